"""The training engine: learn a U-Net from sparse painted labels, as a generator a GUI worker can drive.

Label semantics (a napari Labels layer as it is): 0 = unpainted (weight zero in every loss term), painted
ids 1..K are the classes, and they need not be contiguous ({1, 3} is fine). The id mapping is kept in the
model metadata so predictions come back with the user's ids (class index ``i`` of the network is
``metadata["class_ids"][i]``). With ``dense_labels=True`` the labels are complete (an imported ground truth, a
dataset's masks): 0 is a class and ``DENSE_VOID`` (255) is "no label" (``dataset_training.py`` trains this way).

API
---
``TrainingSettings``
    A dataclass with every knob and good defaults (see its fields).
``Trainer(images, labels, settings=None, *, init=None, class_names=None, channel_axis=None)``
    ``images``/``labels``: lists of numpy arrays (or one array each) of equal shapes. With ``ndim=2`` a
    3D array is a stack trained slice by slice with a 2D net; with ``ndim=3`` it is a volume for a 3D
    net. Multi-channel images (RGB, several stains) name the axis of their channels with ``channel_axis``
    (the same for every image, e.g. -1 for ``(Y, X, 3)``); their labels have the image's shape without it,
    every image has the same number of channels, and each channel is normalized on its own. Construction
    validates the data (clear ``ValueError`` messages), normalizes each image with the percentiles of the
    whole image (``normalization.py``; the slices of a stack under a 2D net when first sampled, so slices
    without strokes are never held, and images may be lazy arrays) and builds the model, or takes it from
    ``init`` (a ``(model, metadata)`` pair as returned by ``io.load_model``) to fine-tune it: its
    normalization, class mapping and channel count are kept, and painting a class the model does not know
    is a ``ValueError``.
``trainer.run()``
    A generator of ``TrainingEvent`` (one per iteration, then a last one with ``done=True`` and a
    ``reason``: "iterations", "time_budget", "plateau", "stopped" or "not_finite"). Closing the generator, or
    ``trainer.request_stop()`` from any thread, ends training within one iteration; either way the
    model is left usable in eval mode on the CPU and GPU memory is released.
``trainer.update_labels(index, labels)``
    Thread-safe: new strokes of image ``index`` are in the batches of the next three iterations at the latest
    (batches are prepared a step ahead on a thread).
``trainer.snapshot()``
    An eval-mode copy (batch norm folded) of the current model, for live previews; safe to call between
    events or from another thread.
``trainer.model``, ``trainer.metadata``, ``trainer.save(path)``
    The network, its metadata (``class_ids``, ``class_names``, ``normalization``, ``training``,
    ``training_profile``: the training images' profiles for ``domain.py``'s check, the class part predicted at the
    end of each run) and saving both with ``io.save_model``.
``train(images, labels, settings=None, *, init=None, class_names=None, channel_axis=None, callback=None,
**overrides)``
    Runs a ``Trainer`` to completion and returns it.

Non-finite training
-------------------
A step whose loss, or whose weights after the optimizer step, hold a NaN or an infinity (a learning rate far too
high, images with extreme values under a "none" recipe) is undone exactly (the model's tensors before each step are
kept in buffers allocated once, on the training device: one more copy of the weights, a copy and a sum per step)
and ends the run with reason "not_finite" and a ``message`` saying so; the weight average only ever takes the
steps that were kept, so no NaN reaches the model the run leaves, its snapshots or a file saved from it. Images
with NaN or infinite pixels need no refusal: normalization sets those pixels to 0 (``normalization.py``).

Normalization
-------------
Percentiles over each whole image (each channel), never per patch. The metadata stores the recipe
(``low``/``high`` percentiles), and prediction recomputes the percentiles over each image it is applied to.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from . import __version__
from .augment import Augmenter, intensity_variant, paste_mix
from .calibration import REFINEMENT_REACH, held_out_patch
from .devices import amp_dtype, default_cpu_threads, release_device_memory, resolve_device
from .domain import (
    SAMPLE_TILE,
    SAMPLE_TILES,
    TRAINING_MIN_PIXELS,
    TRAINING_STEPS,
    TRAINING_TILES,
    background_spread,
    flatten_regions,
    profile,
    read_regions,
    sample_regions,
    training_profile,
)
from .encoders import encoder_parameters
from .holdout import BLOCK, MIN_PIXELS, PREDICTED_PIXELS, held_out
from .io import save_model
from .losses import border_weight_map, class_weights, consistency_loss, masked_loss
from .memory import OutOfMemoryRetry, check_fits, is_out_of_memory, training_bytes
from .model import UNet
from .model_file_checks import MAX_CLASS_ID, MAX_CLASS_NAME
from .normalization import NormalizedView, dataset_recipe, image_params, is_lazy, normalize, slabs
from .predict import predict_regions
from .prefetch import Prefetcher
from .sampling import PatchSampler
from .training_settings import TrainingSettings


class _Batch(NamedTuple):
    """A training batch as the prefetch thread hands it over: input tiles ``(B, 1, *tile)``, targets and
    optional border weights on the output tiles, and the class weights when label updates changed them."""

    images: np.ndarray
    targets: np.ndarray
    weights: np.ndarray | None
    class_weights: torch.Tensor | None
    consistency: float = 0.0
    """The consistency term's weight for this batch (``Trainer._consistency_weight``); above 0 the second half of
    the tiles are intensity variants of the first half's (same labels)."""


@dataclass(frozen=True)
class TrainingEvent:
    """Progress of one training iteration (``done`` marks the final event, with its ``reason``)."""

    iteration: int
    loss: float
    elapsed: float
    samples_seen: int
    learning_rate: float
    done: bool = False
    reason: str | None = None
    """Why training ended, on the final event: "iterations" or "time_budget" (that budget is spent), "plateau"
    (``patience`` iterations without improvement), "stopped" (``request_stop`` or the generator closed) or
    "not_finite" (the loss or the weights became NaN or infinite: that step was undone); a dataset training adds
    "epochs" (all done) and "early_stop" (``patience`` epochs without a better validation mean IoU)."""
    message: str | None = None
    """On a final event whose reason needs explaining ("not_finite"): what happened and what the model keeps."""
    validation: dict | None = None
    """On the event that ends an epoch of a dataset training (``dataset_training.DatasetTrainer``): that epoch's
    validation scores (``dataset_training.EpochScores`` as a dict)."""


@dataclass
class _RunState:
    """What one ``Trainer.run()`` tracks: iterations done, the last loss and learning rate, the seconds spent
    waiting for batches, the smoothed loss for the ``patience`` stop, and why the run ended (None while it goes
    on; "stopped" until the loop first checks, None after an error)."""

    learning_rate: float
    start: float = field(default_factory=time.perf_counter)
    iteration: int = 0
    loss: float = math.nan
    data_time: float = 0.0
    reason: str | None = "stopped"
    message: str | None = None
    """The final event's ``message``."""
    smoothed: float | None = None
    """Exponential moving average of the loss (factor 0.95)."""
    best: float = math.inf
    since_best: int = 0
    """Iterations since the smoothed loss last improved by 1 %."""

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add_loss(self, loss: float) -> None:
        """Record the loss of the iteration just done and whether the smoothed loss improved."""
        self.loss = loss
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss
        if self.smoothed < 0.99 * self.best:
            self.best, self.since_best = self.smoothed, 0
        else:
            self.since_best += 1


def _as_list(arrays, lazy: bool = False) -> list[np.ndarray]:
    """One array or a sequence of them as a list of numpy arrays (with ``lazy``, lazy arrays stay lazy)."""
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        arrays = [arrays]
    return [a if lazy and is_lazy(a) else np.asarray(a) for a in arrays]


def _channels_first(images: list[np.ndarray], channel_axis: int | None) -> list[np.ndarray]:
    """The images with their channels moved to the front (unchanged without ``channel_axis``); every image
    must have the same number of channels."""
    if channel_axis is None:
        return images
    moved = []
    for i, img in enumerate(images):
        if not -img.ndim <= channel_axis < img.ndim:
            raise ValueError(f"image {i} has {img.ndim} dimensions: it has no channel axis {channel_axis}")
        moved.append(np.moveaxis(img, channel_axis, 0))
    counts = sorted({img.shape[0] for img in moved})
    if len(counts) > 1:
        raise ValueError(f"the images have different numbers of channels ({counts}): train on images alike")
    return moved


def integer_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a non-negative integer array; float arrays holding whole numbers are accepted."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError(f"{name} must hold integer class ids, got non-integer values")
        labels = labels.astype(np.int64)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must not hold negative ids (0 = unpainted, 1..K = classes)")
    return labels


CONSISTENCY_RAMP = (0.1, 0.3)
"""When the intensity-consistency term (``TrainingSettings.consistency``) joins, as fractions of the iteration/time
budget: off before the first (each variant learns its tile's prediction, and early that prediction is poor: with the
term on from the first step clean images lost Dice, docs/benchmarks.md), then rising linearly, full from the second
(before the weight average's window, ``weight_averaging``, opens)."""

DENSE_VOID = 255
"""With ``dense_labels`` (complete labels, e.g. a dataset's masks): the value that means "no label" (0 is a class)."""


def painted_ids(labels: Sequence[np.ndarray], unpainted: int = 0) -> list[int]:
    """Sorted painted class ids (values other than ``unpainted``) over all label arrays (read in slabs, so
    memory-mapped labels larger than memory are fine)."""
    ids: set[int] = set()
    for lab in labels:
        for slab in slabs(lab):
            ids.update(int(v) for v in np.unique(slab) if v != unpainted)
    return sorted(ids)


def targets_from_labels(labels: np.ndarray, class_ids: Sequence[int], unpainted: int = 0) -> np.ndarray:
    """Map user ids to class indices 0..K-1 (int16; ``class_ids[k]`` -> ``k``, in whatever order the ids come, as
    a model file may list them), ``unpainted`` (0, or ``DENSE_VOID`` for dense labels) to -1. Unknown ids are a
    ValueError."""
    ids = np.asarray(class_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ascending = ids[order]
    flat = labels.astype(np.int64, copy=False)
    index = np.clip(np.searchsorted(ascending, flat), 0, len(ids) - 1)
    known = ascending[index] == flat
    unknown = ~known & (flat != unpainted)
    if unknown.any():
        extra = sorted(int(v) for v in np.unique(flat[unknown]))
        raise ValueError(f"labels hold class ids {extra} that the model does not know (it has {list(ids)})")
    return np.where(known, order[index], -1).astype(np.int16)


def _validated_pairs(images, labels, settings: TrainingSettings, channel_axis: int | None, unpainted: int = 0):
    """The images (channels first with ``channel_axis``; lazy arrays stay lazy), their labels as integer arrays and
    the sorted painted ids; ``ValueError`` for images and labels a ``settings.ndim``-D net cannot train on."""
    images, labels = _as_list(images, lazy=True), _as_list(labels)
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} label arrays")
    if not images:
        raise ValueError("no images given")
    images = _channels_first(images, channel_axis)
    labels = [integer_labels(lab, f"labels {i}") for i, lab in enumerate(labels)]
    for i, (img, lab) in enumerate(zip(images, labels)):
        spatial = img.shape if channel_axis is None else img.shape[1:]
        if spatial != lab.shape:
            without = " (without channels)" if channel_axis is not None else ""
            raise ValueError(f"image {i} has shape {spatial}{without} but its labels have shape {lab.shape}")
        if lab.ndim not in (settings.ndim, settings.ndim + 1) or (settings.ndim == 3 and lab.ndim != 3):
            raise ValueError(
                f"image {i} has {lab.ndim} spatial dimensions; a {settings.ndim}D net needs "
                + ("2D images or 3D stacks" if settings.ndim == 2 else "3D volumes")
            )
    found = painted_ids(labels, unpainted)
    if not found:
        raise ValueError(f"nothing is painted: paint at least two classes (label {unpainted} means unpainted)")
    return images, labels, found


class _NormalizedSlice:
    """Slice ``z`` of a stack (channels first with ``channels``), normalized with ``params`` the first time it
    is indexed and kept from then on; ``shape`` and ``ndim`` are known without reading it."""

    def __init__(self, stack, z: int, params: dict, channels: bool):
        self._stack, self._z, self._params, self._channels = stack, z, params, channels
        self.shape = (stack.shape[0], *stack.shape[2:]) if channels else tuple(stack.shape[1:])
        self.ndim = len(self.shape)
        self.array: np.ndarray | None = None

    def __getitem__(self, key):
        if self.array is None:
            plane = self._stack[:, self._z] if self._channels else self._stack[self._z]
            self.array = normalize(np.asarray(plane), self._params)
        return self.array[key]


@torch.no_grad()
def _running_mean(averaged: list[torch.Tensor], current: list[torch.Tensor], count: torch.Tensor) -> None:
    """The ``multi_avg_fn`` of the weight average (``torch.optim.swa_utils.AveragedModel`` with
    ``use_buffers=True``): ``count`` models are in the mean of floating-point tensors (weights, batch-norm
    statistics) and ``current`` joins them; integer buffers (batch norm's ``num_batches_tracked``) take the
    latest value. AveragedModel's own averaging does not handle them: on a CPU it truncates their running mean
    (the count stays at the window's first value), and on CUDA its foreach path calls ``_foreach_addcdiv_``,
    which raises for integers. The count is taken as a Python number, so the mean is the same float32 arithmetic
    on every device."""
    n = int(count) + 1
    for mean, value in zip(averaged, current):
        if mean.is_floating_point():
            mean += (value - mean) / n
        else:
            mean.copy_(value)


class _LastGood:
    """The state of a model before the step being taken (its tensors copied into buffers allocated once, on its
    device), to undo a step whose loss or weights are not finite exactly, batch-norm statistics included."""

    def __init__(self, model: UNet):
        self._tensors = list(model.state_dict().values())  # share the model's storage
        self._saved = [t.clone() for t in self._tensors]
        self._floating = [t for t in self._tensors if t.is_floating_point()]

    def keep(self) -> None:
        """Remember the model's state now (before a step)."""
        for saved, tensor in zip(self._saved, self._tensors):
            saved.copy_(tensor)

    def restore(self) -> None:
        """Put back the state :meth:`keep` remembered."""
        for saved, tensor in zip(self._saved, self._tensors):
            tensor.copy_(saved)

    def problem(self, loss: torch.Tensor) -> str | None:
        """What is not finite after a step, "loss" or "weights" (a NaN or infinity anywhere in the weights and
        buffers; a sum per tensor, so weights whose sum overflows float32 count too), or None; one device sync."""
        finite = torch.stack([loss.detach().float().reshape(()), *(t.sum() for t in self._floating)]).isfinite()
        if bool(finite.all()):
            return None
        return "weights" if bool(finite[0]) else "loss"


def _not_finite_message(iteration: int, what: str, learning_rate: float) -> str:
    kept = "nothing was learned"
    if iteration > 1:
        kept = f"the model keeps what the {iteration - 1} iteration(s) before it learned"
    return (
        f"training stopped at iteration {iteration}: the {what} became NaN or infinite (learning rate "
        f"{learning_rate:.3g} too high, or images with extreme values?); {kept}"
    )


class Trainer:
    """Train a U-Net from sparse painted labels; see the module docstring for the whole API."""

    def __init__(
        self,
        images,
        labels,
        settings: TrainingSettings | None = None,
        *,
        init: tuple[torch.nn.Module, dict] | None = None,
        class_names: Sequence[str] | dict[int, str] | None = None,
        channel_axis: int | None = None,
        dense_labels: bool = False,
    ):
        self.settings = settings = settings or TrainingSettings()
        self.dense_labels = dense_labels
        self.unpainted = DENSE_VOID if dense_labels else 0
        """The label value that means "no label": 0 for strokes, ``DENSE_VOID`` (255) for complete labels."""
        images, labels, found = _validated_pairs(images, labels, settings, channel_axis, self.unpainted)
        self.in_channels = 1 if channel_axis is None else images[0].shape[0]
        if init is not None:
            self._model_from_init(init, found)
        else:
            self._new_model(found, class_names)
        self._plan_tiles()
        self._prepare_pieces(images, labels, None if channel_axis is None else 0)
        self._sample_profiles(images, self.image_normalization, self._shapes, channel_axis is not None)
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What every trainer holds besides its data and model: the lock, label updates, the stop, the run record."""
        self._lock = threading.Lock()
        self._pending: dict[int, tuple | np.ndarray] = {}
        self.label_problems: list[tuple[int, str]] = []
        """``(image index, why)`` for each update from :meth:`update_labels_later` that was not used."""
        self._stop = threading.Event()
        self._smaller: TrainingSettings | None = None
        """Sizes after an out-of-memory step, for the batches built from then on (``_shrink_after_out_of_memory``)."""
        self._record: dict = {}
        self._average: AveragedModel | None = None
        """The weight average of the current run() once its averaging window has begun."""
        self.calibration: dict | None = None
        """What the last run's fitted or given temperature does on its held-out pixels (``calibration.calibrate``:
        temperature, pixel count, NLL and expected calibration error before and after), or None (none fitted)."""
        self.iteration = 0
        self._run_start: float | None = None
        """``time.perf_counter()`` when the current or last ``run()`` began (the budget the prefetch thread sees)."""
        self._clock_start: float | None = None
        """``time.perf_counter()`` when the current run's first step ended (None before): where the time fraction
        of the schedule starts (:meth:`_progress`)."""
        self._first_iteration = 0
        """The iteration the next ``run()`` starts counting from (a resumed dataset training: where it stopped)."""
        self._batch_iteration = 0
        """The iteration the prefetch thread's next batch is for, counted where batches are built (not read from
        ``iteration``, which the training thread advances meanwhile): a seeded run pairs the same batches whatever
        the two threads' timing."""

    def _model_from_init(self, init: tuple[torch.nn.Module, dict], found: list[int]) -> None:
        """Take the model to fine-tune from ``init`` (a copy; the caller's stays untouched) with its class ids and
        names, normalization and training history; ``ValueError`` where it cannot learn these labels."""
        settings = self.settings
        model, meta = init
        self.class_ids = [int(c) for c in meta.get("class_ids", range(1, model.config["n_classes"] + 1))]
        if model.config["n_classes"] != len(self.class_ids):
            raise ValueError("the initial model's metadata does not match its number of classes")
        if len(found) > len(self.class_ids) or not set(found) <= set(self.class_ids):
            raise ValueError(
                f"the initial model has {len(self.class_ids)} classes (ids {self.class_ids}) but the labels "
                f"hold ids {found}: paint the same classes or train a new model"
            )
        if model.config["ndim"] != settings.ndim:
            raise ValueError(f"the initial model is {model.config['ndim']}D but ndim={settings.ndim}")
        if model.config["in_channels"] != self.in_channels:
            raise ValueError(
                f"the initial model takes {model.config['in_channels']} channel(s) but the images "
                f"have {self.in_channels}"
            )
        self.normalization = dict(meta.get("normalization") or settings.normalization)
        self.class_names = list(meta.get("class_names") or [f"class {c}" for c in self.class_ids])
        self._history = list((meta.get("training") or {}).get("history", []))
        self._earlier_profile = meta.get("training_profile")
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        self.model = copy.deepcopy(model).cpu().train()
        self.model.temperature = 1.0  # fitted to the weights it came with: training learns on plain logits

    def _new_model(self, found: list[int], class_names: Sequence[str] | dict[int, str] | None) -> None:
        """Build a new network for the painted ids ``found`` (at least two) as ``settings`` describes, with
        ``class_names`` in the order of the ids or by id (ids without a name are "class <id>")."""
        settings = self.settings
        if len(found) < 2:
            raise ValueError(f"only one class is painted (id {found[0]}): paint at least two classes")
        self.class_ids = found
        self.normalization = dict(settings.normalization)
        if isinstance(class_names, dict):
            class_names = [class_names.get(c, f"class {c}") for c in found]
        names = list(class_names) if class_names else [f"class {c}" for c in found]
        if len(names) != len(found):
            raise ValueError(f"got {len(names)} class names for {len(found)} painted classes")
        if max(found) > MAX_CLASS_ID:  # what a model file may hold: a model Save writes, Load must read
            raise ValueError(f"painted id {max(found)} is above {MAX_CLASS_ID}, the largest a model file holds")
        long = next((n for n in names if len(str(n)) > MAX_CLASS_NAME), None)
        if long is not None:
            raise ValueError(f"a class name of {len(str(long))} characters: at most {MAX_CLASS_NAME}")
        self.class_names = names
        self._history = []
        self._earlier_profile = None
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        self.model = UNet(
            in_channels=self.in_channels,
            n_classes=len(found),
            ndim=settings.ndim,
            depth=settings.depth,
            base_filters=settings.base_filters,
            batch_norm=settings.batch_norm,
            dropout=settings.dropout,
            block=settings.block,
        )

    def _plan_tiles(self) -> None:
        """The model's input and output tile shapes for ``settings.patch_size``, and where the output tile (its
        labels, the loss) lies in an input tile."""
        settings = self.settings
        self.image_ndim = settings.ndim
        self.output_shape = self.model.legal_output_shape(settings.patch_size)
        # Channels-last: a 1.17x faster training step on CPU (oneDNN; docs/benchmarks.md).
        self._memory_format = torch.channels_last if settings.ndim == 2 else torch.channels_last_3d
        self.input_shape = self.model.legal_input_shape(self.output_shape)
        self._output_region = tuple(
            slice((i - o) // 2, (i - o) // 2 + o) for i, o in zip(self.input_shape, self.output_shape)
        )

    def _prepare_pieces(self, images: list, labels: list[np.ndarray], channels: int | None) -> None:
        """The whole-image percentiles, the normalized image pieces and target pieces, the patch sampler, the
        augmenter (both drawing from one seeded generator) and the class weights."""
        settings = self.settings
        self._rng = np.random.default_rng(settings.seed)
        self._shapes = [lab.shape for lab in labels]
        if self.normalization.get("method") == "dataset":  # fixed from these images, then the same for every image
            self.normalization = dataset_recipe(images, self.normalization, channels)
        self.image_normalization = [image_params(img, self.normalization, channels) for img in images]
        """The normalization parameters (percentile values) of each image, computed once over the whole image."""
        targets, weights, self._held = zip(*[self._target_pieces(i, lab) for i, lab in enumerate(labels)])
        self._held = list(self._held)
        """Per image, per piece: the flat indices and class indices of its held-out painted pixels (or None)."""
        self.sampler = PatchSampler(
            [self._image_pieces(img, params, channels) for img, params in zip(images, self.image_normalization)],
            targets,
            self.input_shape,
            self.output_shape,
            self._rng,
            weights=weights if settings.border_weight else None,
            class_power=settings.class_sampling,
        )
        self._make_augmenters()
        self._class_weights = self._compute_class_weights()

    def _make_augmenters(self) -> None:
        """The augmenter of ``settings`` and the maker of intensity variants (``consistency``), both drawing from
        the trainer's seeded generator."""
        settings = self.settings
        self._variant = intensity_variant(self._rng)
        self.augmenter = Augmenter(
            self._rng,
            flips=settings.flips,
            rotations=settings.rotations,
            elastic=settings.elastic,
            intensity=settings.intensity,
            zoom_range=settings.zoom,
            gamma_range=settings.gamma_range,
            scale_range=settings.gain_range,
            shift_range=settings.offset_range,
            blur=settings.blur,
            illumination=settings.illumination,
            background=settings.background,
            specks=settings.specks,
            noise=settings.noise,
        )

    def _sample_profiles(self, images: list, params: list[dict], shapes: list[tuple], channels: bool) -> None:
        """Read the sampled tiles of the training images for their profiles (``domain.py``), once: their normalized
        pixels give the intensity part now; each run's end predicts the same tiles for the class part
        (:meth:`_profile_classes`). As many tiles as a budget of about ``domain.TRAINING_STEPS`` training steps
        allows with the network's context (``domain.TRAINING_TILES`` at most), up to ``domain.SAMPLE_TILES`` per
        image; images beyond one tile each are chosen evenly. The background spread of each chosen image
        (``domain.background_spread``, no network) is read from the whole sample a prediction of it reads.
        ``params``: each image's normalization parameters, ``shapes``: its spatial shape."""
        s, halo, grid = self.settings, self.model.halo, self.model.grid
        budget = max(TRAINING_MIN_PIXELS, TRAINING_STEPS * 3 * s.batch_size * math.prod(self.input_shape))
        tile = [SAMPLE_TILE] * len(halo)
        if len(halo) == 3:
            tile[0] = 1  # the tiles are one plane thick
        per_tile = math.prod(n + 2 * h + grid for n, h in zip(tile, halo))
        total = int(min(TRAINING_TILES, max(1, budget // per_tile)))
        count = min(len(images), total)
        chosen = sorted({round(float(i)) for i in np.linspace(0, len(images) - 1, count)})
        tiles = min(SAMPLE_TILES, total // len(chosen))
        self._profile_samples = []
        for i in chosen:
            view = NormalizedView(images[i], params[i])
            regions, predicted = sample_regions(shapes[i], tiles), sample_regions(shapes[i])
            parts = read_regions(view, regions, channels)
            background = background_spread(parts if regions == predicted else read_regions(view, predicted, channels))
            self._profile_samples.append((view, regions, flatten_regions(parts), background))
        self.image_profiles = [profile(values, None, spread) for _, _, values, spread in self._profile_samples]
        """The profiles of (some of) the training images: intensities, and once a run has ended the class
        fractions, class intensities and entropy of the model it left (``metadata["training_profile"]``)."""

    def _profile_classes(self, device: torch.device) -> None:
        """The class part of the training images' profiles: the sampled tiles predicted on ``device`` by the model
        this run leaves (one pass, ``predict.predict_region``: each tile with its context, or the whole plane the
        tiles lie in where that reads fewer pixels; the same probabilities either way)."""
        model = self.model.inference_copy().to(device)
        profiles = []
        for view, regions, values, spread in self._profile_samples:
            sampled = np.concatenate([p.reshape(p.shape[0], -1) for p in predict_regions(model, view, regions)], 1)
            profiles.append(profile(values, sampled, spread))
        self.image_profiles = profiles

    # --- data -------------------------------------------------------------------------------------

    def _image_pieces(self, image, params: dict, channels: int | None) -> list:
        """The network-sized pieces of one image (channels first with ``channels``), normalized with ``params``
        (its whole-image percentiles): the image itself, or the slices of a stack under a 2D net, each
        normalized when first read (a slice without strokes never is, and a lazy stack is read only there)."""
        if image.ndim - (channels is not None) != self.image_ndim + 1:
            return [normalize(np.asarray(image), params)]
        return [_NormalizedSlice(image, z, params, channels is not None) for z in range(image.shape[-3])]

    def _target_pieces(self, index: int, labels: np.ndarray) -> tuple[list, list | None, list]:
        """Class-index targets (and border weights when on) per piece of labels array ``index``, without the
        pixels held out for the temperature fit (``holdout.held_out``), and those pixels per piece (flat indices
        and class indices, or None); the slices of a stack without strokes share one constant view (nothing to
        sample there, nothing held)."""
        border, stack = self.settings.border_weight, labels.ndim == self.image_ndim + 1
        share = self.settings.calibration_holdout if self.settings.temperature == "auto" else 0.0
        targets, weights, held = [], [], []
        for z, plane in enumerate(labels if stack else [labels]):
            if stack and not (plane != self.unpainted).any():
                targets.append(np.broadcast_to(np.int16(-1), plane.shape))
                weights.append(np.broadcast_to(np.float32(1.0), plane.shape) if border else None)
                held.append(None)
                continue
            target = targets_from_labels(plane, self.class_ids, self.unpainted)
            kept_out = held_out(target, share, (self.settings.seed or 0, index, z))
            held.append((np.flatnonzero(kept_out), target[kept_out]) if kept_out.any() else None)
            target[kept_out] = -1
            targets.append(target)
            weights.append(border_weight_map(target) if border else None)
        return targets, (weights if border else None), held

    def _compute_class_weights(self) -> torch.Tensor:
        counts = self.sampler.class_counts(len(self.class_ids))
        return torch.as_tensor(class_weights(counts, self.settings.class_balance), dtype=torch.float32)

    def update_labels(self, index: int, labels: np.ndarray) -> None:
        """Replace the labels of image ``index`` (thread-safe); batches use them within three iterations.

        Raises ``ValueError`` for a wrong shape, non-integer labels or ids the model does not know.
        """
        pieces = self._checked_pieces(self._checked_index(index), labels)
        with self._lock:
            self._pending[index] = pieces

    def update_labels_later(self, index: int, source) -> None:
        """Like :meth:`update_labels`, but ``source`` (an array its owner may go on writing into, such as a
        napari Labels layer's data) is read on the training thread, before the next batch, so the caller never
        waits for a copy. A read that overlaps a write may miss part of a stroke until the next update. An
        update that :meth:`update_labels` would refuse is skipped, with its reason in ``label_problems``."""
        with self._lock:
            self._pending[self._checked_index(index)] = source

    def _checked_index(self, index: int) -> int:
        if not 0 <= index < len(self._shapes):
            raise IndexError(f"image index {index} out of range (0..{len(self._shapes) - 1})")
        return index

    def _checked_pieces(self, index: int, labels) -> tuple:
        """The target pieces of new labels for image ``index``; ``ValueError`` for labels it cannot use."""
        labels = integer_labels(labels)
        if labels.shape != self._shapes[index]:
            raise ValueError(f"labels shape {labels.shape} does not match image {index} shape {self._shapes[index]}")
        return self._target_pieces(index, labels)

    def _apply_pending(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, {}
        changed = False
        for index, update in pending.items():
            if not isinstance(update, tuple):  # from update_labels_later: read and checked here
                try:
                    update = self._checked_pieces(index, update)
                except ValueError as e:
                    self.label_problems.append((index, str(e)))
                    continue
            before = (*self.sampler.targets_of(index), self._held[index])
            targets, weights, self._held[index] = update
            self.sampler.set_targets(index, targets, weights)
            if not self.sampler.class_counts(len(self.class_ids)).any():  # every stroke erased: nothing to learn from
                targets, weights, self._held[index] = before
                self.sampler.set_targets(index, targets, weights)
                self.label_problems.append((index, "no strokes are left on any image: the earlier ones are kept"))
                continue
            changed = True
        if changed:
            self._class_weights = self._compute_class_weights()
        return changed

    # --- training ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the training loop to end (thread-safe); it ends within one iteration, keeping the model."""
        self._stop.set()

    def _numpy_batch(self) -> _Batch:
        """One training batch as numpy arrays, built on the prefetch thread: label updates waiting from
        ``update_labels`` are applied first; the class weights come along when they changed (else None)."""
        self._apply_smaller_sizes()
        changed = self._apply_pending()
        consistency = self._consistency_weight(self._batch_iteration)
        self._batch_iteration += 1
        paired = consistency > 0
        images, targets, weights = [], [], []
        for _ in range(self.settings.batch_size // 2 if paired else self.settings.batch_size):
            image, target, weight = self.sampler.sample()
            image, target, weight = self.augmenter(image, target, weight)
            images.append(image)
            targets.append(target)
            weights.append(weight)
        images, targets = np.stack(images), np.stack(targets)
        weights = np.stack(weights) if self.settings.border_weight else None
        paste_mix(images, targets, weights, self._rng, self.settings.paste_mix, self._output_region)
        if paired:  # each tile and its intensity variant (the labels are the tile's)
            variants = [self._variant(image, target)[0] for image, target in zip(images, targets)]
            images, targets = np.concatenate([images, variants]), np.concatenate([targets, targets])
            weights = None if weights is None else np.concatenate([weights, weights])
        crop = (slice(None), *self._output_region)
        targets = targets[crop].astype(np.int64)
        weights = None if weights is None else np.ascontiguousarray(weights[crop])
        images = images if self.in_channels > 1 else images[:, None]  # (batch, channels, *tile)
        return _Batch(images, targets, weights, self._class_weights if changed else None, consistency)

    def _to_device(self, batch: _Batch, device: torch.device):
        x = torch.from_numpy(batch.images).to(device).contiguous(memory_format=self._memory_format)
        y = torch.from_numpy(batch.targets).to(device)
        w = None if batch.weights is None else torch.from_numpy(batch.weights).to(device)
        return x, y, w, batch.consistency

    def _consistency_weight(self, iteration: int) -> float:
        """The intensity-consistency weight for the batch of ``iteration``: 0 until ``CONSISTENCY_RAMP[0]`` of the
        budget is spent (all tiles of the batch carry strokes), then rising linearly to ``settings.consistency`` at
        ``CONSISTENCY_RAMP[1]``; 0 with a batch of one tile (no pair)."""
        s = self.settings
        if s.consistency <= 0 or s.batch_size < 2:
            return 0.0
        start, full = CONSISTENCY_RAMP
        ramp = (self._progress(iteration) - start) / (full - start)
        return s.consistency * min(1.0, max(0.0, ramp))

    def _progress(self, iteration: int) -> float:
        """How much of the iteration/time budget is spent: the larger of the two fractions, the time's counted from
        the end of the run's first step (``_clock_start``) over what the budget had left then. The first step's
        one-off costs (kernel creation, the first batches, the model moved to the device) would otherwise put the
        clock ahead of the iteration count in the first steps of a run that the count ends, and steer its warm-up by
        the machine's load: a seeded run is repeatable unless its time budget is what ends it."""
        s = self.settings
        spent = iteration / s.iterations if s.iterations else 0.0
        clock_start, run_start = self._clock_start, self._run_start
        if s.time_budget and clock_start is not None and run_start is not None:
            left = s.time_budget - (clock_start - run_start)
            spent = max(spent, 1.0 if left <= 0 else (time.perf_counter() - clock_start) / left)
        return spent

    def _learning_rate(self, progress: float) -> float:
        peak = self.settings.learning_rate
        warmup = 0.03
        if progress < warmup:
            return peak * (0.1 + 0.9 * progress / warmup)
        progress = (progress - warmup) / (1 - warmup)
        return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def run(self) -> Iterator[TrainingEvent]:
        """Train, yielding a ``TrainingEvent`` per iteration and a final one with ``done=True``."""
        s = self.settings
        device = resolve_device(s.device)
        previous_threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(s.cpu_threads or default_cpu_threads())
        state = _RunState(learning_rate=s.learning_rate, iteration=self._first_iteration)
        self._run_start, self._batch_iteration, self._clock_start = state.start, state.iteration, None
        check_fits(  # a one-line ValueError before the optimizer and the first batch are allocated
            training_bytes(self.model, self.input_shape, s.batch_size),
            device,
            f"training with {_batches_in_words(s.batch_size, self.input_shape)}, "
            f"{self.model.config['base_filters']} filters, depth {self.model.config['depth']}",
            "choose a smaller patch size, batch size, base filters or depth "
            "(--patch-size, --batch-size, --filters, --depth)",
        )
        dtype = amp_dtype(device, s.cpu_bfloat16) if s.amp else None
        self._record = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "device": str(device),
            "precision": f"mixed {str(dtype).removeprefix('torch.')}" if dtype else "float32",
        }
        loop = self._loop(device, dtype, state)
        try:
            yield from loop
        except GeneratorExit:
            state.reason = "stopped"
            raise
        finally:
            loop.close()
            del loop  # frees the optimizer, batches and activations before the cache is emptied
            self._finish(device, previous_threads, state)
        yield TrainingEvent(
            state.iteration,
            state.loss,
            state.elapsed(),
            state.iteration * s.batch_size,
            state.learning_rate,
            True,
            state.reason,
            state.message,
        )

    def _loop(self, device: torch.device, dtype: torch.dtype | None, state: _RunState) -> Iterator[TrainingEvent]:
        s = self.settings
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        model = self.model.to(device, memory_format=self._memory_format).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate)
        weights = self._class_weights.to(device)
        last_good = _LastGood(model)
        # Sampling and augmentation run on a thread, a batch ahead of the step (prefetch.py).
        with Prefetcher(self._numpy_batch, depth=1, name="napari-unet training batches") as batches:
            while True:
                elapsed = state.elapsed()
                state.reason = self._stop_reason(state, elapsed)
                if state.reason:
                    return
                state.learning_rate = lr = self._learning_rate(self._progress(state.iteration))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tick = time.perf_counter()
                batch = self._next_batch(batches)
                if batch.class_weights is not None:
                    weights = batch.class_weights.to(device)
                try:
                    tensors = self._to_device(batch, device)
                    state.data_time += time.perf_counter() - tick
                    loss = self._step(model, optimizer, scaler, dtype, tensors, weights, state, last_good)
                except Exception as error:  # only out-of-memory goes on, with smaller sizes
                    if not is_out_of_memory(error):
                        raise
                    loss = tensors = None
                if loss is None:  # outside the except clause: the failed step's tensors are gone
                    release_device_memory(device)
                    if not self._shrink_after_out_of_memory(state):
                        state.reason = "out_of_memory"
                        return
                    continue
                if isinstance(loss, str):  # what was not finite; the step is undone
                    state.reason, state.message = "not_finite", _not_finite_message(state.iteration + 1, loss, lr)
                    return
                state.iteration = self.iteration = state.iteration + 1
                if self._clock_start is None:
                    self._clock_start = time.perf_counter()
                state.add_loss(loss)
                yield TrainingEvent(state.iteration, state.loss, state.elapsed(), state.iteration * s.batch_size, lr)

    # --- out of memory: smaller batches, then smaller patches, then a stop that keeps the model -------------------

    def _shrink_after_out_of_memory(self, state: _RunState) -> bool:
        """After a step ran out of memory: halve the batch, or at one patch per batch the patch (to the next legal
        size), for the batches built from now on, and say so (an ``OutOfMemoryRetry`` warning); False, with a
        warning that training stops and keeps the model trained so far, when both are at their smallest."""
        s = self._smaller or self.settings
        wanted = self._wanted_shape(s)
        what = _batches_in_words(*wanted)
        if s.batch_size > 1:
            smaller = dataclasses.replace(s, batch_size=s.batch_size // 2)
        else:
            output = self.model.legal_output_shape(
                [max(1, o // 2) for o in self.model.legal_output_shape(s.patch_size)]
            )
            smaller = dataclasses.replace(s, patch_size=tuple(output))
            if math.prod(self._wanted_shape(smaller)[1]) >= math.prod(wanted[1]):
                warnings.warn(
                    f"out of memory training with {what} (the smallest): training stopped after {state.iteration} "
                    "iterations, the model trained so far is kept; free memory on the device, or train a smaller "
                    "model (--filters, --depth)",
                    OutOfMemoryRetry,
                    stacklevel=2,
                )
                return False
        new = self._wanted_shape(smaller)
        warnings.warn(
            f"out of memory training with {what}: going on with {_batches_in_words(*new)}",
            OutOfMemoryRetry,
            stacklevel=2,
        )
        self._smaller = smaller
        return True

    def _wanted_shape(self, settings: TrainingSettings) -> tuple[int, tuple[int, ...]]:
        """``(batch size, input tile)`` of the batches ``settings`` make."""
        return settings.batch_size, self.model.legal_input_shape(self.model.legal_output_shape(settings.patch_size))

    def _apply_smaller_sizes(self) -> None:
        """On the prefetch thread, before a batch is built: take the sizes ``_shrink_after_out_of_memory`` chose."""
        smaller = self._smaller
        if smaller is not None:
            self.settings = smaller
            self._plan_tiles()
            sampler = self.sampler
            sampler.input_shape, sampler.output_shape = self.input_shape, self.output_shape
            sampler.halo = tuple((i - o) // 2 for i, o in zip(self.input_shape, self.output_shape))
            self._smaller = None

    def _next_batch(self, batches: Prefetcher) -> _Batch:
        """The next batch of the current sizes: those built before an out-of-memory shrink are dropped (new class
        weights they brought go on with the batch returned)."""
        class_weights = None
        while True:
            batch = batches.get()
            if batch.class_weights is not None:
                class_weights = batch.class_weights
            if (batch.images.shape[0], batch.images.shape[2:]) == self._wanted_shape(self._smaller or self.settings):
                return batch if class_weights is None else batch._replace(class_weights=class_weights)

    def _stop_reason(self, state: _RunState, elapsed: float) -> str | None:
        """Why training ends before the next iteration (a ``TrainingEvent.reason``), or None to go on."""
        s = self.settings
        if self._stop.is_set():
            return "stopped"
        if s.iterations is not None and state.iteration >= s.iterations:
            return "iterations"
        if s.time_budget is not None and elapsed >= s.time_budget:
            return "time_budget"
        if s.patience is not None and state.since_best >= s.patience:
            return "plateau"
        return None

    def _step(
        self,
        model: UNet,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        dtype: torch.dtype | None,
        tensors: tuple,
        weights: torch.Tensor,
        state: _RunState,
        last_good: _LastGood,
    ) -> float | str:
        """One optimizer step on the device tensors ``(x, y, border weights)``, and the weight average once the
        averaging window has begun; under the lock, so snapshots and saves never see half-updated weights.
        Returns the loss, or, for a step whose loss or weights are not finite, undone (``last_good``) before the
        average sees it, what was not finite ("loss" or "weights")."""
        s = self.settings
        x, y, w, consistency = tensors
        with self._lock:
            last_good.keep()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            logits = logits.float()
            # paired: the strokes teach from the tiles (first half), the variants learn the tiles' predictions
            tiles = len(logits) // 2 if consistency else len(logits)
            weight_map = None if w is None else w[:tiles]
            loss = masked_loss(logits[:tiles], y[:tiles], weights, weight_map=weight_map, dice_weight=s.dice_weight)
            if consistency:
                loss = loss + consistency * consistency_loss(logits[:tiles], logits[tiles:])
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if state.iteration < s.freeze_encoder:  # no gradient: Adam leaves the encoder as it is
                for parameter in encoder_parameters(model):
                    parameter.grad = None
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            problem = last_good.problem(loss)
            if problem is not None:
                last_good.restore()
                return problem
            spent = self._progress(state.iteration + 1)
            if s.weight_averaging and spent > 1 - s.weight_averaging:
                if self._average is None:
                    self._average = AveragedModel(model, use_buffers=True, multi_avg_fn=_running_mean)
                self._average.update_parameters(model)
        return float(loss.detach())

    def _finish(self, device: torch.device, previous_threads: int, state: _RunState) -> None:
        with self._lock:
            average, self._average = self._average, None  # a later run() averages its own window
            self.model = self.model.cpu().eval()
            if average is not None:
                self.model.load_state_dict(average.module.state_dict())
        averaged = 0 if average is None else int(average.n_averaged)
        del average  # on a GPU, released before the cache is emptied
        if state.reason is not None and state.iteration > 0:  # ended (not by an error) with new weights
            self._settle(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.set_num_threads(previous_threads)
        self._record.update(
            iterations=state.iteration,
            averaged_iterations=averaged,
            seconds=round(state.elapsed(), 3),
            data_seconds=round(state.data_time, 3),
            final_loss=state.loss,
            stop_reason=state.reason or "error",
        )
        self._history.append({**self._record, "settings": dataclasses.asdict(self.settings)})

    def _settle(self, device: torch.device) -> None:
        """After a run that changed the weights: the temperature (:meth:`_calibrate`), then the class part of the
        training profile, predicted with that temperature as every later prediction will be."""
        self._calibrate(device)
        self._profile_classes(device)

    def _calibrate(self, device: torch.device) -> None:
        """The softmax temperature of the model the run leaves (``settings.temperature``): fitted on the held-out
        pixels ("auto"; where there are too few, none), given (a number), or none ("off"); ``calibration`` says
        what it does on the held-out pixels."""
        from .calibration import calibrate

        chosen = self.settings.temperature
        self.model.temperature = 1.0
        self.calibration = None
        pixels = None if chosen == "off" else self._held_out_pixels(device)
        if pixels is not None:
            self.calibration = calibrate(*pixels, chosen)
            self.model.temperature = self.calibration["temperature"]
        elif chosen != "auto" and chosen != "off":
            self.model.temperature = float(chosen)

    def _held_out_pixels(self, device: torch.device) -> tuple[list, np.ndarray] | None:
        """``(patches, targets)`` of the painted pixels held out of training: the test-time flip passes and edge
        refinement of a default prediction (``calibration.held_out_patch``) of a seeded choice of the held-out
        blocks, as many as
        ``holdout.PREDICTED_PIXELS`` input pixels per pass allow (so a run's end stays short on any image), each
        piece's chosen blocks predicted with their context or, where that reads less, their bounding box; None
        where there are fewer than ``holdout.MIN_PIXELS`` of them or they hold one class."""
        held = [(i, j, h) for i, pieces in enumerate(self._held) for j, h in enumerate(pieces) if h is not None]
        model = self.model.inference_copy().to(device)
        shapes = {(i, j): self._piece_shape(i, j) for i, j, _ in held}
        candidates = []
        for index, j, (flat, _) in held:
            shape = shapes[index, j]
            keys = np.stack([c // BLOCK for c in np.unravel_index(flat, shape)], 1)
            inverse = np.unique(keys, axis=0, return_inverse=True)[1].ravel()
            cost = _patch_pixels([BLOCK] * len(shape), shape, model)
            candidates += [(index, j, np.flatnonzero(inverse == k), cost) for k in range(inverse.max() + 1)]
        chosen: dict[tuple[int, int], list[np.ndarray]] = {}
        spent = 0
        for k in np.random.default_rng(self.settings.seed).permutation(len(candidates)):
            index, j, which, cost = candidates[k]
            if spent and spent + cost > PREDICTED_PIXELS:
                break
            chosen.setdefault((index, j), []).append(which)
            spent += cost
        pieces = {(i, j): h for i, j, h in held}
        selected = [(key, np.sort(np.concatenate(parts))) for key, parts in chosen.items()]
        classes = np.concatenate([pieces[key][1][which] for key, which in selected] or [np.empty(0, np.int16)])
        if classes.size < MIN_PIXELS or np.unique(classes).size < 2:
            return None
        patches, targets = [], []
        for (index, j), which in selected:
            flat, labels = pieces[index, j][0][which], pieces[index, j][1][which]
            piece = self.sampler.image_piece(index, j)
            for coordinates, part in _held_out_regions(flat, shapes[index, j], model):
                patches.append(held_out_patch(model, piece, coordinates, device=device))
                targets.append(labels[part].astype(np.int64))
        return patches, np.concatenate(targets)

    def _piece_shape(self, index: int, piece: int) -> tuple[int, ...]:
        """The spatial shape of piece ``piece`` of image ``index`` (its channels left out)."""
        array = self.sampler.image_piece(index, piece)
        return tuple(array.shape[array.ndim - self.image_ndim :])

    def _leaving_model(self) -> UNet:
        """A copy of the model training would leave now: the weight average once the averaging window has
        begun, else the current weights; thread-safe."""
        with self._lock:
            return copy.deepcopy(self.model if self._average is None else self._average.module)

    @property
    def run_record(self) -> dict:
        """What the current (or last) ``run()`` recorded so far: start time, device, precision, and when it
        has ended iterations, seconds, stop reason (the entry it adds to ``metadata["training"]["history"]``)."""
        return dict(self._record)

    def snapshot(self) -> UNet:
        """An eval-mode copy (batch norm folded) of the model training would leave now, for previews."""
        return self._leaving_model().inference_copy()

    @property
    def metadata(self) -> dict:
        """Metadata for the model file: class ids and names, normalization recipe, training record."""
        return {
            "class_ids": list(self.class_ids),
            "class_names": list(self.class_names),
            "normalization": dict(self.normalization),
            "training": {
                "history": list(self._history),
                "input_shape": list(self.input_shape),
                "output_shape": list(self.output_shape),
            },
            "napari_unet_version": __version__,
            "training_profile": training_profile(self.image_profiles, self._earlier_profile),
            **({"calibration": dict(self.calibration)} if self.calibration else {}),
            **({"dense_labels": True} if self.dense_labels or 0 in self.class_ids else {}),  # 0 is a class
        }

    def save(self, path, extra: dict | None = None) -> None:
        """Write the model training would leave now (as ``snapshot``) and its metadata (with the entries of
        ``extra`` added) with ``io.save_model`` (atomic); callable during training, from any thread."""
        save_model(self._leaving_model().cpu().eval(), path, {**self.metadata, **(extra or {})})


def _patch_pixels(extent, shape: tuple[int, ...], model) -> int:
    """Input pixels that ``calibration.held_out_patch`` predicts for held-out pixels spanning ``extent`` (per axis)
    of a piece of ``shape``: the span grown by the refinement's reach and the network's context, within the piece."""
    return math.prod(min(n, e + 2 * (h + REFINEMENT_REACH) + model.grid) for e, h, n in zip(extent, model.halo, shape))


def _held_out_regions(flat: np.ndarray, shape: tuple[int, ...], model):
    """The held-out pixels ``flat`` of a piece of ``shape`` in groups to predict: one per ``holdout.BLOCK`` block, or
    all of them at once where their bounding box with its context reads fewer pixels; ``(coordinates, which)``
    each (``which`` indexes ``flat``)."""
    coordinates = np.unravel_index(flat, shape)

    def cost(low, high):
        return _patch_pixels([hi - lo for lo, hi in zip(low, high)], shape, model)

    blocks = np.stack([c // BLOCK for c in coordinates], 1)
    keys, which = np.unique(blocks, axis=0, return_inverse=True)
    whole = cost([c.min() for c in coordinates], [c.max() + 1 for c in coordinates])
    if whole <= sum(cost(k * BLOCK, (k + 1) * BLOCK) for k in keys):
        return [(coordinates, np.arange(len(flat)))]
    groups = [np.flatnonzero(which.ravel() == k) for k in range(len(keys))]
    return [(tuple(c[g] for c in coordinates), g) for g in groups]


def _batches_in_words(batch_size: int, input_tile: tuple[int, ...]) -> str:
    return f"batches of {batch_size} patch{'es' * (batch_size != 1)} of {'x'.join(map(str, input_tile))} pixels"


def train(
    images,
    labels,
    settings: TrainingSettings | None = None,
    *,
    init: tuple[torch.nn.Module, dict] | None = None,
    class_names: Sequence[str] | None = None,
    channel_axis: int | None = None,
    callback: Callable[[TrainingEvent], None] | None = None,
    **overrides,
) -> Trainer:
    """Train to completion and return the ``Trainer`` (``trainer.model``, ``trainer.metadata``).

    ``overrides`` replace fields of ``settings`` (e.g. ``train(img, lab, time_budget=30, depth=2)``);
    ``callback`` is called with every ``TrainingEvent``.
    """
    settings = dataclasses.replace(settings or TrainingSettings(), **overrides)
    trainer = Trainer(images, labels, settings, init=init, class_names=class_names, channel_axis=channel_axis)
    for event in trainer.run():
        if callback is not None:
            callback(event)
    return trainer
