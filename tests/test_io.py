"""Model files (safe, atomic, self-describing) and TIFF reading/writing."""

import json
import os
import pickle

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import io
from napari_unet.io import (
    ImageFileError,
    ModelFileError,
    load_model,
    open_image,
    read_image,
    save_model,
    write_tiff,
)
from napari_unet.normalization import DEFAULT_RECIPE
from napari_unet.tiling import predict_tiled

# ---------------------------------------------------------------------------------------
# model files


def test_round_trip_gives_identical_predictions(tmp_path, make_model):
    model = make_model(block="residual")
    path = save_model(model, tmp_path / "m.safetensors", {"class_ids": [1, 3, 7], "class_names": ["bg", "a", "b"]})
    loaded, metadata = load_model(path)

    assert not loaded.training
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    image = np.random.default_rng(0).random((45, 61), dtype=np.float32)
    np.testing.assert_array_equal(predict_tiled(loaded, image), predict_tiled(model, image))

    assert metadata["class_ids"] == [1, 3, 7]
    assert metadata["class_names"] == ["bg", "a", "b"]
    assert metadata["normalization"] == DEFAULT_RECIPE  # the default recipe when none is given
    assert metadata["config"] == model.config
    assert metadata["format"] == "napari-unet" and metadata["format_version"] == io.FORMAT_VERSION
    assert "napari_unet_version" in metadata


def test_defaults_and_numpy_metadata(tmp_path, make_model):
    model = make_model(n_classes=2)
    training = {"epochs": np.int64(3), "loss": np.float32(0.25), "history": np.array([1.0, 0.5])}
    _, metadata = load_model(save_model(model, tmp_path / "m.safetensors", {"training": training}))
    assert metadata["class_ids"] == [1, 2]
    assert metadata["class_names"] == ["class 1", "class 2"]
    assert metadata["training"] == {"epochs": 3, "loss": 0.25, "history": [1.0, 0.5]}


def test_class_ids_must_match_classes(tmp_path, make_model):
    with pytest.raises(ValueError, match="one id per class"):
        save_model(make_model(n_classes=3), tmp_path / "m.safetensors", {"class_ids": [1, 2]})
    assert list(tmp_path.iterdir()) == []


def test_malicious_pickle_is_refused_without_running(tmp_path, malicious_pickle):
    marker = tmp_path / "pwned"
    # The payload is real: unpickling it creates the marker.
    with pickle.loads(malicious_pickle(tmp_path / "probe.pkl", marker).read_bytes())["state_dict"]:
        pass
    assert marker.exists()
    marker.unlink()

    for name in ("evil.safetensors", "evil.pt"):
        path = malicious_pickle(tmp_path / name, marker)
        with pytest.raises(ModelFileError, match=r"pickle.*refused"):
            load_model(path)
        assert not marker.exists()


def test_safetensors_header_length_starting_with_a_pickle_byte_loads(tmp_path, make_model):
    # The first byte of a safetensors file is the low byte of its header length: 0x80 is as likely as any other.
    model = make_model()
    for padding in range(300):
        path = save_model(model, tmp_path / "model.safetensors", {"note": "x" * padding})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length with low byte 0x80 in 300 paddings")
    loaded, metadata = load_model(path)
    assert metadata["note"].startswith("x") and loaded.n_classes == model.n_classes


def test_torch_save_files_are_refused(tmp_path, make_model, malicious_pickle):
    marker = tmp_path / "pwned"
    torch.save(make_model().state_dict(), tmp_path / "weights.pt")
    malicious_pickle(tmp_path / "model.pth", marker, torch_zip=True)
    for name in ("weights.pt", "model.pth"):
        with pytest.raises(ModelFileError, match=r"PyTorch \.pt/\.pth"):
            load_model(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_files_are_refused(tmp_path, make_model, keep):
    data = save_model(make_model(), tmp_path / "m.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a valid safetensors model file"):
        load_model(bad)


def test_corrupt_and_foreign_files_are_refused(tmp_path, make_model):
    from safetensors.torch import save_file

    path = save_model(make_model(), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[10:header_end] = b"!" * (header_end - 10)  # garbage header
    (tmp_path / "garbage.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="not a valid safetensors"):
        load_model(tmp_path / "garbage.safetensors")

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelFileError, match="without napari-unet metadata"):
        load_model(tmp_path / "plain.safetensors")

    (tmp_path / "text.safetensors").write_text("hello, I am not a model")
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "text.safetensors")

    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match="folder"):
        load_model(tmp_path)


def _rewrite_record(src, dst, edit, tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        record = json.loads(f.metadata()[io.METADATA_KEY])
        state = {k: f.get_tensor(k) for k in f.keys()}
    edit(record)
    save_file(tensors if tensors is not None else state, str(dst), metadata={io.METADATA_KEY: json.dumps(record)})
    return dst


def test_inconsistent_files_are_refused(tmp_path, make_model):
    src = save_model(make_model(), tmp_path / "m.safetensors")

    bigger = _rewrite_record(src, tmp_path / "a.safetensors", lambda r: r["config"].update(base_filters=8))
    with pytest.raises(ModelFileError, match="weights do not match"):
        load_model(bigger)

    newer = _rewrite_record(src, tmp_path / "b.safetensors", lambda r: r.update(format_version=99))
    with pytest.raises(ModelFileError, match="upgrade"):
        load_model(newer)

    unknown = _rewrite_record(src, tmp_path / "c.safetensors", lambda r: r["config"].update(block="magic"))
    with pytest.raises(ModelFileError, match="cannot build"):
        load_model(unknown)

    ids = _rewrite_record(src, tmp_path / "d.safetensors", lambda r: r.update(class_ids=[1]))
    with pytest.raises(ModelFileError, match="class_ids"):
        load_model(ids)


def test_atomic_save_keeps_previous_file_on_crash(tmp_path, make_model, monkeypatch):
    path = tmp_path / "m.safetensors"
    first = make_model(seed=1)
    save_model(first, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(io.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_model(make_model(seed=2), path)
    monkeypatch.undo()

    def disk_full(fd):  # the data is (partly) written, then the flush to disk fails
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model(seed=2), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    loaded, _ = load_model(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in first.state_dict().items())


def test_save_overwrites_and_into_missing_folder_fails_cleanly(tmp_path, make_model):
    path = tmp_path / "m.safetensors"
    save_model(make_model(seed=1), path)
    second = make_model(seed=2)
    save_model(second, path)
    loaded, _ = load_model(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second.state_dict().items())
    with pytest.raises(OSError):
        save_model(second, tmp_path / "missing" / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_load_on_a_device(tmp_path, make_model):
    model, _ = load_model(save_model(make_model(), tmp_path / "m.safetensors"), device="cpu")
    assert next(model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------
# TIFF


@pytest.mark.parametrize(
    ("shape", "dtype", "axes", "scale"),
    [
        ((20, 30), np.uint16, "YX", (0.5, 0.25)),
        ((4, 20, 30), np.uint8, "ZYX", (2.0, 0.5, 0.5)),
        ((3, 20, 30), np.float32, "CYX", (0.5, 0.5)),
        ((3, 4, 20, 30), np.float32, "CZYX", (2.0, 0.5, 0.5)),  # not ImageJ order: shaped TIFF
        ((4, 2, 20, 30), np.float32, "ZCYX", (2.0, 0.5, 0.5)),
        ((20, 30), np.uint32, "YX", None),
        ((20, 30), np.float64, "YX", (0.1, 0.1)),
        ((2, 20, 1), np.float32, "CYX", (0.5, 0.5)),  # one pixel wide: ImageJ's writer would take it for samples
        ((5, 20, 1), np.uint8, "ZYX", (2.0, 0.5, 0.5)),
        ((3, 1, 1), np.float32, "CYX", None),
    ],
)
def test_tiff_round_trip(tmp_path, shape, dtype, axes, scale):
    array = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    path = write_tiff(tmp_path / "a.tif", array, axes=axes, scale=scale)
    back, info = read_image(path)
    np.testing.assert_array_equal(back, array)
    assert info["axes"] == axes
    assert info["channel_axis"] == (axes.index("C") if "C" in axes else None)
    expected = scale if scale is not None else (1.0,) * len(axes.replace("C", ""))
    np.testing.assert_allclose(info["scale"], expected, rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]
    with open_image(path) as (lazy, lazy_info):  # the same image and description, read on demand
        assert lazy_info == info and lazy.shape == array.shape
        np.testing.assert_array_equal(np.asarray(lazy), array)


def test_open_image_drops_singleton_axes_and_reads_only_what_is_sliced(tmp_path):
    array = (np.random.default_rng(0).random((1, 6, 2, 40, 30)) * 1000).astype(np.uint16)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, array, imagej=True, metadata={"axes": "TZCYX"})
    with open_image(path) as (lazy, info):
        assert info["axes"] == "ZCYX" and lazy.shape == (6, 2, 40, 30)
        np.testing.assert_array_equal(np.asarray(lazy[4, 1, 5:9]), array[0, 4, 1, 5:9])
        assert not isinstance(lazy, np.ndarray)  # nothing read until sliced


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_lazy_image_reads_regions_of_single_strip_and_compressed_files(tmp_path, monkeypatch, compression):
    """An uncompressed file is memory-mapped: a region of a page stored as one strip is read without the rest
    (dask chunks of bands of rows); a compressed one goes through the zarr store. No ``with`` block needed."""
    monkeypatch.setattr(io, "_LAZY_CHUNK_BYTES", 2 * 30 * 500)  # bands of 30 rows of a 2-byte, 500-wide plane
    array = (np.random.default_rng(0).random((3, 100, 500)) * 60000).astype(np.uint16)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, array, compression=compression, byteorder=">", photometric="minisblack")
    lazy, info = io.lazy_image(path)
    assert not isinstance(lazy, np.ndarray) and info == read_image(path)[1]
    if compression is None:
        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].rowsperstrip == 100 and tif.byteorder == ">"  # one strip per page, big-endian
        assert lazy.chunks == ((1, 1, 1), (30, 30, 30, 10), (500,))
    np.testing.assert_array_equal(np.asarray(lazy[1, 40:70, 100:130]), array[1, 40:70, 100:130])
    np.testing.assert_array_equal(np.asarray(lazy), array)
    assert io.lazy_image(path)[0].name == lazy.name  # named from the file, not by hashing its pixels


def test_open_image_of_a_pyramid_reads_its_full_resolution(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "pyramid.ome.tif", ome=True) as tif:
        tif.write(array, subifds=1, tile=(64, 64), compression="zlib", metadata={"axes": "YX"})
        tif.write(array[::2, ::2], subfiletype=1, tile=(64, 64), compression="zlib")
    with open_image(tmp_path / "pyramid.ome.tif") as (lazy, info):
        assert info["axes"] == "YX"
        np.testing.assert_array_equal(np.asarray(lazy), array)


def test_read_rgb_ome_imagej_and_unnamed_axes(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    assert read_image(tmp_path / "rgb.tif")[1]["axes"] == "YXC"
    tifffile.imwrite(tmp_path / "rgb_gray.tif", rgb, photometric="minisblack")
    assert read_image(tmp_path / "rgb_gray.tif")[1]["axes"] == "YXC"
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 20, 30), np.uint16), photometric="minisblack")
    assert read_image(tmp_path / "stack.tif")[1]["axes"] == "ZYX"

    ome = tmp_path / "a.ome.tif"
    tifffile.imwrite(
        ome,
        np.zeros((5, 20, 30), np.uint16),
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 1.5},
    )
    array, info = read_image(ome)
    assert array.shape == (5, 20, 30) and info["axes"] == "ZYX"
    np.testing.assert_allclose(info["scale"], (1.5, 0.4, 0.3))
    assert info["unit"] == "um"

    tifffile.imwrite(
        tmp_path / "ij.tif",
        np.zeros((6, 20, 30), np.uint16),
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.2),
        metadata={"axes": "TYX", "unit": "micron"},
    )
    _, info = read_image(tmp_path / "ij.tif")
    assert info["axes"] == "ZYX"
    np.testing.assert_allclose(info["scale"], (1.0, 0.2, 0.2))
    assert info["unit"] == "um"

    tifffile.imwrite(tmp_path / "dpi.tif", np.zeros((20, 30), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    assert read_image(tmp_path / "dpi.tif")[1]["scale"] == (1.0, 1.0)


def test_image_errors(tmp_path):
    with pytest.raises(ImageFileError, match="not found"):
        read_image(tmp_path / "missing.tif")
    with pytest.raises(ImageFileError, match="folder"):
        read_image(tmp_path)
    (tmp_path / "text.tif").write_text("not a tiff")
    with pytest.raises(ImageFileError, match="not a readable TIFF"):
        read_image(tmp_path / "text.tif")
    with pytest.warns(UserWarning):
        tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 5), np.uint8))
    with pytest.raises(ImageFileError, match="empty"):
        read_image(tmp_path / "empty.tif")
    tifffile.imwrite(tmp_path / "tz.tif", np.zeros((2, 3, 8, 8), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ImageFileError, match="more than one stack axis"):
        read_image(tmp_path / "tz.tif")
    good = write_tiff(tmp_path / "good.tif", np.zeros((20, 30), np.uint8))
    (tmp_path / "cut.tif").write_bytes(good.read_bytes()[:150])
    with pytest.raises(ImageFileError):
        read_image(tmp_path / "cut.tif")


def test_write_tiff_checks_arguments_and_is_atomic(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="axes"):
        write_tiff(tmp_path / "a.tif", np.zeros((2, 3)), axes="ZYX")
    with pytest.raises(ValueError, match="scale"):
        write_tiff(tmp_path / "a.tif", np.zeros((2, 3)), scale=(1.0,))
    path = write_tiff(tmp_path / "a.tif", np.ones((4, 5), np.uint8))
    monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        write_tiff(path, np.zeros((4, 5), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]
    assert read_image(path)[0].min() == 1
    assert os.path.getsize(path) > 0


# ---------------------------------------------------------------------------------------
# temporary files of atomic writes, output markers


def test_atomic_write_creates_its_temporary_file_exclusively(tmp_path, make_model, monkeypatch):
    """A symbolic link (or a file) planted at the temporary name a write draws is never opened: the write draws
    another name, the planted link's target is untouched, and the planted entries stay as they were."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "m.safetensors"
    draws = iter(["0" * 16, "1" * 16, "2" * 16])
    monkeypatch.setattr(io.secrets, "token_hex", lambda n: next(draws))
    prefix = io._temporary_prefix(target)
    (tmp_path / f"{prefix}{'0' * 16}.tmp").symlink_to(victim)
    (tmp_path / f"{prefix}{'1' * 16}.tmp").write_bytes(b"someone's")
    save_model(make_model(), target)
    assert victim.read_bytes() == b"precious" and (tmp_path / f"{prefix}{'1' * 16}.tmp").read_bytes() == b"someone's"
    assert (tmp_path / f"{prefix}{'0' * 16}.tmp").is_symlink()
    load_model(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["victim", "m.safetensors", f"{prefix}{'0' * 16}.tmp", f"{prefix}{'1' * 16}.tmp"]
    )


def test_atomic_write_keeps_the_umask_mode(tmp_path):
    """The temporary file (and so the written file) gets the mode an ordinary ``open`` gives, not 0600."""
    umask = os.umask(0o022)
    try:
        path = write_tiff(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_device_or_pipe_at_the_path_is_never_replaced(tmp_path, make_model):
    """``os.replace`` renames over whatever is at the path: as root, Save to ``/dev/full`` replaced the device node
    with a file. A path that is not a regular file is refused before anything is written, and stays."""
    import stat

    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    with pytest.raises(FileExistsError, match="is not a regular file"):
        save_model(make_model(), pipe)
    with pytest.raises(FileExistsError, match="is not a regular file"):
        write_tiff(pipe, np.zeros((4, 4), np.uint8))
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe.safetensors"]


def test_stale_temporaries_of_dead_processes_are_removed_on_the_next_save(tmp_path, make_model):
    """What processes killed mid-write left (their temporary files, named with their host and process id) is
    removed by the next write into the folder; a live process's, another host's, a link and a name of another form
    stay. A folder is listed for this once per process."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "m.safetensors"
        host = io._HOST
        entries = {
            "stale": f".m.safetensors.{host}.{dead.pid}.0123456789abcdef.tmp",
            "stale of another file": f".n.tif.{host}.{dead.pid}.0123456789abcdef.tmp",
            "alive": f".m.safetensors.{host}.{alive.pid}.0123456789abcdef.tmp",
            "other host": f".m.safetensors.{host}x.{dead.pid}.0123456789abcdef.tmp",
            "other form": f".m.safetensors.{host}.{dead.pid}.0123.tmp",
        }
        for name in entries.values():
            (tmp_path / name).write_bytes(b"partial")
        link = tmp_path / f".m.safetensors.{host}.{dead.pid}.fedcba9876543210.tmp"
        link.symlink_to(tmp_path / "elsewhere")
        save_model(make_model(), target)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"m.safetensors", link.name, *(v for k, v in entries.items() if not k.startswith("stale"))}
        (tmp_path / entries["stale"]).write_bytes(b"partial")
        save_model(make_model(), target)  # the folder was cleaned once in this process: not listed again
        assert (tmp_path / entries["stale"]).exists()
        assert io.remove_stale_temporaries(tmp_path) == [tmp_path / entries["stale"]]
    finally:
        alive.kill()
        alive.wait(timeout=60)


def test_output_marker(tmp_path):
    """``write_tiff(output=role)`` marks a file as napari-unet's output (ImageJ and shaped TIFFs alike, next to a
    record); any other file has no role, and a FIFO is not opened (it would wait for a writer)."""
    labels = write_tiff(tmp_path / "l.tif", np.ones((8, 8), np.uint8), output="labels", record={"domain": {"a": 1}})
    wide = write_tiff(tmp_path / "w.tif", np.ones((8, 8), np.int32), output="labels")  # no ImageJ int32: shaped
    assert io.output_role(labels) == "labels" and io.output_role(wide) == "labels"
    assert io.read_tiff_record(labels)["domain"] == {"a": 1}
    assert io.output_role(write_tiff(tmp_path / "mine.tif", np.ones((8, 8), np.uint8))) is None
    (tmp_path / "notes.tif").write_text("not a TIFF")
    os.mkfifo(tmp_path / "fifo.tif")
    for other in ("notes.tif", "fifo.tif", "missing.tif", "."):
        assert io.output_role(tmp_path / other) is None
