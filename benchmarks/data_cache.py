"""Seconds to load ../shared/data/cifar10: the first load decodes 60,000 JPEGs, later ones hit the cache.

    python benchmarks/data_cache.py [--repeats 5]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

from cnnlab.data.folder import load_image_folder

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_image_folder(FOLDER, cache_dir=Path(cache))
        first = time.perf_counter() - start
        again = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_image_folder(FOLDER, cache_dir=Path(cache))
            again.append(time.perf_counter() - start)
    print(f"first load (decode 60,000 JPEGs): {first:.2f} s")
    print(f"cached load: median {statistics.median(again):.3f} s over {args.repeats} "
          f"(min {min(again):.3f}, max {max(again):.3f})")


if __name__ == "__main__":
    main()
