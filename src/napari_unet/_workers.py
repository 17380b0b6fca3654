"""Work the dock widget runs on ``napari.qt.threading`` workers: training with live previews, prediction.

Nothing here touches Qt, napari layers or widgets. The generators receive the layers' arrays (views, numpy or
lazy), which they read on their own thread, only the parts they need; they yield small messages (tuples whose
first item names the kind) and the widget applies them to layers on the main thread. They yield often so that
``worker.quit()`` and the stop flags take effect promptly.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ._layers import output_array
from .class_ids import labels_dtype, segmentation_from_probabilities
from .normalization import NormalizedView, normalized_view

PREVIEW_MAX_SIZE = 768
"""Largest preview region per axis (pixels): zoomed far out, the preview covers the view centre."""


@dataclass(frozen=True)
class PreviewResult:
    """Probabilities for one region of the training image (``region``: slices into the image)."""

    region: tuple[slice, ...]
    probabilities: np.ndarray
    """``(n_classes, *region shape)`` float32."""
    segmentation: np.ndarray
    """Argmax as the user's class ids, the region's shape."""
    class_ids: tuple[int, ...]
    iteration: int


class ViewRegion:
    """The region of the training image the user looks at, written by the main thread, read by the worker.

    ``region`` is a tuple of slices into the image (one per image axis) or None for "the whole image".
    Assigning a tuple is atomic, so no lock is needed.
    """

    def __init__(self, region: tuple[slice, ...] | None = None):
        self.region = region


def release_device_memory(device) -> None:
    """Return cached GPU memory to the driver after work on ``device`` (no-op on the CPU)."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.empty_cache()
    elif getattr(device, "type", str(device)) == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


@contextlib.contextmanager
def gui_friendly_threads():
    """Run torch on all cores but one (``devices.default_cpu_threads``) so the GUI thread keeps a core."""
    import torch

    from .devices import default_cpu_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(default_cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def predict_region(model, normalized: np.ndarray, region: tuple[slice, ...], *, should_stop=None) -> np.ndarray:
    """Probabilities ``(n_classes, *region shape)`` of ``model`` for ``region`` of a normalized image.

    ``normalized`` is the whole (normalized) image, channels first for a multi-channel model; ``region``
    holds slices of its spatial axes. A 2D model on a 3D stack predicts each slice of the region. Only the
    region and its context are computed, and the result equals the whole-image prediction there.
    """
    from .tiling import predict_tiled

    channels = (slice(None),) if model.in_channels > 1 else ()
    crop, inner = region_with_context(region, normalized.shape[len(channels):], model.halo, model.grid)
    patch = np.ascontiguousarray(normalized[channels + crop])
    probabilities = predict_tiled(model, patch, should_stop=should_stop)
    return np.ascontiguousarray(probabilities[(slice(None), *inner)])


def train_steps(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    settings,
    *,
    init=None,
    class_names: dict[int, str] | None = None,
    view: ViewRegion | None = None,
    preview_interval: float = 3.0,
    stop: threading.Event | None = None,
    resume: threading.Event | None = None,
) -> Iterator[tuple]:
    """Train on images (channels first when they have several) and their painted labels; a generator for a
    napari worker. Previews show the first image.

    Yields ``("ready", trainer)`` once the trainer is built (the widget then sends it new strokes with
    ``trainer.update_labels_later(index, ...)``), ``("warning", index, message)`` when such an update is not used,
    ``("progress", TrainingEvent)`` per iteration and, every
    ``preview_interval`` seconds at least (longer when previews are slow, so they never take more than
    about a third of the time), ``("preview", PreviewResult)`` for ``view.region``. Returns the trainer.
    Setting ``stop`` ends training within one iteration (and interrupts a preview). ``class_names``
    maps painted ids to names (missing ids are called "class <id>"); a fine-tuned model keeps its own.
    With ``resume``, training waits after "ready" until it is set (at most 10 s): the GUI then makes
    its preview layers while the worker leaves the CPU to it.
    """
    from .tiling import PredictionStopped
    from .training import Trainer

    with contextlib.suppress(ImportError):
        # torch.optim imports torch._dynamo (~800 modules) on first use; do it while preparing, so that
        # its garbage-collection pauses do not hit the GUI once training runs.
        import torch._dynamo  # noqa: F401
    stop = stop or threading.Event()
    image, shape = images[0], labels[0].shape  # what previews show
    channel_axis = 0 if image.ndim > len(shape) else None
    trainer = Trainer(list(images), list(labels), settings, init=init, class_names=class_names,
                      channel_axis=channel_axis)
    # Previews normalize only the region they read, with the percentiles the trainer computed for this image.
    normalized = NormalizedView(image, trainer.image_normalization[0])
    yield ("ready", trainer)
    if resume is not None:
        resume.wait(timeout=10.0)
    if stop.is_set():
        trainer.request_stop()
    next_preview = time.perf_counter() + min(1.0, preview_interval)
    reported = 0
    for event in trainer.run():
        yield ("progress", event)
        while reported < len(trainer.label_problems):
            yield ("warning", *trainer.label_problems[reported])
            reported += 1
        if stop.is_set():
            trainer.request_stop()
            continue
        if view is None or event.done or time.perf_counter() < next_preview:
            continue
        started = time.perf_counter()
        region = view.region or tuple(slice(0, n) for n in shape)
        try:
            probabilities = predict_region(trainer.snapshot(), normalized, region, should_stop=stop.is_set)
        except PredictionStopped:
            trainer.request_stop()
            continue
        took = time.perf_counter() - started
        next_preview = time.perf_counter() + max(preview_interval, 2 * took)
        yield ("preview", _preview(region, probabilities, trainer.class_ids, event.iteration))
    if view is not None and not stop.is_set() and trainer.iteration > 0:
        # A last preview from the final weights, so what the user sees matches the trained model.
        region = view.region or tuple(slice(0, n) for n in shape)
        with gui_friendly_threads():
            probabilities = predict_region(trainer.model, normalized, region, should_stop=stop.is_set)
        yield ("preview", _preview(region, probabilities, trainer.class_ids, trainer.iteration))
    return trainer


def _preview(region, probabilities, class_ids, iteration) -> PreviewResult:
    segmentation = segmentation_from_probabilities(probabilities, class_ids)
    return PreviewResult(region, probabilities, segmentation, tuple(class_ids), iteration)


@dataclass(frozen=True)
class PredictJob:
    """One image to predict: the source layer's name and its data (``_layers.image_array``: a view of the layer's
    array, numpy or lazy), channels first if several."""

    name: str
    image: np.ndarray


@dataclass(frozen=True)
class PredictResult:
    """What the widget turns into output layers for one source image."""

    name: str
    probabilities: np.ndarray
    segmentation: np.ndarray
    uncertainty: np.ndarray | None


def predict_steps(
    model,
    metadata: dict,
    jobs: Sequence[PredictJob],
    *,
    device: str = "auto",
    uncertainty: bool = False,
    test_time_flips: bool = False,
    refine_radius: int | str = 0,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> Iterator[tuple]:
    """Overlap-tile prediction of several images; a generator for a napari worker.

    Each image is normalized as a whole with the model's recipe, predicted with ``predict_tiled``
    (``test_time_flips`` and ``refine_radius`` as there) and yielded as ``("result", PredictResult)``;
    ``progress(done, total)`` counts tiles within the current image and ``("image", index, count, name)``
    announces each image. An image whose file cannot be read (a lazy layer over a corrupt TIFF) yields
    ``("failed", name, message)`` and the others go on. ``stop`` raises ``tiling.PredictionStopped`` at the next
    tile batch. Returns the number of images done.
    """
    from .devices import resolve_device
    from .io import ImageFileError

    stop = stop or threading.Event()
    target = resolve_device(device)
    class_ids = metadata.get("class_ids") or list(range(1, model.n_classes + 1))
    try:
        with gui_friendly_threads():
            done = 0
            for index, job in enumerate(jobs):
                yield ("image", index, len(jobs), job.name)
                try:
                    result = _predict_job(model, metadata, job, class_ids, device=target, progress=progress,
                                          should_stop=stop.is_set, test_time_flips=test_time_flips,
                                          refine_radius=refine_radius, uncertainty=uncertainty)
                except ImageFileError as e:
                    yield ("failed", job.name, str(e))
                    continue
                done += 1
                yield ("result", result)
    finally:
        release_device_memory(target)
    return done


def _predict_job(model, metadata: dict, job: PredictJob, class_ids, *, uncertainty: bool,
                 **predict) -> PredictResult:
    """One image of :func:`predict_steps`: normalized tile by tile as read (no float32 copy of the whole image
    next to the outputs), outputs over the memory limit memory-mapped (``_layers.output_array``)."""
    from .tiling import predict_tiled

    normalized = normalized_view(job.image, metadata.get("normalization"),
                                 channel_axis=0 if model.in_channels > 1 else None)
    spatial = tuple(job.image.shape[1:] if model.in_channels > 1 else job.image.shape)
    probabilities = predict_tiled(model, normalized, out=output_array((model.n_classes, *spatial), np.float32),
                                  **predict)
    return PredictResult(
        job.name,
        probabilities,
        segmentation_from_probabilities(probabilities, class_ids, out=output_array(spatial, labels_dtype(class_ids))),
        normalized_entropy(probabilities, out=output_array(spatial, np.float32)) if uncertainty else None,
    )
