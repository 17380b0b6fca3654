"""What :func:`napari_unet.io.load_model` checks in a model file before it allocates anything for it.

A model file may come from anywhere (a colleague, a download, a shared folder), so everything in it is checked
before it decides what gets allocated or run, and every problem is one :class:`~napari_unet.io.ModelFileError`:

- the path: a regular file (a FIFO, a device such as ``/dev/zero``, a socket or a folder is refused from its
  ``stat``, and the file is opened non-blocking, so nothing waits for a writer or reads without end);
- the safetensors framing: a header length of at most :data:`MAX_HEADER_BYTES` that lies inside the file, a JSON
  header (malformed, or nested deeper than Python's parser goes, is refused), and a tensor table whose byte ranges
  tile the data that follows it exactly; files of other formats (pickles, zip archives, HDF5) are named and
  refused without being parsed;
- the napari-unet record: format and version, every argument of the architecture ``config`` (:class:`UNet`'s
  signature: types and :data:`CONFIG_LIMITS`), ``class_ids`` (one per class, unique integers from 1 to
  :data:`MAX_CLASS_ID`), ``class_names``, the ``normalization`` recipe (``normalization.check_recipe``) and the
  ``training`` record's shape;
- the weights the config implies: their names, shapes and dtypes come from the network built on torch's ``meta``
  device (no memory), their number must stay under :data:`MAX_PARAMETERS` and their bytes under
  :data:`MEMORY_FRACTION` of the memory available, and the file's tensor table must list exactly those;
- once read, every floating-point tensor must be finite (no NaN or infinity: a diverged training's weights).

So a file of a few hundred bytes that claims ``base_filters=1024`` or ``n_classes=10**9`` costs a line of error,
never the gigabytes its claim would need.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import stat
from pathlib import Path

import torch

from .calibration import TEMPERATURE_RANGE
from .io import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, ModelFileError
from .model import BLOCKS, UNet
from .normalization import check_recipe

MAX_HEADER_BYTES = 16 << 20
"""Largest safetensors header read (tensor table + metadata record); napari-unet writes a few to a few hundred kB."""
MAX_PARAMETERS = 2**31
"""Most weights a model file may describe (a paper-sized 2D U-Net has 31 million)."""
MEMORY_FRACTION = 0.5
"""Share of the memory available now that a model's weights may take."""
MAX_CLASS_ID = 2**32 - 1
"""Largest painted class id (napari's uint32 labels)."""
MAX_CLASS_NAME = 1000
"""Longest class name, in characters."""
CONFIG_LIMITS = {
    "in_channels": (1, 4096),
    "n_classes": (1, 65536),
    "ndim": (2, 3),
    "depth": (1, 8),
    "base_filters": (1, 4096),
}
"""Inclusive ranges of the integer arguments of :class:`UNet` in a model file."""

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64"}
"""The safetensors names of the dtypes a napari-unet state dict holds."""
_DTYPE_BYTES = {"F32": 4, "I64": 8}
_FOREIGN_SIGNATURES = (
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth file?)"),
    *((b"\x80" + bytes([protocol]), "a Python pickle (a PyTorch .pt/.pth file?)") for protocol in range(2, 6)),
    (b"\x89HDF", "an HDF5 file (a Keras .h5 model?)"),
)


def _corrupt(path: Path, detail: str) -> ModelFileError:
    return ModelFileError(f"{path} is not a valid safetensors model file (corrupt or truncated?): {detail}")


def _not_regular(path: Path) -> ModelFileError:
    return ModelFileError(f"{path} is not a regular file (a pipe, device or socket): refused")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian) and then ``{``.

    That length can begin with any byte, 0x80 included, so a signature alone does not tell a pickle apart.
    """
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _json(text: str | bytes):
    """``json.loads`` whose failures (malformed text, bad UTF-8, nesting too deep to parse) are a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of the safetensors file ``path`` and the size of the data after it, read without following
    anything the header says; :class:`ModelFileError` for what is not a regular, well-framed safetensors file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"model path is a folder, not a file: {path}")
    if not stat.S_ISREG(mode):
        raise _not_regular(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)  # non-blocking: a FIFO swapped in after the stat does not wait for a writer
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):  # swapped in since the stat
            raise _not_regular(path)
        size = info.st_size
        try:
            head = f.read(9)
            for signature, kind in _FOREIGN_SIGNATURES:
                if head.startswith(signature) and not _looks_like_safetensors(head, size):
                    raise ModelFileError(
                        f"{path} is {kind}, not a napari-unet .safetensors model; refused without loading it "
                        "(pickle-based files can run code when loaded)"
                    )
            if len(head) < 9 or head[8:9] != b"{":
                raise _corrupt(path, "no safetensors header")
            length = int.from_bytes(head[:8], "little")
            if length > MAX_HEADER_BYTES:
                raise _corrupt(path, f"a header of {length} bytes (napari-unet reads at most {MAX_HEADER_BYTES})")
            if 8 + length > size:
                raise _corrupt(path, f"a header of {length} bytes in a file of {size}")
            text = head[8:] + f.read(length - 1)
        except OSError as e:
            raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from None
    try:
        header = _json(text)
    except ValueError as e:
        raise _corrupt(path, f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    return header, size - 8 - length


def checked_record(path: Path, header: dict) -> dict:
    """The napari-unet record of a safetensors ``header``, every entry checked (see the module docstring)."""
    metadata = header.get("__metadata__")
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        raise ModelFileError(f"{path} is a safetensors file without napari-unet metadata (not saved by napari-unet)")
    try:
        record = _json(raw) if isinstance(raw, str) else None
    except ValueError as e:
        raise ModelFileError(f"{path} has corrupt napari-unet metadata: {e}") from None
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict) or record.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} has no valid napari-unet metadata (missing format or config)")
    version = record.get("format_version")
    if not _is_int(version) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses model format version {_short(version)}; this napari-unet reads up to {FORMAT_VERSION} "
            "(upgrade napari-unet)"
        )
    try:
        record["config"] = config = _checked_config(config)
    except ValueError as e:
        raise ModelFileError(f"{path} describes an architecture this napari-unet cannot build: {e}") from None
    n_classes = config["n_classes"]
    class_ids = record.get("class_ids")
    dense = record.get("dense_labels", False)
    if not isinstance(dense, bool):
        raise ModelFileError(f"{path} has an invalid dense_labels {_short(dense)} (true or false)")
    lowest = 0 if dense else 1  # dense labels (a dataset's masks): 0 is a class
    if (
        not isinstance(class_ids, list)
        or len(class_ids) != n_classes
        or not all(_is_int(i) and lowest <= i <= MAX_CLASS_ID for i in class_ids)
        or len(set(class_ids)) != len(class_ids)
    ):
        raise ModelFileError(
            f"{path} has invalid class_ids {_short(class_ids)} for {n_classes} classes "
            f"(one unique id from {lowest} to {MAX_CLASS_ID} per class)"
        )
    names = record.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != n_classes
        or not all(isinstance(n, str) and len(n) <= MAX_CLASS_NAME for n in names)
    ):
        raise ModelFileError(f"{path} has invalid class_names {_short(names)} for {n_classes} classes")
    try:
        if record.get("normalization") is not None:
            check_recipe(record["normalization"], config["in_channels"])
    except ValueError as e:
        raise ModelFileError(f"{path} has an invalid normalization recipe: {e}") from None
    training = record.get("training")
    if training is not None and not (isinstance(training, dict) and isinstance(training.get("history", []), list)):
        raise ModelFileError(f"{path} has an invalid training record (not an object with a history list)")
    return record


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _checked_config(config: dict) -> dict:
    """The architecture ``config`` with :class:`UNet`'s defaults filled in; ValueError naming what is wrong."""
    try:
        bound = inspect.signature(UNet).bind(**config)
    except TypeError as e:
        raise ValueError(str(e)) from None
    bound.apply_defaults()
    config = dict(bound.arguments)
    for name, (low, high) in CONFIG_LIMITS.items():
        value = config[name]
        if not _is_int(value) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer from {low} to {high}, got {_short(value)}")
    if not isinstance(config["batch_norm"], bool):
        raise ValueError(f"batch_norm must be true or false, got {_short(config['batch_norm'])}")
    if not (_is_number(config["dropout"]) and 0.0 <= config["dropout"] < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {_short(config['dropout'])}")
    low, high = TEMPERATURE_RANGE
    if not (_is_number(config["temperature"]) and low <= config["temperature"] <= high):
        raise ValueError(f"temperature must be a number from {low:g} to {high:g}, got {_short(config['temperature'])}")
    if config["block"] not in BLOCKS:
        raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {_short(config['block'])}")
    return config


def expected_model(path: Path, config: dict) -> UNet:
    """The network ``config`` describes, built on the ``meta`` device (shapes only, no memory), once its weights
    are known to fit :data:`MAX_PARAMETERS` and :data:`MEMORY_FRACTION` of the memory available."""
    with torch.device("meta"):
        model = UNet(**config)
    tensors = model.state_dict().values()
    count = sum(t.numel() for t in tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if count > MAX_PARAMETERS:
        raise ModelFileError(
            f"{path} describes a network of {count:.3g} weights ({nbytes / 2**30:.3g} GiB); "
            f"napari-unet loads at most {MAX_PARAMETERS:.3g}"
        )
    available = _available_memory()
    if available is not None and nbytes > MEMORY_FRACTION * available:
        raise ModelFileError(
            f"{path} describes a network whose weights need {nbytes / 2**30:.3g} GiB, more than "
            f"{MEMORY_FRACTION:.0%} of the {available / 2**30:.3g} GiB of memory available"
        )
    return model


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # a platform psutil cannot read: the parameter bound alone
        return None


def check_tensor_table(path: Path, header: dict, model: UNet, data_size: int) -> None:
    """The header's tensors must be exactly ``model``'s state dict (names, dtypes, shapes) and their byte ranges
    must tile the ``data_size`` bytes after the header."""
    table = {name: entry for name, entry in header.items() if name != "__metadata__"}
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
    if missing or extra:
        parts = [f"missing {_short(missing)}"] if missing else []
        what = "; ".join(parts + ([f"unexpected {_short(extra)}"] if extra else []))
        raise ModelFileError(f"{path}: weights do not match the stored architecture ({what})")
    ranges = []
    for name, tensor in expected.items():
        entry = table[name]
        if not isinstance(entry, dict):
            raise _corrupt(path, f"tensor {name!r} is described by {_short(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        want = _SAFETENSORS_DTYPES[tensor.dtype]
        if shape != list(tensor.shape) or dtype != want:
            raise ModelFileError(
                f"{path}: weights do not match the stored architecture ({name}: {dtype} {_short(shape)} in the file, "
                f"{want} {list(tensor.shape)} for its config)"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise _corrupt(path, f"tensor {name!r} has data_offsets {_short(offsets)}")
        begin, end = offsets
        if end - begin != tensor.numel() * _DTYPE_BYTES[want]:
            raise _corrupt(path, f"tensor {name!r} spans {end - begin} bytes for its shape {list(tensor.shape)}")
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise _corrupt(path, f"its tensors' bytes overlap or leave a gap at byte {position}")
        position = end
    if position != data_size:
        raise _corrupt(path, f"its tensors need {position} bytes but the file holds {data_size}")


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """:class:`ModelFileError` naming the first floating-point tensor of ``state`` that holds a NaN or infinity."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if not all(bool(torch.isfinite(extreme)) for extreme in torch.aminmax(tensor)):  # NaN: both are NaN
            raise ModelFileError(
                f"{path}: weights are not finite (NaN or infinity in {name}); refused (saved from a training that "
                "diverged?)"
            )
