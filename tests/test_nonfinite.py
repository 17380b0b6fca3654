"""Non-finite training: a NaN/inf loss or weights end the run with the last good weights, never NaN in a model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import training
from napari_unet.cli import main
from napari_unet.io import load_model, save_model
from napari_unet.training import Trainer, TrainingEvent, TrainingSettings

TINY = dict(
    depth=1, base_filters=4, patch_size=16, batch_size=2, time_budget=None, device="cpu", cpu_threads=1, specks=0.0
)


def _halves(shape=(48, 48)):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, shape).astype(np.float32)
    image[:, shape[1] // 2 :] += 100
    labels = np.zeros(shape, np.uint8)
    labels[5:40, 6:9] = 1
    labels[8:44, 36:39] = 3
    return image, labels


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finite(model) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def _run_recording(trainer) -> tuple[list[TrainingEvent], dict[int, dict]]:
    """All events, and the model's state after each iteration (the generator waits while the caller copies it)."""
    events, states = [], {}
    for event in trainer.run():
        events.append(event)
        if not event.done:
            states[event.iteration] = _state(trainer.model)
    return events, states


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the gamma augmentation of 1e36
def test_extreme_images_stop_at_the_first_step_and_leave_the_model_as_it_was():
    image, labels = _halves()
    trainer = Trainer(image * 1e36, labels, TrainingSettings(**TINY, iterations=20, normalization={"method": "none"}))
    before = _state(trainer.model)
    events = list(trainer.run())
    last = events[-1]
    assert len(events) == 1 and last.done and last.reason == "not_finite" and last.iteration == 0
    assert "iteration 1: the loss became NaN or infinite" in last.message and "nothing was learned" in last.message
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # batch-norm statistics included
    record = trainer.metadata["training"]["history"][-1]
    assert record["stop_reason"] == "not_finite" and record["iterations"] == 0


def test_a_step_with_infinite_gradients_is_undone_exactly(tmp_path):
    image, labels = _halves()
    trainer = Trainer(image, labels, TrainingSettings(**TINY, iterations=10, weight_averaging=0.0))
    calls = []

    def poison(grad):  # the 5th backward pass: an infinite gradient, Adam's step makes the weights NaN
        calls.append(1)
        return torch.full_like(grad, math.inf) if len(calls) == 5 else grad

    trainer.model.head.weight.register_hook(poison)
    events, states = _run_recording(trainer)
    last = events[-1]
    assert last.reason == "not_finite" and last.iteration == 4 and trainer.iteration == 4
    assert "iteration 5: the weights became NaN" in last.message and "the 4 iteration(s) before it" in last.message
    assert math.isfinite(last.loss) and last.loss == events[-2].loss
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in states[4].items())
    # Nothing non-finite reaches a snapshot or a saved file (which load_model would refuse).
    assert _finite(trainer.snapshot())
    trainer.save(tmp_path / "kept.safetensors")
    loaded, metadata = load_model(tmp_path / "kept.safetensors")
    assert _finite(loaded) and metadata["training"]["history"][-1]["stop_reason"] == "not_finite"


def test_the_weight_average_takes_only_the_steps_that_were_kept(monkeypatch):
    image, labels = _halves()
    trainer = Trainer(image, labels, TrainingSettings(**TINY, iterations=10, weight_averaging=0.75))
    real_loss, calls = training.masked_loss, []

    def nan_at_six(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * math.nan if len(calls) == 6 else loss

    monkeypatch.setattr(training, "masked_loss", nan_at_six)
    events, states = _run_recording(trainer)
    assert events[-1].reason == "not_finite" and "iteration 6: the loss became" in events[-1].message
    # The window is the last 75 % of the 10 iterations: steps 3 to 5 were averaged, step 6 was undone.
    record = trainer.metadata["training"]["history"][-1]
    assert record["averaged_iterations"] == 3 and record["iterations"] == 5
    final = trainer.model.state_dict()
    for name, tensor in final.items():
        if tensor.is_floating_point():
            mean = torch.stack([states[i][name] for i in range(3, 6)]).mean(0)
            torch.testing.assert_close(tensor, mean, rtol=1e-5, atol=1e-6)
    assert _finite(trainer.model)


def test_images_with_nan_and_infinite_pixels_train_normally():
    # Decided: no refusal; normalization sets those pixels to 0 (normalization.py), so the loss stays finite.
    image, labels = _halves()
    image[10:20, 10:30] = np.nan
    image[30:34, :] = np.inf
    image[40, 40] = -np.inf
    events = list(Trainer(image, labels, TrainingSettings(**TINY, iterations=5)).run())
    assert events[-1].reason == "iterations"
    assert all(math.isfinite(e.loss) for e in events)


@pytest.fixture
def pair(tmp_path):
    image, labels = _halves()
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    return ["--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif")]


CLI_TINY = ["--iterations", "3", "--depth", "1", "--filters", "4", "--patch-size", "16", "--device", "cpu"]


@pytest.mark.parametrize(
    "option, value", [("--time-budget", "nan"), ("--time-budget", "inf"), ("--learning-rate", "inf"),
                      ("--learning-rate", "nan"), ("--learning-rate", "0"), ("--learning-rate", "-1e-3"),
                      ("--temperature", "1e-40"), ("--temperature", "1e9")]  # 1e-40: every probability NaN
)  # fmt: skip
def test_non_finite_numbers_are_usage_errors(pair, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as usage:
        main(["train", *pair, "--out", str(tmp_path / "m.safetensors"), *CLI_TINY, option, value])
    assert usage.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_a_learning_rate_out_of_range_is_one_line(pair, tmp_path, capsys):
    code = main(["train", *pair, "--out", str(tmp_path / "m.safetensors"), *CLI_TINY, "--learning-rate", "5"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "learning_rate must be a finite number in (0, 1]" in err and len(err.splitlines()) == 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_cli_training_that_learns_nothing_finite_writes_nothing(pair, tmp_path, capsys, make_model):
    # A model to fine-tune whose weights are near float32's largest: the first forward pass overflows. (Normalized
    # images cannot do it any more: they are held within normalization.NORMALIZED_LIMIT.)
    model = make_model(n_classes=2, depth=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1e38)
    init = save_model(model, tmp_path / "init.safetensors", {"class_ids": [1, 3]})
    out = tmp_path / "m.safetensors"
    code = main(["train", *pair, "--out", str(out), "--init", str(init), *CLI_TINY])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "error: training stopped at iteration 1: the loss became NaN or infinite" in err
    assert "not written" in err


def test_cli_training_that_diverges_later_saves_the_good_weights_and_warns(pair, tmp_path, capsys, monkeypatch):
    real_loss, calls = training.masked_loss, []

    def nan_at_three(*args, **kwargs):
        calls.append(1)
        return real_loss(*args, **kwargs) * (math.nan if len(calls) == 3 else 1.0)

    monkeypatch.setattr(training, "masked_loss", nan_at_three)
    out = tmp_path / "m.safetensors"
    assert main(["train", *pair, "--out", str(out), *CLI_TINY]) == 0
    err = capsys.readouterr().err
    assert "warning: training stopped at iteration 3: the loss became NaN" in err
    model, metadata = load_model(out)
    assert _finite(model) and metadata["training"]["history"][-1]["iterations"] == 2


def test_widget_shows_why_training_stopped(make_napari_viewer, monkeypatch):
    pytest.importorskip("pytestqt")
    from napari_unet.widgets import UNetWidget, unet_widget

    warnings = []
    monkeypatch.setattr(unet_widget, "show_warning", warnings.append)
    widget = UNetWidget(make_napari_viewer())
    try:
        message = "training stopped at iteration 7: the loss became NaN or infinite (...)"
        widget._on_progress(TrainingEvent(6, 0.5, 1.0, 12, 1e-3, True, "not_finite", message))
        assert warnings == [f"U-Net: {message}"]
        assert "not_finite" in widget.status_label.text()
        widget._on_progress(TrainingEvent(6, 0.5, 1.0, 12, 1e-3, True, "iterations"))
        assert len(warnings) == 1
    finally:
        widget.shutdown()
