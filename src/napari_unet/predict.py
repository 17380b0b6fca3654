"""The one prediction pipeline of napari-unet: a raw image in, class probabilities, labels and uncertainty out.

Every caller (the widget's worker, ``napari-unet predict``, the demo, the benchmarks) runs :func:`predict_image`:
the image is normalized with the model's recipe as it is read (``normalization.normalized_view``: the percentiles
are computed over the whole image in a streaming pass, no float32 copy of it is made), predicted tile by tile
(``tiling.predict_tiled``: test-time flips, then the edge refinement), turned into the user's painted class ids
(``class_ids.segmentation_from_probabilities``) and, when asked, into a per-pixel uncertainty. Its knobs and their
defaults (those of the CLI and the widget) are the fields of :class:`PredictionSettings`. Callers choose where the
outputs live with ``out`` (memory maps of scratch files for the CLI, ``arrays.output_array`` for the widget's
layers). :func:`predict_region` is the widget's live preview: a region of an image with just the context it needs.

No Qt or napari here, and torch is imported only when something is predicted.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .class_ids import labels_dtype, segmentation_from_probabilities
from .domain import DomainCheck, check_prediction
from .normalization import normalized_view
from .precisions import PRECISIONS
from .refine import AUTO, DEFAULT_EPS, DEFAULT_RADIUS

OutputFactory = Callable[[str, tuple, np.dtype], np.ndarray]
"""``out(role, shape, dtype)``: an array to write one output into; ``role`` is "probabilities", "labels" or
"uncertainty"."""


def _setting(default, label: str, tooltip: str, **limits):
    """A :class:`PredictionSettings` field whose ``metadata`` holds its GUI label, tooltip and (integers) range."""
    return field(default=default, metadata={"label": label, "tooltip": tooltip, **limits})


@dataclass(frozen=True)
class PredictionSettings:
    """Everything that controls a prediction besides the model and the image; the defaults are what the CLI and
    the widget do. Each field's ``metadata`` holds a short GUI ``label``, a one-sentence ``tooltip`` and, for
    integers, the ``min``/``max`` a form offers. Invalid values raise ``ValueError``."""

    device: str = _setting(
        "auto",
        "Device",
        "Where the network runs: auto (a CUDA GPU, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps.",
    )
    """A device name for ``devices.resolve_device``; a device this machine lacks is refused when predicting."""
    tile_shape: tuple[int, ...] | None = _setting(
        None,
        "Tile size",
        "Output tile size per axis (Y X, or Z Y X for a 3D model); empty: as large as the memory budget allows.",
        min=1,
        max=4096,
    )
    """Output tile shape (2 sizes for a 2D model, 3 for a 3D one); None: from the memory budget
    (``tiling.plan_tiles``). Tiles are exact, so this changes speed and memory, not the result."""
    batch_size: int | None = _setting(
        None, "Batch size", "Tiles per forward pass; empty: as many as the memory budget allows.", min=1, max=256
    )
    """Tiles per forward pass; None: as many as the memory budget allows."""
    tile_tuning: bool = _setting(
        True,
        "Tune tiles",
        "Without a tile size: on first use on this machine, time a few tile sizes for the network and use the "
        "fastest (kept per machine); off: the largest tiles the memory budget allows.",
    )
    """``tiling.predict_tiled(tile_tuning=...)``: tiles from measurement (``tile_tuning.tuned_tile``) when no
    ``tile_shape`` is given."""
    precision: str = _setting(
        "auto",
        "Precision",
        "What the network computes in: auto (float16 on a CUDA GPU, bfloat16 on a CPU where it measured faster, "
        "else float32), float32, bfloat16 or float16.",
        choices=[(name, name) for name in PRECISIONS],
    )
    """``devices.prediction_dtype``: the network's autocast precision on the chosen device (probabilities stay
    float32)."""
    test_time_flips: bool = _setting(
        True,
        "Test-time flips",
        "Average the predictions of the 8 flips and transpositions of each image: a little more accurate, 8x slower.",
    )
    """Average the 8 flips/transpositions of each tile (``tiling.flip_transforms``)."""
    refine_radius: int | str = _setting(
        DEFAULT_RADIUS,
        "Snap to edges",
        "Window half-width in pixels of the guided filter that snaps the "
        "probabilities to the image's edges; auto fits it to the predicted structures, 0 turns it off.",
        min=0,
        max=8,
        choices=[
            (f"{AUTO} (fits the objects' width)", AUTO),
            ("off", 0),
            *((f"{radius} px", radius) for radius in range(1, 9)),
        ],
    )
    """Edge refinement (``refine.refine_probabilities``): pixels, ``"auto"`` (``refine.auto_radius``), 0: off."""
    refine_eps: float = _setting(
        DEFAULT_EPS,
        "Edge threshold",
        "Edges whose local intensity variance in the normalized image is well below this are smoothed over.",
    )
    """The guided filter's regularisation: edges much weaker than this (normalized variance) are smoothed."""
    uncertainty: bool = _setting(
        False,
        "Uncertainty",
        "Also compute each pixel's normalized entropy of the "
        "class probabilities (0 certain, 1 undecided): where to paint next.",
    )
    """Also compute :func:`normalized_entropy` of the probabilities."""

    def __post_init__(self):
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"device must be a device name such as 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.tile_shape is not None:
            object.__setattr__(self, "tile_shape", _tile_sizes(self.tile_shape))
        if self.batch_size is not None and not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("tile_tuning", "test_time_flips", "uncertainty"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.refine_radius != AUTO and not (_is_int(self.refine_radius) and self.refine_radius >= 0):
            raise ValueError(f"refine_radius must be an integer >= 0 (pixels) or {AUTO!r}, got {self.refine_radius!r}")
        eps = self.refine_eps
        if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"refine_eps must be a finite number greater than 0, got {eps!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _tile_sizes(value) -> tuple[int, ...]:
    """``value`` as a tuple of 2 or 3 positive ints, or ``ValueError``."""
    sizes = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(sizes) not in (2, 3) or not all(_is_int(n) and n >= 1 for n in sizes):
        raise ValueError(f"tile_shape needs 2 (Y X) or 3 (Z Y X) positive sizes, got {value!r}")
    return tuple(int(n) for n in sizes)


@dataclass(frozen=True)
class PredictionOutputs:
    """What :func:`predict_image` gives for one image (the arrays ``out`` made, when given)."""

    probabilities: np.ndarray
    """``(n_classes, *spatial)`` float32 softmax probabilities, refined when the settings say so."""
    labels: np.ndarray
    """The spatial shape: the painted class id of the most probable class (dtype ``class_ids.labels_dtype``)."""
    uncertainty: np.ndarray | None
    """The spatial shape, float32 :func:`normalized_entropy`; None unless ``settings.uncertainty``."""
    domain: DomainCheck | None = None
    """How far the image lies outside the model's training images (``domain.check_prediction``: a bounded sample
    of the normalized image and of the probabilities); None for a model without a training profile."""


def model_class_ids(model, metadata: dict) -> list[int]:
    """The painted id of each of ``model``'s classes: ``metadata["class_ids"]``, or 1..n_classes for a model whose
    metadata has none."""
    return list(metadata.get("class_ids") or range(1, model.n_classes + 1))


def in_memory(role: str, shape: tuple, dtype) -> np.ndarray:
    """The default ``out`` of :func:`predict_image`: a new numpy array (every element gets written)."""
    return np.empty(shape, dtype)


def predict_image(
    model,
    metadata: dict,
    image,
    settings: PredictionSettings | None = None,
    *,
    out: OutputFactory | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PredictionOutputs:
    """Segment one raw image with ``model`` and its model-file ``metadata`` (``normalization``, ``class_ids``).

    ``image`` is the image as read, not normalized: ``(*spatial)``, or ``(C, *spatial)`` channels first for a
    multi-channel model (a bool array counts as 0 and 1, a nested list as its array); numpy or lazy (dask,
    ``io.open_image``'s view): it is read once for its percentiles and then tile by tile, so no float32 copy of it
    is made. ``spatial`` has the model's dimensions, or one more for a stack that a 2D model predicts slice by
    slice. ``settings`` None: the defaults. ``out(role, shape, dtype)`` makes each output array (default:
    :func:`in_memory`), e.g. memory maps for images larger than memory. ``progress(done, total)`` counts tiles;
    ``should_stop()`` is polled between tile batches and raises ``tiling.PredictionStopped``. A device the machine
    lacks and an image that does not fit the model raise ``ValueError``. ``domain`` of the outputs compares the
    image with the training images (``domain.py``; it reads a few tiles of both, the outputs are unchanged).
    """
    from .devices import resolve_device
    from .tiling import predict_tiled

    out = in_memory if out is None else out
    settings = PredictionSettings() if settings is None else settings
    if not hasattr(image, "shape"):  # a nested list, say
        image = np.asarray(image)
    if isinstance(image, np.ndarray) and image.dtype == bool:  # a mask as an image: 0 and 1
        image = image.view(np.uint8)
    channel_axis = 0 if model.in_channels > 1 else None
    normalized = normalized_view(image, metadata.get("normalization"), channel_axis=channel_axis)
    spatial = tuple(normalized.shape[1:] if channel_axis == 0 else normalized.shape)
    class_ids = model_class_ids(model, metadata)
    device = resolve_device(settings.device)
    probabilities = predict_tiled(
        model,
        normalized,
        tile_shape=settings.tile_shape,
        batch_size=settings.batch_size,
        device=device,
        out=out("probabilities", (model.n_classes, *spatial), np.float32),
        progress=progress,
        should_stop=should_stop,
        precision=settings.precision,
        test_time_flips=settings.test_time_flips,
        refine_radius=settings.refine_radius,
        refine_eps=settings.refine_eps,
        tile_tuning=settings.tile_tuning,
    )
    labels = segmentation_from_probabilities(
        probabilities, class_ids, out=out("labels", spatial, labels_dtype(class_ids))
    )
    uncertainty = None
    if settings.uncertainty:
        uncertainty = normalized_entropy(probabilities, out=out("uncertainty", spatial, np.float32))
    domain = check_prediction(
        metadata,
        normalized,
        probabilities,
        functools.partial(predict_regions, model, device=device, precision=settings.precision, should_stop=should_stop),
        halo=model.halo,
        grid=model.grid,
        channels=channel_axis == 0,
        one_pass=not settings.test_time_flips and settings.refine_radius == 0,
    )
    return PredictionOutputs(probabilities, labels, uncertainty, domain)


def normalized_entropy(probabilities, out=None) -> np.ndarray:
    """Per-pixel entropy of the class probabilities divided by log(n_classes): 0 = certain, 1 = undecided.

    Computed one index of the first spatial axis at a time (memory maps in and out stay bounded); ``out``:
    a float32 array of the spatial shape to write into, default a new one.
    """
    out = np.empty(probabilities.shape[1:], np.float32) if out is None else out
    scale = 1.0 / np.log(probabilities.shape[0])
    for index in range(out.shape[0]):
        p = np.clip(np.asarray(probabilities[:, index], dtype=np.float32), 1e-7, 1.0)
        out[index] = -(p * np.log(p)).sum(axis=0) * scale
    return out


def region_with_context(region: tuple[slice, ...], shape: tuple[int, ...], halo: Sequence[int], grid: int = 1):
    """Grow the last ``len(halo)`` axes of ``region`` by ``halo``, clipped to ``shape``.

    Returns ``(crop, inner)``: the slices to read from the image and, relative to the crop, the slices
    that give back ``region``. Crops start on multiples of ``grid`` (the model's pooling grid), so the
    network pools the same pixel pairs as in a whole-image pass, and reach ``grid`` further on the high
    side (a pixel's context there can exceed the halo by less than ``grid``). Inside the image the crop carries real
    context, so predicting the crop and keeping ``inner`` equals predicting the whole image there; at
    the border ``predict_tiled`` mirrors, as it does for the whole image.
    """
    lead = len(shape) - len(halo)
    crop, inner = list(region[:lead]), [slice(None)] * lead
    for s, size, h in zip(region[lead:], shape[lead:], halo):
        start, stop, _ = s.indices(size)
        lo, hi = max(0, start - h), min(size, stop + h + grid)
        lo -= lo % grid
        crop.append(slice(lo, hi))
        inner.append(slice(start - lo, stop - lo))
    return tuple(crop), tuple(inner)


def predict_region(
    model, normalized: np.ndarray, region: tuple[slice, ...], *, should_stop=None, device=None, precision="float32"
) -> np.ndarray:
    """Probabilities ``(n_classes, *region shape)`` of ``model`` for ``region`` of a normalized image.

    ``normalized`` is the whole (normalized) image, channels first for a multi-channel model; ``region``
    holds slices of its spatial axes. A 2D model on a 3D stack predicts each slice of the region. Only the
    region and its context are computed, and the result equals the whole-image prediction there (one pass, no
    refinement: the widget's live preview while training).
    """
    from .tiling import predict_tiled

    channels = (slice(None),) if model.in_channels > 1 else ()
    crop, inner = region_with_context(region, normalized.shape[len(channels) :], model.halo, model.grid)
    patch = np.ascontiguousarray(normalized[channels + crop])
    probabilities = predict_tiled(model, patch, should_stop=should_stop, device=device, precision=precision)
    return np.ascontiguousarray(probabilities[(slice(None), *inner)])


def predict_regions(model, normalized, regions: Sequence[tuple[slice, ...]], **options) -> list[np.ndarray]:
    """:func:`predict_region` of each of ``regions`` (``domain.sample_regions``: tiles of the last two axes, one
    plane thick in a stack), computed per plane as whichever reads fewer input pixels: every tile with its context,
    or the whole plane once (the same probabilities either way). ``options``: ``device``, ``precision``,
    ``should_stop``."""
    spatial = tuple(normalized.shape[1:] if model.in_channels > 1 else normalized.shape)
    halo, grid, ndim = model.halo, model.grid, len(model.halo)

    def cost(region):
        return math.prod(min(n, s.stop - s.start + 2 * h + grid) for s, h, n in zip(region[-ndim:], halo, spatial))

    planes: dict[tuple, list[int]] = {}
    for k, region in enumerate(regions):
        planes.setdefault(tuple((s.start, s.stop) for s in region[:-2]), []).append(k)
    out: list[np.ndarray] = [np.empty(0)] * len(regions)
    for indices in planes.values():
        whole = (*regions[indices[0]][:-2], slice(0, spatial[-2]), slice(0, spatial[-1]))
        if cost(whole) < sum(cost(regions[k]) for k in indices):
            plane = predict_region(model, normalized, whole, **options)
            for k in indices:
                out[k] = plane[(slice(None), *(slice(None),) * (len(whole) - 2), regions[k][-2], regions[k][-1])]
        else:
            for k in indices:
                out[k] = predict_region(model, normalized, regions[k], **options)
    return out
