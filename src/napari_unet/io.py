"""Model files and TIFF images.

Model files
    One self-describing ``.safetensors`` file: the tensors are the model's ``state_dict`` and
    the safetensors string metadata holds, under the key ``"napari_unet"``, a JSON record with
    the architecture ``config`` (``UNet(**config)`` rebuilds it), ``class_ids``,
    ``class_names``, ``normalization`` (a recipe for :mod:`napari_unet.normalization`), the
    ``training`` record, ``training_profile`` (the training images' profiles, :mod:`napari_unet.domain`;
    absent from older files), ``napari_unet_version``, ``format`` and ``format_version``.
    Loading never executes code from the file: safetensors holds raw tensor bytes only, and
    anything that is not a valid napari-unet safetensors file (a torch ``.pt`` pickle, a
    crafted pickle, a truncated or corrupt file) is refused with :class:`ModelFileError`.
    Writes are atomic (temporary file in the same folder, fsync, ``os.replace``), so a crash
    mid-save leaves the previous file intact; the temporary file is created exclusively under an unpredictable
    name, and the ones killed processes left are removed by the next write (:func:`atomic_write`).

TIFF images
    :func:`read_image` reads the first image series with tifffile (:func:`open_image`: the same
    image as a lazy array that reads only what is sliced) and describes its axes with
    the letters ``Z`` (stack: Z, time or an unnamed sequence), ``C`` (channels or RGB
    samples), ``Y`` and ``X``; when the file does not name its axes, a trailing axis of at most
    4 that is smaller than the others is taken as channels-last (``YXC``). The pixel size
    (``scale``, one value per spatial axis) comes, in this order, from OME ``PhysicalSize*``, ImageJ ``spacing``
    + resolution tags, the ``scale`` written by :func:`write_tiff`, or resolution tags in centimeters/millimeters/
    micrometers (converted to micrometers); otherwise it is 1.0 (unknown). Plain TIFF
    resolution in inches (usually a meaningless 72 dpi) is ignored.

    A file's axes can be wrong or ambiguous: ``tifffile.imwrite(path, stack)`` without metadata stores a stack of 3
    or 4 planes as the samples of one RGB(A) page, so it reads as channels (``CYX``). The ``axes`` argument of the
    readers (the command line's ``--axes``) overrides what the file says, one letter per axis
    (:func:`parse_axes`); the pixels and their order stay as stored.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import xml.etree.ElementTree as ET
from contextlib import contextmanager, suppress
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import numpy as np

FORMAT_NAME = "napari-unet"
FORMAT_VERSION = 1
METADATA_KEY = "napari_unet"


class ModelFileError(ValueError):
    """A model file is missing, unreadable, not a napari-unet safetensors file, or corrupt."""


class ImageFileError(ValueError):
    """An image file is missing, not a readable TIFF, empty, or has unsupported axes."""


# --------------------------------------------------------------------------------------
# atomic writes


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it in place.

    The temporary file is fsynced before ``os.replace``, so ``path`` holds either its previous
    content or the complete new file, never a partial one. On any error the temporary file
    is removed and the error propagates. The temporary file gets an unpredictable name and is created
    exclusively (never through a symbolic link someone planted) before ``write`` fills it; its name holds this
    host and process, so the first write of a process into a folder removes the temporary files that killed
    processes of this host left there (:func:`remove_stale_temporaries`; once per folder, so writing thousands of
    outputs into one folder lists it once). A device or pipe at ``path`` is never replaced by a file
    (``FileExistsError``; run as root, a save to ``/dev/full`` replaced the device node).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there yet (or unreadable: the write says why)
        mode = None
    if mode is not None and not S_ISREG(mode) and not S_ISDIR(mode):  # a folder: os.replace refuses it itself
        raise FileExistsError(errno.EEXIST, f"{path} is not a regular file (a device or a pipe): not replaced")
    tmp = temporary_file(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)
    return path


_TEMPORARY_SUFFIX = ".tmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_USER = os.getuid() if hasattr(os, "getuid") else 0  # Windows: no owners in st_uid (always 0)
_TEMPORARY = re.compile(
    r"\..+\." + re.escape(_HOST) + r"\.(?P<pid>[0-9]+)\.[0-9a-f]{16}" + re.escape(_TEMPORARY_SUFFIX)
)
_cleaned_folders: set[str] = set()
_cleaned_lock = threading.Lock()


def _temporary_prefix(path: Path) -> str:
    """``.<name>.<host>.<pid>.`` for this process's temporary files of ``path`` (the name shortened, so a long
    one stays within the file name limit)."""
    return f".{path.name[:120]}.{_HOST}.{os.getpid()}."


def _exclusive_temporary(path: Path) -> Path:
    """A new empty file next to ``path``, named ``.<name>.<host>.<pid>.<random>.tmp``: created with
    ``O_CREAT | O_EXCL`` (and ``O_NOFOLLOW``), so an existing file or symbolic link is never opened; the mode
    follows the umask, as an ``open`` would."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f"{_temporary_prefix(path)}{secrets.token_hex(8)}{_TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue  # taken (by chance, or planted): another name
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def temporary_file(path) -> Path:
    """A new empty file next to ``path`` (``.<name>.<host>.<pid>.<random>.tmp``, created exclusively, as
    :func:`atomic_write`'s are), for scratch data the caller deletes; if the process is killed first, the next
    process that writes into the folder removes it (:func:`remove_stale_temporaries`)."""
    path = Path(path)
    _remove_stale_once(path.parent)
    return _exclusive_temporary(path)


def _remove_stale_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    with _cleaned_lock:
        if key in _cleaned_folders:
            return
        _cleaned_folders.add(key)
    remove_stale_temporaries(folder)


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files (of :func:`atomic_write`, :func:`temporary_file`) that processes no longer alive
    on this host left in ``folder`` (a process killed mid-write); returns them.

    Only regular files of the current user whose name has exactly the form ``.<name>.<this host>.<pid>.<16
    hex>.tmp`` with ``pid`` not running are removed: another host's (a shared network folder), a live process's,
    someone else's, and any other file stay.
    """
    import psutil

    removed = []
    with suppress(OSError):
        with os.scandir(folder) as entries:
            found = [(entry, _TEMPORARY.fullmatch(entry.name)) for entry in entries if entry.name.startswith(".")]
        for entry, match in found:
            if match is None or int(match["pid"]) == os.getpid() or psutil.pid_exists(int(match["pid"])):
                continue
            with suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if S_ISREG(info.st_mode) and info.st_uid == _USER:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable on POSIX; not possible (nor needed) everywhere.
    with suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------
# model files


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serialisable")


def save_model(model, path, metadata=None) -> Path:
    """Save ``model`` (weights + architecture config + ``metadata``) atomically to ``path``.

    ``metadata`` may hold ``class_ids`` (the user's label ids, one per output class; default
    ``1..n_classes``), ``class_names``, ``normalization`` (default
    :data:`napari_unet.normalization.DEFAULT_RECIPE`), ``training`` and any other
    JSON-serialisable entries. Save the trainable model, not its ``inference_copy()``.
    Returns the path.
    """
    from safetensors.torch import save

    from . import __version__
    from .normalization import DEFAULT_RECIPE

    config = dict(model.config)
    n_classes = int(config["n_classes"])
    record = dict(metadata or {})
    record.setdefault("class_ids", list(range(1, n_classes + 1)))
    record.setdefault("class_names", [f"class {i}" for i in record["class_ids"]])
    record.setdefault("normalization", dict(DEFAULT_RECIPE))
    if len(record["class_ids"]) != n_classes:
        raise ValueError(f"class_ids {list(record['class_ids'])} must have one id per class ({n_classes})")
    record.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, napari_unet_version=__version__, config=config)
    header = {METADATA_KEY: json.dumps(record, default=_json_default)}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    data = save(tensors, metadata=header)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_model(path, device="cpu"):
    """Load a model saved by :func:`save_model`; returns ``(model, metadata)``.

    Everything in the file is checked before anything is allocated for it (:mod:`napari_unet.model_file_checks`:
    the path is a regular file, the header is bounded and well-formed, the metadata's architecture, class ids,
    names and normalization recipe are valid, the weights it implies are within bounds and are exactly the tensors
    the file holds); then the weights are read, must be finite, and become the model's (rebuilt from
    ``metadata["config"]``), moved to ``device`` (a name for :func:`napari_unet.devices.resolve_device` or a
    ``torch.device``) in eval mode. Every problem is a :class:`ModelFileError`: a missing file, a folder, a pipe or
    device, a file that is not a napari-unet safetensors file (pickles are never unpickled), a truncated or corrupt
    file, metadata out of range, weights that do not match the stored architecture or are not finite.
    """
    from safetensors import SafetensorError, safe_open

    from .devices import resolve_device
    from .model_file_checks import check_finite, check_tensor_table, checked_record, expected_model, read_header

    path = Path(path)
    header, data_size = read_header(path)
    record = checked_record(path, header)
    model = expected_model(path, record["config"])
    check_tensor_table(path, header, model, data_size)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # Copies: safetensors' tensors are views of a memory map of the file, which writing over the file in
            # place (``cp new.safetensors model.safetensors``) would pull from under the model.
            state = {name: f.get_tensor(name).clone() for name in f.keys()}
    except SafetensorError as e:
        raise ModelFileError(f"{path} is not a valid safetensors model file (corrupt or truncated?): {e}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}") from None
    check_finite(path, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # the meta tensors become the file's
    except RuntimeError as e:  # the file changed since its header was checked
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "mismatch"
        raise ModelFileError(f"{path}: weights do not match the stored architecture ({first_line})") from None
    return model.to(resolve_device(device)).eval(), record


# --------------------------------------------------------------------------------------
# TIFF images

_CHANNEL_LETTERS = "CS"
_IMAGEJ_ORDER = "TZCYXS"
_UNIT_TO_UM = {2: None, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit -> micrometers per unit (inch ignored)
AXES_LETTERS = "ZTCYX"
"""The letters an ``axes`` override may use: ``Z`` or ``T`` (a stack: slices, time points), ``C`` (channels), ``Y``,
``X``."""


def parse_axes(text: str) -> str:
    """An axes override as the readers take it (upper case), e.g. ``"zyx"`` -> ``"ZYX"``; ``ValueError`` saying what
    is wrong otherwise. One letter per axis of the image, from :data:`AXES_LETTERS`: at most one ``C``, at most one
    stack axis (``Z`` or ``T``), and ending with ``YX`` (or ``YXC``, channels last), e.g. ``ZYX``, ``CYX``, ``YXC``,
    ``ZCYX``, ``CZYX``, ``TYX``."""
    axes = str(text).strip().upper()
    if not axes or set(axes) - set(AXES_LETTERS):
        raise ValueError(f"axes {text!r}: use one letter per axis from Z (or T), C, Y, X, e.g. ZYX, CYX or YXC")
    if axes.count("C") > 1:
        raise ValueError(f"axes {text!r}: at most one C (channel axis)")
    if axes.count("Z") + axes.count("T") > 1:
        raise ValueError(f"axes {text!r}: at most one stack axis (Z or T)")
    if not axes.endswith(("YX", "YXC")) or axes.count("Y") != 1 or axes.count("X") != 1:
        raise ValueError(f"axes {text!r}: must end with YX, or YXC for channels last")
    return axes


def read_image(path, lazy=None, axes=None):
    """Read the first image series of a TIFF file; returns ``(array, info)``.

    ``array`` keeps the file's axis order. ``info`` is a dict with ``axes`` (letters from
    ``ZCYX``, e.g. ``"YX"``, ``"ZYX"``, ``"YXC"``, ``"ZCYX"``), ``channel_axis`` (index into
    ``array`` or None), ``scale`` (pixel size per spatial axis, in ``axes`` order without C;
    1.0 where unknown) and ``unit`` (e.g. ``"um"``, or None). Singleton axes are dropped.
    Raises :class:`ImageFileError` for a missing, unreadable or non-TIFF file, an empty image,
    or more than one stack axis (e.g. time and Z). With ``lazy``, a function of the image's size in bytes and its
    dtype: where it returns True, the pixels are not read and ``array`` is :func:`lazy_image`'s view instead.
    With ``axes`` (:func:`parse_axes`, one letter per axis of ``array``), the image's axes are those, whatever the
    file says; :class:`ImageFileError` when their number is not the image's. An OME-Zarr store (a ``.zarr``
    folder, ``ome_zarr_io.open_ome_zarr``) is read the same way: level 0 of its multiscale image, axes and pixel
    size from its metadata.
    """
    if _is_zarr(path):
        from .ome_zarr_io import open_ome_zarr

        array, info = open_ome_zarr(path, axes)
        if lazy is None or not lazy(math.prod(array.shape) * array.dtype.itemsize, array.dtype):
            return np.asarray(array), info
        return array, info
    with _open_series(path) as (tif, series):
        squeeze, info = _describe(path, tif, series, axes)
        if lazy is None or not lazy(math.prod(series.shape) * series.dtype.itemsize, series.dtype):
            return _decode(path, series.asarray)[squeeze], info
        return _lazy_view(path, tif, series)[0][squeeze], info  # readable after the file closes, as lazy_image's


@contextmanager
def open_image(path, axes=None):
    """:func:`read_image` without reading the pixels: yields ``(array, info)``, where ``array`` is a lazy
    read-only view of the file (a dask array): slicing it and converting the slice with ``np.asarray`` reads
    only what the slice covers. An uncompressed contiguous image is memory-mapped (any region is read
    directly, however the file is laid out in strips); otherwise the view goes through tifffile's zarr store
    (the strips/tiles the slice covers are decoded; one that cannot be decoded raises :class:`ImageFileError`).
    The file stays open inside the ``with`` block. Same ``axes``, ``info`` and errors as :func:`read_image`; an
    OME-Zarr store yields its level 0 as a dask array over its chunks.
    """
    array, info, close = _open_lazily(path, axes)
    try:
        yield array, info
    finally:
        close()


def lazy_image(path, axes=None):
    """:func:`open_image` for a napari layer: ``(array, info)`` with no ``with`` block. The lazy array stays
    readable for as long as it is referenced (tifffile reopens the file for a read after its handle closed)."""
    array, info, _ = _open_lazily(path, axes)
    return array, info


_LAZY_CHUNK_BYTES = 64 << 20


def _open_lazily(path, axes=None) -> tuple:
    """``(lazy array, info, close)`` for :func:`open_image` and :func:`lazy_image` (an OME-Zarr store: its level 0,
    nothing to close)."""
    if _is_zarr(path):
        from .ome_zarr_io import open_ome_zarr

        return (*open_ome_zarr(path, axes), lambda: None)
    with _open_series(path) as (tif, series):
        squeeze, info = _describe(path, tif, series, axes)
        array, close = _lazy_view(path, tif, series)
    return array[squeeze], info, close


def _is_zarr(path) -> bool:
    from .ome_zarr_io import is_zarr_path

    return is_zarr_path(path)


def _lazy_view(path, tif, series) -> tuple:
    """``(dask array over the series, close)`` for an open ``tif``: a memory map of an uncompressed contiguous
    series, else tifffile's zarr store (``close`` closes it)."""
    import dask.array as da

    if series.dataoffset is not None and series.keyframe.is_memmappable:
        dtype = series.dtype.newbyteorder(tif.byteorder)
        pixels = _decode(
            path, lambda: np.memmap(path, dtype=dtype, mode="r", offset=series.dataoffset, shape=series.shape)
        )
        chunks, close = _memmap_chunks(series.shape, dtype.itemsize), lambda: None
    else:
        import zarr

        store = _decode(path, lambda: series.aszarr(level=0))  # full resolution of a pyramid
        pixels = zarr.open(store, mode="r")
        chunks, close = pixels.chunks, store.close
    # Through a reader object: dask would copy a numpy array (a memory map too) into its graph.
    return da.from_array(_CheckedReader(pixels, path), chunks=chunks, lock=False), close


def _memmap_chunks(shape, itemsize: int) -> tuple[int, ...]:
    """Dask chunks of about ``_LAZY_CHUNK_BYTES`` or less over a memory map: whole trailing axes, split
    along the first axis that does not fit (planes of a stack, bands of rows of a large plane)."""
    chunks = list(shape)
    for axis in range(len(shape)):
        rest = math.prod(shape[axis + 1 :]) * itemsize
        if shape[axis] * rest <= _LAZY_CHUNK_BYTES:
            break
        chunks[axis] = max(1, _LAZY_CHUNK_BYTES // rest)
        if rest <= _LAZY_CHUNK_BYTES:
            break
    return tuple(chunks)


class _CheckedReader:
    """``source[key]`` with decoding errors as :class:`ImageFileError` (what dask reads an open image through)."""

    def __init__(self, source, path):
        self.source, self.path = source, path
        self.shape, self.dtype, self.ndim = source.shape, source.dtype, source.ndim

    def __getitem__(self, key):
        return _decode(self.path, lambda: self.source[key])

    def __dask_tokenize__(self):
        """The file and its version, so dask names the array without hashing (or pickling) its pixels."""
        stat = os.stat(self.path)
        return (str(Path(self.path).resolve()), stat.st_size, stat.st_mtime_ns, self.shape, str(self.dtype))


@contextmanager
def _open_series(path):
    """Yield ``(TiffFile, its first series)``; ImageFileError for a missing, non-TIFF or empty file."""
    import tifffile

    path = Path(path)
    if not path.exists():
        raise ImageFileError(f"image not found: {path}")
    if path.is_dir():
        raise ImageFileError(f"image path is a folder, not a file: {path}")
    tif = _decode(path, lambda: tifffile.TiffFile(path))
    with tif:
        all_series = _decode(path, lambda: tif.series)
        if not all_series:
            raise ImageFileError(f"{path} contains no image")
        series = all_series[0]
        if math.prod(series.shape) == 0:
            raise ImageFileError(f"{path} holds an empty image (shape {series.shape})")
        yield tif, series


def _decode(path, read):
    """``read()``, with the many kinds of errors tifffile/zarr raise on a corrupt ``path`` as
    :class:`ImageFileError`."""
    import tifffile

    try:
        return read()
    except ImageFileError:
        raise
    except tifffile.TiffFileError as e:
        raise ImageFileError(f"{path} is not a readable TIFF file: {e}") from None
    except OSError as e:
        raise ImageFileError(f"cannot read {path}: {e.strerror or e}") from None
    except MemoryError:
        raise
    except Exception as e:
        raise ImageFileError(f"{path} is not a readable TIFF file ({type(e).__name__}: {e})") from None


def _describe(path: Path, tif, series, given_axes=None) -> tuple[tuple, dict]:
    """The index that drops the series' singleton axes, and the ``info`` dict of :func:`read_image` (``given_axes``:
    its ``axes`` override)."""
    file_axes = series.axes
    scale, unit = _decode(path, lambda: _read_scale(tif, file_axes))
    shape = series.shape
    keep = [i for i, n in enumerate(shape) if n > 1 or file_axes[i] in "YX"]
    squeeze = tuple(slice(None) if i in keep else 0 for i in range(len(shape)))
    shape = [shape[i] for i in keep]
    file_axes = "".join(file_axes[i] for i in keep)
    if given_axes is not None:
        file_axes = _given_axes(path, given_axes, tuple(shape))
    elif "Q" in file_axes and len(shape) == 3 and shape[-1] <= 4 < min(shape[:2]):
        file_axes = "YXS"  # axes unknown: a small trailing axis is channels-last (e.g. RGB as minisblack)
    axes = _canonical_axes(path, file_axes)
    spatial = [file_axes[i] for i, a in enumerate(axes) if a != "C"]
    info = {
        "axes": axes,
        "channel_axis": axes.index("C") if "C" in axes else None,
        "scale": tuple(float(scale.get(a, 1.0)) for a in spatial),
        "unit": unit,
    }
    return squeeze, info


def _given_axes(path: Path, given: str, shape: tuple) -> str:
    """An ``axes`` override checked against the image's shape (singleton axes dropped), as ``_canonical_axes`` takes
    it; :class:`ImageFileError` otherwise."""
    try:
        axes = parse_axes(given)
    except ValueError as e:
        raise ImageFileError(f"{path}: {e}") from None
    if len(axes) != len(shape):
        raise ImageFileError(
            f"{path}: axes {axes} name {len(axes)} axes, the image has {len(shape)} (shape {shape}, "
            "axes of length 1 left out)"
        )
    return axes


def _canonical_axes(path: Path, file_axes: str) -> str:
    if not file_axes.endswith(("YX", "YXS")) or file_axes.count("Y") != 1 or file_axes.count("X") != 1:
        raise ImageFileError(f"{path}: unsupported axes {file_axes!r} (expected ...YX or ...YXS)")
    axes = "".join("C" if a in _CHANNEL_LETTERS else a if a in "YX" else "Z" for a in file_axes)
    if axes.count("C") > 1:
        raise ImageFileError(f"{path}: more than one channel axis (axes {file_axes!r}) is not supported")
    if axes.count("Z") > 1:
        raise ImageFileError(
            f"{path}: more than one stack axis (axes {file_axes!r}) is not supported; save one stack per file"
        )
    return axes


def _read_scale(tif, file_axes: str) -> tuple[dict, str | None]:
    """Pixel size per tifffile axis letter, and its unit (see the module docstring)."""
    if tif.is_ome and tif.ome_metadata:
        with suppress(ET.ParseError, ValueError):
            scale, unit = _ome_scale(tif.ome_metadata)
            if scale:
                return scale, unit
    page = tif.pages[0]
    x_res, y_res = page.resolution if page.resolution else (0, 0)
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        scale = {}
        if x_res and y_res and meta.get("unit"):
            scale.update(X=1.0 / x_res, Y=1.0 / y_res)
        if meta.get("spacing"):
            scale["Z"] = float(meta["spacing"])
        if scale:
            return scale, _unit_name(meta.get("unit"))
    if tif.is_shaped and tif.shaped_metadata:
        meta = tif.shaped_metadata[0]
        stored = meta.get("scale")
        if isinstance(stored, list) and len(stored) == len(meta.get("axes", "")):
            return {a: float(s) for a, s in zip(meta["axes"], stored) if a not in _CHANNEL_LETTERS}, meta.get("unit")
    factor = _UNIT_TO_UM.get(int(page.resolutionunit)) if x_res and y_res else None
    if factor:
        return {"X": factor / x_res, "Y": factor / y_res}, "um"
    return {}, None


def _unit_name(unit):
    if unit in ("micron", "microns", "\\u00B5m", "µm", "um"):
        return "um"
    return unit or None


def _ome_scale(xml: str) -> tuple[dict, str | None]:
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None:
        return {}, None
    scale = {a: float(pixels.get(f"PhysicalSize{a}")) for a in "XYZ" if pixels.get(f"PhysicalSize{a}")}
    return scale, _unit_name(pixels.get("PhysicalSizeXUnit", "µm"))


def write_tiff(path, array, *, scale=None, axes=None, compression="zlib", unit="um", record=None, output=None) -> Path:
    """Write ``array`` to a TIFF file atomically; returns the path.

    ``axes`` uses the letters ``TZCYX`` (default ``YX``, ``ZYX`` or ``CZYX`` by
    dimensionality). ``scale`` is the pixel size per non-channel axis, in ``unit``. ImageJ
    hyperstacks are written when the dtype (uint8, uint16, float32) and axis order allow it
    (Fiji then sees the axes and pixel size); otherwise a tifffile shaped TIFF that stores
    axes and scale in its description (read back by :func:`read_image`). ``record``, a
    JSON-serialisable dict (e.g. ``{"domain": ...}`` of ``napari-unet predict``), is stored
    as ``{"napari_unet": record}``: JSON text in the ImageJ ``Info`` property (Fiji: Image >
    Show Info), or a key of a shaped TIFF's description; :func:`read_tiff_record` reads it back.
    ``output``, the role of a file napari-unet computed (``"labels"``, ``"probabilities"``), marks it as
    napari-unet's output: the record then holds ``"output": output`` and the version
    (:func:`output_role` reads it), which is how ``napari-unet predict`` tells its own files, which it may
    replace, from the user's, which it never replaces unasked.
    """
    import tifffile

    from . import __version__

    if output is not None:
        record = {**(record or {}), OUTPUT_KEY: str(output), "napari_unet_version": __version__}
    array = np.asarray(array)
    axes = axes or {2: "YX", 3: "ZYX", 4: "CZYX"}.get(array.ndim)
    if axes is None or len(axes) != array.ndim:
        raise ValueError(f"axes {axes!r} do not match an array of shape {array.shape}")
    spatial = [a for a in axes if a != "C"]
    if scale is not None and len(scale) != len(spatial):
        raise ValueError(f"scale {tuple(scale)} needs one value per spatial axis {''.join(spatial)}")
    pixel = dict(zip(spatial, scale)) if scale is not None else {}
    kwargs = {"compression": compression, "photometric": "minisblack"}
    if pixel.get("X") and pixel.get("Y"):
        kwargs["resolution"] = (1.0 / pixel["X"], 1.0 / pixel["Y"])
    imagej_order = [_IMAGEJ_ORDER.index(a) for a in axes if a in _IMAGEJ_ORDER]
    if (
        array.dtype in (np.uint8, np.uint16, np.float32)
        and len(imagej_order) == len(axes)
        and imagej_order == sorted(imagej_order)
        and array.shape[-1] > 1  # tifffile's ImageJ writer takes a last axis of 1 for samples: an unreadable file
    ):
        metadata = {"axes": axes, "unit": unit}
        if pixel.get("Z"):
            metadata["spacing"] = float(pixel["Z"])
        if record is not None:
            metadata["Info"] = json.dumps({METADATA_KEY: record}, default=_json_default)
        kwargs.update(imagej=True, metadata=metadata)
    else:
        metadata = {"axes": axes, "unit": unit}
        if scale is not None:
            metadata["scale"] = [float(pixel[a]) if a in pixel else 1.0 for a in axes]
        if record is not None:
            metadata[METADATA_KEY] = json.loads(json.dumps(record, default=_json_default))
        kwargs.update(metadata=metadata, resolutionunit=None)
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, array, **kwargs))


def read_tiff_record(path) -> dict | None:
    """The ``record`` that :func:`write_tiff` stored in a TIFF file, or None (none stored, or not readable)."""
    with _open_series(path) as (tif, _):
        return _stored_record(tif)


def _stored_record(tif) -> dict | None:
    """:func:`read_tiff_record` of an open ``TiffFile``."""
    if tif.is_imagej:
        info = (tif.imagej_metadata or {}).get("Info")
        with suppress(TypeError, ValueError):
            stored = json.loads(info).get(METADATA_KEY) if isinstance(info, str) else None
            return stored if isinstance(stored, dict) else None
        return None
    if tif.is_shaped and tif.shaped_metadata:
        stored = tif.shaped_metadata[0].get(METADATA_KEY)
        return stored if isinstance(stored, dict) else None
    return None


def _role(record: dict | None) -> str | None:
    role = None if record is None else record.get(OUTPUT_KEY)
    return role if isinstance(role, str) else None


OUTPUT_KEY = "output"
"""The key of a TIFF record (:func:`read_tiff_record`) that marks a file as napari-unet's output."""


def complete_output_role(path) -> str | None:
    """:func:`output_role` of an output file whose pixel data is all there: as many pages as its image needs, each
    page's data within the file; None otherwise. A file cut short (a failed copy or sync, a full disk on another
    tool's side) still reads its marker from the first page; its later pages are missing or end past the file's
    end. Read from the pages' tags only (the file opened once): nothing is decoded."""
    try:
        if not Path(path).is_file():
            return None
        size = Path(path).stat().st_size
        with _open_series(path) as (tif, series), _tifffile_quiet():
            role = _role(_stored_record(tif))
            if role is None:
                return None
            pages = list(tif.pages)
            needed = math.prod(series.shape) // max(1, math.prod(pages[0].shape))
            ends = [o + c for page in pages for o, c in zip(page.dataoffsets, page.databytecounts)]
    except (ImageFileError, OSError, ValueError, IndexError):
        return None
    return role if len(pages) >= needed and ends and max(ends) <= size else None


@contextmanager
def _tifffile_quiet():
    """tifffile's log silenced: it logs each page it cannot reach, which is what is being checked here."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def output_role(path) -> str | None:
    """The role (``"labels"``, ``"probabilities"``) of a TIFF that napari-unet wrote as an output
    (``write_tiff(..., output=role)``), or None for any other file: the user's images and labels, a file
    that is not a readable TIFF, a folder, a FIFO or device (never opened: reading one could wait forever), a
    missing path."""
    try:
        if not Path(path).is_file():
            return None
        record = read_tiff_record(path)
    except (ImageFileError, OSError):
        return None
    return _role(record)
