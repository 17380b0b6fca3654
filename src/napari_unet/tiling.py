"""Overlap-tile prediction with a valid-padding U-Net.

Each output tile is predicted from an input tile that carries the network's full context (the halo)
around it. Context that lies outside the image is filled by mirroring (numpy ``np.pad(mode="reflect")``
semantics), and only there: interior tiles read the real neighbouring pixels. Tiles start on a grid of
``2**depth`` pixels, so every max-pooling sees the same pixel pairs as in one whole-image pass, and the
output tiles abut exactly. The tiled prediction therefore equals a whole-image prediction on the
reflect-padded image, up to float rounding; no blending is needed and no pixel is predicted twice
(except the few pixels a legal output tile has beyond its stride).

The planning is pure arithmetic (:func:`mirror_index`, :func:`plan_tiles`); :func:`predict_tiled` runs
the network over the plan in batches and writes each tile's centre into any array-like ``out``
(numpy, memmap, zarr), so memory stays bounded by the tile batch.

Why own code: MONAI's ``sliding_window_inference`` assumes an output as large as the input and blends overlapping
windows, so a valid-padding network's smaller output is not overlap-tile there; the tile arithmetic that makes the
tiles of a valid U-Net abut exactly (legal sizes, the pooling grid, mirroring at the border only, flips per tile)
is specific to this network and a few lines here (docs/benchmarks.md compares the speed with MONAI's).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .devices import prediction_dtype, release_device_memory
from .memory import (
    INFERENCE_FLOATS_PER_VOXEL_AND_FILTER,
    DeviceMemoryError,
    OutOfMemoryRetry,
    available_bytes,
    check_fits,
    inference_bytes,
    is_out_of_memory,
    refinement_bytes,
)
from .refine import AUTO, DEFAULT_EPS, refine_probabilities

DEFAULT_MEMORY_BYTES = 2 * 1024**3
"""Activation memory a tile batch may use by default (it sets the default tile and batch size); less on a device
with little free memory (:func:`default_memory_bytes`)."""


class PredictionStopped(RuntimeError):
    """Raised by :func:`predict_tiled` when ``should_stop()`` returned True."""


def mirror_index(index, size: int) -> np.ndarray:
    """Map (possibly out-of-range) indices into ``[0, size)`` like ``np.pad(mode="reflect")``.

    The edge pixel is not repeated, and pads wider than the image reflect back and forth, exactly as
    numpy does. A size-1 axis maps every index to 0.
    """
    index = np.asarray(index)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)


@dataclass(frozen=True)
class TilePlan:
    """How one image is cut into tiles.

    ``stack_shape`` holds the leading axes predicted slice by slice (a 2D model on a 3D stack);
    the remaining axes, ``shape``, are tiled. Tile ``k`` along an axis predicts the output pixels
    ``[k * stride, (k + 1) * stride)`` from the input pixels ``[k * stride - halo, k * stride - halo + input_tile)``.
    A plan of a region of the image (``plan_tiles(region=...)``) counts those from ``offset`` (the region's start,
    per spatial axis, stack axes first) and mirrors at the image's border, ``bounds`` (its tiled axes), not the
    region's: the region's tiles are the image's, read with real context where the image has it.
    """

    stack_shape: tuple[int, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    output_tile: tuple[int, ...]
    input_tile: tuple[int, ...]
    halo: tuple[int, ...]
    offset: tuple[int, ...] = ()
    bounds: tuple[int, ...] = ()

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of tiles along each tiled axis."""
        return tuple(math.ceil(n / s) for n, s in zip(self.shape, self.stride))

    def tiles(self):
        """Iterate ``(stack_index, output_origin)`` over every tile of every slice."""
        origins = list(itertools.product(*[range(0, c * s, s) for c, s in zip(self.counts, self.stride)]))
        for stack_index in np.ndindex(*self.stack_shape):
            for origin in origins:
                yield stack_index, origin

    def __len__(self):
        return math.prod(self.stack_shape) * math.prod(self.counts)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_tiles(model, spatial_shape, tile_shape=None, max_input_voxels=None, region=None) -> TilePlan:
    """Plan the tiles for an image of ``spatial_shape`` (without channels).

    ``tile_shape`` is the wanted output tile (rounded up to the ``2**depth`` grid). Without it, tiles are as
    large as ``max_input_voxels`` allows (larger tiles recompute less halo), spread evenly over the image.
    ``region`` (one slice per spatial axis, steps of 1; tiled axes starting on the ``2**depth`` grid) plans only
    the tiles of that part of the image, with its context read from the image (``blockwise.py``'s blocks).
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if region is not None:
        return _region_plan(model, spatial_shape, tile_shape, max_input_voxels, region)
    if len(spatial_shape) not in (model.ndim, model.ndim + 1):
        raise ValueError(
            f"a {model.ndim}D model predicts images with {model.ndim} or {model.ndim + 1} spatial axes, "
            f"got shape {spatial_shape}"
        )
    if min(spatial_shape) < 1:
        raise ValueError(f"cannot predict an empty image of shape {spatial_shape}")
    stack_shape, shape = spatial_shape[: -model.ndim], spatial_shape[-model.ndim :]
    grid, halo = model.grid, model.halo

    if tile_shape is not None:
        tile_shape = (tile_shape,) * model.ndim if isinstance(tile_shape, int) else tuple(tile_shape)
        if len(tile_shape) != model.ndim or min(tile_shape) < 1:
            raise ValueError(f"tile_shape needs {model.ndim} positive sizes, got {tile_shape}")
        stride = [_round_up(min(t, n), grid) for t, n in zip(tile_shape, shape)]
    else:
        if max_input_voxels is None:
            max_input_voxels = default_max_input_voxels(model)
        counts = [1] * model.ndim
        stride = [_round_up(n, grid) for n in shape]
        while True:
            input_tile = model.legal_input_shape(stride)
            if math.prod(input_tile) <= max_input_voxels or max(stride) <= grid:
                break
            axis = int(np.argmax(stride))
            counts[axis] += 1
            stride[axis] = _round_up(math.ceil(shape[axis] / counts[axis]), grid)
    output_tile = model.legal_output_shape(stride)
    return TilePlan(
        stack_shape=stack_shape,
        shape=shape,
        stride=tuple(stride),
        output_tile=output_tile,
        input_tile=tuple(o + 2 * h for o, h in zip(output_tile, halo)),
        halo=tuple(halo),
    )


def _region_plan(model, spatial_shape, tile_shape, max_input_voxels, region) -> TilePlan:
    """:func:`plan_tiles` of ``region`` of an image of ``spatial_shape``."""
    if len(region) != len(spatial_shape):
        raise ValueError(f"region needs one slice per spatial axis of {spatial_shape}, got {region}")
    bounds = [s.indices(n) for s, n in zip(region, spatial_shape)]
    if any(step != 1 or stop <= start for start, stop, step in bounds):
        raise ValueError(f"region {region} is empty or has steps within {spatial_shape}")
    offset = tuple(start for start, _, _ in bounds)
    if any(o % model.grid for o in offset[-model.ndim :]):
        raise ValueError(f"region {region} does not start on the {model.grid}-pixel grid of the model")
    extent = tuple(stop - start for start, stop, _ in bounds)
    plan = plan_tiles(model, extent, tile_shape, max_input_voxels)
    return dataclasses.replace(plan, offset=offset, bounds=spatial_shape[-model.ndim :])


def default_memory_bytes(device=None) -> int:
    """``DEFAULT_MEMORY_BYTES``, or less when the device has little free memory (at least 256 MiB): a quarter of
    the host's available memory on the CPU (and MPS, which shares it), so that the rest of a small machine (napari,
    the outputs) keeps room; half of the GPU's free memory on CUDA (``memory.available_bytes``), where host RAM
    says nothing about what fits."""
    kind = "cpu" if device is None else getattr(device, "type", str(device).split(":")[0])
    try:
        available = available_bytes(device if kind == "cuda" else None)
    except RuntimeError:  # a CUDA driver that cannot answer: the fixed default
        available = None
    if available is None:
        return DEFAULT_MEMORY_BYTES
    share = available // 2 if kind == "cuda" else available // 4
    return max(256 * 1024**2, min(DEFAULT_MEMORY_BYTES, share))


def default_max_input_voxels(model, memory_bytes: int | None = None, device=None) -> int:
    """Largest input tile (in voxels) whose activations fit ``memory_bytes`` (default: :func:`default_memory_bytes`
    of ``device``)."""
    memory_bytes = default_memory_bytes(device) if memory_bytes is None else memory_bytes
    base_filters = model.config["base_filters"]
    return max(1, memory_bytes // (4 * INFERENCE_FLOATS_PER_VOXEL_AND_FILTER * base_filters))


def smaller_plan(model, plan: TilePlan) -> TilePlan | None:
    """The plan with the output stride of its longest axis halved (on the ``2**depth`` grid), for a retry after an
    out-of-memory error; None when no axis can be halved so that the input tile gets smaller (the smallest legal
    tile). Tiles abut exactly whatever their size, so the prediction stays the same."""
    voxels = math.prod(plan.input_tile)
    for axis in sorted(range(len(plan.stride)), key=lambda a: -plan.stride[a]):
        tile = list(plan.stride)
        tile[axis] = max(model.grid, _round_up(tile[axis] // 2, model.grid))
        smaller = plan_tiles(model, plan.stack_shape + plan.shape, tuple(tile))
        if math.prod(smaller.input_tile) < voxels:
            return dataclasses.replace(smaller, offset=plan.offset, bounds=plan.bounds)
    return None


def read_tile(image, plan: TilePlan, stack_index, origin, channel_axis: bool) -> np.ndarray:
    """Read one input tile ``(channels, *input_tile)`` as float32, mirroring only outside the image."""
    local = []
    slices = []
    if plan.offset:  # a region's plan: its tiles' places in the image
        lead = len(plan.stack_shape)
        stack_index = tuple(i + o for i, o in zip(stack_index, plan.offset[:lead]))
        origin = tuple(i + o for i, o in zip(origin, plan.offset[lead:]))
    for o, h, size, n in zip(origin, plan.halo, plan.input_tile, plan.bounds or plan.shape):
        index = mirror_index(np.arange(o - h, o - h + size), n)
        low = int(index.min())
        slices.append(slice(low, int(index.max()) + 1))
        local.append(index - low)
    key = ((slice(None),) if channel_axis else ()) + tuple(stack_index) + tuple(slices)
    block = np.asarray(image[key], dtype=np.float32)
    if not channel_axis:
        block = block[None]
    return block[(slice(None),) + np.ix_(*local)]


def flip_transforms(ndim: int) -> list[tuple[tuple[int, ...], bool]]:
    """The test-time transforms as ``(flipped tensor dims, transpose last two)`` for an ``ndim``-D network.

    2D: the 8 symmetries of the square (flips of y and x, with and without transposition). 3D: the 8 flip
    combinations of z, y and x, without transposition (volumes are often anisotropic).
    """
    axes = tuple(range(-ndim, 0))
    flips = [tuple(a for a, keep in zip(axes, mask) if keep) for mask in itertools.product((False, True), repeat=ndim)]
    transposes = (False, True) if ndim == 2 else (False,)
    return [(f, t) for f in flips for t in transposes]


def _apply(tensor: torch.Tensor, transform, inverse: bool = False) -> torch.Tensor:
    """Flip then transpose ``tensor`` (``(batch, channels, *spatial)``), or undo that with ``inverse``."""
    dims, transpose = transform
    if not inverse and dims:
        tensor = torch.flip(tensor, dims)
    if transpose:
        tensor = tensor.transpose(-1, -2)
    if inverse and dims:
        tensor = torch.flip(tensor, dims)
    return tensor


def predict_tiled(
    model,
    image,
    *,
    tile_shape=None,
    batch_size: int | None = None,
    device=None,
    out=None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    precision: str = "float32",
    test_time_flips: bool | Sequence[tuple] = False,
    refine_radius: int | str = 0,
    refine_eps: float = DEFAULT_EPS,
    region: tuple[slice, ...] | None = None,
    tile_tuning: bool = False,
) -> np.ndarray:
    """Softmax probabilities of ``model`` over ``image`` by exact overlap-tile prediction.

    Parameters
    ----------
    model : UNet
        The network; it is not modified (an eval-mode copy with folded batch norm runs).
    image : array-like
        ``(*spatial)``, or ``(channels, *spatial)`` when ``model.in_channels > 1``; ``spatial`` has
        ``model.ndim`` axes, or one more for a stack that a 2D model predicts slice by slice. It is used
        as given (cast to float32): normalise the whole image first (``napari_unet.normalize``).
    tile_shape : int or tuple, optional
        Output tile shape; rounded up to a multiple of ``2**depth``. Default: as large as memory allows.
    batch_size : int, optional
        Tiles per forward pass. Default: as many as the memory budget allows.
    device : str or torch.device, optional
        Where the network runs ("auto", "cpu", "cuda", "mps"); default: the model's device.
    out : array-like, optional
        ``(n_classes, *spatial)`` array to write into (numpy, memmap, zarr...). Default: a new float32 array.
    progress : callable, optional
        ``progress(done_tiles, total_tiles)``, called after every batch.
    should_stop : callable, optional
        Polled before every batch; when it returns True, :class:`PredictionStopped` is raised.
    precision : str
        What the network runs in (``devices.prediction_dtype``): "float32" (default), "auto" (float16 on CUDA,
        bfloat16 on a CPU where it pays), "bfloat16" or "float16" autocast. The softmax runs on float32 logits
        and the probabilities are float32; tiles stay exact in every precision (a tiled pass equals a whole-image
        pass in the same precision).
    test_time_flips : bool or sequence
        Average the probabilities over the mirror flips of the image (and, in 2D, its transpositions):
        8 network passes per tile in 2D and 3D (:func:`flip_transforms`), so 8 times slower. Tiles stay
        exact: the result equals the average of whole-image passes over the flipped reflect-padded image,
        because a legal input tile has an even length at every pooling level and so pools the same pixel
        pairs whichever end it is read from. A list of some of :func:`flip_transforms` averages those only
        (``calibration.held_out_patch`` predicts each pass on its own).
    refine_radius, refine_eps : int or "auto", float
        When ``refine_radius`` is not 0, the assembled probabilities are snapped to the image's edges by
        :func:`napari_unet.refine.refine_probabilities` (a guided filter with ``image`` as the guide, read
        band by band; exact, so tiled and whole-image results still agree); "auto" fits the window to the
        width of the predicted structures (:func:`napari_unet.refine.auto_radius`). 0 (the default) leaves the
        network's probabilities as they are.
    region : tuple of slices, optional
        Predict only this part of the image (one slice per spatial axis; the tiled axes start on the ``2**depth``
        grid), with real context from the image around it and mirroring only at the image's border, so the result
        equals that part of the whole-image prediction; ``out`` then has the region's shape. Not with
        ``refine_radius`` (the refinement of a region needs context of its own: ``blockwise.predict_block``).
    tile_tuning : bool
        Without ``tile_shape``, for an image the memory budget cuts into more than one tile: tiles no larger than the
        fastest one measured for this network on this device (``tile_tuning.tuned_tile``: timed on first use, kept
        per machine), in its batch size unless ``batch_size`` is given; False: as large as the memory budget allows.
        Speed only: the result is the same.

    Returns
    -------
    The array written into (``out`` when given).
    """
    channel_axis = model.in_channels > 1
    image_shape = tuple(image.shape)
    if channel_axis:
        if len(image_shape) < 1 or image_shape[0] != model.in_channels:
            raise ValueError(
                f"the model expects {model.in_channels} channels first, got an image of shape {image_shape}"
            )
        spatial_shape = image_shape[1:]
    else:
        spatial_shape = image_shape
    if device is None:
        device = next(model.parameters()).device
    elif device == "auto":
        from .devices import resolve_device

        device = resolve_device("auto")
    device = torch.device(device)
    budget = default_max_input_voxels(model, device=device)
    if region is not None and refine_radius:
        raise ValueError("predict_tiled refines whole images only; refine a region with blockwise.predict_block")
    # Channels-last lets oneDNN/cuDNN pick faster convolution kernels; results are unchanged.
    memory_format = torch.channels_last if model.ndim == 2 else torch.channels_last_3d
    dtype = prediction_dtype(precision, device)
    net, tuned_batch = None, None  # the network is copied once the sizes are known to fit, unless tuning needs it
    plan = plan_tiles(model, spatial_shape, tile_shape, max_input_voxels=budget, region=region)
    if tile_tuning and tile_shape is None and len(plan) > 1:  # one tile: the image's size, nothing to choose
        from .tile_tuning import tuned_tile

        net = model.inference_copy().to(device, memory_format=memory_format)
        budget, tuned_batch = tuned_tile(net, device, dtype, budget)
        plan = plan_tiles(model, spatial_shape, tile_shape, max_input_voxels=budget, region=region)
    if region is not None:
        spatial_shape = plan.stack_shape + plan.shape
    chosen_batch = batch_size is not None
    if batch_size is None:
        batch_size = tuned_batch or max(1, budget // math.prod(plan.input_tile))
    batch_size = max(1, min(int(batch_size), len(plan)))
    _check_sizes(model, plan, batch_size, device, test_time_flips, tile_shape is not None or chosen_batch)
    if refine_radius != AUTO and refine_radius:  # "auto" is at most refine.MAX_AUTO_RADIUS
        check_fits(
            refinement_bytes(model.n_classes, spatial_shape, int(refine_radius), model.ndim),
            "cpu",
            f"the edge refinement with radius {refine_radius}",
            "choose a smaller refinement radius (--refine-radius)",
        )

    if out is None:
        out = np.empty((model.n_classes, *spatial_shape), dtype=np.float32)
    elif tuple(out.shape) != (model.n_classes, *spatial_shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(model.n_classes, *spatial_shape)}")

    if net is None:
        net = model.inference_copy().to(device, memory_format=memory_format)
    if should_stop is not None:  # a stop takes effect within one layer, not after a whole (flipped) batch
        for layer in net.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d)):
                layer.register_forward_pre_hook(lambda *_: _stop_if(should_stop, "during a tile batch"))
    run = _TileRun(net, image, out, channel_axis, device, memory_format, progress, should_stop, dtype, test_time_flips)
    first, done = (plan.input_tile, batch_size), 0
    while True:
        try:
            done = run.predict(plan, batch_size, done)
            break
        except Exception as error:  # only out-of-memory is retried, the rest raised again
            if not is_out_of_memory(error):
                raise
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        # outside the except clause: the failed batch's tensors are gone with the traceback before memory is released
        release_device_memory(device)
        if batch_size > 1:
            batch_size //= 2
            continue
        smaller = smaller_plan(model, plan)
        if smaller is None:
            raise DeviceMemoryError(
                f"out of memory on {device} even with the smallest legal tiles ({_size(plan.input_tile)} input pixels) "
                f"one per pass ({reason}); free memory on the device, predict on another (--device), or use a "
                "smaller model: --tile and --batch-size cannot go lower"
            )
        plan, done = smaller, 0
    if (plan.input_tile, batch_size) != first:
        warnings.warn(
            f"out of memory on {device} with tiles of {_size(first[0])} input pixels in batches of {first[1]}: "
            f"predicted with tiles of {_size(plan.input_tile)} in batches of {batch_size} instead (the same result; "
            f"--tile {' '.join(map(str, plan.stride))} --batch-size {batch_size} starts there)",
            OutOfMemoryRetry,
            stacklevel=2,
        )
    if refine_radius:
        _stop_if(should_stop, f"after {len(plan)} tiles, before refinement")
        refine_probabilities(
            out,
            image,
            spatial_ndim=model.ndim,
            radius=refine_radius,
            eps=refine_eps,
            out=out,
            should_stop=should_stop,
        )
    return out


def _size(shape) -> str:
    return "x".join(map(str, shape))


def _stop_if(should_stop, when: str) -> None:
    if should_stop is not None and should_stop():
        raise PredictionStopped(f"prediction stopped {when}")


def _check_sizes(model, plan: TilePlan, batch_size: int, device, flips: bool, chosen: bool) -> None:
    """A :class:`~napari_unet.memory.DeviceMemoryError` before anything is allocated when tiles or a batch size the
    caller chose need more memory than ``device`` has (the default sizes come from its free memory)."""
    if chosen:
        check_fits(
            inference_bytes(model, plan.input_tile, batch_size, flips),
            device,
            f"tiles of {_size(plan.input_tile)} input pixels in batches of {batch_size}",
            "choose a smaller tile or batch size (--tile, --batch-size), or leave them out: sizes from the free memory",
        )


@dataclass
class _TileRun:
    """The network pass over a tile plan, written into ``out``: run again with another plan or batch size after an
    out-of-memory error (``predict_tiled``)."""

    net: torch.nn.Module
    image: object
    out: object
    channel_axis: bool
    device: torch.device
    memory_format: torch.memory_format
    progress: Callable[[int, int], None] | None
    should_stop: Callable[[], bool] | None
    dtype: torch.dtype | None
    flips: bool | Sequence[tuple]

    def predict(self, plan: TilePlan, batch_size: int, done: int) -> int:
        """Predict the tiles of ``plan`` from the ``done``-th on, ``batch_size`` per pass; returns the tiles done."""
        if self.flips is True:
            transforms = flip_transforms(self.net.ndim)
        else:
            transforms = list(self.flips) if self.flips else [((), False)]
        total = len(plan)
        tiles = itertools.islice(plan.tiles(), done, None)
        memory_format = self.memory_format
        enabled = self.dtype is not None
        autocast = torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=enabled)
        with torch.inference_mode(), autocast:
            while done < total:
                _stop_if(self.should_stop, f"after {done} of {total} tiles")
                batch = list(itertools.islice(tiles, batch_size))
                inputs = np.stack([read_tile(self.image, plan, s, o, self.channel_axis) for s, o in batch])
                inputs = torch.from_numpy(inputs).to(self.device, memory_format=memory_format)
                total_probabilities = None
                for transform in transforms:
                    logits = self.net(_apply(inputs, transform).contiguous(memory_format=memory_format))
                    p = _apply(torch.softmax(logits.float(), dim=1), transform, inverse=True)
                    total_probabilities = p if total_probabilities is None else total_probabilities + p
                probabilities = (total_probabilities / len(transforms)).cpu().numpy()
                for (stack_index, origin), tile in zip(batch, probabilities):
                    sizes = [min(s, n - o) for s, n, o in zip(plan.stride, plan.shape, origin)]
                    target = tuple(slice(o, o + size) for o, size in zip(origin, sizes))
                    crop = tuple(slice(0, size) for size in sizes)
                    self.out[(slice(None), *stack_index, *target)] = tile[(slice(None), *crop)]
                done += len(batch)
                if self.progress is not None:
                    self.progress(done, total)
        return done
