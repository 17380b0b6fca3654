"""Calibration of models trained from strokes: a share of the painted pixels is held out of training by position
(stable as the labels grow), the temperature is fitted on them when the run ends, stored, reported by the CLI, and the
training profile is predicted with it."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet.calibration import REFINEMENT_REACH
from napari_unet.cli import main
from napari_unet.holdout import BLOCK, MIN_PIXELS, held_out
from napari_unet.io import load_model
from napari_unet.training import Trainer, TrainingSettings

TINY = dict(
    depth=1, base_filters=4, patch_size=16, batch_size=2, iterations=25, time_budget=None, device="cpu",
    cpu_threads=1, amp=False,
)  # fmt: skip


def _strokes(size: int = 256, seed: int = 0) -> np.ndarray:
    """Class indices (-1 unpainted): horizontal strokes of class 0 and vertical ones of class 1, 3 px wide."""
    rng = np.random.default_rng(seed)
    target = np.full((size, size), -1, np.int16)
    for _ in range(12):
        y, x0 = rng.integers(0, size - 3), rng.integers(0, size // 2)
        target[y : y + 3, x0 : x0 + size // 3] = 0
        x, y0 = rng.integers(0, size - 3), rng.integers(0, size // 2)
        target[y0 : y0 + size // 3, x : x + 3] = 1
    return target


def test_held_out_pixels_are_whole_blocks_of_a_class_and_about_the_share():
    target = _strokes(512)
    mask = held_out(target, 0.25, (0, 0, 0))
    painted = target >= 0
    assert not (mask & ~painted).any()
    assert 0.1 < mask.sum() / painted.sum() < 0.4
    blocks = (np.arange(512) // BLOCK)[:, None] * 1000 + (np.arange(512) // BLOCK)[None, :]
    for cls in (0, 1):
        of_class = target == cls
        held_blocks, kept_blocks = set(blocks[mask & of_class]), set(blocks[~mask & of_class])
        assert held_blocks and kept_blocks and not held_blocks & kept_blocks
    assert not held_out(target, 0.0, (0, 0, 0)).any()
    assert (held_out(target, 0.25, (0, 0, 0)) == mask).all()
    assert (held_out(target, 0.25, (1, 0, 0)) != mask).any()  # another seed, another choice


def test_the_choice_holds_as_strokes_are_added_and_a_class_keeps_its_training_pixels():
    target = _strokes(256)
    before = held_out(target, 0.3, (0, 2, 0))
    grown = target.copy()
    grown[200:203, 10:250] = 0
    after = held_out(grown, 0.3, (0, 2, 0))
    assert (after[target >= 0] == before[target >= 0]).all()  # no earlier pixel changes side
    one_dot = np.full((64, 64), -1, np.int16)
    one_dot[3:6, 3:6], one_dot[40:60, 40:43] = 0, 1
    for seed in range(20):  # a class painted in a single block is never held out whole
        mask = held_out(one_dot, 0.5, (seed, 0, 0))
        assert not mask[one_dot == 0].any()


def _image_and_labels(seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:160, :160]
    discs = np.zeros((160, 160), bool)
    for cy, cx in rng.integers(20, 140, (8, 2)):
        discs |= (yy - cy) ** 2 + (xx - cx) ** 2 < 12**2
    image = rng.normal(0, 1, discs.shape).astype(np.float32) + 2.5 * discs
    labels = np.where(discs & (rng.random(discs.shape) < 0.4), 2, 0).astype(np.uint8)
    labels[~discs & (rng.random(discs.shape) < 0.08)] = 1
    return image, labels


def test_stroke_training_fits_the_temperature_on_held_out_pixels_only():
    image, labels = _image_and_labels()
    trainer = Trainer([image], [labels], TrainingSettings(**TINY, calibration_holdout=0.3))
    held = sum(len(h[0]) for h in trainer._held[0] if h is not None)
    assert held > 0
    assert trainer.sampler.class_counts(2).sum() == (labels > 0).sum() - held  # training never sees them
    list(trainer.run())
    c = trainer.calibration
    assert c["pixels"] == held and c["nll_after"] <= c["nll_before"]
    assert trainer.model.temperature == c["temperature"] != 1.0
    assert trainer.metadata["calibration"] == c
    # new strokes while training: their held-out share follows the same rule
    more = labels.copy()
    more[100:103, :] = 1
    trainer.update_labels(0, more)
    trainer._apply_pending()
    held = sum(len(h[0]) for h in trainer._held[0] if h is not None)
    assert trainer.sampler.class_counts(2).sum() == (more > 0).sum() - held


@pytest.mark.parametrize("temperature", ["off", 2.0])
def test_off_or_a_given_temperature_holds_nothing_out(temperature):
    image, labels = _image_and_labels()
    trainer = Trainer([image], [labels], TrainingSettings(**TINY, temperature=temperature))
    assert trainer.sampler.class_counts(2).sum() == (labels > 0).sum()
    list(trainer.run())
    assert trainer.calibration is None and trainer.model.temperature == (1.0 if temperature == "off" else 2.0)


def test_the_training_profile_is_predicted_with_the_temperature_the_model_keeps():
    """The out-of-distribution check compares an image's entropy (predicted with the model's temperature) with the
    training images': those must be predicted with the same temperature, so the same weights at T=3 profile higher."""
    image, labels = _image_and_labels()
    entropies = []
    for temperature in ("off", 3.0):
        trainer = Trainer([image], [labels], TrainingSettings(**TINY, temperature=temperature))
        list(trainer.run())
        entropies.append(trainer.metadata["training_profile"]["images"][0]["entropy"])
    assert entropies[1] > entropies[0]


def test_cli_train_reports_the_calibration_of_held_out_strokes(tmp_path, capsys):
    image, labels = _image_and_labels()
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    out = tmp_path / "m.safetensors"
    common = ["train", "--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"), "--out", str(out)]
    tiny = ["--iterations", "20", "--depth", "1", "--filters", "4", "--patch-size", "16", "--device", "cpu"]
    assert main([*common, *tiny, "--calibration-holdout", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "calibration: temperature" in err and "held-out painted pixels: expected calibration error" in err
    model, meta = load_model(out)
    assert model.temperature == meta["calibration"]["temperature"]
    assert main([*common, *tiny]) == 0  # by default no stroke is held out
    assert "calibration: no temperature fitted (no strokes held out for it" in capsys.readouterr().err
    assert load_model(out)[0].temperature == 1.0


def test_held_out_pixels_are_predicted_block_by_block_where_that_reads_less():
    from napari_unet.model import UNet
    from napari_unet.training import _held_out_regions

    model = UNet(depth=2, base_filters=4)
    shape = (2048, 2048)
    far_apart = np.ravel_multi_index((np.array([10, 11, 1500, 2000]), np.array([10, 12, 40, 2000])), shape)
    groups = _held_out_regions(far_apart, shape, model)
    assert sorted(len(which) for _, which in groups) == [1, 1, 2]  # three blocks, each with its context
    assert sorted(np.concatenate([which for _, which in groups]).tolist()) == [0, 1, 2, 3]
    yy, xx = np.mgrid[0:100:3, 0:100:3]
    close = np.ravel_multi_index((yy.ravel(), xx.ravel()), shape)
    ((coordinates, which),) = _held_out_regions(close, shape, model)  # one box reads less than 16 blocks
    assert len(which) == close.size and coordinates[0].max() == 99


def test_the_prediction_of_held_out_blocks_is_bounded(monkeypatch):
    """Past ``PREDICTED_PIXELS`` a seeded choice of the held-out blocks is predicted: fewer pixels, still a fit."""
    import napari_unet.training as training

    image, labels = _image_and_labels()
    monkeypatch.setattr(training, "PREDICTED_PIXELS", 1)  # one block's context
    trainer = Trainer([image], [labels], TrainingSettings(**TINY, calibration_holdout=0.3))
    held = sum(len(h[0]) for h in trainer._held[0] if h is not None)
    list(trainer.run())
    assert trainer.calibration is None or trainer.calibration["pixels"] < held
    trainer = Trainer([image], [labels], TrainingSettings(**TINY, calibration_holdout=0.3))
    block = (BLOCK + 2 * (trainer.model.halo[0] + REFINEMENT_REACH) + trainer.model.grid) ** 2
    monkeypatch.setattr(training, "PREDICTED_PIXELS", 3 * block)  # three blocks with their context
    list(trainer.run())
    assert MIN_PIXELS <= trainer.calibration["pixels"] < held
