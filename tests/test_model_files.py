"""Hostile model files: refused with one ModelFileError before anything is allocated or waited for."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from napari_unet import io
from napari_unet.io import ModelFileError, load_model, save_model
from napari_unet.model import UNet

SRC = Path(__file__).resolve().parents[1] / "src"


def _tensors_and_record(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[io.METADATA_KEY])


def _rewrite(src, dst, edit):
    """A copy of the model file ``src`` whose napari-unet record ``edit(record)`` changed (tensors unchanged)."""
    from safetensors.torch import save_file

    state, record = _tensors_and_record(src)
    edit(record)
    save_file(state, str(dst), metadata={io.METADATA_KEY: json.dumps(record)})
    return dst


def _raw_file(path, header, data=b"", length=None):
    """A file framed as safetensors: 8-byte little-endian header length, the header text, then ``data``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


def _claiming(path, config, with_table=True):
    """A few-kB file whose record describes ``config`` and whose tensor table (the shapes ``config`` implies, at
    their offsets) promises data it does not hold."""
    with torch.device("meta"):
        expected = UNet(**config).state_dict()
    header, offset = {}, 0
    for name, tensor in expected.items() if with_table else []:
        size = tensor.numel() * tensor.element_size()
        dtype = "F32" if tensor.dtype == torch.float32 else "I64"
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    ids = [1, 2] if config.get("n_classes", 2) > 2 else list(range(1, config.get("n_classes", 2) + 1))
    record = {"format": io.FORMAT_NAME, "format_version": io.FORMAT_VERSION, "config": config, "class_ids": ids}
    header["__metadata__"] = {io.METADATA_KEY: json.dumps(record)}
    return _raw_file(path, header, b"\0" * 64)


@pytest.fixture
def saved(tmp_path, make_model):
    return save_model(make_model(), tmp_path / "good.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["config"].update(base_filters=1024, depth=4), "network of .* weights"),
        (lambda r: r["config"].update(n_classes=10**9), "n_classes must be an integer from 1 to 65536"),
        (lambda r: r["config"].update(depth=10**6), "depth must be an integer from 1 to 8"),
        (lambda r: r["config"].update(in_channels="1"), "in_channels must be an integer"),
        (lambda r: r["config"].update(ndim=True), "ndim must be an integer"),
        (lambda r: r["config"].update(base_filters=0), "base_filters must be an integer"),
        (lambda r: r["config"].update(batch_norm="yes"), "batch_norm must be true or false"),
        (lambda r: r["config"].update(dropout=math.nan), "dropout must be a probability"),
        (lambda r: r["config"].update(dropout=1.0), "dropout must be a probability"),
        (lambda r: r["config"].update(block="magic"), "cannot build.*block"),
        (lambda r: r["config"].update(temperature=0), "temperature must be a number from 0.05 to 20"),
        (lambda r: r["config"].update(temperature=math.inf), "temperature must be a number from 0.05 to 20"),
        (lambda r: r["config"].update(temperature=1e-300), "temperature must be a number from 0.05 to 20"),  # NaN
        (lambda r: r["config"].update(kernel=5), "cannot build.*kernel"),
        (lambda r: r.update(config=[1, 2]), "missing format or config"),
        (lambda r: r.update(format_version="1"), "format version"),
        (lambda r: r.update(class_ids=[1, 1, 2]), "class_ids"),
        (lambda r: r.update(class_ids=[0, 1, 2]), "class_ids"),
        (lambda r: r.update(class_ids=[1, 2, 2**40]), "class_ids"),
        (lambda r: r.update(class_ids=[1, 2, 2.5]), "class_ids"),
        (lambda r: r.update(class_ids=[True, 2, 3]), "class_ids"),
        (lambda r: r.update(class_ids=list(range(1, 10**5))), "class_ids"),
        (lambda r: r.update(class_names=["a", "b"]), "class_names"),
        (lambda r: r.update(class_names=["a", "b", 3]), "class_names"),
        (lambda r: r.update(class_names=["a", "b", "c" * 5000]), "class_names"),
        (lambda r: r.update(normalization="robust"), "normalization recipe: a normalization recipe is an object"),
        (lambda r: r.update(normalization={"method": "magic"}), "unknown normalization method"),
        (lambda r: r.update(normalization={"method": "percentile", "low": 50, "high": 10}), "percentiles"),
        (lambda r: r.update(normalization={"method": "robust", "low": math.nan}), "percentiles"),
        (lambda r: r.update(normalization={"method": "robust", "speck_area": 10**12}), "speck_area"),
        (lambda r: r.update(normalization={"method": "robust", "speck_area": 2.5}), "speck_area"),
        (lambda r: r.update(normalization={"method": "fixed", "low_values": [0], "high_values": [1, 2]}), "high_val"),
        (lambda r: r.update(normalization={"method": "fixed", "low_values": [math.inf], "high_values": [1]}), "low_"),
        (lambda r: r.update(training=[1, 2]), "training record"),
        (lambda r: r.update(training={"history": "none"}), "training record"),
    ],
)
def test_metadata_out_of_range_is_one_line(saved, tmp_path, edit, message):
    path = _rewrite(saved, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ModelFileError, match=message) as refused:
        load_model(path)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400 + len(str(path))


def test_recipes_the_engine_writes_are_accepted(saved, tmp_path, make_model):
    from napari_unet.normalization import BACKGROUND_RECIPE, DATASET_RECIPE, PERCENTILE_RECIPE, ROBUST_RECIPE

    fixed = {"method": "fixed", "from": "dataset", "low": 1.0, "high": 99.8, "low_values": [3], "high_values": [9.5]}
    for recipe in (DATASET_RECIPE, PERCENTILE_RECIPE, ROBUST_RECIPE, BACKGROUND_RECIPE, fixed, {"method": "none"}):
        path = _rewrite(saved, tmp_path / "ok.safetensors", lambda r, recipe=recipe: r.update(normalization=recipe))
        assert load_model(path)[1]["normalization"] == recipe
    rgb = save_model(make_model(in_channels=3), tmp_path / "rgb.safetensors")
    fixed3 = {**fixed, "low_values": [0, 1, 2], "high_values": [5, 6, 7]}
    assert load_model(_rewrite(rgb, tmp_path / "rgb3.safetensors", lambda r: r.update(normalization=fixed3)))
    with pytest.raises(ModelFileError, match="3 finite"):
        load_model(_rewrite(rgb, tmp_path / "rgb1.safetensors", lambda r: r.update(normalization=fixed)))


def test_a_model_whose_config_omits_defaults_loads_with_them(saved, tmp_path, make_model):
    path = _rewrite(saved, tmp_path / "short.safetensors", lambda r: [r["config"].pop(k) for k in ("dropout", "block")])
    model, metadata = load_model(path)
    assert model.config == make_model().config and metadata["config"]["block"] == "plain"


def test_a_file_from_before_temperature_scaling_loads_uncalibrated(tmp_path, make_model):
    """Format version 1 files written before ``temperature`` joined the config (and before the ``calibration``
    record) still load, at temperature 1: the key is optional, so no format version bump is needed to read them."""
    model = make_model()
    model.temperature = 2.0
    saved = save_model(model, tmp_path / "calibrated.safetensors", {"calibration": {"temperature": 2.0}})
    old = _rewrite(
        saved, tmp_path / "old.safetensors", lambda r: [r["config"].pop("temperature"), r.pop("calibration")]
    )
    loaded, metadata = load_model(old)
    assert loaded.temperature == 1.0 and "calibration" not in metadata
    assert load_model(saved)[0].temperature == 2.0
    x = torch.rand(1, 1, *loaded.legal_input_shape((8, 8)))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), load_model(saved)[0].eval()(x) * 2.0, atol=1e-5)


def test_a_tensor_table_unlike_the_config_is_refused_before_reading(saved, tmp_path):
    from safetensors.torch import save_file

    state, record = _tensors_and_record(saved)
    meta = {io.METADATA_KEY: json.dumps(record)}
    name = "head.weight"
    cases = {
        "extra": ({**state, "payload": torch.zeros(10)}, "unexpected.*payload"),
        "missing": ({k: v for k, v in state.items() if k != name}, f"missing.*{name}"),
        "dtype": ({**state, name: state[name].double()}, f"{name}: F64"),
        "shape": ({**state, name: state[name][:1]}, f"{name}: F32 \\[1,"),
    }
    for case, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{case}.safetensors"), metadata=meta)
        with pytest.raises(ModelFileError, match=f"weights do not match.*{message}"):
            load_model(tmp_path / f"{case}.safetensors")


def test_byte_ranges_must_tile_the_data(saved, tmp_path):
    data = saved.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    overlapping = json.loads(json.dumps(header))
    overlapping[second]["data_offsets"] = overlapping[first]["data_offsets"]
    for name, (bad, payload) in {
        "short": (header, body[:-4]),
        "long": (header, body + b"\0" * 4),
        "overlap": (overlapping, body),
    }.items():
        with pytest.raises(ModelFileError, match="not a valid safetensors model file"):
            load_model(_raw_file(tmp_path / f"{name}.safetensors", bad, payload))


def test_non_finite_weights_are_refused(tmp_path, make_model):
    for name, value in (("head.weight", math.nan), ("encoder.0.layers.0.norm.running_var", math.inf)):
        model = make_model()
        with torch.no_grad():
            model.state_dict()[name].view(-1)[0] = value
        path = save_model(model, tmp_path / "diverged.safetensors")
        with pytest.raises(ModelFileError, match=f"not finite .*{name}"):
            load_model(path)


@pytest.mark.parametrize(
    "header, length, message",
    [
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
        (b"{not json", None, "not JSON"),
        (b'{"a": "\xff\xfe"}', None, "not JSON"),
        (b"[1, 2]", None, "no safetensors header"),
        (b"{}", 2**62, "at most"),
        (b"{}", 1000, "a header of 1000 bytes in a file of"),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header, length, message):
    with pytest.raises(ModelFileError, match=message):
        load_model(_raw_file(tmp_path / "bad.safetensors", header, length=length))


def test_deeply_nested_metadata_record_is_refused(tmp_path):
    deep = '{"format": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _raw_file(tmp_path / "deep.safetensors", {"__metadata__": {io.METADATA_KEY: deep}})
    with pytest.raises(ModelFileError, match="corrupt napari-unet metadata: JSON nested too deeply"):
        load_model(path)


def test_a_claim_within_the_bounds_is_checked_against_the_bytes_there(tmp_path):
    # The paper's 2D U-Net: 31 million weights described in a few kB, none of them there.
    path = _claiming(tmp_path / "paper.safetensors", {"depth": 4, "base_filters": 64, "n_classes": 2})
    assert path.stat().st_size < 20_000
    with pytest.raises(ModelFileError, match="tensors need 124"):
        load_model(path)


_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from napari_unet.io import load_model, save_model
    from napari_unet.model import UNet
    # Warm up (imports, a real load) so that only the hostile files' cost is measured.
    load_model(save_model(UNet(depth=1, base_filters=2), sys.argv[1] + "/warm.safetensors"))
    results = {}
    for path in sys.argv[2:]:
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        try:
            load_model(path)
            outcome = "loaded"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # kB on Linux
        results[path] = [outcome, grown, time.perf_counter() - start]
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, /dev/zero and ru_maxrss in kB: Linux")
def test_hostile_files_cost_neither_memory_nor_time(tmp_path):
    """In a child process with a wall-clock bound: huge claims, a FIFO (no writer: a blocking open would hang), device
    files that never end, a folder. Each is one ModelFileError line and costs under 50 MB of peak memory and 5 s."""
    os.mkfifo(tmp_path / "fifo.safetensors")
    paths = [
        _claiming(tmp_path / "wide.safetensors", {"depth": 4, "base_filters": 1024, "n_classes": 2}),
        _claiming(tmp_path / "classes.safetensors", {"depth": 1, "base_filters": 2, "n_classes": 10**9}, False),
        _claiming(tmp_path / "deep.safetensors", {"depth": 8, "base_filters": 64, "ndim": 3}, False),
        _claiming(tmp_path / "paper.safetensors", {"depth": 4, "base_filters": 64, "n_classes": 2}),
        _raw_file(tmp_path / "long.safetensors", b"{}", length=2**63),
        tmp_path / "fifo.safetensors",
        Path("/dev/zero"),
        Path("/dev/urandom"),
        tmp_path,
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    assert len(results) == len(paths)
    for path, (outcome, grown_kb, seconds) in results.items():
        assert outcome.startswith("ModelFileError: ") and "\n" not in outcome, (path, outcome)
        assert grown_kb < 50_000, (path, outcome, grown_kb)
        assert seconds < 5.0, (path, outcome, seconds)
    assert "not a regular file" in results[str(tmp_path / "fifo.safetensors")][0]
    assert "not a regular file" in results["/dev/zero"][0]
    assert "folder" in results[str(tmp_path)][0]
    assert time.monotonic() - start < 120


def test_widget_load_keeps_the_current_model_whatever_goes_wrong(make_napari_viewer, tmp_path, make_model, monkeypatch):
    pytest.importorskip("pytestqt")
    from napari_unet.widgets import UNetWidget, unet_widget

    errors = []
    monkeypatch.setattr(unet_widget, "show_error", errors.append)
    widget = UNetWidget(make_napari_viewer())
    try:
        widget.load_model(save_model(make_model(), tmp_path / "good.safetensors"))
        current = widget.model
        os.mkfifo(tmp_path / "fifo.safetensors")
        (tmp_path / "text.safetensors").write_text("hello")
        for bad in ("fifo.safetensors", "text.safetensors", "missing.safetensors"):
            widget.load_model(tmp_path / bad)
        monkeypatch.setattr(io, "load_model", lambda path: (_ for _ in ()).throw(MemoryError("out of memory")))
        widget.load_model(tmp_path / "good.safetensors")  # an error that is no ModelFileError stays in the slot too
        assert widget.model is current
        assert len(errors) == 4 and all("cannot load" in e for e in errors)
        assert "out of memory" in errors[-1]
    finally:
        widget.shutdown()


@pytest.mark.skipif(sys.platform != "linux", reason="in-place truncation of a mapped file: SIGBUS on Linux")
def test_a_loaded_model_owns_its_weights(tmp_path):
    """Writing over the file in place after loading (``cp other.safetensors model.safetensors``) leaves the loaded
    model intact: its weights are not views of a memory map of the file (which would die of SIGBUS)."""
    script = textwrap.dedent(
        """
        import os, sys, torch
        from napari_unet.io import load_model, save_model
        from napari_unet.model import UNet
        path = save_model(UNet(depth=2, base_filters=8), sys.argv[1] + "/m.safetensors")
        model, _ = load_model(path)
        expected = float(sum(p.detach().double().sum() for p in model.parameters()))
        os.truncate(path, 16)
        with open(path, "r+b") as f:
            f.write(b"\\0" * 16)
        print(float(sum(p.detach().double().sum() for p in model.parameters())) == expected)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "True"
