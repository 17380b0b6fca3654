"""Overlap-tile prediction equals a whole-image pass on the reflect-padded image."""

import numpy as np
import pytest
import torch

from napari_unet import PredictionStopped, UNet, predict_tiled
from napari_unet.tiling import flip_transforms, mirror_index, plan_tiles


def _model(ndim=2, depth=2, block="plain", in_channels=1, n_classes=3, seed=0):
    torch.manual_seed(seed)
    model = UNet(in_channels=in_channels, n_classes=n_classes, ndim=ndim, depth=depth, base_filters=4, block=block)
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def whole_image_probabilities(model, image, transform=((), False)):
    """One forward pass over the whole reflect-padded image (the reference), optionally flipped/transposed."""
    spatial = image.shape[-model.ndim :]
    out = model.legal_output_shape(spatial)
    pad = [(h, h + o - n) for h, o, n in zip(model.halo, out, spatial)]
    channels = image if model.in_channels > 1 else image[None]
    padded = np.pad(channels, [(0, 0), *pad], mode="reflect")
    dims, transpose = transform
    padded = torch.from_numpy(padded.astype(np.float32))[None]
    padded = torch.flip(padded, dims) if dims else padded
    with torch.no_grad():
        logits = model(padded.transpose(-1, -2) if transpose else padded)
    logits = logits.transpose(-1, -2) if transpose else logits
    logits = torch.flip(logits, dims) if dims else logits
    probabilities = torch.softmax(logits, dim=1)[0].numpy()
    return probabilities[(slice(None), *[slice(0, n) for n in spatial])]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 40])
@pytest.mark.parametrize("pad", [0, 1, 4, 33, 100])
def test_mirror_index_is_numpy_reflect(size, pad):
    data = np.arange(size) * 10
    expected = np.pad(data, (pad, pad), mode="reflect")
    assert np.array_equal(data[mirror_index(np.arange(-pad, size + pad), size)], expected)


@pytest.mark.parametrize("block", ["plain", "residual", "vgg", "vgg16"])
@pytest.mark.parametrize(
    "shape, tile",
    [((61, 97), 8), ((61, 97), 24), ((61, 97), None), ((7, 5), 8), ((1, 3), None), ((130, 33), 16)],
)
def test_tiled_equals_whole_image_2d(block, shape, tile):
    model = _model(block=block)
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    tiled = predict_tiled(model, image, tile_shape=tile, batch_size=3)
    assert tiled.shape == (3, *shape) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled.sum(0), 1, atol=1e-5)
    assert np.abs(tiled - whole_image_probabilities(model, image)).max() < 1e-4


@pytest.mark.parametrize("shape, tile", [((13, 21, 9), 8), ((5, 3, 4), None), ((20, 17, 18), (8, 16, 8))])
def test_tiled_equals_whole_image_3d(shape, tile):
    model = _model(ndim=3, depth=1)
    image = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    tiled = predict_tiled(model, image, tile_shape=tile, batch_size=2)
    assert np.abs(tiled - whole_image_probabilities(model, image)).max() < 1e-4


@pytest.mark.parametrize("ndim, shape, tile", [(2, (37, 50), 8), (3, (9, 13, 11), 4)])
def test_test_time_flips_average_exact_flipped_passes(ndim, shape, tile):
    model = _model(ndim=ndim, depth=2)
    image = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    transforms = flip_transforms(ndim)
    assert len(set(transforms)) == 8
    reference = np.mean([whole_image_probabilities(model, image, t) for t in transforms], axis=0)
    averaged = predict_tiled(model, image, tile_shape=tile, batch_size=3, test_time_flips=True)
    assert np.abs(averaged - reference).max() < 1e-4
    assert np.abs(averaged - predict_tiled(model, image, tile_shape=tile)).max() > 1e-3  # flips do change it


def test_image_smaller_than_halo():
    model = _model(depth=3)
    assert model.halo[0] > 20
    image = np.random.default_rng(3).normal(size=(6, 11)).astype(np.float32)
    assert np.abs(predict_tiled(model, image) - whole_image_probabilities(model, image)).max() < 1e-4


def test_misaligned_tiles_would_show_seams():
    """The grid alignment matters: shifting a tile by one pixel changes the output (so the tests above can fail)."""
    model = _model(depth=2)
    image = np.random.default_rng(4).normal(size=(40, 40)).astype(np.float32)
    reference = whole_image_probabilities(model, image)
    shifted = whole_image_probabilities(model, image[1:, :])
    assert np.abs(shifted - reference[:, 1:, :]).max() > 1e-3


def test_multichannel_and_out_array():
    model = _model(in_channels=2, n_classes=2)
    image = np.random.default_rng(5).normal(size=(2, 30, 45)).astype(np.float32)
    out = np.full((2, 30, 45), np.nan, dtype=np.float32)
    returned = predict_tiled(model, image, tile_shape=8, out=out)
    assert returned is out and not np.isnan(out).any()
    assert np.abs(out - whole_image_probabilities(model, image)).max() < 1e-4
    with pytest.raises(ValueError, match="channels"):
        predict_tiled(model, image[0])


def test_writes_into_memmap(tmp_path):
    model = _model()
    image = np.random.default_rng(6).normal(size=(50, 37)).astype(np.float32)
    out = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(3, 50, 37))
    predict_tiled(model, image, tile_shape=16, out=out)
    assert np.abs(np.asarray(out) - whole_image_probabilities(model, image)).max() < 1e-4


def test_2d_model_on_a_stack_predicts_slice_by_slice():
    model = _model()
    stack = np.random.default_rng(7).normal(size=(3, 25, 31)).astype(np.float32)
    tiled = predict_tiled(model, stack, tile_shape=8, batch_size=5)
    assert tiled.shape == (3, 3, 25, 31)
    for z in range(3):
        assert np.abs(tiled[:, z] - whole_image_probabilities(model, stack[z])).max() < 1e-4


def test_progress_and_stop():
    model = _model()
    image = np.zeros((64, 64), np.float32)
    calls = []
    predict_tiled(model, image, tile_shape=16, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 16), (8, 16), (12, 16), (16, 16)]
    seen = []
    with pytest.raises(PredictionStopped):
        predict_tiled(
            model,
            image,
            tile_shape=16,
            batch_size=4,
            progress=lambda d, t: seen.append(d),
            should_stop=lambda: len(seen) >= 2,  # asked after the second batch
        )
    assert seen == [4, 8]


def test_default_plan_is_large_and_even():
    model = UNet(depth=4, base_filters=16)
    plan = plan_tiles(model, (2048, 2048))
    assert plan.counts == (1, 1) and plan.stride == (2048, 2048)
    small_budget = plan_tiles(model, (2048, 2048), max_input_voxels=1300**2)
    assert small_budget.counts == (2, 2) and small_budget.stride == (1024, 1024)
    assert all(s % model.grid == 0 for s in small_budget.stride)
    assert model.output_shape(small_budget.input_tile) == small_budget.output_tile
    stack = plan_tiles(model, (7, 300, 200))
    assert stack.stack_shape == (7,) and len(stack) == 7


def test_bad_shapes():
    model = _model()
    with pytest.raises(ValueError, match="spatial axes"):
        predict_tiled(model, np.zeros((2, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="empty"):
        predict_tiled(model, np.zeros((0, 5), np.float32))


def test_default_tiles_follow_the_memory_available(monkeypatch):
    """With little free memory the default tile batch shrinks (a quarter of what is available, at least 256 MiB);
    how tiles are cut never changes the prediction (the tests above)."""
    from collections import namedtuple

    psutil = pytest.importorskip("psutil")
    from napari_unet import tiling

    model = _model(depth=2)
    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(64 * 1024**3))
    assert tiling.default_memory_bytes() == tiling.DEFAULT_MEMORY_BYTES
    big = plan_tiles(model, (3000, 3000))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(2 * 1024**3))
    assert tiling.default_memory_bytes() == 512 * 1024**2
    small = plan_tiles(model, (3000, 3000))
    assert np.prod(small.input_tile) < np.prod(big.input_tile)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(1))
    assert tiling.default_memory_bytes() == 256 * 1024**2


def test_stop_takes_effect_within_a_flip_of_a_batch():
    """A stop asked during the first of the 8 flipped passes of a batch ends the prediction in that pass (the
    network polls it before every convolution), not after the batch."""
    model = _model()
    convolutions = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda *_: convolutions.append(1))
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    predict_tiled(model, image, tile_shape=64, test_time_flips=True)
    per_pass = len(convolutions) // 8
    convolutions.clear()
    with pytest.raises(PredictionStopped, match="during a tile batch"):
        predict_tiled(model, image, tile_shape=64, test_time_flips=True, should_stop=lambda: len(convolutions) >= 3)
    assert len(convolutions) == 3 < per_pass


def test_stop_takes_effect_between_refinement_bands():
    from napari_unet.refine import band_rows, refine_probabilities

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=(2048, 600)).transpose(2, 0, 1).astype(np.float32)
    image = rng.random((2048, 600)).astype(np.float32)
    band, _ = band_rows(image.shape, 2, 2)
    assert band < 2048 // 3  # several bands
    polls = []
    refined = probabilities.copy()
    with pytest.raises(PredictionStopped, match="edge refinement"):
        refine_probabilities(
            refined, image, spatial_ndim=2, radius=2, out=refined, should_stop=lambda: polls.append(1) or len(polls) > 1
        )
    assert len(polls) == 2  # polled before the first band and stopped before the second
    assert not np.array_equal(refined[:, :band], probabilities[:, :band])
    assert np.array_equal(refined[:, band:], probabilities[:, band:])


def test_stop_after_the_tiles_skips_the_refinement(monkeypatch):
    from napari_unet import tiling

    calls = []
    monkeypatch.setattr(tiling, "refine_probabilities", lambda *a, **k: calls.append(1))
    seen = []
    with pytest.raises(PredictionStopped, match="before refinement"):
        predict_tiled(
            _model(),
            np.zeros((40, 40), np.float32),
            refine_radius=1,
            progress=lambda d, t: seen.append(d),
            should_stop=lambda: bool(seen),
        )
    assert calls == []
