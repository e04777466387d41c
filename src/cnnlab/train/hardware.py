"""Device, threads and numeric precision: picked from the config and the machine."""
from __future__ import annotations

import contextlib
import os

import torch

from cnnlab.errors import CnnlabError


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise CnnlabError("--device cuda was asked for but no CUDA GPU is visible to PyTorch "
                          f"(torch {torch.__version__}); use --device auto or cpu")
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


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if choice == "fp32":
        return None
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if choice == "fp16" and device.type == "cpu":
        raise CnnlabError("--precision fp16 needs a CUDA device; on CPU use bf16 (or auto)")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass; BatchNorm and the loss stay float32 under it."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
