"""The training engine: learning, stopping, label updates, id mapping, fine-tuning, validation."""

import threading
import time

import numpy as np
import pytest
import torch

from napari_unet.devices import cpu_has_native_bfloat16
from napari_unet.io import load_model
from napari_unet.normalization import normalize_image
from napari_unet.tiling import predict_tiled
from napari_unet.training import Trainer, TrainingEvent, TrainingSettings, _running_mean, train

# Tiny fixed runs of a few dozen iterations: without the speck augmentation (a robustness default, on half of the
# tiles), which slows how fast such a run learns its two halves; the default is tested where it is set.
TINY = dict(
    depth=1, base_filters=4, patch_size=16, batch_size=2, time_budget=None, device="cpu", cpu_threads=1, specks=0.0
)


def _halves(shape=(48, 48), seed=0):
    """An image whose right half is bright, with a few strokes of ids 1 (left) and 3 (right)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, shape).astype(np.float32)
    image[..., shape[-1] // 2 :] += 100
    labels = np.zeros(shape, dtype=np.uint8)
    h, w = shape[-2:]
    labels[..., h // 10 : h - 8, w // 8 : w // 8 + 3] = 1
    labels[..., h // 6 : h - 4, 3 * w // 4 : 3 * w // 4 + 3] = 3
    truth = np.broadcast_to(np.arange(shape[-1]) >= shape[-1] // 2, shape)
    return image, labels, truth


def _settings(**kwargs):
    return TrainingSettings(**{**TINY, **kwargs})


@pytest.mark.parametrize("bfloat16", [False, True])
def test_tiny_model_learns_separable_image(bfloat16):
    image, labels, truth = _halves()
    trainer = train(image, labels, _settings(iterations=60, learning_rate=1e-2, cpu_bfloat16=bfloat16))
    probabilities = predict_tiled(trainer.model, normalize_image(image, trainer.normalization))
    accuracy = ((probabilities.argmax(0) == 1) == truth).mean()
    assert accuracy > 0.95
    assert trainer.metadata["class_ids"] == [1, 3]
    # mixed precision on a CPU means bfloat16, when asked and only where oneDNN runs it natively
    expected = "mixed bfloat16" if bfloat16 and cpu_has_native_bfloat16() else "float32"
    assert trainer.metadata["training"]["history"][-1]["precision"] == expected


def test_events_and_budget():
    image, labels, _ = _halves()
    events = list(Trainer(image, labels, _settings(iterations=5)).run())
    assert [e.iteration for e in events] == [1, 2, 3, 4, 5, 5]
    assert all(isinstance(e, TrainingEvent) and np.isfinite(e.loss) for e in events)
    assert events[-1].done and events[-1].reason == "iterations"
    assert events[2].samples_seen == 6 and events[2].elapsed >= events[1].elapsed
    timed = list(Trainer(image, labels, _settings(time_budget=0.5)).run())
    assert timed[-1].reason == "time_budget" and timed[-1].elapsed < 5


def test_stop_within_one_iteration_keeps_a_usable_model():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=1000))
    events = trainer.run()
    first = next(events)
    threading.Thread(target=trainer.request_stop).start()
    rest = list(events)
    assert len(rest) <= 2 and rest[-1].done and rest[-1].reason == "stopped"
    assert rest[-1].iteration <= first.iteration + 1
    assert not trainer.model.training
    assert predict_tiled(trainer.model, np.zeros((20, 20), np.float32)).shape == (2, 20, 20)


def test_closing_the_generator_ends_training():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=1000))
    events = trainer.run()
    next(events)
    events.close()
    assert trainer.iteration == 1
    assert not trainer.model.training
    assert trainer.metadata["training"]["history"][-1]["stop_reason"] == "stopped"


def _float_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_final_model_is_the_average_over_the_last_part_of_the_budget():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=10, weight_averaging=0.5))
    window = []
    for event in trainer.run():
        if not event.done and event.iteration > 5:
            window.append(_float_state(trainer.model))
    assert len(window) == 5
    final = _float_state(trainer.model)
    for key, value in final.items():
        torch.testing.assert_close(value, torch.stack([w[key] for w in window]).mean(0), atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(final[k], window[-1][k]) for k in final)  # not just the last weights
    assert trainer.metadata["training"]["history"][-1]["averaged_iterations"] == 5


def test_stopping_before_the_averaging_window_keeps_the_last_weights():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=100, weight_averaging=0.5))
    events = trainer.run()
    next(events)
    next(events)
    last = _float_state(trainer.model)
    events.close()
    for key, value in _float_state(trainer.model).items():
        torch.testing.assert_close(value, last[key])
    assert trainer.metadata["training"]["history"][-1]["averaged_iterations"] == 0


def test_averaging_starts_in_the_final_fraction_and_a_later_run_averages_its_own_window():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=10, weight_averaging=0.3))
    started = [trainer._average is not None for event in trainer.run() if not event.done]
    assert started == [False] * 7 + [True] * 3  # averaged after iterations 8, 9 and 10: spent > 0.7
    assert trainer._average is None  # left in the model
    window = []
    for event in trainer.run():  # the second run: its own last three iterations, not the first run's
        if not event.done and event.iteration > 7:
            window.append(_float_state(trainer.model))
    for key, value in _float_state(trainer.model).items():
        torch.testing.assert_close(value, torch.stack([w[key] for w in window]).mean(0), atol=1e-6, rtol=1e-5)
    assert [run["averaged_iterations"] for run in trainer.metadata["training"]["history"]] == [3, 3]


def test_averaging_keeps_the_latest_integer_buffers():
    """Batch norm's ``num_batches_tracked`` is a counter, not a weight: the model training leaves has the last
    iteration's count (torch's own SWA averaging would keep the first one on a CPU and raise on CUDA)."""
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=6, weight_averaging=0.5))
    for event in trainer.run():
        if not event.done:
            counts = {k: v.clone() for k, v in trainer.model.state_dict().items() if not v.is_floating_point()}
    assert counts and all(int(v) == 6 for v in counts.values())
    for key, value in counts.items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    averaged, current = [torch.zeros(3), torch.tensor(4)], [torch.full((3,), 3.0), torch.tensor(9)]
    _running_mean(averaged, current, torch.tensor(2))  # two models in the mean, a third joins
    assert torch.equal(averaged[0], torch.ones(3)) and int(averaged[1]) == 9


def test_each_run_records_its_stop_reason_and_iterations():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=500, patience=3, weight_averaging=0.0))
    events = list(trainer.run())
    assert events[-1].reason == "plateau" and events[-1].iteration < 500
    record = trainer.metadata["training"]["history"][-1]
    assert record["stop_reason"] == "plateau" and record["iterations"] == events[-1].iteration == trainer.iteration
    assert record["averaged_iterations"] == 0 and np.isclose(record["final_loss"], events[-1].loss)
    assert events[-1].samples_seen == events[-1].iteration * 2 and events[-1].learning_rate == events[-2].learning_rate
    events = trainer.run()
    next(events)
    events.close()
    assert [(run["stop_reason"], run["iterations"]) for run in trainer.metadata["training"]["history"]] == [
        ("plateau", record["iterations"]),
        ("stopped", 1),
    ]


def test_snapshot_is_an_eval_copy():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=3))
    events = trainer.run()
    next(events)
    snapshot = trainer.snapshot()
    assert not snapshot.training and snapshot is not trainer.model
    next(events)
    assert next(events).iteration == 3
    # In the averaging window (iterations 2 and 3) the preview shows the average: what training leaves now.
    late = trainer.snapshot()
    assert not late.training
    assert list(events)[-1].done
    image = normalize_image(image, trainer.normalization)
    np.testing.assert_allclose(predict_tiled(late, image), predict_tiled(trainer.model, image), atol=1e-5)


def test_saving_during_training_writes_what_training_would_leave(tmp_path):
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=10, weight_averaging=0.5))
    events = trainer.run()
    for _ in range(8):  # iterations 6..8 are in the averaging window
        next(events)
    trainer.save(tmp_path / "mid.safetensors")
    saved, _ = load_model(tmp_path / "mid.safetensors")
    image = normalize_image(image, trainer.normalization)
    np.testing.assert_allclose(predict_tiled(saved, image), predict_tiled(trainer.snapshot(), image), atol=1e-5)
    assert not np.allclose(predict_tiled(saved, image), predict_tiled(trainer.model.inference_copy(), image))
    events.close()


def test_update_labels_is_picked_up_without_restart():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=6))
    events = trainer.run()
    next(events)
    more = labels.copy()
    more[40:46, 30:46] = 3
    trainer.update_labels(0, more)
    for _ in range(3):  # batches are prepared a step ahead: three iterations at the latest
        next(events)
    assert trainer.sampler.class_counts(2)[1] == (more == 3).sum()
    with pytest.raises(ValueError, match="does not know"):
        trainer.update_labels(0, np.where(more == 3, 5, more))
    with pytest.raises(ValueError, match="shape"):
        trainer.update_labels(0, more[:10])
    list(events)


def test_every_stroke_erased_while_training_keeps_the_earlier_ones_and_the_run():
    """The user erases all strokes mid-run (to repaint): the sampler had nothing left to draw from and the run
    failed ("nothing is painted"), taking the model with it. The update is refused with its reason, the earlier
    strokes stay, the run goes on; strokes painted again are taken."""
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=12))
    events = trainer.run()
    next(events)
    counts = trainer.sampler.class_counts(2).copy()
    source = np.zeros_like(labels)
    trainer.update_labels_later(0, source)
    for _ in range(3):
        next(events)
    [(index, problem)] = trainer.label_problems
    assert index == 0 and "no strokes are left" in problem
    np.testing.assert_array_equal(trainer.sampler.class_counts(2), counts)
    source[labels == 1] = 1  # painted again: one class only, but something to learn from
    trainer.update_labels_later(0, source)
    for _ in range(3):
        next(events)
    assert trainer.sampler.class_counts(2).tolist() == [(labels == 1).sum(), 0]
    assert list(events)[-1].done and trainer.iteration == 12


def test_update_labels_later_reads_the_source_on_the_training_thread_and_skips_bad_updates():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=9))
    events = trainer.run()
    next(events)
    source = labels.copy()  # a layer's data the GUI paints into
    source[40:46, 30:46] = 3
    trainer.update_labels_later(0, source)  # no copy: read when the training thread builds a batch
    for _ in range(3):
        next(events)
    assert trainer.sampler.class_counts(2)[1] == (source == 3).sum()
    counts = trainer.sampler.class_counts(2).copy()
    trainer.update_labels_later(0, np.where(source == 3, 5, source))  # an id the model does not know
    for _ in range(3):
        next(events)
    [(index, problem)] = trainer.label_problems
    assert index == 0 and "does not know" in problem
    np.testing.assert_array_equal(trainer.sampler.class_counts(2), counts)  # the previous strokes stay
    with pytest.raises(IndexError):
        trainer.update_labels_later(1, source)
    assert list(events)[-1].done and trainer.iteration == 9


def test_class_names_by_painted_id():
    image, labels, _ = _halves()  # ids 1 and 3
    trainer = Trainer(image, labels, _settings(iterations=1), class_names={1: "background", 2: "unused"})
    assert trainer.class_names == ["background", "class 3"]


def test_ids_and_names_a_model_file_cannot_hold_are_refused_before_training():
    """A painted id above 2**32 - 1 or a class name over 1000 characters: training went through and Save wrote a
    file that Load refused; now the trainer refuses them first, naming the limit."""
    from napari_unet.model_file_checks import MAX_CLASS_ID, MAX_CLASS_NAME

    image, labels, _ = _halves()  # ids 1 and 3
    huge = labels.astype(np.int64)
    huge[labels == 3] = MAX_CLASS_ID + 1
    with pytest.raises(ValueError, match=f"painted id {MAX_CLASS_ID + 1} is above {MAX_CLASS_ID}"):
        Trainer(image, huge, _settings(iterations=1))
    with pytest.raises(ValueError, match=f"a class name of {MAX_CLASS_NAME + 1} characters: at most"):
        Trainer(image, labels, _settings(iterations=1), class_names=["bg", "x" * (MAX_CLASS_NAME + 1)])
    huge[labels == 3] = MAX_CLASS_ID  # the largest napari's uint32 labels hold: fine
    assert Trainer(image, huge, _settings(iterations=1)).class_ids == [1, MAX_CLASS_ID]


def test_non_contiguous_ids_round_trip(tmp_path):
    image, labels, truth = _halves()
    trainer = train(image, labels, _settings(iterations=60, learning_rate=1e-2), class_names=["bg", "cell"])
    path = tmp_path / "model.safetensors"
    trainer.save(path)
    model, meta = load_model(path)
    assert meta["class_ids"] == [1, 3] and meta["class_names"] == ["bg", "cell"]
    probabilities = predict_tiled(model, normalize_image(image, meta["normalization"]))
    predicted = np.asarray(meta["class_ids"])[probabilities.argmax(0)]
    assert set(np.unique(predicted)) <= {1, 3}
    assert ((predicted == 3) == truth).mean() > 0.95


def test_fine_tune_from_saved_model(tmp_path):
    image, labels, _ = _halves()
    first = train(image, labels, _settings(iterations=3))
    first.save(tmp_path / "m.safetensors")
    model, meta = load_model(tmp_path / "m.safetensors")
    meta["normalization"] = {"method": "percentile", "low": 2.0, "high": 98.0}
    only_three = np.where(labels == 3, 3, 0).astype(np.uint8)  # a subset of the classes is fine
    second = train(image, only_three, _settings(iterations=2), init=(model, meta))
    assert second.normalization == meta["normalization"]
    assert second.class_ids == [1, 3]
    assert len(second.metadata["training"]["history"]) == 2
    assert not torch.equal(second.model.head.weight, model.head.weight)  # trained further, init untouched
    with pytest.raises(ValueError, match="classes"):
        Trainer(image, np.where(labels == 1, 2, labels), _settings(iterations=1), init=(model, meta))


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros((48, 48), np.uint8), "nothing is painted"),
        (np.pad(np.ones((8, 8), np.uint8), 20), "only one class"),
        (np.zeros((40, 48), np.uint8), "shape"),
        (np.full((48, 48), 0.5, np.float32), "integer"),
        (np.full((48, 48), -1, np.int32), "negative"),
    ],
)
def test_invalid_labels_are_clear_errors(labels, message):
    image, _, _ = _halves()
    with pytest.raises(ValueError, match=message):
        Trainer(image, labels, _settings(iterations=1))


def test_float_labels_with_whole_numbers_are_accepted():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels.astype(np.float32), _settings(iterations=1))
    assert trainer.class_ids == [1, 3]


@pytest.mark.parametrize("time_budget", [None, 3600.0])
def test_seeded_runs_are_reproducible(time_budget):
    # a time budget that does not end the run must not steer its schedule: the clock of the first steps (start-up,
    # the first batches) differs from run to run
    image, labels, _ = _halves()
    a = train(image, labels, _settings(iterations=6, seed=7, time_budget=time_budget)).model.state_dict()
    b = train(image, labels, _settings(iterations=6, seed=7, time_budget=time_budget)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_schedule_clock_counts_from_the_end_of_the_first_step(monkeypatch):
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=100, time_budget=10.0))
    now = 1000.0
    monkeypatch.setattr(time, "perf_counter", lambda: now)
    trainer._run_start, trainer._clock_start = now - 5.0, None
    assert trainer._progress(0) == 0.0  # before the first step ends the clock does not count
    assert trainer._progress(20) == 0.2
    trainer._clock_start = now - 1.0  # the first step ended 4 s into the run: 6 s of the budget were left
    assert trainer._progress(1) == pytest.approx(1.0 / 6.0)
    assert trainer._progress(50) == 0.5  # the iteration count ahead of the clock
    trainer._run_start = now - 12.0  # a first step longer than the whole budget: all of it is spent
    assert trainer._progress(1) == 1.0


def test_intensity_augmentation_settings_reach_the_augmenter_and_train():
    image, labels, _ = _halves()
    pieces = dict(illumination=0.3, background=0.2, specks=0.5, blur=0.5, noise=0.1)
    trainer = Trainer(
        image, labels, _settings(iterations=4, gain_range=0.5, gamma_range=0.2, offset_range=0.1, **pieces)
    )
    augmenter = trainer.augmenter
    assert (augmenter.scale_range, augmenter.gamma_range, augmenter.shift_range) == (0.5, 0.2, 0.1)
    assert {name: getattr(augmenter, name) for name in pieces} == pieces
    assert all(np.isfinite(event.loss) for event in trainer.run())
    default = Trainer(image, labels, _settings(iterations=1, specks=TrainingSettings().specks)).augmenter
    assert (default.scale_range, default.gamma_range, default.shift_range) == (0.07, 0.1, 0.03)
    assert default.illumination == default.background == default.blur == default.noise == 0.0
    assert default.specks == 0.5


def test_seeded_fine_tuning_and_stacks_are_bit_identical_through_the_averaging_window():
    image, labels, _ = _halves()
    first = train(image, labels, _settings(iterations=3))
    init = (first.model, first.metadata)
    stack, stack_labels, _ = _halves((3, 32, 32))
    stack_labels[1] = 0
    for make in (
        lambda: Trainer(image, labels, _settings(iterations=8, seed=3), init=init),
        lambda: Trainer(stack, stack_labels, _settings(iterations=8, seed=3)),
    ):
        states = []
        for _ in range(2):
            trainer = make()
            losses = [event.loss for event in trainer.run()]
            states.append((trainer.model.state_dict(), losses))
        (a, losses_a), (b, losses_b) = states
        assert losses_a == losses_b and all(torch.equal(a[k], b[k]) for k in a)
        assert trainer.metadata["training"]["history"][-1]["averaged_iterations"] == 4


def test_stack_trained_slice_wise_with_a_2d_net():
    image, labels, _ = _halves((3, 32, 32))
    labels[1] = 0  # an unpainted slice weighs nothing
    trainer = train(image, labels, _settings(iterations=2))
    assert trainer.model.ndim == 2


def test_a_stack_is_read_and_normalized_only_where_painted():
    """Under a 2D net the slices of a stack are normalized (with the whole stack's percentiles) when first
    sampled, so only painted slices are ever held as float32; a slice painted during training is read then. A
    lazy stack (dask, as the reader opens large files) trains exactly like the same stack in memory."""
    dask_array = pytest.importorskip("dask.array")
    image, labels, _ = _halves((8, 32, 32))
    labels[[0, 1, 2, 4, 5, 6, 7]] = 0  # only slice 3 painted
    models = []
    for source in (image, dask_array.from_array(image, chunks=(1, 32, 32))):
        trainer = train(source, labels, _settings(iterations=4, seed=1))
        assert [piece.array is not None for piece in trainer.sampler._images[0]] == [z == 3 for z in range(8)]
        models.append(trainer.model.state_dict())
    for name, value in models[0].items():
        torch.testing.assert_close(models[1][name], value, rtol=0, atol=0, msg=name)

    trainer = Trainer(image, labels, _settings(iterations=60, seed=1))
    events = trainer.run()
    next(events)
    more = labels.copy()
    more[6, 4:28, 4:7] = 1
    trainer.update_labels(0, more)
    for _ in events:  # the update is used within three iterations; then slice 6 is drawn at some point
        if trainer.sampler._images[0][6].array is not None:
            break
    assert [piece.array is not None for piece in trainer.sampler._images[0]] == [z in (3, 6) for z in range(8)]
    np.testing.assert_array_equal(trainer.sampler._images[0][6][...], normalize_image(image)[6])
    events.close()


def test_sparse_slices_of_a_volume_train_a_3d_net():
    image, labels, _ = _halves((12, 32, 32))
    labels[[0, 1, 2, 3, 5, 6, 7, 8, 9, 11]] = 0  # only slices 4 and 10 painted
    trainer = train(image, labels, _settings(iterations=2, ndim=3, patch_size=8, border_weight=True))
    assert trainer.model.ndim == 3
    assert trainer.input_shape == tuple(trainer.model.legal_input_shape(8))


def test_border_weight_runs_in_2d():
    image, labels, _ = _halves()
    assert train(image, labels, _settings(iterations=2, border_weight=True)).iteration == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("zoom", -0.1, "zoom"),
        ("paste_mix", 1.5, "paste_mix"),
        ("weight_averaging", 1.0, "weight_averaging"),
        ("batch_size", 0, "batch_size"),
        ("ndim", 4, "ndim"),
        ("ndim", True, "ndim"),
        ("learning_rate", float("nan"), "learning_rate must be a finite number"),
        ("learning_rate", float("inf"), "learning_rate"),
        ("learning_rate", 0.0, "learning_rate"),
        ("learning_rate", 2.0, "learning_rate"),
        ("learning_rate", "1e-3", "learning_rate"),
        ("time_budget", float("nan"), "time_budget must be a finite number"),
        ("time_budget", float("inf"), "time_budget"),
        ("time_budget", 0, "time_budget"),
        ("iterations", 0, "iterations must be an integer from 1"),
        ("iterations", 2.5, "iterations"),
        ("iterations", True, "iterations"),
        ("depth", 0, "depth"),
        ("depth", 9, "depth"),
        ("base_filters", 0, "base_filters"),
        ("patch_size", 0, "patch_size"),
        ("patch_size", (16,), "patch_size"),
        ("patch_size", "16", "patch_size"),
        ("patience", 0, "patience"),
        ("seed", -1, "seed"),
        ("cpu_threads", 0, "cpu_threads"),
        ("dropout", float("nan"), "dropout"),
        ("dropout", 1.0, "dropout"),
        ("block", "magic", "block"),
        ("weight_averaging", float("nan"), "weight_averaging"),
        ("zoom", float("nan"), "zoom"),
        ("zoom", 5.0, "zoom"),
        ("class_balance", float("inf"), "class_balance"),
        ("class_sampling", -1.0, "class_sampling"),
        ("dice_weight", float("nan"), "dice_weight"),
        ("flips", "yes", "flips"),
        ("amp", 1, "amp"),
        ("normalization", {"method": "magic"}, "unknown normalization method"),
        ("normalization", {"method": "robust", "low": float("nan")}, "percentiles"),
        ("normalization", {"method": "fixed", "low_values": [0.0], "high_values": [float("inf")]}, "high_values"),
        ("device", None, "device"),
    ],
)
def test_invalid_settings_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        _settings(**{"iterations": 1, field: value})


def test_valid_settings_of_every_kind_are_accepted():
    settings = _settings(iterations=None, time_budget=0.5, patch_size=(16, 24), patience=3, seed=None, learning_rate=1)
    assert settings.patch_size == (16, 24) and settings.learning_rate == 1
    assert _settings(iterations=np.int64(5), seed=np.int64(2), normalization={"method": "none"}).iterations == 5


def _colours(shape=(48, 48), seed=0):
    """An RGB image (channels last) whose classes differ only in hue: the left half red, the right half green,
    with the same brightness (a single-channel mean of the channels cannot tell them apart)."""
    image, labels, truth = _halves(shape, seed)
    rng = np.random.default_rng(seed + 1)
    rgb = rng.normal(100, 10, (*shape, 3)).astype(np.float32)
    rgb[..., 0] += np.where(truth, 0, 100)
    rgb[..., 1] += np.where(truth, 100, 0)
    return rgb, labels, truth


def test_multi_channel_images_train_a_model_that_sees_every_channel(tmp_path):
    rgb, labels, truth = _colours()
    trainer = train(rgb, labels, _settings(iterations=60, learning_rate=1e-2), channel_axis=-1)
    assert trainer.model.in_channels == 3 and trainer.model.config["in_channels"] == 3
    trainer.save(tmp_path / "rgb.safetensors")
    model, meta = load_model(tmp_path / "rgb.safetensors")
    channels_first = np.moveaxis(rgb, -1, 0)
    probabilities = predict_tiled(model, normalize_image(channels_first, meta["normalization"], channel_axis=0))
    assert ((probabilities.argmax(0) == 1) == truth).mean() > 0.95
    # fine-tuning keeps the channels; an image with other channels is a clear error
    assert train(rgb, labels, _settings(iterations=1), init=(model, meta), channel_axis=-1).model.in_channels == 3
    with pytest.raises(ValueError, match="3 channel"):
        Trainer(rgb[..., :2], labels, _settings(iterations=1), init=(model, meta), channel_axis=-1)


def test_multi_channel_stacks_and_volumes_keep_channels_first():
    rgb, labels, _ = _colours((4, 32, 32))  # a stack (Z, Y, X, C)
    labels[1] = 0
    stack = train(rgb, labels, _settings(iterations=2, border_weight=True), channel_axis=3)
    assert stack.model.ndim == 2 and stack.model.in_channels == 3
    volume = np.moveaxis(_colours((12, 32, 32))[0], -1, 0)  # (C, Z, Y, X)
    trainer = train(volume, _colours((12, 32, 32))[1], _settings(iterations=2, ndim=3, patch_size=8), channel_axis=0)
    assert trainer.model.ndim == 3 and trainer.model.in_channels == 3


@pytest.mark.parametrize(
    "images, labels, channel_axis, message",
    [
        (
            [np.zeros((32, 32, 3)), np.zeros((32, 32, 2))],
            2 * [np.pad(np.ones((2, 4), np.uint8), 14)],
            -1,
            "numbers of channels",
        ),
        ([np.zeros((32, 32, 3))], [np.zeros((32, 32, 3), np.uint8)], -1, "without channels"),
        ([np.zeros((32, 32))], [np.zeros((32, 32), np.uint8)], 2, "no channel axis"),
    ],
)
def test_multi_channel_mistakes_are_clear_errors(images, labels, channel_axis, message):
    with pytest.raises(ValueError, match=message):
        Trainer(images, labels, _settings(iterations=1), channel_axis=channel_axis)


def test_targets_follow_the_class_order_of_the_model_file_also_when_unsorted():
    from napari_unet.training import targets_from_labels

    labels = np.array([[0, 7, 2], [5, 2, 7]])
    assert targets_from_labels(labels, [7, 2, 5]).tolist() == [[-1, 0, 1], [2, 1, 0]]
    assert targets_from_labels(labels, [2, 5, 7]).tolist() == [[-1, 2, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match=r"\[5\]"):
        targets_from_labels(labels, [7, 2])


def test_consistency_pairs_each_tile_with_an_intensity_variant_under_the_same_labels():
    image, labels, _ = _halves()
    plain = Trainer(image, labels, _settings(batch_size=4, seed=3))._numpy_batch()
    assert plain.consistency == 0 and len(plain.images) == 4
    trainer = Trainer(image, labels, _settings(batch_size=4, seed=3, consistency=1.0))
    trainer._batch_iteration = trainer.settings.iterations // 2  # past the ramp (CONSISTENCY_RAMP)
    batch = trainer._numpy_batch()
    assert batch.consistency == 1.0 and len(batch.images) == 4
    tiles, variants = batch.images[:2], batch.images[2:]
    np.testing.assert_array_equal(batch.targets[:2], batch.targets[2:])
    assert (batch.targets >= 0).any()
    assert not np.allclose(tiles, variants)
    # the variant changes intensities only: it stays aligned with its tile (same geometry)
    for tile, variant in zip(tiles[:, 0], variants[:, 0]):
        assert np.corrcoef(tile.ravel(), variant.ravel())[0, 1] > 0.5
    # with consistency off a seeded run draws what it drew before the option existed
    again = Trainer(image, labels, _settings(batch_size=4, seed=3, consistency=0.0))._numpy_batch()
    np.testing.assert_array_equal(again.images, plain.images)


def test_consistency_joins_after_a_tenth_of_the_budget_and_rises_to_its_weight():
    image, labels, _ = _halves()
    trainer = Trainer(image, labels, _settings(iterations=1000, time_budget=None, batch_size=4, consistency=0.8))
    weights = {}
    for iteration in (0, 99, 200, 300, 900):
        weights[iteration] = trainer._consistency_weight(iteration)
    assert weights[0] == weights[99] == 0
    assert weights[200] == pytest.approx(0.4) and weights[300] == weights[900] == pytest.approx(0.8)
    early = trainer._numpy_batch()  # before the ramp every tile of the batch carries strokes, none is a variant
    assert early.consistency == 0 and len(early.images) == 4
    assert not np.array_equal(early.targets[:2], early.targets[2:])
    single = Trainer(image, labels, _settings(iterations=1000, batch_size=1, consistency=0.8))
    assert single._consistency_weight(900) == 0  # one tile: no pair


def test_consistency_follows_the_batches_built_not_the_training_thread():
    """The prefetch thread builds batch k+1 while step k runs: the weight of a batch is that of the iteration it is
    built for, so a seeded run with the term is bit-identical from run to run (an iteration budget)."""
    image, labels, _ = _halves()
    runs = []
    for _ in range(2):
        trainer = Trainer(image, labels, _settings(iterations=12, batch_size=4, seed=5, consistency=1.0))
        runs.append(([event.loss for event in trainer.run()], trainer.model.state_dict()))
    (losses_a, a), (losses_b, b) = runs
    assert losses_a == losses_b and all(torch.equal(a[k], b[k]) for k in a)
    assert trainer._batch_iteration >= 12  # one batch per iteration was built for the schedule, counted there


def test_training_with_consistency_learns_the_image():
    image, labels, truth = _halves()
    trainer = train(image, labels, _settings(iterations=150, learning_rate=1e-2, batch_size=4, consistency=1.0))
    probabilities = predict_tiled(trainer.model, normalize_image(image, trainer.normalization))
    assert ((probabilities.argmax(0) == 1) == truth).mean() > 0.95
