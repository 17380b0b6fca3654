"""Memory: out-of-memory retries give the same result, budgets from the device's free memory, sizes beyond the
device refused up front, and the estimates bound a measured peak."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unet import UNet, predict_tiled, tiling
from napari_unet import memory as memory_module
from napari_unet.memory import (
    DeviceMemoryError,
    OutOfMemoryRetry,
    is_out_of_memory,
)
from napari_unet.predict import PredictionSettings, predict_image

SRC = str(Path(__file__).resolve().parents[1] / "src")


class _Shared(list):
    """A list that model copies (``inference_copy`` deep-copies) share."""

    def __deepcopy__(self, memo):
        return self


class OutOfMemoryAbove(UNet):
    """A U-Net whose forward pass raises ``error`` when its input holds more than ``limit`` elements (as an
    allocator would); ``sizes`` records the input sizes it was called with (shared by its inference copies)."""

    def __init__(self, limit, error, sizes, **config):
        super().__init__(**config)
        self.limit, self.error, self.sizes = limit, error, sizes

    def forward(self, x):
        self.sizes.append(tuple(x.shape))
        if x.numel() > self.limit:
            raise self.error
        return super().forward(x)


def _failing(make_model, limit, error=None):
    """The tiny model of ``make_model`` and a copy of it with the same weights that fails above ``limit``."""
    plain = make_model()
    error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    failing = OutOfMemoryAbove(limit, error, _Shared(), **plain.config)
    failing.load_state_dict(plain.state_dict())
    return plain, failing.eval()


def test_out_of_memory_retries_with_smaller_batches_then_tiles_and_says_so_once(make_model):
    image = np.random.default_rng(0).random((100, 90)).astype(np.float32)
    plain, failing = _failing(make_model, limit=0)
    tile = failing.legal_input_shape(64)  # 64 px output tiles; inputs under 48x48 pixels fit
    failing.limit = math.prod(plain.legal_input_shape(32)) + 1
    expected = predict_tiled(plain, image, tile_shape=64, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = predict_tiled(failing, image, tile_shape=64, batch_size=4)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    batches = [s[0] for s in failing.sizes]
    assert failing.sizes[0][2:] == tile and batches[:3] == [4, 2, 1]  # batches halved first, then the tiles
    passed = [i for i, s in enumerate(failing.sizes) if math.prod(s) <= failing.limit]
    assert passed == list(range(passed[0], len(failing.sizes)))  # smaller and smaller until it fits, then no failure
    retries = [w for w in caught if issubclass(w.category, OutOfMemoryRetry)]
    assert len(retries) == 1
    assert "in batches of 4" in str(retries[0].message) and "the same result" in str(retries[0].message)


def test_cpu_allocator_errors_are_retried_too(make_model):
    image = np.random.default_rng(1).random((70, 70)).astype(np.float32)
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried")
    plain, failing = _failing(make_model, limit=0, error=error)
    failing.limit = math.prod(plain.legal_input_shape(32))
    with pytest.warns(OutOfMemoryRetry):
        result = predict_tiled(failing, image, tile_shape=64, batch_size=1)
    np.testing.assert_allclose(result, predict_tiled(plain, image), atol=1e-5)


def test_out_of_memory_at_the_smallest_tile_names_the_options(make_model):
    _, failing = _failing(make_model, limit=1)
    with pytest.raises(DeviceMemoryError, match="--tile and --batch-size") as raised:
        predict_tiled(failing, np.zeros((80, 80), np.float32), tile_shape=64, batch_size=2)
    assert isinstance(raised.value, ValueError)  # the CLI's and the widget's one-line path
    smallest = failing.legal_input_shape(failing.grid)
    assert failing.sizes[-1] == (1, 1, *smallest)


def test_other_errors_are_not_retried(make_model):
    _, failing = _failing(make_model, limit=0, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        predict_tiled(failing, np.zeros((40, 40), np.float32), batch_size=2)
    assert len(failing.sizes) == 1
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GiB)"))


def test_cuda_tile_budget_comes_from_the_gpu_free_memory(monkeypatch):
    import psutil

    free_gpu = 600 * 1024**2

    class Plenty:
        available = 512 * 1024**3

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Plenty)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gpu, 80 * 1024**3))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 100 * 1024**2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    cuda = torch.device("cuda")
    assert memory_module.available_bytes(cuda) == free_gpu + 100 * 1024**2
    assert tiling.default_memory_bytes(cuda) == (free_gpu + 100 * 1024**2) // 2
    assert tiling.default_memory_bytes("cpu") == tiling.DEFAULT_MEMORY_BYTES  # the host has plenty
    model = UNet(base_filters=16, depth=3)
    voxels = tiling.default_max_input_voxels(model, device=cuda)
    assert voxels == (free_gpu + 100 * 1024**2) // 2 // (4 * memory_module.INFERENCE_FLOATS_PER_VOXEL_AND_FILTER * 16)
    assert math.prod(tiling.plan_tiles(model, (8192, 8192), max_input_voxels=voxels).input_tile) <= voxels


def test_chosen_sizes_beyond_the_device_are_refused_before_allocation(make_model, monkeypatch):
    model = make_model()
    monkeypatch.setattr(memory_module, "available_bytes", lambda device=None: 64 * 1024**2)
    copies = []
    monkeypatch.setattr(type(model), "inference_copy", lambda self: copies.append(self))
    image = np.zeros((2000, 2000), np.float32)
    with pytest.raises(DeviceMemoryError, match=r"--tile, --batch-size") as raised:
        predict_tiled(model, image, tile_shape=2000)
    assert "free on cpu" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(DeviceMemoryError, match="--refine-radius"):
        predict_tiled(model, image, refine_radius=5000)
    assert copies == []  # nothing was allocated for the network


def test_cli_refuses_a_tile_beyond_the_memory_in_one_line(tmp_path, make_model, monkeypatch, capsys):
    import tifffile

    from napari_unet.cli import main
    from napari_unet.io import save_model

    save_model(make_model(), tmp_path / "m.safetensors", {"class_ids": [1, 2, 3]})
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((600, 600), np.uint8))
    monkeypatch.setattr(memory_module, "available_bytes", lambda device=None: 16 * 1024**2)
    args = ["predict", "-m", str(tmp_path / "m.safetensors"), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out")]
    assert main([*args, "--tile", "600", "600", "--no-test-time-flips", "--refine-radius", "0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--tile, --batch-size" in error[0]
    assert not list((tmp_path / "out").glob("*.tif"))


def test_cli_says_once_that_it_predicted_with_smaller_tiles(tmp_path, make_model, monkeypatch, capsys):
    import tifffile

    from napari_unet import io
    from napari_unet.cli import main

    plain, failing = _failing(make_model, limit=0)
    failing.limit = math.prod(plain.legal_input_shape(32))
    metadata = {"class_ids": [1, 2, 3], "config": failing.config}
    monkeypatch.setattr(io, "load_model", lambda path: (failing, metadata))
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # restored after the test
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    warnings.resetwarnings()  # Python's default: each distinct warning once
    image = (np.random.default_rng(2).random((90, 90)) * 255).astype(np.uint8)
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(tmp_path / name, image)
    args = ["predict", "-m", "m.safetensors", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "-o", str(tmp_path)]
    assert main([*args, "--tile", "64", "64", "--no-test-time-flips", "--refine-radius", "0"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert len(lines) == 1 and lines[0].startswith("napari-unet: warning: out of memory on cpu")
    labels = tifffile.imread(tmp_path / "a_labels.tif")
    settings = PredictionSettings(tile_shape=(64, 64), test_time_flips=False, refine_radius=0)
    expected = predict_image(plain, {"class_ids": [1, 2, 3]}, image, settings).labels
    assert np.array_equal(labels, expected)  # the same segmentation as without the failures


# --- training ------------------------------------------------------------------------------------------------


def _strokes(shape=(64, 64)):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, shape).astype(np.float32)
    image[:, shape[1] // 2 :] += 100
    labels = np.zeros(shape, np.uint8)
    labels[8:-8, 8:11], labels[8:-8, -12:-9] = 1, 2
    return image, labels


def _training_settings(**kwargs):
    from napari_unet.training import TrainingSettings

    tiny = dict(depth=1, base_filters=4, patch_size=32, batch_size=4, time_budget=None, device="cpu", cpu_threads=1)
    return TrainingSettings(**{**tiny, "specks": 0.0, **kwargs})


def _failing_training(monkeypatch, limit=None, after=None):
    """Training forward passes (train mode) raise CUDA's out-of-memory error above ``limit`` input elements, or
    from the ``after``-th pass on; returns the input shapes of the training passes."""
    shapes = []
    forward = UNet.forward

    def failing(self, x):
        if self.training:
            shapes.append(tuple(x.shape))
            if (limit is not None and x.numel() > limit) or (after is not None and len(shapes) > after):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", failing)
    return shapes


def test_training_out_of_memory_halves_the_batch_then_the_patch(monkeypatch):
    from napari_unet.training import Trainer

    image, labels = _strokes()
    trainer = Trainer(image, labels, _training_settings(iterations=4))
    small = trainer.model.legal_input_shape(trainer.model.legal_output_shape(16))
    shapes = _failing_training(monkeypatch, limit=math.prod(small))
    with pytest.warns(OutOfMemoryRetry) as caught:
        events = list(trainer.run())
    assert events[-1].reason == "iterations" and events[-1].iteration == 4
    assert [s[0] for s in shapes[:3]] == [4, 2, 1] and shapes[0][2:] == trainer.model.legal_input_shape(32)
    assert all(s[2:] == small for s in shapes[-4:])  # the four iterations ran with the smaller patch
    messages = [str(w.message) for w in caught]
    assert "going on with batches of 2" in messages[0] and "going on with batches of 1" in messages[1]
    assert all(np.isfinite(e.loss) for e in events)
    assert trainer.metadata["training"]["history"][-1]["settings"]["batch_size"] == 1
    assert tuple(trainer.metadata["training"]["input_shape"]) == small


def test_training_out_of_memory_at_the_smallest_sizes_stops_and_keeps_the_model(monkeypatch, tmp_path):
    from napari_unet.io import load_model
    from napari_unet.training import Trainer

    image, labels = _strokes()
    trainer = Trainer(image, labels, _training_settings(iterations=50, batch_size=1, patch_size=8))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _failing_training(monkeypatch, after=3)
    with pytest.warns(OutOfMemoryRetry, match="training stopped after 3 iterations, the model trained so far is kept"):
        events = list(trainer.run())
    assert events[-1].done and events[-1].reason == "out_of_memory" and events[-1].iteration == 3
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # three steps were taken and kept
    trainer.save(tmp_path / "m.safetensors")
    model, metadata = load_model(tmp_path / "m.safetensors")
    assert metadata["training"]["history"][-1]["stop_reason"] == "out_of_memory"


def test_training_sizes_beyond_the_device_are_refused_before_the_first_step(monkeypatch):
    from napari_unet.training import Trainer

    image, labels = _strokes()
    trainer = Trainer(image, labels, _training_settings(iterations=2, batch_size=64, patch_size=64, base_filters=8))
    monkeypatch.setattr(memory_module, "available_bytes", lambda device=None: 32 * 1024**2)
    shapes = _failing_training(monkeypatch)
    with pytest.raises(DeviceMemoryError, match="--patch-size, --batch-size, --filters, --depth"):
        next(trainer.run())
    assert shapes == []
