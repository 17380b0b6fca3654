"""OME-Zarr images in and out: the format that volumes of hundreds of GB live in.

Reading (:func:`open_ome_zarr`): an OME-Zarr image, NGFF 0.4 (zarr v2: ``multiscales`` in the group's attributes)
or 0.5 (zarr v3: under ``ome``), opens as a lazy dask array over level 0 of its multiscale image (the first
``datasets`` entry, full resolution), chunked as stored, with ``info`` as ``io.read_image`` gives it for a TIFF:
the axes in napari-unet's letters (``t``/``z`` a stack axis ``Z``, ``c`` channels ``C``; axes of length 1 dropped),
the pixel size of each spatial axis from the level's (and the image's) ``scale`` transformations, and the space
axes' unit (``micrometer`` -> ``um``). Why own code for this: ``ome_zarr.reader`` walks the whole hierarchy (labels,
plates) and builds napari layer dicts; what is needed here is one level's array and three metadata fields, which
the zarr group's attributes hold as JSON.

Writing (:func:`create_output`): a prediction output is an OME-Zarr image with one level ``0`` (the metadata written
by ``ome_zarr.writer.write_multiscales_metadata``) created empty with chunks the caller chooses (the prediction
blocks: no two writers share a chunk) and filled block by block by whoever predicts them (``blockwise.py``); the
group's attributes carry the output marker (``napari_unet: {"output": role, ...}``, :func:`output_store_role`), as a
TIFF's metadata does (``io.output_role``), so napari-unet replaces only stores it wrote. :func:`write_pyramid` adds
levels halved in y and x (mean of the probabilities, every other pixel of the labels) for viewing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from .io import METADATA_KEY, OUTPUT_KEY, ImageFileError, _given_axes

ZARR_SUFFIX = ".zarr"
FORMATS = ("0.4", "0.5")
"""NGFF versions written: 0.4 (zarr v2, what most viewers read today) and 0.5 (zarr v3)."""
_UNITS = {"micrometer": "um", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m"}
_NGFF_UNITS = {short: long for long, short in _UNITS.items()} | {"µm": "micrometer", "micron": "micrometer"}


def is_zarr_path(path) -> bool:
    """Whether ``path`` names a zarr store (a folder ending in ``.zarr``, or one holding zarr metadata)."""
    path = Path(path)
    if path.name.lower().rstrip("/").endswith(ZARR_SUFFIX):
        return True
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zattrs", ".zgroup"))


def _open_group(path, mode: str = "r"):
    import zarr

    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as e:
        raise ImageFileError(f"{path} is not a readable OME-Zarr image ({type(e).__name__}: {e})") from None


def _multiscales(attributes: dict, path) -> dict:
    """The first multiscale image of a group's attributes (NGFF 0.4 at the top level, 0.5 under ``ome``)."""
    ome = attributes.get("ome") if isinstance(attributes.get("ome"), dict) else attributes
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise ImageFileError(f"{path} is a zarr store without OME-Zarr multiscales metadata")
    image = multiscales[0]
    if not image.get("datasets") or not isinstance(image.get("axes"), list):
        raise ImageFileError(f"{path}: its OME-Zarr metadata lists no datasets or axes (NGFF 0.4 or later needed)")
    return image


def _scale(transformations) -> list[float] | None:
    for transform in transformations or ():
        if isinstance(transform, dict) and transform.get("type") == "scale":
            return [float(s) for s in transform["scale"]]
    return None


def _letter(axis: dict) -> str:
    name = str(axis.get("name", "")).lower()
    kind = axis.get("type")
    if kind == "channel" or name == "c":
        return "C"
    if name in ("y", "x"):
        return name.upper()
    return "Z"  # z, t, or another space/time axis: a stack


def open_ome_zarr(path, axes=None) -> tuple:
    """``(lazy array, info)`` of level 0 of the OME-Zarr image at ``path`` (module docstring); ``axes``
    (``io.parse_axes``) overrides the metadata's. :class:`~napari_unet.io.ImageFileError` for a store that is not a
    readable OME-Zarr image, an empty image, or axes napari-unet cannot use (more than one stack or channel axis)."""

    path = Path(path)
    if not path.exists():
        raise ImageFileError(f"image not found: {path}")
    group = _open_group(path)
    try:
        return _level_zero(group, path, axes)
    except ImageFileError:
        raise
    except (AttributeError, TypeError, IndexError, KeyError, ValueError) as e:  # axes as strings, a short scale...
        raise ImageFileError(f"{path}: its OME-Zarr metadata is malformed ({type(e).__name__}: {e})") from None


def _level_zero(group, path: Path, axes) -> tuple:
    """:func:`open_ome_zarr` once the group is open (its metadata as NGFF describes it, or some exception)."""
    import dask.array as da
    import zarr

    image = _multiscales(dict(group.attrs), path)
    level = image["datasets"][0]
    try:
        array = group[level["path"]]
    except KeyError:
        raise ImageFileError(f"{path}: level {level.get('path')!r} listed in its metadata is missing") from None
    if not isinstance(array, zarr.Array) or len(image["axes"]) != array.ndim:
        raise ImageFileError(f"{path}: level 0 has {array.ndim} axes, its metadata names {len(image['axes'])}")
    if math.prod(array.shape) == 0:
        raise ImageFileError(f"{path} holds an empty image (shape {array.shape})")
    scale = _scale(level.get("coordinateTransformations")) or [1.0] * array.ndim
    overall = _scale(image.get("coordinateTransformations"))
    if overall is not None and len(overall) == len(scale):
        scale = [s * o for s, o in zip(scale, overall)]
    if len(scale) != array.ndim or not all(float(s) > 0 for s in scale):
        raise ImageFileError(f"{path}: its scale {scale} is not one positive number per axis ({array.ndim})")
    letters = [_letter(axis) for axis in image["axes"]]
    keep = [i for i, n in enumerate(array.shape) if n > 1 or letters[i] in "YX"]
    squeeze = tuple(slice(None) if i in keep else 0 for i in range(array.ndim))
    file_axes = "".join(letters[i] for i in keep)
    if axes is not None:
        file_axes = _given_axes(path, axes, tuple(array.shape[i] for i in keep))
    if not file_axes.endswith("YX") or file_axes.count("C") > 1 or file_axes.count("Z") > 1:
        raise ImageFileError(
            f"{path}: unsupported axes {file_axes!r} (one stack axis at most, one channel axis at most, ending YX)"
        )
    units = {_letter(a): a.get("unit") for a in image["axes"] if a.get("type") == "space" and a.get("unit")}
    unit = next(iter(units.values()), None)
    kept_scale = [scale[i] for i in keep]
    info = {
        "axes": file_axes,
        "channel_axis": file_axes.index("C") if "C" in file_axes else None,
        "scale": tuple(float(s) for s, a in zip(kept_scale, file_axes) if a != "C"),
        "unit": _UNITS.get(unit, unit) if isinstance(unit, str) else None,
    }
    lazy = da.from_zarr(array)[squeeze]
    return lazy, info


def ngff_unit(unit) -> str | None:
    """A unit as NGFF names it (``um`` -> ``micrometer``), or None for one it does not know."""
    if not isinstance(unit, str):
        return None
    unit = _NGFF_UNITS.get(unit, unit)
    return unit if unit in _UNITS else None


def output_store_role(path) -> str | None:
    """The role (``"labels"``, ``"probabilities"``) of a zarr store that napari-unet created as an output
    (:func:`create_output`), or None for anything else (a user's store, a file, a missing path)."""
    record = store_record(path)
    role = None if record is None else record.get(OUTPUT_KEY)
    return role if isinstance(role, str) else None


def store_record(path) -> dict | None:
    """The ``napari_unet`` record in a zarr group's attributes (the output marker and the run it belongs to), or
    None."""
    path = Path(path)
    if not path.is_dir():
        return None
    try:
        import zarr

        record = dict(zarr.open_group(str(path), mode="r").attrs).get(METADATA_KEY)
    except Exception:  # not a zarr group, or one zarr cannot read: not napari-unet's
        return None
    return record if isinstance(record, dict) else None


def create_output(
    path,
    *,
    role: str,
    shape: tuple[int, ...],
    axes: str,
    scale,
    unit,
    chunks: tuple[int, ...],
    dtype,
    record: dict | None = None,
    version: str = "0.4",
):
    """Create the OME-Zarr output store ``path`` (replacing what is there: the caller checked it may) with an empty
    level ``0`` of ``shape`` (axes in napari-unet letters, e.g. ``"CZYX"``), ``chunks`` and ``dtype``, the pixel size
    ``scale`` per non-channel axis in ``unit``, and the output marker of ``role`` with ``record`` in its attributes;
    returns the zarr array of level 0 (chunks not yet written read as 0)."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    from . import __version__

    if version not in FORMATS:
        raise ValueError(f"OME-Zarr version {version!r}: use one of {', '.join(FORMATS)}")
    fmt = FormatV04() if version == "0.4" else FormatV05()
    path = Path(path)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    names = _dimension_names(fmt, axes)
    level = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **names)
    write_multiscales_metadata(
        group,
        [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": _full_scale(axes, scale)}]}],
        fmt=fmt,
        axes=_ngff_axes(axes, unit),
        name=path.name,
    )
    marker = {**(record or {}), OUTPUT_KEY: role, "napari_unet_version": __version__}
    group.attrs[METADATA_KEY] = json.loads(json.dumps(marker))
    return level


def _dimension_names(fmt, axes: str) -> dict:
    return {"dimension_names": _names(axes)} if fmt.zarr_format == 3 else {}


def _names(axes: str) -> list[str]:
    return [{"C": "c", "Z": "z"}.get(a, a.lower()) for a in axes]


def _full_scale(axes: str, scale) -> list[float]:
    spatial = iter(scale)
    return [1.0 if a == "C" else float(next(spatial)) for a in axes]


def _ngff_axes(axes: str, unit) -> list[dict]:
    unit = ngff_unit(unit)
    result = []
    for name in _names(axes):
        axis = {"name": name, "type": "channel" if name == "c" else "space"}
        if name != "c" and unit is not None:
            axis["unit"] = unit
        result.append(axis)
    return result


def open_level(path, mode: str = "r+"):
    """Level 0 of an output store, for the writers of its blocks."""
    return _open_group(path, mode=mode)["0"]


def write_pyramid(path, levels: int, labels: bool) -> None:
    """Add ``levels`` levels to the OME-Zarr image at ``path``, each halving y and x of the one before (the mean of
    2x2 pixels; for ``labels`` every other pixel, so ids stay ids), and list them in its metadata."""
    import dask.array as da
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    attributes = dict(group.attrs)
    ome = attributes.get("ome", attributes)
    image = ome["multiscales"][0]
    base = image["datasets"][0]
    scale = _scale(base["coordinateTransformations"])
    ndim = group["0"].ndim
    datasets, previous = [base], da.from_zarr(group["0"])
    for index in range(1, levels + 1):
        if min(previous.shape[-2:]) < 2:
            break
        if labels:
            smaller = previous[..., ::2, ::2]
        else:
            factors = {ndim - 2: 2, ndim - 1: 2}
            trimmed = previous[..., : previous.shape[-2] // 2 * 2, : previous.shape[-1] // 2 * 2]
            smaller = da.coarsen(np.mean, trimmed, factors).astype(previous.dtype)
        chunks = tuple(min(c, n) for c, n in zip(group["0"].chunks, smaller.shape))
        target = group.create_array(str(index), shape=smaller.shape, chunks=chunks, dtype=smaller.dtype, overwrite=True)
        da.store(smaller.rechunk(chunks), target, lock=False)
        level_scale = [s * (2**index if axis >= ndim - 2 else 1) for axis, s in enumerate(scale)]
        datasets.append({"path": str(index), "coordinateTransformations": [{"type": "scale", "scale": level_scale}]})
        previous = da.from_zarr(target)
    image["datasets"] = datasets
    if "ome" in attributes:
        group.attrs["ome"] = ome
    else:
        group.attrs["multiscales"] = attributes["multiscales"]
