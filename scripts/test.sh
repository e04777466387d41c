#!/usr/bin/env bash
# The project's tests: the linter, the type checker, the whole suite (the import contract included), then the
# numerics-sensitive files again with PyTorch's kernels capped to AVX2 (as on a laptop without
# AVX-512 or AMX), so a pass here is a pass there.
#   bash scripts/test.sh            # after: bash scripts/setup.sh --test
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks          # unused or undefined names, import order
.venv/bin/python -m mypy                           # src/cnnlab, as configured in pyproject.toml
# Two workers, a file each at a time (module fixtures stay in one process): much of the suite
# waits on subprocesses, servers and the disk, so two share the two cores well.
PARALLEL=(-n 2 --dist loadfile)
.venv/bin/python -m pytest -q "${PARALLEL[@]}" "$@"
echo "tests again as an AVX2 laptop runs them (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2):"
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest -q "${PARALLEL[@]}" "$@" \
    tests/test_distributed.py tests/test_hardware.py tests/test_optim.py tests/test_speednet.py tests/test_ema.py \
    tests/test_augment.py tests/test_callbacks.py tests/test_evaluation.py tests/test_evaluate.py tests/test_recipes.py \
    tests/test_config.py tests/test_checkpoint.py tests/test_signals.py tests/test_runs.py tests/test_files.py \
    tests/test_trainer.py tests/test_export.py tests/test_inference.py tests/test_serve.py
