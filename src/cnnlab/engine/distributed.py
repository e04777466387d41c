"""Data-parallel training: one process per GPU (or per share of the CPU cores), gradients
averaged every step by PyTorch's DistributedDataParallel.

Launch on one machine or several with torchrun::

    torchrun --nproc-per-node 8 -m cnnlab train --recipe imagenet --data /data/imagenet

or on one machine with ``cnnlab train --nproc N ...``, which starts the N processes itself
(``launch_local``). Every process runs the same ``fit``; what data parallelism changes is here:

- ``setup`` joins the process group the launcher describes in the environment (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA with one GPU per process,
  gloo on CPU with the cores shared out (``threads_per_process``).
- ``training_batches``: every process walks the same seeded permutation and process r takes
  items r, r+N, r+2N... of each global batch of ``batch_size x N`` (``BatchStream.indices``),
  so N processes take exactly the steps one process takes with an N times larger batch.
  ``--batch-size`` is per process; the learning rate and weight decay scaling see the global
  batch (``global_batch_config``). The last incomplete global batch of an epoch is dropped so
  every process averages over the same number of images.
- ``wrap_model``: DDP averages gradients during backward. BatchNorm normalises over each
  process's own batch (as in Goyal et al. 2017's ImageNet-in-an-hour); ``sync_bn`` makes it
  use all processes' batches (CUDA only).
- Only rank 0 writes the run folder and checkpoints. Evaluation is sharded and gathered
  (``gather_shards``). A signal reaching any process is agreed on (``any_rank``), so all
  stop after the same step and rank 0's checkpoint resumes every one of them exactly.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError

LAUNCH_ENV = ("RANK", "WORLD_SIZE")        # set by torchrun (and by launch_local) for each process
GRACE_SECONDS = 30     # after one process fails, how long the others get to exit before SIGKILL
_cpu_group: Any = None  # gloo group for small host-side agreements (the default group under NCCL)


# ----------------------------------------------------------------------------- who am I
def launched() -> bool:
    """Whether a launcher (torchrun, ``launch_local``) started this process as one of several."""
    return all(k in os.environ for k in LAUNCH_ENV)


def launched_world() -> int:
    """How many processes a launcher started this one among (1 when none did), before they join."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that prints and writes the run folder."""
    return rank() == 0


def shard() -> tuple[int, int]:
    return rank(), world_size()


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched() else 1


def rank_key() -> tuple[int, ...]:
    """Appended to a seed so each process draws its own randomness (nothing for one process)."""
    return (rank(),) if is_distributed() else ()


def threads_per_process() -> int:
    """This process's share of the machine's cores: N processes on a CPU must not oversubscribe."""
    from cnnlab.core.hardware import available_cores
    return max(1, available_cores() // local_world_size())


# ----------------------------------------------------------------------------- process group
def setup(device: torch.device) -> torch.device:
    """Join the launcher's process group (once) and return the device this process trains on."""
    global _cpu_group
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise CnnlabError(f"process {local} on this machine has no GPU of its own: "
                              f"{torch.cuda.device_count()} visible, so start at most that many "
                              f"processes per machine (--nproc / --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(teardown)
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD
    return device


def teardown() -> None:
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


def _host_group():
    global _cpu_group
    if _cpu_group is None:   # a group the caller initialised: make the gloo side group now
        _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD
    return _cpu_group


# ----------------------------------------------------------------------------- agreement
def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a host-side all-reduce)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(t.item())


def sum_over_ranks(*values: float | torch.Tensor) -> list[float]:
    """Each value summed over all processes (as plain floats, on every process)."""
    floats = [float(v) for v in values]
    if not is_distributed():
        return floats
    t = torch.tensor(floats, dtype=torch.float64)
    dist.all_reduce(t, group=_host_group())
    return t.tolist()


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Each parameter's gradient averaged over all processes, for steps DDP does not see."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def from_main(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every process (e.g. a run folder named after the clock)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_host_group())
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_host_group())


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling caches), the others after it finished."""
    if is_distributed() and not is_main():
        barrier()
    yield
    if is_distributed() and is_main():
        barrier()


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows ``rank::world`` from each process -> all ``total`` rows in order, on every process."""
    if not is_distributed():
        return local
    world, group = world_size(), _host_group()
    width = torch.tensor([local.shape[1] if len(local) else 0])
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    per = -(-total // world)
    buf = torch.zeros(per, int(width), dtype=torch.float32)
    buf[:len(local)] = local.float().cpu()
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    out = torch.empty(total, int(width), dtype=torch.float32)
    for r, part in enumerate(parts):
        out[r::world] = part[:len(range(r, total, world))]
    return out


# ----------------------------------------------------------------------------- training pieces
def global_batch_config(cfg: Config) -> Config:
    """``cfg`` as the optimizer sees it: the batch one step averages over is every process's.

    ``lr_per_1024`` and the decoupled SGD weight decay scale with this batch, so 8 processes
    of 32 train like one of 256.
    """
    world = world_size()
    return cfg if world == 1 else cfg.replace(batch_size=cfg.batch_size * world)


def training_batches(cfg: Config, data, device: torch.device):
    """This process's training batches: in memory or streamed, sharded when data-parallel."""
    from cnnlab.data.augment import Augmentation
    r, world = shard()
    batches = data.train.train_batches(cfg.batch_size, device, seed=cfg.seed,
                                       aug=Augmentation.from_config(cfg, data.num_classes),
                                       channels_last=cfg.channels_last, drop_last=world > 1, shard=(r, world))
    if len(batches) == 0:
        raise CnnlabError(f"{len(data.train)} training images do not fill one global batch of "
                          f"{cfg.batch_size} x {world} processes: lower --batch-size or the process count")
    return batches


def wrap_model(model: nn.Module, device: torch.device, *, sync_bn: bool = False,
               unused_parameters: bool = False) -> nn.Module:
    """The module the training step calls: ``model`` itself, or DDP around it."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel
    if sync_bn:
        if device.type != "cuda":
            raise CnnlabError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                              "on CPU BatchNorm normalises over each process's batch")
        # Replaces BatchNorm modules below the top one, keeping their parameters and buffers.
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # unused_parameters: some parameters stop taking gradients during training (a frozen whitening bias).
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused_parameters)


def describe(cfg: Config) -> str | None:
    """One header line about data parallelism, or None for one process."""
    if not is_distributed():
        return None
    w = world_size()
    bn = "synchronised (SyncBatchNorm)" if cfg.sync_bn else "per process"
    return (f"  data-parallel: {w} processes ({dist.get_backend()}), batch {cfg.batch_size} per process "
            f"= effective batch {cfg.batch_size * w}; BatchNorm statistics {bn}")


def check_resume_world(saved: int, run: str | Path) -> None:
    now = world_size()
    if saved != now:
        raise CnnlabError(f"{run} was trained by {saved} process(es) and this resume has {now}: exact "
                          f"resume needs the same number (each process's share of every batch depends on "
                          f"it). Resume with `cnnlab train --resume {run}` on one machine (it starts "
                          f"{saved} again) or with the same torchrun --nnodes/--nproc-per-node")


# ----------------------------------------------------------------------------- local launcher
def saved_nproc(run: str | Path) -> int:
    """The ``--nproc`` a run folder was started with (1 when unknown)."""
    from cnnlab.core.run_folder import RunFolder
    try:
        return int(RunFolder(run).saved_config.get("nproc", 1))
    except (CnnlabError, ValueError, TypeError, AttributeError):
        return 1   # resume() itself reports a folder it cannot continue


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(code: int) -> int:
    """A Popen return code as a shell exit status (killed by signal s -> 128 + s)."""
    return 128 - code if code < 0 else code


def launch_local(argv: Sequence[str], nproc: int) -> int:
    """Run ``cnnlab ARGV`` as ``nproc`` data-parallel processes on this machine; their status.

    What torchrun does for one machine, without its agent: the environment for
    ``init_process_group``, SIGINT/SIGTERM forwarded to every process (they checkpoint and
    stop after the same step), and when one process fails the others are stopped.
    """
    port = _free_port()
    cmd = [sys.executable, "-m", "cnnlab", *argv]
    procs: list[subprocess.Popen] = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(procs)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _wait(procs: list[subprocess.Popen]) -> int:
    first_failure: tuple[int, int] | None = None      # (rank, status)
    failed_at = 0.0
    while any(p.poll() is None for p in procs):
        if first_failure is None:
            for r, p in enumerate(procs):
                if p.returncode not in (None, 0):
                    first_failure, failed_at = (r, _status(p.returncode)), time.monotonic()
                    for q in procs:
                        if q.poll() is None:
                            q.terminate()
                    break
        elif time.monotonic() - failed_at > GRACE_SECONDS:
            for q in procs:
                if q.poll() is None:
                    q.kill()
        time.sleep(0.05)
    codes = [_status(p.returncode) for p in procs]
    if first_failure is None:
        first_failure = next(((r, c) for r, c in enumerate(codes) if c), (0, 0))
    if len(set(codes)) > 1:
        print(f"cnnlab: process {first_failure[0]} of {len(procs)} exited with status {first_failure[1]}; "
              f"the others were stopped", file=sys.stderr)
    return first_failure[1]
