"""Exact block-wise prediction: a volume cut into output blocks that anyone (a process, a Dask worker) predicts
on its own, with the same result as one ``predict_image`` of the whole volume.

The valid-padding U-Net's tiles abut exactly (``tiling.py``), so a block of output pixels that starts on the
network's pooling grid is predicted from the block plus the network's halo read from the volume, mirrored only at
the volume's border (``tiling.predict_tiled(region=...)``). Three things couple a block to the whole volume, and
each is settled before any block runs, then shipped with the model (:class:`BlockSettings`):

- normalization: the percentiles of the whole volume (``normalization.image_params``, exact and streamed), so every
  block is normalized with the same values;
- the edge refinement's radius when it is "auto": ``refine.auto_radius`` measures a centred crop of the whole
  prediction, so exactly that crop is predicted first (:func:`resolve_radius`);
- the refinement's own context: a guided filter of radius ``r`` reads ``2 r`` pixels around each output pixel, so a
  block is predicted over itself grown by ``2 r`` (clipped to the volume, where the filter mirrors as it does for
  the whole volume) and refined there, and the block's part kept (:func:`predict_block`).

Test-time flips need nothing more: they act tile by tile and a legal tile pools the same pixel pairs from either
end. Class ids (the argmax) are per pixel. :func:`plan_blocks` cuts a volume into blocks (whole multiples of the
grid on the tiled axes); ``distributed_predict.py`` runs them in parallel and writes them into OME-Zarr stores.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .normalization import NormalizedView
from .refine import AUTO, radius_for_width, refine_probabilities, sample_crops, samples_width

DEFAULT_BLOCK = {2: (512, 512), 3: (128, 128, 128)}
"""Default output block of a 2D / 3D model (a 2D model over a stack: 8 slices of the 2D block)."""
STACK_BLOCK = 8


@dataclass(frozen=True)
class BlockSettings:
    """What every block of one volume is predicted with, decided once for the whole volume: the normalization
    parameters (``normalization.image_params`` of the volume), the refinement radius in pixels (0: none; never
    "auto", :func:`resolve_radius` turned it into pixels) and the other prediction settings."""

    params: dict
    radius: int = 0
    eps: float = 0.01
    flips: bool = True
    tile_shape: tuple[int, ...] | None = None
    batch_size: int | None = None
    device: str = "cpu"
    """A device name (``PredictionSettings.device``: "auto", "cuda", ...), resolved by the process that predicts."""
    precision: str = "float32"
    """``PredictionSettings.precision`` (``distributed_predict`` names one for "auto", the same for every block),
    turned into a dtype (``devices.prediction_dtype``) by the process that predicts."""
    tile_tuning: bool = False
    """``PredictionSettings.tile_tuning``: measured where the blocks run (each machine keeps its own)."""


@dataclass(frozen=True)
class BlockPlan:
    """A volume of spatial ``shape`` cut into blocks of ``block`` (the last ones cut by the volume's end)."""

    shape: tuple[int, ...]
    block: tuple[int, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        """Blocks along each spatial axis."""
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block))

    def indices(self) -> list[tuple[int, ...]]:
        """Every block's index, in C order."""
        return list(itertools.product(*(range(c) for c in self.counts)))

    def region(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        """The output pixels of block ``index``, one slice per spatial axis."""
        return tuple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, self.block, self.shape))

    def __len__(self) -> int:
        return math.prod(self.counts)


def plan_blocks(model, spatial_shape, block=None) -> BlockPlan:
    """Blocks of ``block`` output pixels (default :data:`DEFAULT_BLOCK`) over a volume of ``spatial_shape``; sizes of
    the tiled axes are rounded up to the network's pooling grid (``model.grid``) so that every block starts on it,
    and none exceeds the volume (rounded up to the grid). ``block`` may name the tiled axes only (a stack under a 2D
    model then takes :data:`STACK_BLOCK` slices per block). ``ValueError`` for sizes that are not positive."""
    spatial_shape = tuple(int(n) for n in spatial_shape)
    lead = len(spatial_shape) - model.ndim
    if lead not in (0, 1):
        raise ValueError(f"a {model.ndim}D model predicts {model.ndim} or {model.ndim + 1} spatial axes")
    if block is None:
        block = DEFAULT_BLOCK[model.ndim]
    block = (block,) * len(spatial_shape) if isinstance(block, int) else tuple(int(b) for b in block)
    if len(block) == model.ndim and lead:
        block = (STACK_BLOCK, *block)
    if len(block) != len(spatial_shape) or min(block) < 1:
        raise ValueError(f"block needs {len(spatial_shape)} positive sizes for shape {spatial_shape}, got {block}")
    grid = model.grid
    sizes = [min(b, n) for b, n in zip(block[:lead], spatial_shape[:lead])]
    for b, n in zip(block[lead:], spatial_shape[lead:]):
        sizes.append(min(-(-b // grid) * grid, -(-n // grid) * grid))
    return BlockPlan(spatial_shape, tuple(sizes))


def predict_block(model, normalized, region: tuple[slice, ...], settings: BlockSettings) -> np.ndarray:
    """Probabilities ``(n_classes, *region shape)`` of ``model`` for ``region`` of the ``normalized`` volume (a
    ``NormalizedView`` or array, channels first for a multi-channel model), equal to that part of the whole-volume
    prediction with the same settings (module docstring). ``region`` need not start on the grid (the block is grown
    to it); the refinement's context is ``2 * settings.radius`` pixels on the tiled axes."""
    from .devices import resolve_device
    from .tiling import predict_tiled

    channels = model.in_channels > 1
    spatial = tuple(normalized.shape[1:] if channels else normalized.shape)
    lead = len(spatial) - model.ndim
    context = 2 * settings.radius
    grown, inner = [], []
    for axis, (s, n) in enumerate(zip(region, spatial)):
        start, stop, _ = s.indices(n)
        if axis < lead:
            grown.append(slice(start, stop))
            inner.append(slice(0, stop - start))
            continue
        low, high = max(0, start - context), min(n, stop + context)
        low -= low % model.grid
        grown.append(slice(low, high))
        inner.append(slice(start - low, stop - low))
    probabilities = predict_tiled(
        model,
        normalized,
        tile_shape=settings.tile_shape,
        batch_size=settings.batch_size,
        device=resolve_device(settings.device),
        test_time_flips=settings.flips,
        precision=settings.precision,
        region=tuple(grown),
        tile_tuning=settings.tile_tuning,
    )
    if settings.radius:
        guide = np.asarray(normalized[((slice(None),) if channels else ()) + tuple(grown)], np.float32)
        refine_probabilities(
            probabilities, guide, spatial_ndim=model.ndim, radius=settings.radius, eps=settings.eps, out=probabilities
        )
    return np.ascontiguousarray(probabilities[(slice(None), *inner)])


def resolve_radius(model, normalized, radius, settings: BlockSettings) -> int:
    """The refinement radius in pixels: ``radius`` itself, or for ``"auto"`` what ``refine.auto_radius`` gives on
    the whole-volume prediction, measured on exactly the crops it reads (``refine.sample_crops``), predicted here
    block-wise without refinement."""
    if radius != AUTO:
        return int(radius)
    channels = model.in_channels > 1
    spatial = tuple(normalized.shape[1:] if channels else normalized.shape)
    unrefined = BlockSettings(**{**settings.__dict__, "radius": 0})
    samples = []
    for crop in sample_crops(spatial, model.ndim):
        region = tuple(slice(c, c + 1) if isinstance(c, int) else c for c in crop)
        probabilities = predict_block(model, normalized, region, unrefined)
        samples.append(probabilities[:, 0] if len(crop) and isinstance(crop[0], int) else probabilities)
    return radius_for_width(samples_width(samples))


def volume_settings(model, metadata: dict, image, prediction_settings, mapper=None) -> BlockSettings:
    """:class:`BlockSettings` for ``image`` (raw, channels first for a multi-channel model) from a model file's
    ``metadata`` and ``predict.PredictionSettings``: the whole volume's normalization parameters (streamed, exact;
    ``mapper``: where its slabs are counted, ``normalization.reduce_slabs``) and the refinement radius resolved;
    what a single-process ``predict_image`` of it would use."""
    from .devices import resolve_device
    from .normalization import image_params

    channel_axis = 0 if model.in_channels > 1 else None
    params = image_params(image, metadata.get("normalization"), channel_axis, mapper)
    base = BlockSettings(
        params=params,
        eps=prediction_settings.refine_eps,
        flips=prediction_settings.test_time_flips,
        tile_shape=prediction_settings.tile_shape,
        batch_size=prediction_settings.batch_size,
        device=prediction_settings.device,  # resolved where the blocks run (GPU workers, a login node without one)
        precision=prediction_settings.precision,
        tile_tuning=prediction_settings.tile_tuning,
    )
    try:  # the crops that an "auto" radius measures are predicted here
        here = str(resolve_device(prediction_settings.device))
    except ValueError:
        here = "cpu"
    measuring = BlockSettings(**{**base.__dict__, "device": here})
    radius = resolve_radius(model, NormalizedView(image, params), prediction_settings.refine_radius, measuring)
    return BlockSettings(**{**base.__dict__, "radius": radius})
