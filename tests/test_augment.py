"""Augmentation moves image and labels together; labels stay class indices."""

import numpy as np
import pytest

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
