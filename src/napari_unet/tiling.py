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

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .refine import DEFAULT_EPS, refine_probabilities

DEFAULT_MEMORY_BYTES = 2 * 1024**3
"""Activation memory a tile batch may use by default (it sets the default tile and batch size); less on a machine
with little free memory (:func:`default_memory_bytes`)."""

_FLOATS_PER_INPUT_VOXEL_AND_FILTER = 6
"""Measured peak of live float activations per input voxel and base filter in an inference pass."""


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
    """

    stack_shape: tuple[int, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    output_tile: tuple[int, ...]
    input_tile: tuple[int, ...]
    halo: tuple[int, ...]

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


def plan_tiles(model, spatial_shape, tile_shape=None, max_input_voxels=None) -> TilePlan:
    """Plan the tiles for an image of ``spatial_shape`` (without channels).

    ``tile_shape`` is the wanted output tile (rounded up to the ``2**depth`` grid). Without it, tiles are as
    large as ``max_input_voxels`` allows (larger tiles recompute less halo), spread evenly over the image.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
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


def default_memory_bytes() -> int:
    """``DEFAULT_MEMORY_BYTES``, or a quarter of the memory available now when that is less (at least 256 MiB),
    so that the default tile batch leaves room for the rest of a small machine (napari, the outputs)."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or a platform it cannot read: the fixed default
        return DEFAULT_MEMORY_BYTES
    return max(256 * 1024**2, min(DEFAULT_MEMORY_BYTES, available // 4))


def default_max_input_voxels(model, memory_bytes: int | None = None) -> int:
    """Largest input tile (in voxels) whose activations fit ``memory_bytes`` (default: :func:`default_memory_bytes`)."""
    memory_bytes = default_memory_bytes() if memory_bytes is None else memory_bytes
    base_filters = model.config["base_filters"]
    return max(1, memory_bytes // (4 * _FLOATS_PER_INPUT_VOXEL_AND_FILTER * base_filters))


def read_tile(image, plan: TilePlan, stack_index, origin, channel_axis: bool) -> np.ndarray:
    """Read one input tile ``(channels, *input_tile)`` as float32, mirroring only outside the image."""
    local = []
    slices = []
    for o, h, size, n in zip(origin, plan.halo, plan.input_tile, plan.shape):
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
    amp: bool = False,
    test_time_flips: bool = False,
    refine_radius: int | str = 0,
    refine_eps: float = DEFAULT_EPS,
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
    amp : bool
        Run the network in float16 autocast on CUDA (probabilities are still float32).
    test_time_flips : bool
        Average the probabilities over the mirror flips of the image (and, in 2D, its transpositions):
        8 network passes per tile in 2D and 3D (:func:`flip_transforms`), so 8 times slower. Tiles stay
        exact: the result equals the average of whole-image passes over the flipped reflect-padded image,
        because a legal input tile has an even length at every pooling level and so pools the same pixel
        pairs whichever end it is read from.
    refine_radius, refine_eps : int or "auto", float
        When ``refine_radius`` is not 0, the assembled probabilities are snapped to the image's edges by
        :func:`napari_unet.refine.refine_probabilities` (a guided filter with ``image`` as the guide, read
        band by band; exact, so tiled and whole-image results still agree); "auto" fits the window to the
        width of the predicted structures (:func:`napari_unet.refine.auto_radius`). 0 (the default) leaves the
        network's probabilities as they are.

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
    plan = plan_tiles(model, spatial_shape, tile_shape)
    if out is None:
        out = np.empty((model.n_classes, *spatial_shape), dtype=np.float32)
    elif tuple(out.shape) != (model.n_classes, *spatial_shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(model.n_classes, *spatial_shape)}")

    if device is None:
        device = next(model.parameters()).device
    elif device == "auto":
        from .devices import resolve_device

        device = resolve_device("auto")
    device = torch.device(device)
    if batch_size is None:
        batch_size = max(1, default_max_input_voxels(model) // math.prod(plan.input_tile))
    batch_size = max(1, min(int(batch_size), len(plan)))

    # Channels-last lets oneDNN/cuDNN pick faster convolution kernels; results are unchanged.
    memory_format = torch.channels_last if model.ndim == 2 else torch.channels_last_3d
    net = model.inference_copy().to(device, memory_format=memory_format)
    transforms = flip_transforms(model.ndim) if test_time_flips else [((), False)]
    total, done = len(plan), 0
    tiles = plan.tiles()
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")
    with torch.inference_mode(), autocast:
        while done < total:
            if should_stop is not None and should_stop():
                raise PredictionStopped(f"prediction stopped after {done} of {total} tiles")
            batch = list(itertools.islice(tiles, batch_size))
            inputs = np.stack([read_tile(image, plan, s, o, channel_axis) for s, o in batch])
            inputs = torch.from_numpy(inputs).to(device, memory_format=memory_format)
            total_probabilities = None
            for transform in transforms:
                logits = net(_apply(inputs, transform).contiguous(memory_format=memory_format))
                p = _apply(torch.softmax(logits.float(), dim=1), transform, inverse=True)
                total_probabilities = p if total_probabilities is None else total_probabilities + p
            probabilities = (total_probabilities / len(transforms)).cpu().numpy()
            for (stack_index, origin), tile in zip(batch, probabilities):
                sizes = [min(s, n - o) for s, n, o in zip(plan.stride, plan.shape, origin)]
                target = tuple(slice(o, o + size) for o, size in zip(origin, sizes))
                crop = tuple(slice(0, size) for size in sizes)
                out[(slice(None), *stack_index, *target)] = tile[(slice(None), *crop)]
            done += len(batch)
            if progress is not None:
                progress(done, total)
    if refine_radius:
        if should_stop is not None and should_stop():
            raise PredictionStopped(f"prediction stopped after {done} of {total} tiles, before refinement")
        refine_probabilities(out, image, spatial_ndim=model.ndim, radius=refine_radius, eps=refine_eps, out=out)
    return out
