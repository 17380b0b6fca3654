"""Augmentation moves image and labels together; labels stay class indices."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from napari_unet.augment import Augmenter


def _pair(shape, seed=0, block=4):
    rng = np.random.default_rng(seed)
    target = rng.integers(-1, 3, size=shape).astype(np.int16)
    target = np.kron(target, np.ones((1,) * (len(shape) - 2) + (block, block), dtype=np.int16))  # blocky regions
    return target.astype(np.float32), target


@pytest.mark.parametrize("shape", [(12, 12), (3, 8, 8)])
def test_flips_and_rotations_are_identical_for_image_and_labels(shape):
    image, target = _pair(shape)
    augment = Augmenter(np.random.default_rng(0), elastic=False, intensity=False)
    for _ in range(10):
        out_image, out_target, weight = augment(image, target, target.astype(np.float32))
        assert np.array_equal(out_image, out_target.astype(np.float32))
        assert np.array_equal(weight, out_target.astype(np.float32))
        assert out_image.flags.c_contiguous


def test_elastic_deformation_keeps_labels_aligned_and_integer():
    image, target = _pair((6, 6), seed=1, block=16)
    augment = Augmenter(
        np.random.default_rng(0), flips=False, rotations=False, intensity=False, elastic_probability=1.0
    )
    out_image, out_target, _ = augment(image, target)
    assert out_target.dtype == target.dtype
    assert set(np.unique(out_target)) <= {-1, 0, 1, 2}
    assert not np.array_equal(out_target, target)  # it did deform
    agree = (np.abs(out_image - out_target) < 0.5)[out_target >= 0].mean()
    assert agree > 0.8  # linear vs nearest interpolation differ only at region edges


def test_zoom_magnifies_image_and_labels_together():
    yy, xx = np.mgrid[:64, :64]
    disk = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 12**2).astype(np.int16)
    augment = Augmenter(
        np.random.default_rng(0), flips=False, rotations=False, elastic=False, intensity=False, zoom_range=0.4
    )
    areas = []
    for _ in range(20):
        out_image, out_target, _ = augment(disk.astype(np.float32), disk)
        assert set(np.unique(out_target)) <= {-1, 0, 1}  # shrinking moves unpainted (-1) in at the edges
        assert (out_target[28:36, 28:36] == 1).all() and (out_target == -1).mean() < 0.6
        known = out_target >= 0
        assert (np.abs(out_image - out_target) < 0.5)[known].mean() > 0.99
        areas.append((out_target == 1).sum() / disk.sum())
    # the area scales with zoom ** 2, zoom in exp(+-0.4)
    assert np.exp(-0.8) * 0.9 < min(areas) < 0.8 and 1.25 < max(areas) < np.exp(0.8) * 1.1
    # a volume is zoomed in-plane only: identical slices stay identical
    stack = np.stack([disk] * 3)
    out_image, out_target, _ = augment(stack.astype(np.float32), stack)
    assert not np.array_equal(out_target[0], disk)
    assert all(
        np.array_equal(out_target[0], t) and np.array_equal(out_image[0], i) for i, t in zip(out_image, out_target)
    )


def test_intensity_changes_image_only():
    image, target = _pair((8, 8))
    image = np.abs(image) + 0.5
    augment = Augmenter(np.random.default_rng(0), flips=False, rotations=False, elastic=False)
    out_image, out_target, _ = augment(image, target)
    assert np.array_equal(out_target, target)
    assert out_image.dtype == np.float32
    assert not np.allclose(out_image, image)
    # monotonic: the order of intensities is kept
    assert np.array_equal(np.argsort(out_image, axis=None, kind="stable"), np.argsort(image, axis=None, kind="stable"))


def test_intensity_ranges_bound_the_change():
    ones = np.ones((4, 4), np.float32)  # gamma leaves 1 unchanged: the output is scale + shift
    target = np.zeros((4, 4), np.int16)
    augment = Augmenter(np.random.default_rng(1), flips=False, rotations=False, elastic=False)
    values = [augment(ones, target)[0][0, 0] for _ in range(300)]
    low, high = np.exp(-augment.scale_range) - augment.shift_range, np.exp(augment.scale_range) + augment.shift_range
    assert low <= min(values) and max(values) <= high and max(values) - min(values) > 0.5 * (high - low)
    still = Augmenter(
        np.random.default_rng(1),
        flips=False,
        rotations=False,
        elastic=False,
        gamma_range=0,
        scale_range=0,
        shift_range=0,
    )
    image = np.random.default_rng(2).random((4, 4)).astype(np.float32)
    np.testing.assert_allclose(still(image, target)[0], image, rtol=1e-6)


def test_paste_mix_moves_image_and_labels_together_inside_the_region():
    from napari_unet.augment import paste_mix

    rng = np.random.default_rng(0)
    images = np.stack([np.full((20, 20), float(i), np.float32) for i in range(4)])
    targets = np.stack([np.full((20, 20), -1 if i == 0 else i, np.int16) for i in range(4)])
    before_images, before_targets = images.copy(), targets.copy()
    region = (slice(4, 16), slice(4, 16))
    paste_mix(images, targets, None, rng, 1.0, region)
    for i in range(4):
        changed = images[i] != before_images[i]
        assert changed.any()  # probability 1: every tile got a box
        assert not changed[:4].any() and not changed[16:].any() and not changed[:, :4].any()
        source = int(images[i][changed][0])
        assert source != i and np.all(images[i][changed] == source)
        # the labels moved with the image: painted where the source was painted, unpainted where it was not
        assert np.all(targets[i][changed] == before_targets[source][changed])
        assert np.array_equal(targets[i][~changed], before_targets[i][~changed])
    untouched = images.copy()
    paste_mix(untouched, targets.copy(), None, rng, 0.0, region)
    assert np.array_equal(untouched, images)


def test_channels_move_alike_and_get_their_own_intensity_change():
    """A (C, *tile) image: every channel gets the geometric transform of the labels; intensity changes are
    drawn per channel."""
    _, target = _pair((6, 6), seed=3, block=16)
    base = target.astype(np.float32)
    image = np.stack([base, -2 * base, base + 5])
    geometric = Augmenter(np.random.default_rng(0), intensity=False, elastic_probability=1.0, zoom_range=0.3)
    for _ in range(5):
        out_image, out_target, _ = geometric(image, target)
        assert out_image.shape == (3, *out_target.shape) and out_image.dtype == np.float32
        np.testing.assert_allclose(out_image[1], -2 * out_image[0], atol=1e-5)
        np.testing.assert_allclose(out_image[2], out_image[0] + 5, atol=1e-4)
        agree = (np.abs(out_image[0] - out_target) < 0.5)[out_target >= 0].mean()
        assert agree > 0.8
    flips_only = Augmenter(np.random.default_rng(1), elastic=False, intensity=False)
    for _ in range(5):
        out_image, out_target, _ = flips_only(image, target)
        assert np.array_equal(out_image[0], out_target.astype(np.float32))
    ones = np.ones((3, 4, 4), np.float32)
    changed = Augmenter(np.random.default_rng(2), flips=False, rotations=False, elastic=False)(
        ones, np.zeros((4, 4), np.int16)
    )[0]
    assert len({float(c[0, 0]) for c in changed}) == 3  # gamma leaves 1 alone: three scale/shift draws


def test_paste_mix_pastes_every_channel():
    from napari_unet.augment import paste_mix

    images = np.stack([np.stack([np.full((20, 20), float(i)), np.full((20, 20), -float(i))]) for i in range(3)])
    targets = np.stack([np.full((20, 20), i, np.int16) for i in range(3)])
    paste_mix(images, targets, None, np.random.default_rng(0), 1.0, (slice(4, 16), slice(4, 16)))
    assert np.array_equal(images[:, 1], -images[:, 0])
    assert np.array_equal(images[:, 0], targets.astype(float))


# --- image-only pieces for images that differ in intensity (issue 17) -------------------------------------------

NEW_OFF = dict(blur=0.0, illumination=0.0, background=0.0, specks=0.0, noise=0.0)
ONLY = dict(flips=False, rotations=False, elastic=False, gamma_range=0, scale_range=0, shift_range=0)
"""No geometry and none of the mild gamma/gain/offset: what comes out is the piece under test alone."""


def _scene(shape, seed=0):
    """A normalized-looking tile (background 0.1, objects 0.8, a little texture) and blocky labels."""
    rng = np.random.default_rng(seed)
    _, target = _pair(tuple(shape[:-2]) + tuple(-(-s // 8) for s in shape[-2:]), seed=seed, block=8)
    target = target[tuple(slice(s) for s in shape)]
    image = np.where(target > 0, 0.8, 0.1) + rng.normal(0, 0.02, target.shape)
    return image.astype(np.float32), target


@pytest.mark.parametrize("shape", [(40, 40), (3, 16, 16), "channels"])
def test_new_pieces_off_draw_nothing(shape):
    """With the new pieces at 0 a seeded Augmenter gives what one built with only the old arguments gives, and
    leaves its generator in the same state: no extra draws, so seeded training is bit-identical to before."""
    if shape == "channels":
        image, target = _scene((40, 40))
        image = np.stack([image, 1 - image])
    else:
        image, target = _scene(shape)
    weight = np.random.default_rng(5).random(target.shape).astype(np.float32)
    for kwargs in [{}, dict(zoom_range=0.3, elastic_probability=1.0), dict(intensity=False)]:
        old, new = np.random.default_rng(11), np.random.default_rng(11)
        old_augment, new_augment = Augmenter(old, **kwargs), Augmenter(new, **kwargs, **NEW_OFF)
        for _ in range(6):
            for a, b in zip(old_augment(image, target, weight), new_augment(image, target, weight)):
                assert a.dtype == b.dtype and np.array_equal(a, b)
            assert old.bit_generator.state == new.bit_generator.state


def _replay_old_draws(rng, target_ndim, square, channels, zoom_range):
    """Draw what the Augmenter drew for one call before the new pieces existed, in its order (flips, rotation,
    elastic, zoom, elastic grid, then gamma/scale/shift per channel, with the default ranges)."""
    for _ in range(target_ndim):
        rng.random()
    if square:
        rng.integers(4)
    deform = rng.random() < 0.5
    if zoom_range:
        rng.uniform(-zoom_range, zoom_range)
    if deform:
        rng.normal(0.0, 10.0, size=(2, 3, 3))
    return _replay_intensity(rng, channels)


def _replay_intensity(rng, channels):
    """The old intensity draws, ``(u, v, shift)`` per channel."""
    return [(rng.uniform(-0.1, 0.1), rng.uniform(-0.07, 0.07), rng.uniform(-0.03, 0.03)) for _ in range(channels)]


@pytest.mark.parametrize("shape", [(40, 40), (40, 32), (3, 16, 16), "channels"])
def test_new_pieces_off_replay_the_old_draws(shape):
    """Not just equal to the defaults: with the new pieces at 0, each call draws exactly the old sequence of random
    numbers (a generator replaying it ends in the same state), and the intensity change is the old formula."""
    channels = 3 if shape == "channels" else 1
    image, target = _scene((40, 40) if shape == "channels" else shape)
    if channels > 1:
        image = np.stack([image, 1 - image, image**2])
    for zoom_range in (0.0, 0.3):
        rng, replay = np.random.default_rng(3), np.random.default_rng(3)
        augment = Augmenter(rng, zoom_range=zoom_range, **NEW_OFF)
        for _ in range(8):
            augment(image, target)
            _replay_old_draws(replay, target.ndim, target.shape[-1] == target.shape[-2], channels, zoom_range)
            assert rng.bit_generator.state == replay.bit_generator.state
    rng, replay = np.random.default_rng(4), np.random.default_rng(4)
    intensity_only = Augmenter(rng, flips=False, rotations=False, elastic=False, **NEW_OFF)
    for _ in range(3):
        out = intensity_only(image, target)[0].reshape(channels, *target.shape)
        draws = _replay_intensity(replay, channels)
        for channel, original, (u, v, shift) in zip(out, image.reshape(channels, *target.shape), draws):
            expected = np.sign(original) * np.abs(original) ** float(np.exp(u)) * float(np.exp(v)) + float(shift)
            assert np.array_equal(channel, expected.astype(np.float32))


PIECES = [dict(blur=1.0), dict(illumination=0.3), dict(background=0.3), dict(specks=1.0), dict(noise=0.1)]


@pytest.mark.parametrize("piece", [*PIECES, dict(blur=1.0, illumination=0.3, background=0.3, specks=1.0, noise=0.1)])
@pytest.mark.parametrize("shape", [(40, 40), (6, 24, 24), "channels"])
def test_new_pieces_change_the_image_only(piece, shape):
    """Targets and weights are bit-equal to the same seeded call with the piece off (the geometry draws come
    first); the image changes, keeps its shape, float32 and C order."""
    if shape == "channels":
        image, target = _scene((40, 40))
        image = np.stack([image, 1 - image, image**2])
    else:
        image, target = _scene(shape)
    weight = np.random.default_rng(5).random(target.shape).astype(np.float32)
    changed = 0
    for seed in range(4):
        kwargs = dict(zoom_range=0.3, elastic_probability=0.5)
        reference = Augmenter(np.random.default_rng(seed), **kwargs)(image, target, weight)
        out_image, out_target, out_weight = Augmenter(np.random.default_rng(seed), **kwargs, **piece)(
            image, target, weight
        )
        assert np.array_equal(out_target, reference[1]) and out_target.dtype == target.dtype
        assert np.array_equal(out_weight, reference[2])
        assert out_image.shape == image.shape and out_image.dtype == np.float32 and out_image.flags.c_contiguous
        assert np.isfinite(out_image).all()
        changed += not np.array_equal(out_image, reference[0])
    assert changed >= (1 if piece == dict(specks=1.0) else 4)  # a small tile's 0.2-2 % may hold no speck
    # with intensity off no image-only piece runs
    plain = Augmenter(np.random.default_rng(0), elastic=False, intensity=False, **piece)
    out_image, out_target, _ = plain(target.astype(np.float32), target)
    assert np.array_equal(out_image, out_target.astype(np.float32))


@pytest.mark.parametrize("shape", [(96, 96), (6, 96, 96)])
def test_illumination_is_a_smooth_multiplicative_field_of_mean_one(shape):
    image, target = _scene(shape)
    other = np.random.default_rng(1).random(shape).astype(np.float32) + 0.5
    spreads = []
    for seed in range(10):
        augment = Augmenter(np.random.default_rng(seed), illumination=0.3, **ONLY)
        ratio = augment(image, target)[0] / image
        again = Augmenter(np.random.default_rng(seed), illumination=0.3, **ONLY)(other, target)[0] / other
        np.testing.assert_allclose(again, ratio, rtol=1e-5)  # the same field whatever the image: multiplicative
        log_gain = np.log(ratio.astype(np.float64))
        assert np.exp(log_gain.mean()) == pytest.approx(1.0, abs=1e-4)  # centred: geometric mean 1
        assert abs(ratio.mean() - 1) < 0.15 and log_gain.std() > 0.02
        # smooth: neighbouring gains differ little, and the field has no fine detail
        for axis in (-2, -1):
            assert np.abs(np.diff(log_gain, axis=axis)).max() < 30 * 0.3 / shape[axis]
        detail = log_gain - ndimage.gaussian_filter(log_gain, [0] * (len(shape) - 2) + [2, 2], mode="nearest")
        assert detail[..., 4:-4, 4:-4].std() < 0.05 * log_gain.std()
        # in-plane: a volume's slices get the same field
        planes = log_gain.reshape(-1, *shape[-2:])
        assert all(np.allclose(plane, planes[0], atol=1e-5) for plane in planes)
        spreads.append(log_gain.std())
    assert max(spreads) - min(spreads) > 0.05  # the unevenness varies from tile to tile


@pytest.mark.parametrize("shape", [(96, 96), (6, 96, 96)])
def test_background_is_a_smooth_additive_field_within_its_level(shape):
    """The same field is added whatever the image (additive), it lies in [0, background], is smooth with no fine
    detail, is the same on every slice of a volume, and its level varies from tile to tile."""
    image, target = _scene(shape)
    other = np.random.default_rng(1).random(shape).astype(np.float32) * 3
    tops = []
    for seed in range(12):
        field = Augmenter(np.random.default_rng(seed), background=0.3, **ONLY)(image, target)[0] - image
        again = Augmenter(np.random.default_rng(seed), background=0.3, **ONLY)(other, target)[0] - other
        np.testing.assert_allclose(again, field, atol=1e-5)  # the same field whatever the image: additive
        assert field.min() >= -1e-6 and field.max() <= 0.3 + 1e-6
        for axis in (-2, -1):
            assert np.abs(np.diff(field, axis=axis)).max() < 30 * 0.3 / shape[axis]
        detail = field - ndimage.gaussian_filter(field, [0] * (len(shape) - 2) + [2, 2], mode="nearest")
        assert detail[..., 4:-4, 4:-4].std() <= 0.05 * field.std() + 1e-6
        planes = field.reshape(-1, *shape[-2:])
        assert all(np.allclose(plane, planes[0], atol=1e-6) for plane in planes)
        tops.append(field.max())
    assert max(tops) > 0.15 and min(tops) < 0.1  # the level varies from tile to tile, up to its maximum


@pytest.mark.parametrize("shape", [(188, 188), (16, 64, 64)])
def test_specks_are_bright_small_and_cover_at_most_two_percent(shape):
    from napari_unet.augment import SPECK_TOP

    image, target = _scene(shape)
    saturated_tiles = 0
    hit = 0
    for seed in range(20):
        out, out_target, _ = Augmenter(np.random.default_rng(seed), specks=0.5, **ONLY)(image, target)
        assert np.array_equal(out_target, target)  # labels under a speck stay what they are
        changed = out != image
        assert changed.mean() <= 0.02
        if not changed.any():
            continue
        hit += 1
        assert changed.mean() > 0.0005
        assert out.max() > 1.2 and out.max() <= SPECK_TOP  # well above the objects (0.8), never above the top
        saturated_tiles += bool((out == SPECK_TOP).any())
        # small: a speck is at most 2 (5 + 1) + 1 px wide in-plane (specks may overlap: the typical region)
        regions, count = ndimage.label(changed)
        assert np.median([max(s.stop - s.start for s in box[-2:]) for box in ndimage.find_objects(regions)]) <= 13
    assert 4 <= hit <= 16  # probability 0.5
    assert saturated_tiles >= 2  # half the specks saturate at exactly SPECK_TOP


def test_saturated_specks_stay_flat_under_noise():
    from napari_unet.augment import SPECK_TOP

    image, target = _scene((128, 128))
    flat = 0
    for seed in range(10):
        out = Augmenter(np.random.default_rng(seed), specks=1.0, noise=0.2, **ONLY)(image, target)[0]
        flat += int((out == SPECK_TOP).sum())
        assert out.max() <= SPECK_TOP + 1.0  # noise at 4.0 would reach above the top
    assert flat > 20


@pytest.mark.parametrize("shape", [(96, 96), (8, 48, 48)])
def test_blur_lowers_high_frequencies_in_plane_only(shape):
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    target = np.zeros(shape, np.int16)
    energies = []
    for seed in range(10):
        out = Augmenter(np.random.default_rng(seed), blur=1.0, **ONLY)(image, target)[0]
        ratio = np.mean(np.diff(out, axis=-1) ** 2) / np.mean(np.diff(image, axis=-1) ** 2)
        assert ratio < 0.8  # sigma >= 0.3 px
        energies.append(ratio)
        assert abs(out.mean() - image.mean()) < 0.01
    assert min(energies) < 0.2 and max(energies) - min(energies) > 0.1  # sigma varies, up to 1.5 px
    half = Augmenter(np.random.default_rng(0), blur=0.5, **ONLY)
    assert 3 <= sum(not np.array_equal(half(image, target)[0], image) for _ in range(20)) <= 17
    if len(shape) == 3:  # slices are not mixed: a volume constant in-plane stays as it is
        layers = np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape)
        out = Augmenter(np.random.default_rng(0), blur=1.0, **ONLY)(layers, target)[0]
        np.testing.assert_allclose(out, layers, atol=1e-5)


def test_noise_std_is_uniform_up_to_noise_and_grows_with_the_signal():
    image = np.ones((2, 128, 128), np.float32)
    image[1] = 0.0  # channel 1: dark background, channel 0: intensity 1 (the top percentile)
    target = np.zeros((128, 128), np.int16)
    augment = Augmenter(np.random.default_rng(0), noise=0.1, **ONLY)
    bright, dark = [], []
    for _ in range(100):
        out = augment(image, target)[0]
        assert abs((out[0] - 1).mean()) < 0.01
        bright.append(float((out[0] - 1).std()))
        dark.append(float(out[1].std()))
    bright = np.array(bright)
    # the std at intensity 1 is the drawn level, uniform in [0, 0.1]
    assert bright.max() <= 0.1 * 1.03 and bright.min() < 0.01 and abs(bright.mean() - 0.05) < 0.01
    # in the dark it is level * sqrt(1 - mix): lower on average (each channel draws its own level and mix)
    assert np.mean(dark) < 0.8 * bright.mean() and max(dark) <= 0.1 * 1.03


def test_channels_get_their_own_draws_of_the_new_pieces():
    ones = np.ones((3, 64, 64), np.float32)
    target = np.zeros((64, 64), np.int16)
    for piece in PIECES[1:]:  # blur leaves a constant image alone
        out = Augmenter(np.random.default_rng(0), **ONLY, **piece)(ones, target)[0]
        assert not np.array_equal(out[0], out[1]) and not np.array_equal(out[1], out[2])


def test_the_mild_ranges_are_the_settings_defaults():
    """The settings that drive the Augmenter keep the mild ranges by default; of the new pieces only specks are on
    (chosen by the robustness benchmark, docs/benchmarks.md), the Augmenter's own defaults all off."""
    import inspect

    from napari_unet.training_settings import TrainingSettings

    defaults = {k: v.default for k, v in inspect.signature(Augmenter).parameters.items()}
    settings = TrainingSettings()
    assert (settings.gain_range, settings.gamma_range, settings.offset_range) == (
        defaults["scale_range"],
        defaults["gamma_range"],
        defaults["shift_range"],
    )
    assert settings.illumination == settings.blur == settings.noise == 0.0 and settings.specks == 0.5
    assert all(defaults[name] == 0.0 for name in NEW_OFF)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gain_range", -0.1, "gain_range is a log-gain range in [0, 3], got -0.1"),
        ("gamma_range", 2.5, "gamma_range is a log-gamma range in [0, 2], got 2.5"),
        ("offset_range", float("inf"), "offset_range is an offset range in normalized units in [0, 1], got inf"),
        ("illumination", float("nan"), "illumination is a log-gain standard deviation in [0, 1], got nan"),
        ("background", 1.5, "background is a level in normalized units in [0, 1], got 1.5"),
        ("specks", 1.5, "specks is a probability in [0, 1], got 1.5"),
        ("blur", "0.5", "blur is a probability in [0, 1], got '0.5'"),
        ("noise", True, "noise is a noise level in normalized units in [0, 1], got True"),
    ],
)
def test_training_settings_validate_the_intensity_augmentation(field, value, message):
    from napari_unet.training_settings import TrainingSettings

    with pytest.raises(ValueError) as raised:
        TrainingSettings(**{field: value})
    assert str(raised.value) == message
    assert getattr(TrainingSettings(**{field: np.float32(0.5)}), field) == 0.5
    assert "label" not in {f.name: f for f in dataclasses.fields(TrainingSettings)}[field].metadata
