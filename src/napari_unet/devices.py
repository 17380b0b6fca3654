"""Device choice, CPU thread count, mixed-precision policy and releasing cached device memory."""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name="auto") -> torch.device:
    """Turn a device name into a :class:`torch.device`.

    ``"auto"`` (or None) picks CUDA when available, then Apple MPS, then the CPU.
    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` are checked: asking for a device this
    machine or this torch build does not have raises :class:`ValueError` with a message
    saying what is available. A :class:`torch.device` is accepted and checked too.
    """
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA support" if torch.version.cuda is None else "sees no CUDA GPU"
            raise ValueError(
                f"device 'cuda' is not available: this torch {torch.__version__} {build}; use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r} is not available: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(
                "device 'mps' is not available (needs Apple silicon and an MPS-enabled torch); use 'cpu' or 'auto'"
            )
        return device
    raise ValueError(f"unsupported device {name!r}; expected one of {', '.join(DEVICE_CHOICES)}")


def available_cores() -> int:
    """Number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_cpu_threads() -> int:
    """Torch CPU threads for work next to a GUI: all cores but one (at least 1)."""
    return max(1, available_cores() - 1)


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively here (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device, cpu_bfloat16: bool = False) -> torch.dtype | None:
    """Autocast dtype for mixed-precision training on ``device``, or None for full float32.

    float16 on CUDA; on a CPU bfloat16 only when asked (``cpu_bfloat16``) and where oneDNN runs it natively
    (emulated it is slower than float32); None on MPS (bfloat16 autocast is unsupported or unreliable on
    MPS, a frequent crash in other tools, so MPS runs in float32).
    """
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_bfloat16 and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


def release_device_memory(device) -> None:
    """Return the memory torch's allocator caches on ``device`` to the driver after work there (no-op on the CPU),
    so that a finished prediction does not keep the GPU memory other programs (and the next training) need."""
    kind = getattr(device, "type", str(device))
    if kind.startswith("cuda"):
        torch.cuda.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def describe_device(name, cpu_threads: int | None = None) -> str:
    """What runs for the device choice ``name`` (see :func:`resolve_device`), in words for a status line:
    ``"cpu, 3 threads"`` (``cpu_threads``, default torch's current count), ``"cuda:0 (NVIDIA H200)"``, ``"mps"``.
    Raises ``ValueError`` as :func:`resolve_device` does for a device this machine lacks."""
    device = resolve_device(name)
    if device.type == "cpu":
        threads = torch.get_num_threads() if cpu_threads is None else cpu_threads
        return f"cpu, {threads} thread{'s' * (threads != 1)}"
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
