"""Whether an image looks like the training images (``domain.py``): bounded profiles, training profiles in the model
file, the check in ``predict_image``."""

import math

import numpy as np
import pytest

from napari_unet import domain
from napari_unet.domain import (
    SAMPLE_TILE,
    SAMPLE_TILES,
    THRESHOLD,
    DomainCheck,
    check_prediction,
    compare,
    image_profile,
    profile,
    sample_regions,
    training_profile,
)
from napari_unet.io import load_model, save_model
from napari_unet.normalization import NormalizedView, image_params, normalized_view
from napari_unet.predict import PredictionSettings, predict_image
from napari_unet.training import train

FAST = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)


def cells(seed=0, shape=(128, 128)):
    """A 12-bit image of 16 disks, most at 600 and 3 at 1200, on a background of 100 with noise (normalized: the
    disks at ~0.45, the background at ~0.07), strokes (1 = background, 2 = disk) and the true disks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.full(shape, 100.0)
    labels = np.zeros(shape, np.uint8)
    centres = [(y, x) for y in range(16, shape[0] - 8, 32) for x in range(16, shape[1] - 8, 32)]
    for i, (y, x) in enumerate(centres):
        y, x = y + rng.integers(-4, 5), x + rng.integers(-4, 5)
        image[(yy - y) ** 2 + (xx - x) ** 2 <= 64] = 1200 if i < 3 else 600
        if i % 2 == 0:
            labels[(yy - y) ** 2 + (xx - x) ** 2 <= 9] = 2
    truth = image > 350
    labels[2:5, 4:-4] = 1
    row = slice(shape[0] // 2 - 1, shape[0] // 2 + 1)
    labels[row, 4:-4][~truth[row, 4:-4]] = 1
    image += rng.normal(0, 40, shape)
    return np.clip(image, 0, 4095).astype(np.uint16), labels, truth


def with_debris(image, fraction=0.02, seed=1):
    """``image`` with ``fraction`` of its pixels saturated (12-bit): the upper percentile moves onto the specks and
    the disks land at ~0.12 instead of ~0.45."""
    out = image.copy()
    out[np.random.default_rng(seed).random(image.shape) < fraction] = 4095
    return out


@pytest.fixture(scope="module")
def trained():
    """A tiny model (depth 2, 4 filters, 80 iterations: at 50 one seed of five leaves it undecided) trained on
    ``cells()`` with class names."""
    image, labels, _ = cells()
    trainer = train(
        image,
        labels,
        iterations=80,
        time_budget=None,
        depth=2,
        base_filters=4,
        patch_size=24,
        batch_size=4,
        device="cpu",
        cpu_threads=1,
        class_names=["background", "cell"],
    )
    return trainer.model, trainer.metadata


# --- sampling and profiles -------------------------------------------------------------------------------------


def _pixels(regions):
    return sum(math.prod(s.stop - s.start for s in region) for region in regions)


@pytest.mark.parametrize(
    ("shape", "count", "pixels"),
    [
        ((96, 96), 1, 96 * 96),  # small: the whole image
        ((2048, 2048), SAMPLE_TILES, SAMPLE_TILES * SAMPLE_TILE**2),
        ((50, 20000), 4, 50 * 4 * SAMPLE_TILE),  # a short axis is taken whole
        ((3, 70, 90), 3, 3 * 70 * 90),  # every plane of a short stack
        ((40, 1000, 1000), 16, 16 * SAMPLE_TILE**2),  # 4 planes of 2 x 2 tiles
    ],
)
def test_sample_regions_are_bounded_and_spread_over_the_image(shape, count, pixels):
    regions = sample_regions(shape)
    assert len(regions) == count and _pixels(regions) == pixels
    for axis, size in enumerate(shape):
        spans = sorted({(r[axis].start, r[axis].stop) for r in regions})
        assert all(0 <= a < b <= size for a, b in spans)
        if len(spans) == 1:
            assert spans == [(0, size)]  # taken whole
        else:
            cell = size / len(spans)  # one tile (or plane) centred in each cell of the grid
            assert all(abs((a + b) / 2 - (i + 0.5) * cell) <= 1 for i, (a, b) in enumerate(spans))
    assert len({repr(r) for r in regions}) == len(regions)
    assert sample_regions(shape) == regions  # the same image is always sampled alike
    for tiles in (1, 3, 4, 7):
        assert len(sample_regions(shape, tiles)) <= tiles


class CountingImage:
    """A lazy 'huge' image (computed from the indices, never stored) that counts the pixels read from it."""

    def __init__(self, shape, dtype=np.uint16, channels=0):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.read = 0

    def __getitem__(self, key):
        grids = np.meshgrid(*[np.arange(n)[k] for n, k in zip(self.shape, key)], indexing="ij")
        values = sum((g * (7 + i)) % 1000 for i, g in enumerate(grids))
        self.read += values.size
        return values.astype(self.dtype)


def test_the_profile_of_a_huge_lazy_image_reads_only_the_sample():
    image = CountingImage((100_000, 100_000))  # 20 GB as uint16
    params = {"method": "percentile", "low_values": [10.0], "high_values": [1900.0], "channel_axis": None}
    probabilities = CountingImage((2, 100_000, 100_000), np.float32)
    record = image_profile(NormalizedView(image, params), probabilities)
    assert image.read == probabilities.read / 2 == SAMPLE_TILES * SAMPLE_TILE**2 == record["pixels"]
    assert len(record["intensity"]) == 1 and len(record["intensity"][0]) == len(domain.QUANTILES)
    assert sorted(record["intensity"][0]) == record["intensity"][0]


def test_profile_figures():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0.0, 0.1, 3000), rng.uniform(0.4, 0.6, 1000)])[None]
    probabilities = np.zeros((3, 4000), np.float32)
    probabilities[0, :3000] = probabilities[1, 3000:] = 0.9
    probabilities[2] = 0.1
    probabilities[0, 3000:] = probabilities[1, :3000] = 0.0
    record = profile(values, probabilities)
    assert record["pixels"] == 4000
    assert record["class_fractions"] == [0.75, 0.25, 0.0]
    background, objects, absent = record["class_intensity"]
    assert 0.04 < background[0][1] < 0.06 and 0.49 < objects[0][1] < 0.51
    assert absent is None  # no pixel won: no level
    assert 0 < record["entropy"] < 1


# --- the training profile ---------------------------------------------------------------------------------------


def test_the_trainer_records_the_profile_and_it_survives_save_and_load(trained, tmp_path):
    model, metadata = trained
    profile_ = metadata["training_profile"]
    assert profile_["version"] == domain.PROFILE_VERSION and len(profile_["images"]) == 1
    entry = profile_["images"][0]
    assert entry["pixels"] == 128 * 128  # a small image is sampled whole
    assert set(entry) == {"pixels", "intensity", "background_spread", "class_fractions", "class_intensity", "entropy"}
    assert 0.0 <= entry["background_spread"][0] < 0.05  # an even background (the disks fill no block's low end)
    assert 0.1 < entry["class_fractions"][1] < 0.4  # the disks
    assert entry["class_intensity"][1][0][1] > 0.3 > entry["class_intensity"][0][0][1]
    path = save_model(model, tmp_path / "m.safetensors", metadata)
    _, loaded = load_model(path)
    assert loaded["training_profile"] == profile_


def test_a_trainer_that_never_ran_has_intensities_only_and_no_check():
    from napari_unet.training import Trainer, TrainingSettings

    image, labels, _ = cells()
    trainer = Trainer(image, labels, TrainingSettings(depth=1, base_filters=4, patch_size=16, device="cpu"))
    (entry,) = trainer.metadata["training_profile"]["images"]
    assert set(entry) == {"pixels", "intensity", "background_spread"}
    outputs = predict_image(trainer.model, trainer.metadata, image, FAST)
    assert outputs.domain is None


@pytest.mark.parametrize(("shape", "tiles", "calls"), [((300, 300), 16, 1), ((700, 700), 4, 4), ((3, 150, 260), 16, 3)])
def test_training_tiles_are_predicted_as_the_whole_image_is(shape, tiles, calls, monkeypatch):
    """Whether a plane is predicted whole (where that reads fewer pixels than the tiles with their context: one call
    per plane) or tile by tile, the sampled tiles get the whole image's probabilities there."""
    import torch

    import napari_unet.predict as predict
    from napari_unet.model import UNet
    from napari_unet.predict import predict_region
    from napari_unet.tiling import predict_tiled

    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=2, base_filters=4).eval()
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    regions = sample_regions(shape, tiles)
    made = []
    monkeypatch.setattr(predict, "predict_region", lambda *args: made.append(args[2]) or predict_region(*args))
    predicted = predict.predict_regions(model, image, regions)
    assert len(made) == calls
    whole = predict_tiled(model, image)
    for got, region in zip(predicted, regions):
        np.testing.assert_allclose(got, whole[(slice(None), *region)], atol=1e-5)


def test_the_profile_costs_a_bounded_prediction_at_the_end_of_a_run(monkeypatch):
    """Many training images: the run's end predicts at most the budget's input pixels (about two training steps,
    at least ``TRAINING_MIN_PIXELS``) with their context, spread over evenly chosen images."""
    import napari_unet.predict as predict
    from napari_unet.predict import region_with_context

    read = []
    real = predict.predict_region

    def counting(model, normalized, region, **kwargs):
        crop, _ = region_with_context(region, normalized.shape, model.halo, model.grid)
        read.append(math.prod(s.stop - s.start for s in crop))
        return real(model, normalized, region, **kwargs)

    monkeypatch.setattr(predict, "predict_region", counting)
    pairs = [cells(seed, (96, 96))[:2] for seed in range(40)]
    trainer = train(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        iterations=2,
        time_budget=None,
        depth=2,
        base_filters=4,
        patch_size=16,
        batch_size=2,
        device="cpu",
        cpu_threads=1,
    )
    budget = max(domain.TRAINING_MIN_PIXELS, 6 * 2 * math.prod(trainer.input_shape))
    assert 0 < sum(read) <= budget and len(read) <= domain.TRAINING_TILES
    images = trainer.metadata["training_profile"]["images"]
    assert 4 < len(images) < 40 and all("class_fractions" in p for p in images)


def test_fine_tuning_keeps_the_profiles_of_the_model_it_starts_from(trained):
    model, metadata = trained
    image, labels, _ = cells(seed=3)
    tuned = train(
        image,
        labels,
        init=(model, metadata),
        iterations=2,
        time_budget=None,
        patch_size=24,
        batch_size=2,
        device="cpu",
        cpu_threads=1,
    )
    images = tuned.metadata["training_profile"]["images"]
    assert images[0] == metadata["training_profile"]["images"][0] and len(images) == 2
    assert "class_fractions" in images[1]


def test_training_profiles_keep_the_latest_images():
    entries = [{"pixels": i} for i in range(50)]
    kept = training_profile(entries[40:], training_profile(entries[:40]))["images"]
    assert len(kept) == domain.MAX_TRAINING_IMAGES and kept[-1] == {"pixels": 49}


# --- the check --------------------------------------------------------------------------------------------------


def test_silent_on_the_training_image_a_gain_changed_copy_and_a_new_image_of_the_same_kind(trained):
    model, metadata = trained
    image, _, _ = cells()
    for name, x in (
        ("itself", image),
        ("gain x3", image.astype(np.float32) * 3),
        ("gain x0.3 and an offset", image.astype(np.float32) * 0.3 + 500),
        ("another field", cells(seed=5)[0]),
        ("a little noise", image + np.random.default_rng(2).normal(0, 10, image.shape)),
    ):
        check = predict_image(model, metadata, x, FAST).domain
        assert isinstance(check, DomainCheck) and not check.unlike, (name, check)
        assert check.score < 0.5 and check.threshold == THRESHOLD, name
    check = predict_image(model, metadata, image).domain  # flips and refinement on: still itself
    assert check.score < 0.1


def test_debris_that_the_robust_recipe_leaves_out_raises_no_alarm(trained):
    """Saturated single pixels on 0.5 % of the image: the default (robust) normalization leaves them out of the upper
    percentile, the objects keep their range, and the image is not unlike the training image."""
    model, metadata = trained
    assert metadata["normalization"]["method"] == "robust"
    check = predict_image(model, metadata, with_debris(cells()[0], 0.005), FAST).domain
    assert check is not None and not check.unlike


@pytest.mark.parametrize("fraction", [0.02])
def test_fires_on_bright_saturated_debris(trained, fraction):
    model, metadata = trained
    image, _, truth = cells()
    outputs = predict_image(model, metadata, with_debris(image, fraction), FAST)
    check = outputs.domain
    assert check.unlike and check.score > THRESHOLD
    assert "cell" in check.reason and "training" in check.reason  # names the class and the figures
    record = check.as_metadata()
    assert record["unlike"] is True and record["score"] == round(check.score, 3) and record["reason"] == check.reason
    assert set(record["terms"]) == {"class_level", "class_fraction", "stability", "entropy", "background"}
    message = check.message("img_17")
    assert message.startswith("'img_17' looks unlike the training images (")
    assert message.endswith("): paint a few strokes on it and train on")


def test_outputs_are_unchanged_by_the_check(trained):
    model, metadata = trained
    image, _, _ = cells()
    bare = {k: v for k, v in metadata.items() if k != "training_profile"}
    with_check, without = predict_image(model, metadata, image, FAST), predict_image(model, bare, image, FAST)
    assert without.domain is None and with_check.domain is not None
    np.testing.assert_array_equal(with_check.probabilities, without.probabilities)
    np.testing.assert_array_equal(with_check.labels, without.labels)


def test_a_stop_during_the_check_stops_it(trained, monkeypatch):
    """Stop pressed once the image itself is predicted: the check's own predictions stop too."""
    import napari_unet.predict as predict_module
    from napari_unet.tiling import PredictionStopped

    model, metadata = trained
    image, _, _ = cells()
    stop = []
    labelled = predict_module.segmentation_from_probabilities

    def then_stop(*args, **kwargs):
        stop.append(True)
        return labelled(*args, **kwargs)

    monkeypatch.setattr(predict_module, "segmentation_from_probabilities", then_stop)
    with pytest.raises(PredictionStopped):
        predict_image(model, metadata, image, FAST, should_stop=lambda: bool(stop))
    stop.clear()
    bare = {k: v for k, v in metadata.items() if k != "training_profile"}
    assert predict_image(model, bare, image, FAST, should_stop=lambda: bool(stop)).domain is None  # no check: done


def test_models_without_a_profile_get_no_check(trained, tmp_path):
    model, _ = trained
    path = save_model(model, tmp_path / "old.safetensors", {"class_ids": [1, 2]})
    old, metadata = load_model(path)
    assert predict_image(old, metadata, with_debris(cells()[0]), FAST).domain is None
    nan = _trained_profile([0.05, float("nan")], [0.8, 0.2])
    for broken in (
        {"version": 99, "images": []},
        {"version": 1, "images": [{"class_fractions": "x"}]},
        "nonsense",
        nan,
    ):
        unused = lambda image, regions: pytest.fail("a model without a usable profile predicts nothing")  # noqa: E731
        metadata = {"training_profile": broken}
        image, probabilities = np.zeros((8, 8), np.float32), np.full((2, 8, 8), 0.5, np.float32)
        assert check_prediction(metadata, image, probabilities, unused, halo=(4, 4), grid=2) is None


def test_a_model_file_edited_into_other_shapes_predicts_with_or_without_a_check(trained):
    """A model file's metadata edited by hand (or by another tool) that still loads: a profile's images that are no
    list, runs whose settings are no dict. The check uses what it can read and never raises."""
    model, metadata = trained
    image = cells()[0]
    profile = metadata["training_profile"]
    for edited in (
        {**metadata, "training_profile": {**profile, "images": 5}},
        {**metadata, "training_profile": {**profile, "images": [3, "x", *profile["images"]]}},
        {**metadata, "training": {**metadata["training"], "history": [{"settings": [1, 2]}, 7]}},
        {**metadata, "training": {"history": "x"}},
    ):
        outputs = predict_image(model, edited, image, FAST)
        assert outputs.labels.shape == image.shape
    kept = predict_image(
        model, {**metadata, "training_profile": {**profile, "images": [3, *profile["images"]]}}, image, FAST
    )
    assert kept.domain is not None and kept.domain.score == predict_image(model, metadata, image, FAST).domain.score


def _trained_profile(medians, fractions):
    """A training profile of one image whose classes have these medians (one channel) and fractions."""
    entry = {
        "pixels": 1000,
        "intensity": [[0.0] * 7],
        "class_fractions": list(fractions),
        "class_intensity": [[[m - 0.02, m, m + 0.02]] for m in medians],
        "entropy": 0.1,
    }
    return training_profile([entry])


def _image(medians, fractions):
    return _trained_profile(medians, fractions)["images"][0]


def test_the_distance_on_a_gamma_3_shift_and_its_reason():
    """Gamma 3 on the normalized scale: the objects' median 0.5 -> 0.125, the background 0.05 -> 0.0001."""
    training = _trained_profile([0.05, 0.5], [0.8, 0.2])
    check = compare(_image([0.05**3, 0.5**3], [0.8, 0.2]), training, ["background", "nucleus"])
    # The nucleus level moved (0.5 - 0.125) / (0.5 - 0.05) = 83 % of the way to the background's: 1.85 tolerances.
    assert check.terms["class_level"] == pytest.approx(0.375 / 0.45 / domain.TOWARD)
    assert check.terms["class_fraction"] == 0.0 and check.score == pytest.approx(check.terms["class_level"])
    assert check.unlike
    assert check.reason == "nucleus pixels at 0.12 (training 0.50), 83% of the way to background (0.05)"


def test_the_distance_is_gentler_away_from_the_other_classes_and_adds_the_fraction():
    training = _trained_profile([0.05, 0.5], [0.8, 0.2])
    brighter = compare(_image([0.05, 0.8], [0.8, 0.2]), training)  # away from the background: x1/AWAY
    assert brighter.terms["class_level"] == pytest.approx(0.3 / 0.45 / domain.AWAY) and not brighter.unlike
    assert "class 2 pixels at 0.80" in brighter.reason
    fewer = compare(_image([0.05, 0.5], [0.97, 0.03]), training)  # 8x fewer objects: log-odds 2.09 (12x: 2.5)
    expected = (math.log(0.2 / 0.8) - math.log(0.03 / 0.97)) / domain.FRACTION_LOGIT
    assert fewer.terms["class_fraction"] == pytest.approx(expected) and not fewer.unlike
    both = compare(_image([0.05, 0.3], [0.98, 0.02]), training)  # two differences of ~1 tolerance together
    assert both.score == pytest.approx(math.hypot(both.terms["class_level"], both.terms["class_fraction"]))
    assert both.unlike and "covers 2.0% of the image (training 20.0%)" in both.reason


def test_the_range_of_several_training_images_is_inside():
    a, b = _image([0.05, 0.3], [0.9, 0.1]), _image([0.05, 0.6], [0.6, 0.4])
    training = training_profile([a, b])
    check = compare(_image([0.05, 0.45], [0.75, 0.25]), training)
    assert check.score == 0.0 and not check.unlike
    assert compare(_image([0.05, 0.45], [0.75, 0.25]), training_profile([a])).score > 0


def hazy(image, peak=900.0):
    """``image`` plus a smooth bright bump centred on its top-left corner (out-of-focus light), ``peak`` counts at
    the corner (the disks of :func:`cells` are 500 counts above their background)."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    width = 0.6 * image.shape[0]
    return image + peak * np.exp(-(yy**2 + xx**2) / (2 * width**2))


def test_the_background_spread_sees_a_haze_and_not_the_objects():
    image = cells(shape=(256, 256))[0]
    spreads = {}
    for name, x in (("clean", image), ("haze", hazy(image))):
        params = image_params(x, {"method": "robust", "low": 1.0, "high": 99.8, "speck_area": 100})
        spreads[name] = image_profile(NormalizedView(x, params))["background_spread"][0]
    assert spreads["clean"] < 0.05  # disks in half the blocks, none filled by one
    assert spreads["haze"] > spreads["clean"] + 1.5 * domain.BACKGROUND_TOLERANCE
    parts = [np.zeros((1, 20, 20), np.float32)] * 3  # three blocks: too few to say
    assert domain.background_spread(parts) is None


def test_the_background_term_its_reason_and_the_hint():
    training = _trained_profile([0.05, 0.5], [0.8, 0.2])
    training["images"][0]["background_spread"] = [0.04]
    image = _image([0.05, 0.5], [0.8, 0.2])  # classes as in training
    hazy_ = compare({**image, "background_spread": [0.34]}, training, ["background", "nucleus"])
    assert hazy_.terms["background"] == pytest.approx(0.30 / domain.BACKGROUND_TOLERANCE)
    assert hazy_.score == pytest.approx(hazy_.terms["background"]) and hazy_.unlike
    assert hazy_.reason == "background level varies by 0.34 across the image (training at most 0.04)"
    assert hazy_.hint == domain.BACKGROUND_HINT
    advice = "paint a few strokes on it and train on; if these images have uneven illumination or haze, train with "
    cli, widget = hazy_.message("img_3"), hazy_.message("img_3", surface="widget")
    assert cli.endswith(advice + "the normalization that subtracts a smooth background (--normalization background)")
    assert widget.endswith("(Advanced settings > Normalization: 'robust, uneven background subtracted')")
    assert "--normalization" not in widget and "{how}" not in cli + widget  # each surface names its own control
    record = hazy_.as_metadata()["hint"]
    assert "--normalization background" in record and "'robust, uneven background subtracted'" in record
    assert compare({**image, "background_spread": [0.34]}, training, background_subtracted=True).hint == ""
    assert not compare({**image, "background_spread": [0.34]}, training, background_seen=0.3).unlike  # augmented
    even = compare({**image, "background_spread": [0.1]}, training)
    assert even.terms["background"] == pytest.approx(0.06 / domain.BACKGROUND_TOLERANCE) and not even.unlike
    dimmed = compare({**_image([0.05, 0.2], [0.8, 0.2]), "background_spread": [0.04]}, training)
    assert dimmed.unlike and dimmed.terms["background"] == 0.0 and dimmed.hint == ""  # unlike for another reason
    assert "background" not in compare(image, training).terms  # no figure for the image
    del training["images"][0]["background_spread"]  # a model saved before the figure was recorded
    assert "background" not in compare({**image, "background_spread": [0.34]}, training).terms


def test_a_haze_is_warned_with_the_hint_and_debris_without(trained):
    """A haze lifts part of the background, which the class and behaviour terms barely see on this model (score
    0.9 without the background term); saturated debris squashes the disks toward an even background."""
    model, metadata = trained
    image = cells()[0]
    trained_spread = metadata["training_profile"]["images"][0]["background_spread"][0]
    check = predict_image(model, metadata, hazy(image), FAST).domain
    assert check.unlike and check.terms["background"] > 1.0 and check.hint == domain.BACKGROUND_HINT, check
    assert check.profile["background_spread"][0] > trained_spread + domain.BACKGROUND_TOLERANCE
    debris = predict_image(model, metadata, with_debris(image), FAST).domain
    assert debris.unlike and debris.terms["background"] < domain.REASON_TERM and debris.hint == ""


def test_channels_and_classes_that_do_not_match_give_no_check():
    training = _trained_profile([0.05, 0.5], [0.8, 0.2])
    three = {**_image([0.05, 0.5, 0.9], [0.7, 0.2, 0.1])}
    assert compare(three, training) is None
    two_channels = _image([0.05, 0.5], [0.8, 0.2])
    two_channels["intensity"] = [[0.0] * 7] * 2
    assert compare(two_channels, training) is None
    with pytest.raises(ValueError, match="predicted image"):
        compare({"pixels": 1, "intensity": [[0.0] * 7]}, training)


def test_multi_channel_images_and_stacks_are_profiled_per_channel_and_plane():
    image, labels, _ = cells(shape=(64, 64))
    rgb = np.stack([image, image // 2, 4095 - image], axis=-1)
    trainer = train(
        rgb,
        labels,
        iterations=3,
        time_budget=None,
        depth=1,
        base_filters=4,
        patch_size=16,
        device="cpu",
        channel_axis=-1,
    )
    (entry,) = trainer.metadata["training_profile"]["images"]
    assert len(entry["intensity"]) == 3 and len(entry["class_intensity"][0]) == 3
    check = predict_image(trainer.model, trainer.metadata, np.moveaxis(rgb, -1, 0), FAST).domain
    assert check is not None and check.score < 0.2
    stack = np.stack([image, cells(1, (64, 64))[0], cells(2, (64, 64))[0]])
    stack_labels = np.zeros(stack.shape, np.uint8)
    stack_labels[0] = labels
    trainer = train(
        stack, stack_labels, iterations=3, time_budget=None, depth=1, base_filters=4, patch_size=16, device="cpu"
    )
    (entry,) = trainer.metadata["training_profile"]["images"]
    assert entry["pixels"] == 3 * 64 * 64
    assert predict_image(trainer.model, trainer.metadata, stack, FAST).domain is not None
    volume = train(  # a 3D net: its tiles are predicted with context in Z too
        stack, stack_labels, iterations=2, time_budget=None, ndim=3, depth=1, base_filters=2, patch_size=8, device="cpu"
    )
    assert "class_fractions" in volume.metadata["training_profile"]["images"][0]
    assert predict_image(volume.model, volume.metadata, stack, FAST).domain is not None


def test_the_check_reads_the_view_prediction_normalizes(trained):
    """``check_prediction`` profiles what the model's recipe makes of the image: the percentiles computed on the
    image itself, so a gain cancels exactly."""
    _, metadata = trained
    image, _, _ = cells()
    view = normalized_view(image, metadata["normalization"])
    assert view.params == image_params(image, metadata["normalization"])  # the image's own values
    probabilities = np.stack([np.full(image.shape, 0.3), np.full(image.shape, 0.7)]).astype(np.float32)

    def predicted(image, regions):  # the same probabilities whatever the image
        return [probabilities[(slice(None), *region)] for region in regions]

    first = check_prediction(metadata, view, probabilities, predicted, halo=(4, 4), grid=2)
    doubled = normalized_view(image * 2.0, metadata["normalization"])
    second = check_prediction(metadata, doubled, probabilities, predicted, halo=(4, 4), grid=2)
    assert first.profile["intensity"] == second.profile["intensity"]


# --- stability under a gain, and the entropy ------------------------------------------------------------------


def _disc_probabilities(radius, shape=(64, 64), centre=(32, 32)):
    """Two-class probabilities of a disc (class 1) on background (class 0), confident."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    return np.stack([np.where(disc, 0.05, 0.95), np.where(disc, 0.95, 0.05)]).astype(np.float32)


def test_stability_leaves_boundary_moves_out_and_counts_whole_objects():
    base = [_disc_probabilities(10)]
    grown = [_disc_probabilities(11)]  # the boundary moves by a pixel: nothing counts
    assert domain.stability(base, [grown, base]) == [0, 0]
    gone = [_disc_probabilities(0, centre=(-50, -50))]  # the disc vanishes: its inside counts, for both classes
    changed = domain.stability(base, [base, gone])
    inner = int((np.hypot(*np.mgrid[-32:32, -32:32]) <= 10 - domain.STABILITY_BAND - 1).sum())
    assert changed[0] == changed[1] and inner <= changed[0] < math.pi * 10**2


def test_the_stability_and_entropy_terms_and_their_reasons():
    training = _trained_profile([0.05, 0.8], [0.8, 0.2])  # training entropy 0.1
    image = _image([0.05, 0.8], [0.8, 0.2])
    image["stability"] = {"gain": 1.5, "pixels": 10000, "fractions": [0.8, 0.2], "changed": [300, 300]}
    check = compare(image, training, ["background", "nucleus"])
    assert check.terms["stability"] == pytest.approx(300 / 2000 / domain.STABILITY_TOLERANCE)
    assert check.terms["entropy"] == 0.0 and not check.unlike  # as sure as the training images
    image["stability"]["changed"] = [900, 900]
    image["entropy"] = 0.2
    check = compare(image, training, ["background", "nucleus"])
    assert check.terms["entropy"] == pytest.approx(0.1 / (0.5 * 0.1))
    assert check.unlike and check.score == pytest.approx(math.hypot(900 / 2000 / 0.3, 2.0))
    assert "45% of the nucleus pixels change class when the image is 1.5x brighter or darker" in check.reason
    assert "mean uncertainty 0.20 (training at most 0.10)" in check.reason


def _threshold_model(image, regions):
    """A network that calls a pixel "object" above 0.5 in normalized units (a sharp sigmoid)."""
    out = []
    for region in regions:
        x = np.asarray(image[region], dtype=np.float32)
        p = 1.0 / (1.0 + np.exp(-(x - 0.5) * 40.0))
        out.append(np.stack([1 - p, p]).astype(np.float32))
    return out


def test_objects_dimmed_to_where_the_network_decides_are_caught_by_the_stability_term():
    """A synthetic shift: discs at 1.0 on 0.05 train the threshold network; the same discs at 0.35 (what bright
    debris or a gamma leaves after normalization) are missed, confidently, and neither their class statistics nor
    the entropy say so; 1.5x brighter they come back, and the check fires on that."""
    yy, xx = np.mgrid[:256, :256]
    discs = np.zeros((256, 256), bool)
    for y in range(24, 256, 48):
        for x in range(24, 256, 48):
            discs |= (yy - y) ** 2 + (xx - x) ** 2 <= 100
    clean = np.where(discs, 1.0, 0.05).astype(np.float32)
    regions = sample_regions(clean.shape)
    values = domain.flatten_regions(domain.read_regions(clean, regions))
    probabilities = np.concatenate([p.reshape(2, -1) for p in _threshold_model(clean, regions)], axis=1)
    metadata = {"training_profile": training_profile([profile(values, probabilities)]), "class_names": ["bg", "disc"]}

    def check(image):
        (predicted,) = _threshold_model(image, [(slice(None), slice(None))])
        return check_prediction(metadata, image, predicted, _threshold_model, halo=(8, 8), grid=4, one_pass=True)

    same = check(clean)
    assert not same.unlike and same.terms["stability"] == 0.0
    dimmed = check(np.where(discs, 0.35, 0.05).astype(np.float32))
    assert dimmed.unlike and dimmed.terms["stability"] > 1.0 and dimmed.terms["entropy"] < 0.5
    assert "disc pixels change class" in dimmed.reason
