"""Training from an annotated dataset on disk: epochs, per-epoch validation, the best model kept, early stop, resume.

:class:`DatasetTrainer` is a :class:`training.Trainer` (the same generator of events, stop, progress, devices,
mixed precision, weight averaging, out-of-memory handling); what differs is where patches come from and what an
epoch ends with:

- Data: a :class:`datasets.Dataset`'s training images, opened when sampled (``sampling.LazyPatchSampler``; a
  bounded cache), with dense masks: mask value ``k`` is class ``k`` (0 too), 255 is void and weighs nothing.
  The model's ``class_ids`` are the dataset's mask values, so predictions come back with them.
- Epochs: one epoch is as many patches as cover the training images' pixels once
  (``ceil(pixels / (output tile pixels * batch size))`` iterations); the learning-rate schedule spans all epochs.
- Validation: after each epoch the model training would leave (``Trainer.snapshot``) predicts every whole
  validation image with exact overlap-tile prediction (``tiling.predict_tiled``, no flips, no refinement), and
  :func:`evaluate` scores it: per-class IoU and Dice over the validation pixels (void left out), their mean IoU,
  and the validation loss (cross-entropy + soft Dice of the training loss, unweighted). The scores are on the
  epoch's event (``TrainingEvent.validation``), in ``metadata["dataset_training"]`` and in the run's history entry.
- The best model by validation mean IoU is the one the run leaves; ``patience`` epochs without a better one end
  it early (reason "early_stop"), all epochs done is reason "epochs".
- Resume: ``metadata["dataset_training"]`` of a checkpoint (iteration, epochs scored, best score) given back as
  ``resume`` with the checkpoint as ``init`` goes on where it stopped; the optimizer state and the weight average
  start afresh.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import Dataset, Sample
from .normalization import dataset_recipe, image_params, normalize
from .sampling import LazyPatchSampler
from .training import DENSE_VOID, Trainer, TrainingEvent, TrainingSettings

PROFILE_IMAGES = 4
"""Training images read up front for the model's training profile (``domain.py``)."""


@dataclass(frozen=True)
class EpochScores:
    """One epoch's validation: per-class IoU and Dice (None for a class neither predicted nor annotated), their
    mean IoU (over the other classes) and the validation loss."""

    epoch: int
    iteration: int
    val_loss: float
    iou: list[float | None]
    dice: list[float | None]
    mean_iou: float
    seconds: float


def evaluate(model, dataset: Dataset, samples: list[Sample], recipe: dict, device, dice_weight: float = 1.0):
    """``(val_loss, iou, dice, mean_iou)`` of ``model`` (eval mode) on the whole images ``samples``; each image is
    normalized with ``recipe`` and predicted with exact overlap-tile prediction. IoU and Dice are over all the
    images' pixels together (void pixels left out), the loss is the mean over images."""
    from .losses import masked_loss
    from .tiling import predict_tiled

    n = model.n_classes
    intersection, predicted, annotated = np.zeros(n), np.zeros(n), np.zeros(n)
    losses = []
    channels = 0 if dataset.channels > 1 else None
    for sample in samples:
        image = dataset.read_image(sample)
        normalized = normalize(image, image_params(image, recipe, channels))
        probabilities = predict_tiled(model, normalized, device=device)
        target = dataset.index_mask(sample).astype(np.int64)
        labelled = target >= 0
        guess = np.argmax(probabilities, axis=0)
        t, g = target[labelled], guess[labelled]
        intersection += np.bincount(t[t == g], minlength=n)[:n]
        predicted += np.bincount(g, minlength=n)[:n]
        annotated += np.bincount(t, minlength=n)[:n]
        log_p = torch.from_numpy(np.log(np.clip(probabilities, 1e-8, 1.0)))
        losses.append(float(masked_loss(log_p[None], torch.from_numpy(target)[None], dice_weight=dice_weight)))
    union = predicted + annotated - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        dice = np.where(predicted + annotated > 0, 2 * intersection / (predicted + annotated), np.nan)
    mean_iou = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
    return float(np.mean(losses)), iou.tolist(), dice.tolist(), mean_iou


class DatasetTrainer(Trainer):
    """Train on a :class:`datasets.Dataset` for ``epochs`` epochs (see the module docstring).

    ``settings.iterations`` becomes ``epochs`` times the iterations of an epoch; ``settings.time_budget`` (or None)
    still ends a run early; ``settings.patience`` is not used (``patience`` here counts epochs). ``init``: a
    ``(model, metadata)`` pair to fine-tune or resume, ``resume``: a checkpoint's ``metadata["dataset_training"]``.
    """

    def __init__(
        self,
        dataset: Dataset,
        settings: TrainingSettings | None = None,
        *,
        epochs: int = 50,
        patience: int | None = None,
        init: tuple[torch.nn.Module, dict] | None = None,
        resume: dict | None = None,
    ):
        settings = settings or TrainingSettings(time_budget=None)
        if settings.border_weight:
            raise ValueError("border weights are for sparse strokes; a dense dataset trains without them")
        if epochs < 1 or (patience is not None and patience < 1):
            raise ValueError(f"epochs and patience must be at least 1, got {epochs} and {patience}")
        self.settings, self.dataset, self.epochs, self.patience = settings, dataset, epochs, patience
        self.in_channels = dataset.channels
        self.dense_labels, self.unpainted = True, DENSE_VOID
        if init is not None:
            self._model_from_init(init, dataset.class_values)
            if self.class_ids != dataset.class_values:
                raise ValueError(
                    f"the initial model's classes are the mask values {self.class_ids}, the dataset's "
                    f"{dataset.class_values}: train a new model"
                )
        else:
            self._new_model(dataset.class_values, dataset.class_names)
        self._plan_tiles()
        pixels = sum(math.prod(s.shape) for s in dataset.train)
        self.epoch_iterations = max(1, math.ceil(pixels / (math.prod(self.output_shape) * settings.batch_size)))
        """Iterations of one epoch: patches covering the training images' pixels once."""
        self.settings = dataclasses.replace(settings, iterations=epochs * self.epoch_iterations, patience=None)
        channels = 0 if self.in_channels > 1 else None
        if self.normalization.get("method") == "dataset":
            self.normalization = dataset_recipe(
                (dataset.read_image(s) for s in dataset.train), self.normalization, channels
            )
        self._shapes = [s.shape for s in dataset.train]
        self._rng = np.random.default_rng(settings.seed)
        self.sampler = LazyPatchSampler(
            self._load,
            dataset.counts,
            self.input_shape,
            self.output_shape,
            self._rng,
            class_power=settings.class_sampling,
        )
        self._make_augmenters()
        self._class_weights = self._compute_class_weights()
        chosen = sorted({round(float(i)) for i in np.linspace(0, len(dataset.train) - 1, PROFILE_IMAGES)})
        images = [dataset.read_image(dataset.train[i]) for i in chosen]
        self._sample_profiles(
            images,
            [image_params(image, self.normalization, channels) for image in images],
            [self._shapes[i] for i in chosen],
            channels is not None,
        )
        self._init_run_state()
        state = resume or {}
        if "split" in state and state["split"] != self.split:
            raise ValueError(
                f"the dataset's images changed since the checkpoint ({state.get('train_images')} training and "
                f"{state.get('val_images')} validation images then, {len(dataset.train)} and {len(dataset.val)} now, "
                "or other ones): a resumed run would validate on other images, some trained on; train anew, without "
                "--resume"
            )
        self._first_iteration = self.iteration = int(state.get("iteration", 0))
        self.scores: list[dict] = list(state.get("epochs", []))
        """Every epoch's validation scores (``EpochScores`` as dicts), resumed ones included."""
        best = state.get("best_mean_iou")
        self.best_mean_iou: float = -math.inf if best is None else float(best)
        self.best_epoch: int | None = state.get("best_epoch")
        self._since_best = int(state.get("since_best", 0))
        self._best_state: dict | None = None
        """The best model's weights (CPU) when this run found it, else None."""

    @property
    def found_best(self) -> bool:
        """Whether the model the last ``run()`` left is the best one it validated (False: no validation images,
        or a resumed run that never beat the earlier best: then the model is the last one)."""
        return self._best_state is not None

    def _load(self, index: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Training image ``index`` for the sampler: normalized pieces and their class-index targets."""
        sample = self.dataset.train[index]
        channels = 0 if self.in_channels > 1 else None
        image = self.dataset.read_image(sample)
        normalized = normalize(image, image_params(image, self.normalization, channels))
        target = self.dataset.index_mask(sample)
        if target.ndim == self.image_ndim:
            return [normalized], [target]
        planes = [normalized[:, z] if channels == 0 else normalized[z] for z in range(target.shape[0])]
        return [np.ascontiguousarray(p) for p in planes], list(target)

    def _stop_reason(self, state, elapsed: float) -> str | None:
        if self.patience is not None and self._since_best >= self.patience:
            return "early_stop"
        reason = super()._stop_reason(state, elapsed)
        return "epochs" if reason == "iterations" else reason

    def run(self) -> Iterator[TrainingEvent]:
        """Train, yielding a ``TrainingEvent`` per iteration (with ``validation`` at the end of each epoch) and a
        final one with ``done=True``, after which the model is the best one validated."""
        self._best_state = None
        for event in super().run():
            if event.done:
                self._record_epochs()
            elif event.iteration % self.epoch_iterations == 0 and self.dataset.val:
                event = dataclasses.replace(event, validation=self._validate(event.iteration))
            yield event

    def _validate(self, iteration: int) -> dict:
        tick = time.perf_counter()
        leaving = self._leaving_model()
        device = next(leaving.parameters()).device
        loss, iou, dice, mean_iou = evaluate(
            leaving.inference_copy(),
            self.dataset,
            self.dataset.val,
            self.normalization,
            device,
            self.settings.dice_weight,
        )
        epoch = iteration // self.epoch_iterations
        iou, dice = ([None if math.isnan(v) else v for v in values] for values in (iou, dice))  # JSON has no NaN
        scores = EpochScores(epoch, iteration, loss, iou, dice, mean_iou, round(time.perf_counter() - tick, 3))
        self.scores.append(dataclasses.asdict(scores))
        if mean_iou > self.best_mean_iou:
            self.best_mean_iou, self.best_epoch, self._since_best = mean_iou, epoch, 0
            self._best_state = {k: v.detach().cpu().clone() for k, v in leaving.state_dict().items()}
        else:
            self._since_best += 1
        return self.scores[-1]

    def _settle(self, device: torch.device) -> None:
        """After a run: the best weights it validated become the model, then its temperature (fitted on the
        validation pixels) and training profile follow (``Trainer._settle``)."""
        if self._best_state is not None:
            with self._lock:
                self.model.load_state_dict(self._best_state)
        super()._settle(device)

    def _record_epochs(self) -> None:
        if self._history:
            self._history[-1].update(
                epochs=copy.deepcopy(self.scores), best_epoch=self.best_epoch, best_mean_iou=self.metadata_best()
            )

    def _held_out_pixels(self, device: torch.device) -> tuple[list, np.ndarray] | None:
        """``(patches, targets)`` of the validation images' labelled pixels as a default prediction gives them
        (``calibration.held_out_patch``: test-time flips, edge refinement): each whole image, or a seeded window of
        ``calibration.MAX_PIXELS`` over the validation images' count of a larger one; None without validation
        images."""
        from .calibration import MAX_PIXELS, held_out_patch, sample_window

        rng, patches, targets = np.random.default_rng(self.settings.seed), [], []
        limit = max(1, MAX_PIXELS // max(1, len(self.dataset.val)))
        model = self.model.inference_copy().to(device)
        channels = 0 if self.in_channels > 1 else None
        for sample in self.dataset.val:
            image = self.dataset.read_image(sample)
            target = self.dataset.index_mask(sample)
            window = sample_window(target.shape, limit, rng)
            coordinates = tuple(c + w.start for c, w in zip(np.nonzero(target[window] >= 0), window))
            if not coordinates[0].size:
                continue
            normalized = normalize(image, image_params(image, self.normalization, channels))
            patches.append(held_out_patch(model, normalized, coordinates, device=device))
            targets.append(target[coordinates].astype(np.int64))
        return (patches, np.concatenate(targets)) if patches else None

    def metadata_best(self) -> float | None:
        """The best validation mean IoU so far (None before the first validation)."""
        return self.best_mean_iou if math.isfinite(self.best_mean_iou) else None

    @property
    def split(self) -> str:
        """A digest of the training and validation images' names: a resumed run must see the same split."""
        names = [sorted(s.name for s in part) for part in (self.dataset.train, self.dataset.val)]
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]

    @property
    def metadata(self) -> dict:
        """The model file's metadata (with ``dense_labels``: its ``class_ids`` are mask values, 0 is a class), and
        ``dataset_training``: the dataset, the epochs scored, the best one and
        what a resumed run needs (``resume``)."""
        return {
            **super().metadata,
            "dataset_training": {
                "dataset": str(self.dataset.root),
                "train_images": len(self.dataset.train),
                "val_images": len(self.dataset.val),
                "split": self.split,
                "epoch_iterations": self.epoch_iterations,
                "iteration": self.iteration,
                "epochs": copy.deepcopy(self.scores),
                "best_epoch": self.best_epoch,
                "best_mean_iou": self.metadata_best(),
                "since_best": self._since_best,
            },
        }
