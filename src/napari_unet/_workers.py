"""Work the dock widget runs on ``napari.qt.threading`` workers: training with live previews, prediction.

Nothing here touches Qt, napari layers or widgets. The generators receive the layers' arrays (views, numpy or
lazy), which they read on their own thread, only the parts they need; they yield small messages (frozen
dataclasses: :data:`TrainMessage` from :func:`train_steps`, :data:`PredictMessage` from :func:`predict_steps`) and
the widget applies them to layers on the main thread. They yield often so that ``worker.quit()`` and the stop flags
take effect promptly. The prediction itself is the engine's (``predict.predict_image``, ``predict.predict_region``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .arrays import output_array
from .class_ids import segmentation_from_probabilities
from .domain import DomainCheck
from .normalization import NormalizedView
from .predict import PredictionSettings, predict_image, predict_region

if TYPE_CHECKING:
    from .training import Trainer, TrainingEvent

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
    domain: DomainCheck | None = None
    """How far the image lies outside the training images (``predict.PredictionOutputs.domain``)."""


# --- messages: what the generators yield ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """Training data and model are ready: the widget sends new strokes with ``trainer.update_labels_later``."""

    trainer: Trainer


@dataclass(frozen=True)
class Progress:
    """One training iteration done (``event.done``: training ended)."""

    event: TrainingEvent


@dataclass(frozen=True)
class Preview:
    """A live preview of the training image's view region from the current weights."""

    result: PreviewResult


@dataclass(frozen=True)
class LabelsRefused:
    """New strokes of training image ``index`` (sent with ``update_labels_later``) were not used, and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class ImageStarted:
    """Prediction of image ``index`` of ``count`` (the job's ``name``) begins."""

    index: int
    count: int
    name: str


@dataclass(frozen=True)
class ImageFailed:
    """The image ``name`` could not be read (a lazy layer over a corrupt file); the other images go on."""

    name: str
    reason: str


@dataclass(frozen=True)
class ImageDone:
    """One image predicted (``result.domain``: how far it lies outside the training images, or None)."""

    result: PredictResult


TrainMessage = Ready | Progress | Preview | LabelsRefused
"""What :func:`train_steps` yields."""
PredictMessage = ImageStarted | ImageFailed | ImageDone
"""What :func:`predict_steps` yields."""


class ViewRegion:
    """The region of the training image the user looks at, written by the main thread, read by the worker.

    ``region`` is a tuple of slices into the image (one per image axis) or None for "the whole image".
    Assigning a tuple is atomic, so no lock is needed.
    """

    def __init__(self, region: tuple[slice, ...] | None = None):
        self.region = region


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


def dataset_train_steps(
    root,
    settings,
    *,
    epochs: int = 50,
    patience: int | None = None,
    val_fraction: float = 0.1,
    stop: threading.Event | None = None,
) -> Iterator[TrainMessage]:
    """Train on the annotated dataset in folder ``root`` (``dataset_training.DatasetTrainer``); a generator for a
    napari worker: :class:`Ready` once the dataset is open and the model built, then :class:`Progress` per
    iteration (the epoch's validation scores on ``event.validation``). Returns the trainer, whose model is the best
    one validated. A dataset that cannot be trained on raises its one-line ``DatasetError`` (a ValueError).
    Setting ``stop`` ends training within one iteration."""
    from .dataset_training import DatasetTrainer
    from .datasets import open_dataset

    stop = stop or threading.Event()
    dataset = open_dataset(root, val_fraction=val_fraction, seed=settings.seed, spatial_ndim=settings.ndim)
    trainer = DatasetTrainer(dataset, settings, epochs=epochs, patience=patience)
    yield Ready(trainer)
    for event in trainer.run():
        if stop.is_set():
            trainer.request_stop()
        yield Progress(event)
    return trainer


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
    dense_labels: bool = False,
) -> Iterator[TrainMessage]:
    """Train on images (channels first when they have several) and their painted labels; a generator for a
    napari worker. Previews show the first image.

    Yields :class:`Ready` once the trainer is built (the widget then sends it new strokes with
    ``trainer.update_labels_later(index, ...)``), :class:`LabelsRefused` when such an update is not used,
    :class:`Progress` per iteration and, every
    ``preview_interval`` seconds at least (longer when previews are slow, so they never take more than
    about a third of the time), :class:`Preview` for ``view.region``. Returns the trainer.
    Setting ``stop`` ends training within one iteration (and interrupts a preview). ``class_names``
    maps painted ids to names (missing ids are called "class <id>"); a fine-tuned model keeps its own.
    With ``resume``, training waits after :class:`Ready` until it is set (at most 10 s): the GUI then makes
    its preview layers while the worker leaves the CPU to it. ``dense_labels``: the labels are complete (0 is a
    class, 255 no label), as ``Trainer(dense_labels=True)``.
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
    trainer = Trainer(
        list(images),
        list(labels),
        settings,
        init=init,
        class_names=class_names,
        channel_axis=channel_axis,
        dense_labels=dense_labels,
    )
    # Previews normalize only the region they read, with the percentiles the trainer computed for this image.
    normalized = NormalizedView(image, trainer.image_normalization[0])
    yield Ready(trainer)
    if resume is not None:
        resume.wait(timeout=10.0)
    if stop.is_set():
        trainer.request_stop()
    next_preview = time.perf_counter() + min(1.0, preview_interval)
    reported = 0
    for event in trainer.run():
        yield Progress(event)
        while reported < len(trainer.label_problems):
            yield LabelsRefused(*trainer.label_problems[reported])
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
        yield Preview(_preview(region, probabilities, trainer.class_ids, event.iteration))
    if view is not None and not stop.is_set() and trainer.iteration > 0:
        # A last preview from the final weights, so what the user sees matches the trained model.
        region = view.region or tuple(slice(0, n) for n in shape)
        with gui_friendly_threads():
            probabilities = predict_region(trainer.model, normalized, region, should_stop=stop.is_set)
        yield Preview(_preview(region, probabilities, trainer.class_ids, trainer.iteration))
    return trainer


def _preview(region, probabilities, class_ids, iteration) -> PreviewResult:
    segmentation = segmentation_from_probabilities(probabilities, class_ids)
    return PreviewResult(region, probabilities, segmentation, tuple(class_ids), iteration)


def predict_steps(
    model,
    metadata: dict,
    jobs: Sequence[PredictJob],
    settings: PredictionSettings,
    *,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> Iterator[PredictMessage]:
    """Predict several images with ``predict.predict_image`` and ``settings``; a generator for a napari worker.

    Yields :class:`ImageStarted` before each image and :class:`ImageDone` with its outputs, which are in memory up
    to ``arrays.IN_MEMORY_OUTPUT_BYTES`` and memory-mapped temporary files beyond (``arrays.output_array``: they
    become the widget's layers). ``progress(done, total)`` counts tiles within the current image. An image whose
    file cannot be read (a lazy layer over a corrupt TIFF) yields :class:`ImageFailed` and the others go on.
    Setting ``stop`` ends the generator within a network layer (``tiling.predict_tiled``), a refinement band or
    between images: a stop, not an error (the image in progress yields nothing). Torch leaves the GUI thread a core,
    and the device's cached memory is released at the end. Returns the number of images done.
    """
    from .devices import release_device_memory, resolve_device
    from .io import ImageFileError
    from .tiling import PredictionStopped

    stop = stop or threading.Event()
    target = resolve_device(settings.device)
    try:
        with gui_friendly_threads():
            done = 0
            for index, job in enumerate(jobs):
                if stop.is_set():
                    break
                yield ImageStarted(index, len(jobs), job.name)
                try:
                    outputs = predict_image(
                        model,
                        metadata,
                        job.image,
                        settings,
                        out=_layer_output,
                        progress=progress,
                        should_stop=stop.is_set,
                    )
                except ImageFileError as e:
                    yield ImageFailed(job.name, str(e))
                    continue
                except PredictionStopped:
                    break
                done += 1
                yield ImageDone(
                    PredictResult(job.name, outputs.probabilities, outputs.labels, outputs.uncertainty, outputs.domain)
                )
    finally:
        release_device_memory(target)
    return done


def _layer_output(role: str, shape: tuple, dtype) -> np.ndarray:
    """``predict_image``'s outputs as the widget's layers hold them (``arrays.output_array``)."""
    return output_array(shape, dtype)
