"""Device, threads and numeric precision: picked from the config and the machine, and said.

A user's machine may be an AMX Xeon, an AVX2 laptop, a Mac or a free notebook GPU. What runs
on each is decided here, once, with the reason, so the run header and ``config.json`` can say
what ran and why (``describe``).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from cnnlab.core.config import DEVICES
from cnnlab.core.errors import CnnlabError

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first one with bfloat16 instructions.
_ISA_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
# What `--precision bf16` costs on a CPU without bfloat16 instructions, where it is emulated:
# training images/s measured by `python benchmarks/precision.py --rounds 3 --steps 2` on a
# 2-core AMD EPYC (Zen 3, AVX2), 2026-12-01.
EMULATED_BF16_COST = ("8-18x slower than float32 (training on a 2-core AVX2 EPYC: SpeedNet 8 against 146 "
                      "img/s, the lesson's CNN 218 against 1,782)")


# ----------------------------------------------------------------------------- device
def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(choice: str) -> torch.device:
    """``auto``: a CUDA GPU, else an Apple GPU (mps), else the CPU."""
    if choice not in DEVICES:
        raise CnnlabError(f"--device must be one of {', '.join(DEVICES)}; got {choice!r}")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        found = "an Apple GPU (--device mps)" if mps_available() else "only the CPU"
        raise CnnlabError(f"--device cuda was asked for but PyTorch {torch.__version__} sees no CUDA GPU "
                          f"(found {found}); use --device auto, or install a CUDA build of torch on a "
                          f"machine with an NVIDIA GPU")
    if choice == "mps" and not mps_available():
        found = "a CUDA GPU (--device cuda)" if torch.cuda.is_available() else "only the CPU"
        raise CnnlabError(f"--device mps was asked for but PyTorch {torch.__version__} sees no Apple GPU "
                          f"(found {found}); mps needs an Apple-silicon Mac and macOS 12.3+: use --device auto")
    return torch.device(choice)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def borrowed_process() -> Iterator[None]:
    """Put back what a run changes in the process, torch's thread count and its global random
    state (CPU, and CUDA's where it is in use), however the run ends: a library call, from a
    notebook or another program, leaves the process as it found it. Usable as a decorator."""
    threads = torch.get_num_threads()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            torch.set_num_threads(threads)


# glibc's mallopt parameters (malloc.h) and their defaults, restored after training.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = ((_M_TRIM_THRESHOLD, 128 * 1024), (_M_MMAP_MAX, 65536))
_reuse_lock = threading.Lock()
_reuse_depth = 0   # reuse_freed_memory contexts open now, in any thread


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (whose malloc ``mallopt`` tunes), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """While training, glibc's malloc keeps what a step frees for the next step.

    By default it hands large blocks back to the OS (mmap/munmap, heap trimming), so every
    step's activations and gradients fault fresh zeroed pages in again: training steps run
    1.1-1.3x faster without that (``python benchmarks/malloc.py``). Inside, large blocks come
    from the heap and the heap is never trimmed; resident memory levels off after the first
    steps, a little above the default's peak. On the way out glibc's defaults come back and the
    kept memory is released (``malloc_trim``), so a notebook does not hold it after ``fit``.
    Elsewhere (macOS, Windows, musl) nothing changes. Usable as a decorator; nested or
    concurrent uses (a notebook's own around ``fit``, trials in threads) are counted, and only
    the last one out restores the defaults.
    """
    libc = glibc()
    if libc is None:
        yield
        return
    global _reuse_depth
    with _reuse_lock:
        _reuse_depth += 1
        if _reuse_depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                for param, value in _GLIBC_DEFAULTS:
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


@functools.cache
def cpu_name() -> str:
    """The processor's marketing name ("AMD EPYC 7B13"), or the architecture when unknown."""
    if _cpuinfo().get("model name"):
        return _cpuinfo()["model name"]
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> str:
    """The vector ISA torch's own kernels run with (DEFAULT, AVX2, AVX512, ...): the CPU's
    best, unless capped by ATEN_CPU_CAPABILITY."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_has_bf16() -> bool:
    """Native bfloat16 arithmetic (AVX512_BF16 or AMX) that oneDNN and torch may use here.

    oneDNN also "supports" bf16 on AVX-512 chips without those instructions (Skylake, Cascade
    Lake) by converting in software, which is slower than float32: not native.
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISA_WITHOUT_BF16:
        return False
    if not cpu_isa().upper().startswith("AVX512"):   # capped, or a CPU with no 512-bit units
        return False
    flags = _cpuinfo().get("flags")
    if flags is not None and not {"avx512_bf16", "amx_bf16"} & set(flags.split()):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_amx() -> bool:
    """AMX matrix units (Intel Xeon since Sapphire Rapids) that oneDNN may use for bfloat16 here."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap not in ("", "ALL") and "AMX" not in cap:
        return False
    return "amx_bf16" in _cpuinfo().get("flags", "").split() and cpu_has_bf16()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU ({cpu_name()})"
    return cpu_name()


# ----------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """What a run computes in: plain float32, or autocast to ``dtype`` (with loss scaling
    for float16, whose narrow range underflows small gradients)."""
    dtype: torch.dtype | None     # None: float32 throughout
    reason: str                   # why this one, for people: "no native bf16 on this CPU"

    @property
    def name(self) -> str:
        return str(self.dtype or torch.float32).replace("torch.", "")

    @property
    def scaled(self) -> bool:
        """Float16 trains with a GradScaler."""
        return self.dtype == torch.float16

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def choose_precision(choice: str, device: torch.device, *, strict: bool = True) -> Precision:
    """The precision to run ``choice`` (fp32 | bf16 | fp16 | auto) with on ``device``.

    ``strict`` (training) refuses a precision the device cannot run; otherwise (evaluating a
    run on another machine than it trained on) such a choice falls back to ``auto``.
    """
    kind = device.type
    if choice == "fp32":
        return Precision(None, "as asked")
    if choice == "auto":
        if kind == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, "auto: this GPU has bf16")
            return Precision(torch.float16, "auto: no bf16 on this GPU; float16 with loss scaling")
        if kind == "mps":
            return Precision(None, "auto: float32 on Apple GPUs; --precision fp16 to try autocast")
        if cpu_has_bf16():
            return Precision(torch.bfloat16, "auto: native bf16 on this CPU")
        return Precision(None, "auto: no native bf16 on this CPU")
    refusal = None
    if choice == "fp16" and kind == "cpu":
        refusal = ("--precision fp16 needs a GPU (cuda or mps); this run is on the CPU: use --precision auto "
                   "(bf16 where the CPU has it, else float32)")
    elif choice == "bf16" and kind == "mps":
        refusal = "--precision bf16 is not supported on Apple GPUs: use --precision fp16 or fp32 (auto: fp32)"
    elif choice == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        refusal = (f"--precision bf16 needs a GPU with bfloat16 (Ampere or newer); {device_name(device)} has "
                   f"none: use --precision fp16 or auto (float16 with loss scaling)")
    if refusal:
        if strict:
            raise CnnlabError(refusal)
        return choose_precision("auto", device)
    if choice == "bf16":
        if kind == "cpu" and not cpu_has_bf16():
            if strict:
                _warn_once("bf16", f"--precision bf16 on a CPU without native bfloat16 ({cpu_name()}, ISA "
                                   f"{cpu_isa()}) is emulated: {EMULATED_BF16_COST}; --precision auto picks "
                                   f"float32 here")
            return Precision(torch.bfloat16, "as asked; emulated, no native bf16 on this CPU")
        return Precision(torch.bfloat16, "as asked")
    return Precision(torch.float16, "as asked, with loss scaling")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass; BatchNorm and the loss stay float32 under it."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


INIT_LOSS_SCALE = 2.0 ** 16   # torch's default: the scale halves on each overflow until gradients fit


def grad_scaler(device: torch.device, precision: Precision):
    """Loss scaling for float16 (None otherwise): imported only then, torch.amp pulls in more."""
    if not precision.scaled:
        return None
    from torch.amp import GradScaler
    return GradScaler(device.type, init_scale=INIT_LOSS_SCALE)



def describe(device: torch.device, precision: Precision) -> dict[str, str]:
    """What ran, for the run header and config.json."""
    return {"device": str(device), "device_name": device_name(device), "isa": cpu_isa(),
            "precision": precision.name, "precision_reason": precision.reason}
