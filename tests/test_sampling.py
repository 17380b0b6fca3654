"""Patch sampling: tiles around painted pixels, mirror context at the border only, class balance."""

import numpy as np
import pytest

from napari_unet.sampling import PatchSampler


def _sampler(image, target, input_shape=(20, 20), output_shape=(8, 8), seed=0, weights=None):
    return PatchSampler(
        [[image]],
        [[target]],
        input_shape,
        output_shape,
        np.random.default_rng(seed),
        weights=None if weights is None else [[weights]],
    )


def test_tiles_always_hold_painted_pixels_in_the_output():
    image = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    target = np.full(image.shape, -1, dtype=np.int16)
    target[3, 60] = 0
    target[45, 2] = 1
    sampler = _sampler(image, target)
    for _ in range(50):
        tile, tile_target, weight = sampler.sample()
        assert tile.shape == (20, 20) and tile.dtype == np.float32
        assert tile_target.shape == (20, 20) and weight is None
        assert (tile_target[6:14, 6:14] >= 0).any()


def test_tile_reads_real_pixels_inside_and_mirrors_outside():
    rng = np.random.default_rng(1)
    image = rng.random((30, 40)).astype(np.float32)
    target = np.full(image.shape, -1, dtype=np.int16)
    target[0, 0] = 0
    target[15, 20] = 1
    padded = np.pad(image, 20, mode="reflect")
    padded_target = np.pad(target, 20, mode="constant", constant_values=-1)
    sampler = _sampler(image, target)
    for _ in range(30):
        tile, tile_target, _ = sampler.sample()
        # locate the tile in the reflect-padded image by its unique values
        matches = np.argwhere(padded == tile[10, 10])
        assert len(matches) >= 1
        found = False
        for y, x in matches:
            y0, x0 = y - 10, x - 10
            if padded[y0 : y0 + 20, x0 : x0 + 20].shape == (20, 20) and np.array_equal(
                padded[y0 : y0 + 20, x0 : x0 + 20], tile
            ):
                assert np.array_equal(padded_target[y0 : y0 + 20, x0 : x0 + 20], tile_target)
                found = True
        assert found


def test_classes_are_drawn_evenly():
    image = np.zeros((64, 64), dtype=np.float32)
    target = np.zeros(image.shape, dtype=np.int16)  # class 0 everywhere ...
    target[30, 30] = 1  # ... and one pixel of class 1
    sampler = _sampler(image, target, seed=3)
    hits = sum(int((sampler.sample()[1] == 1).any()) for _ in range(200))
    assert 70 < hits < 130
    assert list(sampler.class_counts(2)) == [64 * 64 - 1, 1]


def test_class_power_one_draws_in_proportion_to_paint():
    image = np.zeros((64, 64), dtype=np.float32)
    target = np.full(image.shape, -1, dtype=np.int16)
    target[:, :3] = 0  # 192 pixels of class 0
    target[60, 60:62] = 1  # 2 pixels of class 1
    sampler = PatchSampler([[image]], [[target]], (20, 20), (8, 8), np.random.default_rng(0), class_power=1.0)
    hits = sum(int((sampler.sample()[1] == 1).any()) for _ in range(200))
    assert hits < 15


def test_unpainted_slices_are_never_sampled():
    volume = np.random.default_rng(2).random((6, 16, 16)).astype(np.float32)
    slices = [np.full((16, 16), -1, dtype=np.int16) for _ in range(6)]
    slices[4][2:5, 2:5] = 0
    slices[4][10:12, 10:12] = 1
    sampler = PatchSampler([list(volume)], [slices], (12, 12), (4, 4), np.random.default_rng(0))
    for _ in range(20):
        tile, target, _ = sampler.sample()
        assert (target[4:8, 4:8] >= 0).any()
        assert np.isin(tile, volume[4]).all()  # 16 px slices: mirrored context still comes from slice 4


def test_set_targets_updates_counts_and_checks_shape():
    image = np.zeros((10, 10), dtype=np.float32)
    target = np.full(image.shape, -1, dtype=np.int16)
    target[0, 0], target[9, 9] = 0, 1
    sampler = _sampler(image, target, input_shape=(8, 8), output_shape=(4, 4))
    new = target.copy()
    new[5, :] = 1
    sampler.set_targets(0, [new])
    assert list(sampler.class_counts(2)) == [1, 11]
    with pytest.raises(ValueError):
        sampler.set_targets(0, [new[:5]])


def test_weights_travel_with_targets():
    image = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    target = np.full(image.shape, -1, dtype=np.int16)
    target[10, 10], target[12, 12] = 0, 1
    weights = np.arange(400, dtype=np.float32).reshape(20, 20)
    tile, tile_target, tile_weight = _sampler(image, target, (12, 12), (4, 4), weights=weights).sample()
    assert tile_weight.shape == (12, 12)
    assert tile_weight[tile_target == 0].item() == weights[10, 10]


def test_multi_channel_tiles_keep_channels_first_and_read_the_same_place():
    rng = np.random.default_rng(5)
    plane = rng.random((30, 40)).astype(np.float32)
    image = np.stack([plane, plane * 10])
    target = np.full(plane.shape, -1, dtype=np.int16)
    target[2, 3], target[25, 35] = 0, 1
    sampler = _sampler(image, target)
    for _ in range(20):
        tile, tile_target, _ = sampler.sample()
        assert tile.shape == (2, 20, 20) and tile_target.shape == (20, 20)
        np.testing.assert_allclose(tile[1], tile[0] * 10, rtol=1e-6)
        assert (tile_target[6:14, 6:14] >= 0).any()
    with pytest.raises(ValueError, match="shapes"):
        sampler.set_targets(0, [np.zeros((30, 41), np.int16)])
