"""Tile sizes from measurement: the fastest legal tile of a network on this machine, measured once and kept.

Larger tiles recompute less of the halo, but which tile runs fastest also depends on the CPU's caches, on the
convolution kernels oneDNN or cuDNN picks for a shape, on the memory format and on the precision, so a rule cannot
know it. On first use for a network architecture on a device (``tiling.predict_tiled(tile_tuning=True)``, the
default of ``PredictionSettings``), :func:`measure_tiles` times the network on a few cubic (square) tiles on its
pooling grid, from the largest that the memory budget and ``MAX_MEASURED_VOXELS`` allow down to those whose output
is about half their input along each axis, and :func:`tuned_tile` keeps the one with the most output voxels per
second in ``machine_cache``, under a key of everything the answer depends on (device and CPU model, torch version,
threads, precision, the network's shape, the budget). The result changes speed only: tiles are exact whatever their
size.

Each candidate is timed once after a warm-up pass, in batches of at most ``MAX_BATCH`` tiles (about the largest tile's
voxels each), from the largest down, and the search ends after ``PATIENCE`` candidates in a row slower than the
fastest so far: where the largest tile is the fastest, a measurement costs about six passes of it.
"""

from __future__ import annotations

import math
import time

import torch

MAX_BATCH = 4
"""Tiles per timed pass at most (the tuned batch size: a larger one gained nothing measurable on a CPU, and the
measurement's cost grows with it)."""
MIN_OUTPUT_SHARE = 0.5
"""The smallest candidate's output is at least this share of its input along each axis (smaller ones mostly
recompute halo)."""
MIN_CANDIDATES = 3
"""Tiles timed at least (where the grid has that many below the largest)."""
PATIENCE = 2
"""Candidates in a row slower than the fastest so far that end the search (throughput changes smoothly with the
tile's size; one slower candidate can be the timer's noise)."""
MAX_MEASURED_VOXELS = 1 << 22
"""The largest input tile timed (2048² in 2D, 161³ in 3D): it bounds the measurement's cost whatever the memory
budget. When it is the fastest, the whole budget is used (past it larger tiles only recompute less halo)."""


def candidate_strides(model, max_input_voxels: int) -> list[tuple[int, ...]]:
    """Cubic output strides on ``model``'s pooling grid whose legal input tile fits ``max_input_voxels``, ascending:
    the largest that fits, then about half the voxels each, down to the last whose output is ``MIN_OUTPUT_SHARE`` of
    its input along an axis, and at least ``MIN_CANDIDATES`` of them where the grid allows."""
    grid, ndim = model.grid, model.ndim

    def voxels(side: int) -> int:
        return math.prod(model.legal_input_shape((side,) * ndim))

    def share(side: int) -> float:
        return model.legal_output_shape((side,) * ndim)[0] / model.legal_input_shape((side,) * ndim)[0]

    side = grid
    while voxels(side + grid) <= max_input_voxels:
        side += grid
    sides, ratio = [side], 2 ** (1 / ndim)
    while side > grid:
        side = min(side - grid, round(side / ratio / grid) * grid)
        if side < grid or (share(side) < MIN_OUTPUT_SHARE and len(sides) >= MIN_CANDIDATES):
            break
        sides.append(max(side, grid))
    return [(s,) * ndim for s in reversed(sides)]


def measure_tiles(net, candidates, device, dtype, max_input_voxels: int) -> list[dict]:
    """Output voxels per second of ``net`` (an eval-mode ``UNet`` on ``device``, in the memory format a prediction
    uses) on ``candidates`` (output strides, ascending), in batches of ``max_input_voxels`` over the input tile, at
    most ``MAX_BATCH``: ``[{"stride", "batch", "voxels_per_second"}]`` of those timed, ascending. Timed from the
    largest down, until ``PATIENCE`` in a row are slower than the fastest so far; a candidate that runs out of
    device memory is skipped (a smaller one may fit), and when none fits that error is raised."""
    from .devices import release_device_memory
    from .memory import is_out_of_memory

    memory_format = torch.channels_last if net.ndim == 2 else torch.channels_last_3d
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    results, slower, last_error = [], 0, None
    with torch.inference_mode(), autocast:
        for stride in reversed(candidates):
            input_tile = net.legal_input_shape(stride)
            batch = max(1, min(MAX_BATCH, max_input_voxels // math.prod(input_tile)))
            try:
                seconds = _timed_pass(net, batch, input_tile, device, memory_format)
            except Exception as error:  # only out-of-memory is passed over
                if not is_out_of_memory(error):
                    raise
                last_error = error
                release_device_memory(device)
                continue
            speed = batch * math.prod(net.legal_output_shape(stride)) / seconds
            slower = slower + 1 if results and speed <= max(r["voxels_per_second"] for r in results) else 0
            results.append({"stride": list(stride), "batch": batch, "voxels_per_second": speed})
            if slower >= PATIENCE:
                break
    if not results and last_error is not None:
        raise last_error
    return results[::-1]


def _timed_pass(net, batch: int, input_tile, device, memory_format) -> float:
    """Seconds of one pass of ``net`` over a random batch, after a first pass (the kernels are chosen and built on
    the first call)."""
    x = torch.randn(batch, net.in_channels, *input_tile, device=device).contiguous(memory_format=memory_format)
    net(x)
    _synchronize(device)
    start = time.perf_counter()
    net(x)
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tuning_key(model, device, dtype, max_input_voxels: int) -> str:
    """The ``machine_cache`` key of a tuning: the device (the CPU model and thread count, or the GPU's name), torch,
    the precision, what the network's speed depends on, and the memory budget."""
    from .devices import cpu_model

    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        where = f"{device.type} {cpu_model()} {torch.get_num_threads()} threads"
    shape = {k: model.config[k] for k in sorted(model.config) if k not in ("temperature", "dropout")}
    return f"tile | {where} | torch {torch.__version__} | {dtype or 'float32'} | {shape} | {max_input_voxels} voxels"


def tuned_tile(net, device, dtype, max_input_voxels: int) -> tuple[int, int]:
    """``(max_input_voxels, batch_size)`` of the fastest measured tile of ``net`` (:func:`measure_tiles` of the
    candidates up to ``MAX_MEASURED_VOXELS``, once per :func:`tuning_key`, kept by ``machine_cache``): the input
    voxels of its tile, for ``tiling.plan_tiles`` (the whole budget when the largest candidate won), and its batch."""
    from .machine_cache import cached

    def measure():
        candidates = candidate_strides(net, min(max_input_voxels, MAX_MEASURED_VOXELS))
        results = measure_tiles(net, candidates, device, dtype, max_input_voxels)
        best = max(results, key=lambda r: r["voxels_per_second"])
        if tuple(best["stride"]) == tuple(candidates[-1]):
            return [max_input_voxels, best["batch"]]
        return [math.prod(net.legal_input_shape(tuple(best["stride"]))), best["batch"]]

    voxels, batch = cached(tuning_key(net, device, dtype, max_input_voxels), measure)
    return int(voxels), int(batch)
