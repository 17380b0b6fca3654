"""Memory: what a prediction or a training step of a U-Net needs, what the device has, and out-of-memory errors.

One place for the estimates, so that the tile budget (``tiling.default_max_input_voxels``), the up-front check of
sizes the user chose (``--tile``, ``--batch-size``, ``--patch-size``, ``--filters``, ``--depth``, the refinement
radius) and the retries after an out-of-memory error agree. The estimates are activation counts per input voxel and
base filter, measured on CPU (``tests/test_memory.py`` checks them against a measured peak) plus the parameters,
their gradients and the optimizer state. The memory a device has is its free memory: on CUDA the GPU's
(``torch.cuda.mem_get_info`` plus what torch's allocator holds unused), elsewhere the host's available memory.

No Qt here; torch is imported only when a device is asked about.
"""

from __future__ import annotations

import math

INFERENCE_FLOATS_PER_VOXEL_AND_FILTER = 6
"""Measured peak of live float activations per input voxel and base filter in an inference pass (the skip
connections of all levels, at most twice the first level's, and the tensors of the level being computed)."""
TRAINING_FLOATS_PER_VOXEL_AND_FILTER = 20
"""Peak floats of a training step per input voxel and base filter: the activations kept for the backward pass
(every convolution, batch norm and activation output of every level, the concatenations) and the gradients of the
largest of them; measured 15 to 22 on CPU for depths 2 to 4 (``tests/test_memory.py`` checks the bound)."""
PARAMETER_COPIES_IN_TRAINING = 5
"""Float copies of the parameters while training: weights, gradients, Adam's two moments, the weight average."""


class DeviceMemoryError(MemoryError, ValueError):
    """The sizes asked for need more memory than the device has, or out-of-memory persisted at the smallest sizes.

    A ``ValueError`` too, so that callers that turn bad settings into one line (the CLI, the widget) do so."""


class OutOfMemoryRetry(UserWarning):
    """A prediction ran out of memory and was redone with smaller tile batches or tiles (the same result)."""


_CPU_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory", "failed to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says an allocation failed: ``torch.OutOfMemoryError`` (CUDA, MPS), a ``MemoryError``, or
    the ``RuntimeError`` torch's CPU allocator raises ("DefaultCPUAllocator: can't allocate memory", "not enough
    memory")."""
    import torch

    if isinstance(error, DeviceMemoryError):
        return False
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _CPU_MESSAGES)


def available_bytes(device=None) -> int | None:
    """Memory the device can still give, in bytes, or None when it cannot be told.

    CUDA: the GPU's free memory plus what torch's caching allocator reserved but does not use. MPS: the recommended
    working set less what the driver allocated. CPU (and the default): the host's available memory (psutil).
    """
    import torch

    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or a platform it cannot read
        return None


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def inference_bytes(model, input_tile, batch_size: int, flips: bool = False) -> int:
    """Estimated peak memory of predicting ``batch_size`` tiles of ``input_tile`` voxels with ``model``: the
    activations, the input batch, the softmax probabilities (twice with flips: the running sum), the parameters."""
    voxels = math.prod(input_tile) * batch_size
    activations = INFERENCE_FLOATS_PER_VOXEL_AND_FILTER * model.config["base_filters"] * voxels
    outputs = (3 if flips else 2) * model.n_classes * voxels
    return 4 * (activations + model.in_channels * voxels + outputs + _parameters(model))


def training_bytes(model, input_tile, batch_size: int) -> int:
    """Estimated peak memory of one training step on ``batch_size`` patches of ``input_tile`` voxels: the kept
    activations and their gradients, the batch, and the parameters with their gradients and optimizer state."""
    voxels = math.prod(input_tile) * batch_size
    activations = TRAINING_FLOATS_PER_VOXEL_AND_FILTER * model.config["base_filters"] * voxels
    batch = (model.in_channels + 3 * model.n_classes) * voxels
    return 4 * (activations + batch + PARAMETER_COPIES_IN_TRAINING * _parameters(model))


def refinement_bytes(n_classes: int, spatial_shape, radius: int, spatial_ndim: int) -> int:
    """Estimated peak memory of the edge refinement (``refine.refine_probabilities``) of ``n_classes`` maps of
    ``spatial_shape`` with ``radius``: one band of rows with its ``2 radius`` halo rows on each side (as
    ``refine.band_rows`` cuts them), the classes read and refined, and about 8 band-sized temporaries."""
    from .refine import band_rows

    band, halo = band_rows(tuple(spatial_shape), radius, spatial_ndim)
    pixels = min(band + 2 * halo, spatial_shape[0]) * math.prod(spatial_shape[1:])
    return 4 * pixels * (2 * n_classes + 8)


def format_bytes(count: float) -> str:
    """``count`` bytes in words: ``"3.2 GiB"``, ``"512 MiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit in ("B", "KiB") else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def check_fits(needed: int, device, what: str, remedy: str) -> None:
    """Raise :class:`DeviceMemoryError` (one line: ``what`` needs..., ``remedy``) when ``needed`` bytes exceed what
    ``device`` has (:func:`available_bytes`); nothing when that cannot be told."""
    available = available_bytes(device)
    if available is not None and needed > available:
        raise DeviceMemoryError(
            f"{what} need about {format_bytes(needed)}, more than the {format_bytes(available)} free on "
            f"{device}: {remedy}"
        )
