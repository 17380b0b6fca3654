"""Block-wise prediction into OME-Zarr, in this process and on a Dask LocalCluster of 2 worker processes on
127.0.0.1 (distributed_predict.py): equal to the single-process prediction, resumable, fault tolerant."""

import os
import signal

import numpy as np
import pytest

from napari_unet.distributed_predict import (
    ImageSource,
    OutputRefused,
    SchedulerUnreachable,
    dask_client,
    predict_volume,
)
from napari_unet.io import ImageFileError, open_image, read_image, save_model, write_tiff
from napari_unet.predict import PredictionSettings, predict_image

METADATA = {"class_ids": [1, 2, 5], "normalization": {"method": "percentile", "low": 1.0, "high": 99.8}}
PRECISION = "float32"
"""Named, not "auto": the workers are processes of their own, which conftest.py's patch reaches only through the
cache file it fills; the comparisons with this process's prediction must not rest on that."""


def _image(shape, seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return ((smooth > np.median(smooth)) * 1500 + rng.integers(0, 400, shape)).astype(np.uint16)


def _ome_zarr(path, image, axes, scale, version="0.4"):
    """An input image written by ome-zarr-py itself (not by napari-unet)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    units = {a: "micrometer" for a in axes if a in "zyx"}
    chunks = tuple(min(n, 16) for n in image.shape)
    write_image(
        image, str(path), fmt=fmt, axes=axes, scale=dict(zip(axes, scale)), axes_units=units,
        scale_factors=(), storage_options={"chunks": chunks},
    )  # fmt: skip
    return path


def _predict(model_path, image_path, out, settings, **kwargs):
    with open_image(image_path) as (lazy, info):
        spatial_axes = info["axes"]
        source = ImageSource(str(image_path), None, 1)
        return predict_volume(
            model_path, source, lazy, info, spatial_axes,
            (out / "img_probabilities.zarr", out / "img_labels.zarr"), settings, **kwargs,
        )  # fmt: skip


def _check_equal(result, expected):
    probabilities, _ = read_image(result.probabilities)
    labels, info = read_image(result.labels)
    assert np.abs(probabilities - expected.probabilities).max() < 1e-5
    np.testing.assert_array_equal(labels, expected.labels)
    return info


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes on 127.0.0.1 for this module's tests, stopped after them."""
    with dask_client(workers=2, log=lambda line: None) as (client, threads):
        client.wait_for_workers(2, timeout=120)
        yield client, threads


def test_the_local_cluster_runs_without_the_profiler(cluster):
    import dask

    client, _ = cluster
    enabled = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
    assert len(enabled) == 2 and not any(enabled.values())
    assert dask.config.get("distributed.worker.profile.enabled") is True  # this process's config is as it was


@pytest.fixture
def model_file(make_model, tmp_path):
    def make(**kwargs):
        model = make_model(**kwargs)
        return model, save_model(model, tmp_path / "model.safetensors", METADATA)

    return make


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_in_process_equals_predict_image_and_keeps_metadata(model_file, tmp_path, version):
    model, path = model_file()
    image = _image((70, 93))
    source = _ome_zarr(tmp_path / "in.zarr", image, "yx", (0.5, 0.25), version)
    settings = PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=True, refine_radius="auto")
    result = _predict(path, source, tmp_path, settings, block=(32, 40), version=version, pyramid=1)
    assert (result.predicted, result.skipped) == (9, 0)
    info = _check_equal(result, predict_image(model, METADATA, image, settings))
    assert info == {"axes": "YX", "channel_axis": None, "scale": (0.5, 0.25), "unit": "um"}
    assert read_image(result.probabilities)[1]["axes"] == "CYX"
    import zarr

    level = zarr.open_group(str(result.labels))["0"]
    assert level.chunks == (32, 40)  # one block per chunk: no two writers share one
    assert "1" in zarr.open_group(str(result.labels))  # the pyramid level


def test_probabilities_dtype_uint8(model_file, tmp_path):
    model, path = model_file()
    image = _image((40, 50))
    write_tiff(tmp_path / "in.tif", image)
    settings = PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=False, refine_radius=0)
    result = _predict(path, tmp_path / "in.tif", tmp_path, settings, block=(16, 16), probabilities_dtype="uint8")
    expected = predict_image(model, METADATA, image, settings)
    stored, _ = read_image(result.probabilities)
    assert stored.dtype == np.uint8
    assert np.abs(stored / 255.0 - expected.probabilities).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(read_image(result.labels)[0], expected.labels)


def test_interrupted_run_resumes_the_missing_blocks(model_file, tmp_path):
    model, path = model_file()
    image = _image((60, 70))
    source = _ome_zarr(tmp_path / "in.zarr", image, "yx", (1.0, 1.0))
    settings = PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=False, refine_radius=1)

    def stop_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _predict(path, source, tmp_path, settings, block=(16, 16), progress=stop_after_three)
    seen = []
    result = _predict(path, source, tmp_path, settings, block=(16, 16), progress=lambda d, t: seen.append((d, t)))
    assert (result.predicted, result.skipped) == (20 - 3, 3)
    assert seen[0] == (3, 20) and seen[-1] == (20, 20)
    _check_equal(result, predict_image(model, METADATA, image, settings))
    again = _predict(path, source, tmp_path, settings, block=(16, 16))
    assert (again.predicted, again.skipped) == (0, 20)
    other = _predict(
        path,
        source,
        tmp_path,
        PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=False),
        block=(16, 16),
    )
    assert other.predicted == 20  # other settings: a new run, not a resume


def test_foreign_store_refused(model_file, tmp_path):
    _, path = model_file()
    source = _ome_zarr(tmp_path / "in.zarr", _image((30, 30)), "yx", (1.0, 1.0))
    _ome_zarr(tmp_path / "img_labels.zarr", np.zeros((30, 30), np.uint8), "yx", (1.0, 1.0))
    with pytest.raises(OutputRefused, match=r"img_labels\.zarr exists and is not a napari-unet labels output"):
        _predict(path, source, tmp_path, PredictionSettings(device="cpu", precision=PRECISION))
    assert read_image(tmp_path / "img_labels.zarr")[0].max() == 0  # untouched


def test_scheduler_unreachable_is_one_line_within_the_timeout():
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with (
        pytest.raises(
            SchedulerUnreachable, match=f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within 2 s"
        ),
        dask_client(f"tcp://127.0.0.1:{port}", timeout=2),
    ):
        pass
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(axes=["y", "x"]), "metadata is malformed"),  # axes as strings, not objects
        (lambda m: m.update(datasets=["0"]), "metadata is malformed"),
        (lambda m: m["datasets"][0].update(coordinateTransformations=[{"type": "scale", "scale": [1.0]}]), "scale"),
        (
            lambda m: m["datasets"][0].update(coordinateTransformations=[{"type": "scale", "scale": [0.0, 1.0]}]),
            "scale",
        ),
    ],
)
def test_malformed_ome_zarr_metadata_is_one_image_file_error(tmp_path, edit, message):
    """Metadata another tool wrote wrongly: "unexpected AttributeError/TypeError/IndexError" before, or a scale of 0
    copied into the outputs; now an ``ImageFileError`` naming the store (the CLI's one line)."""
    import zarr

    path = _ome_zarr(tmp_path / "in.zarr", _image((30, 30)), "yx", (1.0, 1.0))
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    multiscales = attrs["multiscales"][0]
    edit(multiscales)
    group.attrs.update(attrs)
    with pytest.raises(ImageFileError, match=f"{path}: .*{message}"), open_image(path):
        pass


def test_a_scheduler_without_workers_is_one_line_within_the_timeout():
    """A scheduler that no worker has joined took the blocks and the command waited forever."""
    import time

    from distributed import LocalCluster

    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None, silence_logs=50) as empty:
        started, address = time.monotonic(), empty.scheduler_address
        with (
            pytest.raises(SchedulerUnreachable, match=f"the Dask scheduler at {address} has no workers"),
            dask_client(address, timeout=2),
        ):
            pass
        assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("ndim", "shape", "block", "flips", "radius"),
    [(2, (70, 93), (32, 40), True, "auto"), (3, (21, 30, 27), (12, 16, 16), False, 1)],
)
def test_cluster_equals_single_process(cluster, model_file, tmp_path, ndim, shape, block, flips, radius):
    client, threads = cluster
    model, path = model_file(ndim=ndim)
    image = _image(shape)
    source = _ome_zarr(tmp_path / "in.zarr", image, "zyx"[-ndim:], (2.0, 0.5, 0.5)[-ndim:])
    settings = PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=flips, refine_radius=radius)
    result = _predict(path, source, tmp_path, settings, block=block, client=client, torch_threads=threads)
    assert result.predicted > 4
    _check_equal(result, predict_image(model, METADATA, image, settings))


def test_the_cluster_counts_the_robust_normalization_exactly(cluster, model_file, tmp_path, monkeypatch):
    """The whole volume's robust percentiles (area opening of every plane) are counted by the workers, each reading
    the source, and equal those of the volume in memory."""
    from distributed import get_task_stream

    import napari_unet.distributed_predict as distributed_predict
    import napari_unet.normalization as normalization
    from napari_unet.normalization import percentile_params, robust_params
    from napari_unet.ome_zarr_io import store_record

    client, threads = cluster
    model, _ = model_file(ndim=3)
    robust = {**METADATA, "normalization": {"method": "robust", "low": 1.0, "high": 99.8, "speck_area": 20}}
    path = save_model(model, tmp_path / "robust.safetensors", robust)
    image = _image((24, 30, 27))
    image[::3, 5:7, 5:7] = 9000  # bright specks of 4 px in every third plane: the robust upper value ignores them
    source = _ome_zarr(tmp_path / "in.zarr", image, "zyx", (2.0, 0.5, 0.5))
    settings = PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=False, refine_radius=0)
    monkeypatch.setattr(normalization, "_SLAB_PIXELS", 30 * 27 * 2)  # slabs of 2 planes
    monkeypatch.setattr(distributed_predict, "NORMALIZATION_TASK_PIXELS", 30 * 27 * 4)  # 2 slabs a task
    with get_task_stream(client) as stream:
        result = _predict(path, source, tmp_path, settings, block=(12, 16, 16), client=client)
    counted = [t for t in stream.data if str(t["key"]).startswith("_counted_slabs")]
    assert len(counted) >= 2 * 6  # the plain and the opened histograms, 6 tasks of 4 planes each
    _check_equal(result, predict_image(model, robust, image, settings))
    stored = store_record(result.labels)["block_settings"]["params"]
    wanted = robust_params(image, speck_area=20)
    assert stored["high_values"] == wanted["high_values"] < percentile_params(image)["high_values"]
    assert stored["low_values"] == wanted["low_values"]


def test_worker_killed_mid_run_output_still_equal(cluster, model_file, tmp_path):
    client, threads = cluster
    model, path = model_file()
    image = _image((96, 96))
    source = _ome_zarr(tmp_path / "in.zarr", image, "yx", (1.0, 1.0))
    settings = PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=True, refine_radius=1)
    pids = list(client.run(os.getpid).values())
    killed = []

    def kill_a_worker(done, total):
        if done >= 2 and not killed:  # blocks still running and queued on both workers
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    result = _predict(path, source, tmp_path, settings, block=(16, 16), client=client, progress=kill_a_worker)
    assert killed and result.predicted == 36
    client.wait_for_workers(2, timeout=120)  # its nanny started a new worker process
    assert pids[0] not in client.run(os.getpid).values()
    _check_equal(result, predict_image(model, METADATA, image, settings))


def test_the_cluster_subtracts_the_background_as_the_whole_image_does(cluster, model_file, tmp_path):
    """A model whose recipe subtracts a smooth background (``background_grid``): the block-wise prediction on the
    cluster, each block subtracting its window of the volume's field, equals the single-process one."""
    client, threads = cluster
    model, _ = model_file(ndim=3)
    recipe = {"method": "robust", "low": 1.0, "high": 99.8, "speck_area": 20, "background_grid": 3}
    path = save_model(model, tmp_path / "background.safetensors", {**METADATA, "normalization": recipe})
    image = _image((20, 30, 27)) + np.add.outer(np.arange(30), np.arange(27)).astype(np.uint16) * 20  # a ramp
    source = _ome_zarr(tmp_path / "in.zarr", image, "zyx", (2.0, 0.5, 0.5))
    settings = PredictionSettings(device="cpu", precision=PRECISION, test_time_flips=False, refine_radius=0)
    result = _predict(path, source, tmp_path, settings, block=(10, 16, 16), client=client)
    _check_equal(result, predict_image(model, {**METADATA, "normalization": recipe}, image, settings))


class _Answers:
    """A client whose workers answer ``client.run`` with the given precisions (their CPUs and GPUs differ)."""

    def __init__(self, *answers):
        self.answers = answers

    def run(self, function, *args):
        return {f"tcp://127.0.0.1:{4000 + i}": answer for i, answer in enumerate(self.answers)}


def test_auto_precision_is_the_one_the_workers_agree_on_or_float32():
    from napari_unet.distributed_predict import cluster_precision

    assert cluster_precision(_Answers("bfloat16", "bfloat16"), "cpu") == "bfloat16"
    with pytest.warns(UserWarning, match=r"1 worker\(s\) bfloat16, 1 worker\(s\) float32\): every block .* float32"):
        assert cluster_precision(_Answers("bfloat16", "float32"), "cpu") == "float32"
    with pytest.warns(UserWarning, match="float16"):
        assert cluster_precision(_Answers("float16", "float32", "float16"), "auto") == "float32"


def test_auto_precision_is_decided_once_for_the_volume_and_kept_for_a_resume(cluster, model_file, tmp_path):
    from napari_unet.distributed_predict import here_precision
    from napari_unet.ome_zarr_io import store_record

    client, threads = cluster
    model, path = model_file(ndim=2)
    image = _image((40, 52))
    source = _ome_zarr(tmp_path / "in.zarr", image, "yx", (0.5, 0.5))
    settings = PredictionSettings(device="cpu", precision="auto", test_time_flips=False, refine_radius=0)
    result = _predict(path, source, tmp_path, settings, block=(16, 24), client=client, torch_threads=threads)
    answers = set(client.run(here_precision, "cpu", threads).values())
    assert answers <= {"float32", "bfloat16"}
    stored = store_record(result.labels)["block_settings"]["precision"]
    assert stored == (answers.pop() if len(answers) == 1 else "float32")
    # in this process (conftest pins float32 here): the store says what "auto" was, and the resume keeps it
    alone = tmp_path / "alone"
    alone.mkdir()
    first = _predict(path, source, alone, settings, block=(16, 24))
    assert store_record(first.labels)["block_settings"]["precision"] == here_precision("cpu") == "float32"
    again = _predict(path, source, alone, settings, block=(16, 24))
    assert again.predicted == 0 and again.skipped == first.predicted
