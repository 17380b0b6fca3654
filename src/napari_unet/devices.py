"""Device choice, CPU thread count, mixed-precision policy and releasing cached device memory."""

from __future__ import annotations

import os
import platform
import time

import torch

from .precisions import PRECISIONS

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
BFLOAT16_MIN_SPEEDUP = 1.3
"""Automatic precision runs a CPU in bfloat16 only when a bfloat16 convolution measured at least this much faster
than float32 there (:func:`cpu_bfloat16_pays`): below it the precision lost is not worth the time saved."""


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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name" on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def measure_cpu_bfloat16_speedup(repeats: int = 3) -> float:
    """float32 time / bfloat16-autocast time of a small stack of 3x3 convolutions on this CPU (best of
    ``repeats``; about a second), with torch's current thread count."""
    convs = torch.nn.Sequential(*(torch.nn.Conv2d(c, 32, 3) for c in (16, 32, 32))).eval()
    convs = convs.to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 132, 132).contiguous(memory_format=torch.channels_last)

    def best(dtype) -> float:
        times = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            convs(x)  # oneDNN builds its kernels on the first call
            for _ in range(repeats):
                start = time.perf_counter()
                convs(x)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(None) / best(torch.bfloat16)


def cpu_bfloat16_pays() -> bool:
    """Whether bfloat16 is worth it on this CPU: oneDNN runs it natively (:func:`cpu_has_native_bfloat16`) and a
    short measurement (:func:`measure_cpu_bfloat16_speedup`, once per CPU model, torch version and thread count,
    kept by ``machine_cache``) found it at least ``BFLOAT16_MIN_SPEEDUP`` times faster than float32. Native support
    alone is not enough: some CPUs decode bfloat16 instructions at half the float32 rate."""
    if not cpu_has_native_bfloat16():
        return False
    from .machine_cache import cached

    speedup = cached(bfloat16_speedup_key(torch.get_num_threads()), measure_cpu_bfloat16_speedup)
    return float(speedup) >= BFLOAT16_MIN_SPEEDUP


def bfloat16_speedup_key(threads: int) -> str:
    """The ``machine_cache`` key of :func:`measure_cpu_bfloat16_speedup`'s answer for this CPU model and torch
    version with ``threads`` torch threads."""
    return f"cpu bfloat16 speedup | {cpu_model()} | torch {torch.__version__} | {threads} threads"


def prediction_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype a prediction runs the network in on ``device``, or None for float32.

    ``precision`` is one of ``PRECISIONS``. "auto": float16 on CUDA, bfloat16 on a CPU where it pays
    (:func:`cpu_bfloat16_pays`), float32 otherwise (MPS included). "bfloat16" and "float16" are honoured where
    torch's autocast runs them (on a CPU without native support they are emulated: slower, and rounded differently
    from native kernels); reduced precision on MPS is refused (unreliable there). The probabilities are float32
    whatever the precision: the softmax runs on float32 logits.
    """
    device = device if isinstance(device, torch.device) else torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_bfloat16_pays():
            return torch.bfloat16
        return None
    if device.type == "mps":
        raise ValueError(f"precision {precision} is not supported on MPS; use float32 or auto")
    return torch.bfloat16 if precision == "bfloat16" else torch.float16


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
