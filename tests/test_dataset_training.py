"""Training from a dataset on disk: epochs with validation scores, the best model kept, early stop, resume, dense
semantics (0 a class, 255 void) and predictions with the dataset's values."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from test_datasets import make_plain, make_voc

from napari_unet.dataset_training import DatasetTrainer, evaluate
from napari_unet.datasets import IGNORE, open_dataset
from napari_unet.io import load_model
from napari_unet.predict import PredictionSettings, predict_image
from napari_unet.training import TrainingSettings

TINY = dict(
    depth=1, base_filters=4, patch_size=24, batch_size=2, time_budget=None, device="cpu", cpu_threads=1, amp=False
)


def test_epochs_validation_best_model_and_dataset_values(tmp_path):
    make_voc(tmp_path, count=5, rgb=False)
    dataset = open_dataset(tmp_path)
    trainer = DatasetTrainer(dataset, TrainingSettings(**TINY), epochs=3)
    assert trainer.class_ids == [0, 1] and trainer.settings.iterations == 3 * trainer.epoch_iterations
    pixels = sum(math.prod(s.shape) for s in dataset.train)
    assert trainer.epoch_iterations == math.ceil(pixels / (math.prod(trainer.output_shape) * 2))
    events = list(trainer.run())
    scored = [e for e in events if e.validation is not None]
    assert [e.iteration for e in scored] == [trainer.epoch_iterations * k for k in (1, 2, 3)]
    assert events[-1].done and events[-1].reason == "epochs"
    for e in scored:
        v = e.validation
        assert len(v["iou"]) == len(v["dice"]) == 2 and math.isfinite(v["val_loss"]) and 0 <= v["mean_iou"] <= 1
    best = max(scored, key=lambda e: e.validation["mean_iou"])
    assert trainer.best_epoch == best.validation["epoch"] and trainer.found_best
    # the model left is the best one: its validation scores are the best epoch's
    loss, iou, _, mean_iou = evaluate(trainer.model.eval(), dataset, dataset.val, trainer.normalization, "cpu")
    assert mean_iou == pytest.approx(best.validation["mean_iou"], abs=1e-6)
    history = trainer.metadata["training"]["history"][-1]
    assert [s["epoch"] for s in history["epochs"]] == [1, 2, 3] and history["best_epoch"] == trainer.best_epoch
    # saved and predicted: the labels hold the dataset's values (0 a class), not 1..K
    path = tmp_path / "model.safetensors"
    trainer.save(path)
    model, meta = load_model(path)
    assert meta["class_ids"] == [0, 1] and meta["dataset_training"]["best_epoch"] == trainer.best_epoch
    image = dataset.read_image(dataset.val[0])
    labels = predict_image(model, meta, image, PredictionSettings(device="cpu", test_time_flips=False)).labels
    assert set(np.unique(labels)) <= {0, 1} and labels.shape == image.shape


def test_void_pixels_are_unlabelled_targets(tmp_path):
    """255 becomes the trainer's "no label" target (-1: weight zero in every loss term, losses.py) and 0 a class;
    void pixels are neither counted for the class weights nor drawn as patch centres."""
    make_plain(tmp_path, count=3, suffix=".png")
    dataset = open_dataset(tmp_path, val_fraction=0)
    trainer = DatasetTrainer(dataset, TrainingSettings(**TINY), epochs=1)
    mask = dataset.read_mask(dataset.train[0])
    _, (target,) = trainer._load(0)
    np.testing.assert_array_equal(target == -1, mask == IGNORE)
    np.testing.assert_array_equal(target[mask != IGNORE], mask[mask != IGNORE])
    counts = trainer.sampler.class_counts(2)
    assert counts.sum() == sum((dataset.read_mask(s) != IGNORE).sum() for s in dataset.train)
    halo = trainer.sampler.halo
    for _ in range(50):
        _, tile_target, _ = trainer.sampler.sample()
        output = tile_target[tuple(slice(h, h + o) for h, o in zip(halo, trainer.output_shape))]
        assert (output >= 0).any()


def test_early_stop_after_patience_epochs(tmp_path, monkeypatch):
    make_plain(tmp_path, count=4, suffix=".png")
    trainer = DatasetTrainer(
        open_dataset(tmp_path, val_fraction=0.25), TrainingSettings(**TINY, temperature="off"), epochs=20, patience=2
    )
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    monkeypatch.setattr(
        "napari_unet.dataset_training.evaluate", lambda *a, **k: (1.0, [0.5, 0.5], [0.6, 0.6], next(scores))
    )
    events = list(trainer.run())
    assert events[-1].reason == "early_stop" and trainer.best_epoch == 2 and trainer.best_mean_iou == 0.7
    assert events[-1].iteration == 4 * trainer.epoch_iterations  # epochs 3 and 4 did not beat epoch 2


def test_resume_goes_on_from_the_checkpoint(tmp_path):
    make_plain(tmp_path, count=4, suffix=".png")
    dataset = open_dataset(tmp_path, val_fraction=0.25)
    first = DatasetTrainer(dataset, TrainingSettings(**TINY), epochs=3)
    for event in first.run():
        if event.validation is not None and event.validation["epoch"] == 1:
            first.save(tmp_path / "last.safetensors")
            first.request_stop()
    model, meta = load_model(tmp_path / "last.safetensors")
    state = meta["dataset_training"]
    assert state["iteration"] == first.epoch_iterations and [s["epoch"] for s in state["epochs"]] == [1]
    resumed = DatasetTrainer(dataset, TrainingSettings(**TINY), epochs=3, init=(model, meta), resume=state)
    events = list(resumed.run())
    assert events[0].iteration == first.epoch_iterations + 1  # counts on from the checkpoint
    assert events[-1].reason == "epochs" and events[-1].iteration == 3 * first.epoch_iterations
    assert [s["epoch"] for s in resumed.scores] == [1, 2, 3]
    # images added since the checkpoint: the seeded split would validate on images it trained on, so refused
    for i in (4, 5):
        for folder in ("images", "masks"):
            shutil.copy(tmp_path / folder / "cell0.png", tmp_path / folder / f"cell{i}.png")
    grown = open_dataset(tmp_path, val_fraction=0.25)
    with pytest.raises(ValueError, match=r"the dataset.s images changed since the checkpoint .*train anew"):
        DatasetTrainer(grown, TrainingSettings(**TINY), epochs=3, init=(model, meta), resume=state)
    # an initial model whose classes are not the dataset's values is refused
    with pytest.raises(ValueError, match="train a new model"):
        DatasetTrainer(dataset, TrainingSettings(**TINY), init=(model, {**meta, "class_ids": [1, 2]}))


def test_trainer_with_dense_labels_in_memory():
    """``Trainer(dense_labels=True)``: complete labels held in memory (the widget's "Labels are complete"): 0 is a
    class, 255 no label."""
    from napari_unet.training import Trainer

    image = np.random.default_rng(0).normal(size=(48, 48)).astype(np.float32)
    labels = np.zeros((48, 48), np.uint8)
    labels[10:30, 10:30] = 1
    labels[:, 40:] = 255
    trainer = Trainer(image, labels, TrainingSettings(**TINY, iterations=2), dense_labels=True)
    assert trainer.class_ids == [0, 1] and trainer.metadata["dense_labels"] is True
    (target,), _, (held,) = trainer._target_pieces(0, labels)
    kept_out = np.zeros(labels.shape, bool)
    if held is not None:  # blocks held out for the temperature fit (``holdout.py``) are not trained on either
        kept_out.ravel()[held[0]] = True
        np.testing.assert_array_equal(held[1], (labels.ravel()[held[0]] == 1).astype(np.int16))
    np.testing.assert_array_equal(target == -1, (labels == 255) | kept_out)
    with pytest.raises(ValueError, match="label 0 means unpainted"):
        Trainer(image, np.zeros((48, 48), np.uint8), TrainingSettings(**TINY, iterations=2))
