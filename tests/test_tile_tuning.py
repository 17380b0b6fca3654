"""Tiles from measurement (issue 19): the candidates, the choice kept per machine, the out-of-memory stop, and a
tuned prediction equal to an untuned one."""

import json
import math

import numpy as np
import pytest
import torch

from napari_unet import machine_cache, tile_tuning
from napari_unet.cli import build_parser
from napari_unet.model import UNet
from napari_unet.predict import PredictionSettings
from napari_unet.tiling import predict_tiled


def _net(ndim: int = 2) -> UNet:
    torch.manual_seed(0)
    return UNet(ndim=ndim, depth=2, base_filters=4, n_classes=2).eval()


@pytest.mark.parametrize("ndim", [2, 3])
def test_candidates_fit_the_budget_and_end_with_the_largest_that_does(ndim):
    net = _net(ndim)
    budget = 200_000
    strides = tile_tuning.candidate_strides(net, budget)
    inputs = [math.prod(net.legal_input_shape(s)) for s in strides]
    assert len(strides) >= tile_tuning.MIN_CANDIDATES
    assert inputs == sorted(inputs) and len(set(inputs)) == len(inputs) and inputs[-1] <= budget
    bigger = tuple(s + net.grid for s in strides[-1])
    assert math.prod(net.legal_input_shape(bigger)) > budget
    assert all(s % net.grid == 0 and len(set(stride)) == 1 for stride in strides for s in stride)


def test_the_fastest_tile_is_kept_per_machine(cache_dir, monkeypatch):
    net = _net()
    calls = []

    def measure(net_, candidates, device, dtype, budget):
        calls.append(candidates)
        speeds = [1.0] * len(candidates)
        speeds[1] = 5.0  # the second smallest wins
        return [{"stride": list(c), "batch": 3, "voxels_per_second": v} for c, v in zip(candidates, speeds)]

    monkeypatch.setattr(tile_tuning, "measure_tiles", measure)
    voxels, batch = tile_tuning.tuned_tile(net, torch.device("cpu"), None, 300_000)
    assert (voxels, batch) == (math.prod(net.legal_input_shape(calls[0][1])), 3)
    machine_cache.forget()  # a new process: the file answers, nothing is measured again
    assert tile_tuning.tuned_tile(net, torch.device("cpu"), None, 300_000) == (voxels, batch) and len(calls) == 1
    (key,) = json.loads((cache_dir / machine_cache.FILE_NAME).read_text())
    assert key.startswith("tile | cpu ") and "300000 voxels" in key
    tile_tuning.tuned_tile(net, torch.device("cpu"), torch.bfloat16, 300_000)  # another precision: measured
    assert len(calls) == 2


def test_the_largest_candidate_winning_means_the_whole_budget(cache_dir, monkeypatch):
    def measure(net, candidates, device, dtype, budget):
        return [{"stride": list(c), "batch": 1, "voxels_per_second": float(i)} for i, c in enumerate(candidates)]

    monkeypatch.setattr(tile_tuning, "measure_tiles", measure)
    budget = 4 * tile_tuning.MAX_MEASURED_VOXELS
    assert tile_tuning.tuned_tile(_net(), torch.device("cpu"), None, budget) == (budget, 1)


def _timed_as(monkeypatch, seconds_of):
    """``_timed_pass`` replaced by ``seconds_of(input_tile)`` (an exception it raises is raised by the pass); returns
    the input tiles timed, in order."""
    timed = []

    def timed_pass(net_, batch, input_tile, device, memory_format):
        timed.append(tuple(input_tile))
        return seconds_of(tuple(input_tile))

    monkeypatch.setattr(tile_tuning, "_timed_pass", timed_pass)
    return timed


def test_the_search_goes_down_from_the_largest_and_ends_after_slower_ones(monkeypatch):
    net = _net()
    candidates = tile_tuning.candidate_strides(net, 300_000)
    assert len(candidates) > tile_tuning.PATIENCE + 1
    inputs = [tuple(net.legal_input_shape(c)) for c in candidates]
    timed = _timed_as(monkeypatch, lambda tile: 1.0)  # the same time for every tile: the largest does the most
    results = tile_tuning.measure_tiles(net, candidates, torch.device("cpu"), None, 300_000)
    assert timed == inputs[::-1][: tile_tuning.PATIENCE + 1]
    assert [r["stride"] for r in results] == [list(c) for c in candidates[-tile_tuning.PATIENCE - 1 :]]
    timed = _timed_as(monkeypatch, lambda tile: math.prod(tile) ** 2.0)  # each smaller tile faster: all timed
    results = tile_tuning.measure_tiles(net, candidates, torch.device("cpu"), None, 300_000)
    assert timed == inputs[::-1] and max(results, key=lambda r: r["voxels_per_second"])["stride"] == list(candidates[0])


def test_a_tile_out_of_memory_is_passed_over_and_none_fitting_raises(monkeypatch):
    net = _net()
    candidates = tile_tuning.candidate_strides(net, 300_000)
    inputs = [tuple(net.legal_input_shape(c)) for c in candidates]

    def seconds_of(tile):
        if tile in inputs[-2:]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.1

    _timed_as(monkeypatch, seconds_of)
    results = tile_tuning.measure_tiles(net, candidates, torch.device("cpu"), None, 300_000)
    assert results and all(tuple(net.legal_input_shape(r["stride"])) not in inputs[-2:] for r in results)
    with pytest.raises(torch.OutOfMemoryError):
        tile_tuning.measure_tiles(net, candidates[-2:], torch.device("cpu"), None, 300_000)
    with pytest.raises(ValueError):  # any other error is not passed over
        _timed_as(monkeypatch, lambda tile: (_ for _ in ()).throw(ValueError("broken")))
        tile_tuning.measure_tiles(net, candidates, torch.device("cpu"), None, 300_000)
    monkeypatch.undo()
    real = tile_tuning.measure_tiles(net, candidates[:2], torch.device("cpu"), None, 300_000)  # the real passes
    assert all(r["voxels_per_second"] > 0 and 1 <= r["batch"] <= tile_tuning.MAX_BATCH for r in real)


def test_a_tuned_prediction_equals_the_untuned_one(cache_dir, monkeypatch):
    net = _net()
    image = np.random.default_rng(0).normal(size=(2, 150, 170)).astype(np.float32)  # a stack: more than one tile
    small = tile_tuning.candidate_strides(net, 300_000)[0]
    monkeypatch.setattr(
        tile_tuning,
        "measure_tiles",
        lambda net_, candidates, *a: [
            {"stride": list(c), "batch": 2, "voxels_per_second": 9.0 if tuple(c) == small else 1.0} for c in candidates
        ],
    )
    counts = []
    tuned = predict_tiled(net, image, tile_tuning=True, progress=lambda done, total: counts.append(total))
    np.testing.assert_allclose(tuned, predict_tiled(net, image), atol=1e-5)
    assert counts[-1] > 2  # the small tuned tile, not each slice in one


def test_the_setting_and_the_flag():
    assert PredictionSettings().tile_tuning is True
    with pytest.raises(ValueError, match="tile_tuning"):
        PredictionSettings(tile_tuning="yes")
    args = build_parser().parse_args(["predict", "--model", "m.safetensors", "a.tif", "--out", "o", "--no-tile-tuning"])
    assert args.tile_tuning is False


def test_an_image_of_one_tile_is_predicted_without_tuning(cache_dir, monkeypatch):
    """Nothing to choose where the whole image is one tile: no measurement (it would cost a first prediction many
    times its own time), and the result is the untuned one."""
    net = _net()
    image = np.random.default_rng(1).normal(size=(60, 50)).astype(np.float32)
    calls = []
    monkeypatch.setattr(tile_tuning, "tuned_tile", lambda *args: calls.append(args) or (10**6, 1))
    np.testing.assert_array_equal(predict_tiled(net, image, tile_tuning=True), predict_tiled(net, image))
    assert calls == []
    stack = np.random.default_rng(1).normal(size=(3, 60, 50)).astype(np.float32)  # three tiles: tuned
    predict_tiled(net, stack, tile_tuning=True)
    assert len(calls) == 1
