"""The ``napari-unet`` command line.

``napari-unet predict --model MODEL IMAGE [IMAGE ...] --out DIR [--tile Y X | Z Y X]
[--batch-size N] [--device auto|cpu|cuda|mps] [--no-test-time-flips] [--refine-radius PX|auto]`` segments TIFF
images with a saved model (an image that looks unlike the model's training images, ``domain.py``, gets a warning
line on stderr, ``napari-unet: warning: ...``, and both outputs hold the figures in their metadata);
``napari-unet train --images ... --labels ... --out MODEL`` trains one from sparse painted labels, and
``napari-unet train --dataset DIR --out MODEL`` from a folder of annotated images (``datasets.py``, epochs validated
and the best model kept: ``dataset_training.py``);
``napari-unet demo`` trains and predicts on the bundled sample images;
``napari-unet export-bioimageio --model MODEL --image IMG --out PACKAGE.zip`` writes a BioImage.IO model package.

Subcommands are registered in :data:`COMMANDS` (name -> :class:`Command`); :func:`build_parser`
builds the argparse parser from it. A command's ``run(args)`` returns the exit code and
reports user errors by raising :class:`CLIError` (or :class:`~napari_unet.io.ModelFileError`
/ :class:`~napari_unet.io.ImageFileError`): :func:`main` prints them as one line,
``napari-unet: error: ...``, and exits with 2; nothing ends in a traceback (set
``NAPARI_UNET_DEBUG=1`` to see one for unexpected errors, which exit with 1). Ctrl-C and SIGTERM end a command
with 130 and 143 (``finally`` blocks run: scratch and temporary files are removed); ``train`` then first stops
after the current iteration and saves the model trained so far.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .holdout import MIN_PIXELS as MIN_HELD_OUT
from .io import ImageFileError, ModelFileError
from .normalization import BACKGROUND_RECIPE, DATASET_RECIPE, PERCENTILE_RECIPE, ROBUST_RECIPE
from .precisions import PRECISIONS
from .predict import PredictionSettings, predict_image
from .refine import AUTO
from .training_settings import BLOCKS, CHECKPOINT_SECONDS

PROG = "napari-unet"


NORMALIZATIONS = {
    "robust": ROBUST_RECIPE,
    "background": BACKGROUND_RECIPE,
    "percentile": PERCENTILE_RECIPE,
    "dataset": DATASET_RECIPE,
}
"""``napari-unet train --normalization`` choices (``normalization.py``)."""


class CLIError(Exception):
    """A user error, reported as one line on stderr with exit code 2."""


class Command(NamedTuple):
    """A subcommand: its one-line help, how it adds its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@contextlib.contextmanager
def progress_bar(label: str, unit: str = "tiles", stream=None, delay: float = 1.0, log_interval: float = 10.0):
    """A ``tqdm`` progress bar on stderr, given to the block as the ``progress(done, total)`` callback that
    :func:`~napari_unet.predict.predict_image` takes; it ends when the total is reached or the block exits.

    Shown only once a run has lasted ``delay`` seconds (a quick run prints nothing). On a terminal it redraws one
    line; otherwise (a log file, a cluster job's output) it prints a line every ``log_interval`` seconds and at the
    end.
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    tty = bool(getattr(stream, "isatty", lambda: False)())
    bar = tqdm(
        desc=label,
        unit=unit,
        file=stream if tty else _LineEachRedraw(stream),
        delay=delay,
        mininterval=0.1 if tty else log_interval,
        leave=True,
    )

    def update(done: int, total: int) -> None:
        bar.total = total
        if done >= total:
            bar.n = done
            bar.close()  # its last state, if it was shown
        else:
            bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


class _LineEachRedraw:
    """A stream that is not a terminal, as tqdm's output: each redraw (tqdm starts one with a carriage return to
    overwrite the line) becomes a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.lstrip("\r").rstrip()
        if text.startswith("\r") and line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


# --------------------------------------------------------------------------------------
# predict


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PredictionSettings()
    parser.add_argument(
        "images",
        nargs="*",
        type=Path,
        metavar="IMAGE",
        help="TIFF images or OME-Zarr stores (2D, 3D stacks, with or without channels) or folders of them",
    )
    parser.add_argument(
        "--model", "-m", required=True, type=Path, help="model file (.safetensors) saved by napari-unet"
    )
    parser.add_argument(
        "--out", "-o", required=True, type=Path, metavar="DIR", help="output folder (created if missing)"
    )
    parser.add_argument(
        "--tile",
        nargs="+",
        metavar="N",
        help="output tile size: Y X for a 2D model, Z Y X for a 3D model (default: as large as memory allows)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        metavar="N",
        help="tiles per forward pass (default: from memory)",
    )
    _add_device_argument(parser, defaults.device)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="what the network computes in: auto (float16 on a CUDA GPU, bfloat16 on a CPU where it measured "
        "faster, else float32), float32, bfloat16 or float16; the probabilities are float32 in every case "
        f"(default {defaults.precision})",
    )
    parser.add_argument(
        "--tile-tuning",
        action=argparse.BooleanOptionalAction,
        default=defaults.tile_tuning,
        help="without --tile: on first use on this machine, time a few tile sizes for the model and use the "
        "fastest, kept per machine (default: on; --no-tile-tuning: the largest tiles the memory budget allows)",
    )
    parser.add_argument(
        "--test-time-flips",
        action=argparse.BooleanOptionalAction,
        default=defaults.test_time_flips,
        help="average the predictions of the 8 flips/transpositions of each image: a little more accurate, "
        f"8x the prediction time (default: {'on' if defaults.test_time_flips else 'off'}; --no-test-time-flips for "
        "one pass)",
    )
    parser.add_argument(
        "--refine-radius",
        type=_refine_radius,
        default=defaults.refine_radius,
        metavar="PX|auto",
        help="snap the probabilities to the image's edges with a guided filter of this window half-width in "
        "pixels; auto: the widest window that fits the predicted structures, 1 to 3 px "
        f"(default {defaults.refine_radius}; 0: the network's probabilities as they are)",
    )
    parser.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="predict only images I, I+N, I+2N... of the sorted list (I from 0 to N-1): one share of a batch per "
        "job of a cluster array, e.g. --shard $SLURM_ARRAY_TASK_ID/10 with --array=0-9",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip images whose two outputs napari-unet already wrote in the output folder (resume a batch)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files at the output paths that napari-unet did not write (refused by default; "
        "its own earlier outputs are always replaced; an input is never replaced)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="go on with the next image when one fails; list the failures at the end (exit 2)",
    )
    _add_axes_argument(parser, "every image")
    parser.add_argument(
        "--refine-eps",
        type=_positive_float,
        default=defaults.refine_eps,
        metavar="EPS",
        help="edges whose local intensity variance (normalized image) is well below EPS are smoothed over "
        f"(default {defaults.refine_eps})",
    )
    from .cli_volume import add_arguments

    add_arguments(parser)


def _add_axes_argument(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument(
        "--axes",
        type=_axes,
        metavar="AXES",
        help=f"the axes of {which}, one letter per axis, overriding what the file says: Z (or T) a stack, C channels, "
        "Y X; e.g. ZYX for a 4-slice stack that a TIFF without axis metadata calls channels (CYX), CYX, YXC, ZCYX "
        "(default: from the file; axes of length 1 left out)",
    )


def _axes(text: str) -> str:
    from .io import parse_axes

    try:
        return parse_axes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_device_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--device",
        default=default,
        help=f"auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: {default})",
    )


def _positive_int(text: str) -> int:
    return _bounded_number(text, int, "an integer", 1)


def _refine_radius(text: str) -> int | str:
    return AUTO if text == AUTO else _bounded_number(text, int, f"an integer or {AUTO!r}", 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _bounded_number(text, float, "a number", 0.0)
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, at least 0, got {value}")
    return value


def _bounded_number(text: str, kind, what: str, minimum):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _temperature(text: str) -> str | float:
    from .calibration import TEMPERATURE_RANGE

    if text in ("auto", "off"):
        return text
    value = _positive_float(text)
    if not TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"expected auto, off or a number from {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g}, got {text!r}"
        )
    return value


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def _expand_folders(paths: list[Path]) -> list[Path]:
    """Image paths, with each folder (not an OME-Zarr store) replaced by the TIFF files and OME-Zarr stores in it
    (sorted; not recursive) except napari-unet's own outputs (by the marker in their metadata, ``io.output_role``,
    ``ome_zarr_io.output_store_role``), so predicting into the folder of the images and running again does not
    predict the outputs of the first run."""
    from .io import output_role
    from .ome_zarr_io import is_zarr_path, output_store_role

    expanded = []
    for path in paths:
        if path.is_dir() and not is_zarr_path(path):
            tiffs = sorted(
                p
                for p in path.iterdir()
                if (p.is_file() and p.name.lower().endswith(_TIFF_SUFFIXES)) or (p.is_dir() and is_zarr_path(p))
            )
            found = [p for p in tiffs if output_role(p) is None and output_store_role(p) is None]
            if not found:
                outputs = f" (only {len(tiffs)} napari-unet output(s))" if tiffs else ""
                raise CLIError(f"no TIFF images in folder {path}{outputs}")
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded


def _split_tile_and_images(tile_tokens, images) -> tuple[tuple[int, ...] | None, list[Path]]:
    """``--tile`` is greedy: give back trailing non-numbers (image paths) it swallowed."""
    if tile_tokens is None:
        return None, list(images)
    sizes = []
    for i, token in enumerate(tile_tokens):
        if not token.lstrip("-").isdigit():
            images = [*images, *(Path(t) for t in tile_tokens[i:])]
            break
        sizes.append(int(token))
    if len(sizes) not in (2, 3) or min(sizes) < 1:
        raise CLIError(f"--tile needs 2 (Y X) or 3 (Z Y X) positive sizes, got {' '.join(map(str, sizes)) or 'none'}")
    return tuple(sizes), list(images)


_TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf")


def output_stem(path: Path) -> str:
    """File name without its TIFF or zarr suffix (``a.ome.tif`` -> ``a``, ``b.ome.zarr`` -> ``b``)."""
    name = path.name
    for suffix in (*_TIFF_SUFFIXES, ".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem


OUTPUT_ROLES = ("labels", "probabilities")
"""What ``predict`` writes of each image: ``<stem>_labels.tif`` and ``<stem>_probabilities.tif``."""


def output_path(out: Path, stem: str, role: str) -> Path:
    """Where ``predict`` writes the ``role`` output (one of :data:`OUTPUT_ROLES`) of the image ``stem``."""
    return out / f"{stem}_{role}.tif"


def _prepare_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"output folder {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"output folder {out} is not writable: {e.strerror or e}") from None
    _check_writable(out)


def _check_writable(folder: Path) -> None:
    """CLIError unless a file can be created in ``folder``: a probe file with an unpredictable name, created
    exclusively (``tempfile.mkstemp``: a file or symbolic link planted there is never opened), then removed."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".napari-unet-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"output folder {folder} is not writable: {e.strerror or e}") from None


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing file (the same for two paths of one file: links, ``..``, case), else
    None."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _check_outputs(jobs: list[tuple[Path, str]], out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Before any prediction: an output path that is one of ``inputs`` (the images, the model) is refused, always;
    an existing file there that napari-unet did not write (no output marker, ``io.output_role``) is refused
    unless ``overwrite``. Both say which file and why in one line."""
    from .io import output_role

    identities = {}
    for path in inputs:
        identities.setdefault(_file_identity(path), path)
    identities.pop(None, None)
    foreign = []
    for image, stem in jobs:
        for role in OUTPUT_ROLES:
            target = output_path(out, stem, role)
            same = identities.get(_file_identity(target))
            if same is not None:
                raise CLIError(
                    f"the {role} of {image} would replace {same}, an input: napari-unet never writes over an "
                    "input; choose another --out folder"
                )
            if not overwrite and target.exists() and output_role(target) is None:
                foreign.append(str(target))
    if len(foreign) == 1:
        raise CLIError(
            f"{foreign[0]} exists and is not a napari-unet output (another file, or one too damaged to read): not "
            "replaced (--overwrite replaces it)"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CLIError(
            f"{len(foreign)} files at the output paths are not napari-unet outputs (other files, or too damaged to "
            f"read): {shown}; not replaced (--overwrite replaces them)"
        )


def model_input(array, info: dict, in_channels: int, path) -> tuple:
    """Arrange an image from :func:`~napari_unet.io.read_image` or :func:`~napari_unet.io.open_image` for a model.

    Returns ``(array, spatial_axes)``: ``(*spatial)`` for a 1-channel model, ``(C, *spatial)``
    (channels first) otherwise. Without a channel axis in the file, a multi-channel model takes
    a leading or trailing axis of size ``in_channels`` as channels. Raises :class:`CLIError`
    when the image's channels do not match the model's; when another reading of its axes would match (a 4-slice
    stack that the file calls channels), the error names the ``--axes`` that gives it.
    """
    import numpy as np

    axes = info["axes"]
    channel_axis = info["channel_axis"]
    if channel_axis is None and in_channels > 1 and array.ndim >= 3:
        if array.shape[-1] == in_channels:
            channel_axis = array.ndim - 1
        elif array.shape[0] == in_channels:
            channel_axis = 0
        if channel_axis is not None:
            axes = axes[:channel_axis] + "C" + axes[channel_axis + 1 :]
    channels = 1 if channel_axis is None else array.shape[channel_axis]
    if channels != in_channels:
        raise CLIError(
            f"{path}: the model expects {in_channels} channel(s), the image has {channels} "
            f"(axes {info['axes']}, shape {tuple(array.shape)}){_axes_hint(info['axes'], array.shape, in_channels)}"
        )
    spatial_axes = axes.replace("C", "")
    if channel_axis is None:
        return array, spatial_axes
    array = np.moveaxis(array, channel_axis, 0)
    return (array if in_channels > 1 else array[0]), spatial_axes


_ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _other_axes(axes: str, shape, in_channels: int) -> list[str]:
    """The other readings of an image's ``axes`` (Y and X where they are, the other axes Z or C, at most one of
    each, C alone after X) under which it has ``in_channels`` channels: what ``--axes`` could say instead."""
    import itertools

    others = [i for i, a in enumerate(axes) if a not in "YX"]
    readings = []
    for roles in itertools.product("ZC", repeat=len(others)):
        letters = list(axes)
        for i, role in zip(others, roles):
            letters[i] = role
        reading = "".join(letters)
        if reading == axes or reading.count("Z") > 1 or reading.count("C") > 1 or reading.endswith("YXZ"):
            continue
        if (shape[reading.index("C")] if "C" in reading else 1) == in_channels:
            readings.append(reading)
    return readings


def _axes_hint(axes: str, shape, in_channels: int) -> str:
    """``"; if the first axis is Z, give --axes ZYX"`` for :func:`model_input`'s error, or ``""``."""
    hints = []
    for reading in _other_axes(axes, shape, in_channels):
        changed = [f"the {_ORDINALS[i]} axis is {a}" for i, (a, was) in enumerate(zip(reading, axes)) if a != was]
        hints.append(f"if {' and '.join(changed)}, give --axes {reading}")
    return f"; {'; '.join(hints)}" if hints else ""


def _run_predict(args: argparse.Namespace) -> int:
    from . import cli_volume

    tile, images = _split_tile_and_images(args.tile, args.images)
    args.block_sizes, images = cli_volume.block_sizes(args.block, images)
    if not images:
        raise CLIError("predict needs at least one IMAGE")
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        raise CLIError(f"image not found: {', '.join(missing)}")
    images = _expand_folders(images)
    stems = [output_stem(p) for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise CLIError(f"several images would write the same outputs: {', '.join(duplicates)}")
    jobs = list(zip(images, stems))
    if args.shard is not None:
        index, count = args.shard
        jobs = jobs[index::count]
    zarr_output = cli_volume.wanted(args, images)
    if args.skip_existing and not zarr_output:
        from .io import complete_output_role

        done = [
            (p, s) for p, s in jobs if all(complete_output_role(output_path(args.out, s, r)) == r for r in OUTPUT_ROLES)
        ]
        jobs = [job for job in jobs if job not in done]
        if done:
            print(f"skipping {len(done)} image(s) with outputs in {args.out}", file=sys.stderr, flush=True)
    if not zarr_output:
        _check_outputs(jobs, args.out, [*images, args.model], args.overwrite)

    from .devices import resolve_device
    from .io import load_model

    try:
        settings = PredictionSettings(
            device=args.device,
            tile_shape=tile,
            batch_size=args.batch_size,
            precision=args.precision,
            tile_tuning=args.tile_tuning,
            test_time_flips=args.test_time_flips,
            refine_radius=args.refine_radius,
            refine_eps=args.refine_eps,
        )
        if args.scheduler is None:  # the scheduler's workers resolve it themselves
            resolve_device(settings.device)  # a device this machine lacks: an error before any work
    except ValueError as e:
        raise CLIError(str(e)) from None
    model, metadata = load_model(args.model)
    config = metadata["config"]
    if tile is not None and len(tile) != config["ndim"]:
        raise CLIError(f"--tile needs {config['ndim']} sizes for this {config['ndim']}D model, got {len(tile)}")
    if zarr_output:  # block by block into OME-Zarr stores, here or on a Dask cluster
        return cli_volume.run(args, args.model, jobs, settings, [*images, args.model])
    _prepare_output_folder(args.out)

    failed = []
    for path, stem in jobs:
        started = time.monotonic()
        try:
            probabilities_path, labels_path, domain = _predict_file(
                model, metadata, path, args.out, stem, settings, args.axes
            )
        except (CLIError, ImageFileError) as e:
            if not args.keep_going:
                raise
            _fail(str(e), 2)
            failed.append(str(path))
            continue
        print(f"{path} -> {labels_path}, {probabilities_path} ({time.monotonic() - started:.1f}s)", flush=True)
        if domain is not None and domain.unlike:
            _warn(domain.message(stem))
    if failed:
        raise CLIError(f"{len(failed)} of {len(jobs)} image(s) failed: {', '.join(failed)}")
    return 0


def _predict_file(
    model, metadata: dict, path: Path, out: Path, stem: str, settings: PredictionSettings, axes: str | None = None
) -> tuple:
    """Predict one image file (``axes``: ``--axes``, or None for the file's) into ``out/<stem>_probabilities.tif``
    and ``out/<stem>_labels.tif``; returns both paths and the image's ``domain.DomainCheck`` (None for a model
    without a training profile)."""
    from .io import open_image

    with open_image(path, axes) as (lazy, info):  # tiles are read from the file as prediction needs them
        image, spatial_axes = model_input(lazy, info, model.in_channels, path)
        try:
            with progress_bar(path.name) as progress:
                return _predict_to_files(model, metadata, image, out, stem, spatial_axes, info, settings, progress)
        except ImageFileError:
            raise  # names the file already
        except ValueError as e:
            raise CLIError(f"{path}: {e}") from None


def _predict_to_files(
    model,
    metadata: dict,
    image,
    out: Path,
    stem: str,
    spatial_axes: str,
    info: dict,
    settings: PredictionSettings,
    progress,
) -> tuple:
    """Predict ``image`` (``predict.predict_image``), write ``out/<stem>_probabilities.tif`` and
    ``out/<stem>_labels.tif``; returns both paths and the outputs' ``domain`` check, whose figures both files hold
    in their metadata (``{"domain": DomainCheck.as_metadata()}``, ``io.read_tiff_record``) next to the output
    marker (``io.output_role``).

    The class probabilities (4 bytes per class and pixel, the largest array of a prediction) and the labels are
    predicted into hidden ``.npy`` memory maps next to the outputs instead of RAM, and the scratch files are deleted
    afterwards, also when prediction fails. They are ``io.temporary_file``'s: unpredictable names created exclusively
    (a symbolic link planted in the output folder is never followed) that hold this host and process, so those of
    a killed run are removed by the next one; their disk space is reserved before they are mapped
    (``arrays.reserve_space``), so a full disk is an error message and not a SIGBUS.
    """
    import numpy as np

    from .arrays import reserve_space
    from .io import temporary_file

    scratch = []

    def scratch_file(role: str, shape: tuple, dtype) -> np.ndarray:
        scratch.append(temporary_file(out / f"{stem}_{role}.npy"))
        array = np.lib.format.open_memmap(scratch[-1], mode="w+", dtype=dtype, shape=shape)
        try:
            with open(scratch[-1], "rb+") as f:
                reserve_space(f.fileno(), os.fstat(f.fileno()).st_size, out)
        except OSError as e:
            raise CLIError(f"{stem}: no room for its {role} while predicting: {e.strerror}") from None
        return array

    outputs = None
    try:
        outputs = predict_image(model, metadata, image, settings, out=scratch_file, progress=progress)
        domain = outputs.domain
        record = None if domain is None else {"domain": domain.as_metadata()}
        probabilities = output_path(out, stem, "probabilities")
        return (
            _write_output(probabilities, outputs.probabilities, "C" + spatial_axes, info, record, "probabilities"),
            _write_output(output_path(out, stem, "labels"), outputs.labels, spatial_axes, info, record, "labels"),
            domain,
        )
    finally:
        outputs = None  # unmapped before the files are deleted (Windows refuses to delete a mapped file)
        for path in scratch:
            with contextlib.suppress(OSError):  # still mapped through an error's traceback (Windows): it stays
                path.unlink(missing_ok=True)


def _write_output(target: Path, data, axes: str, info: dict, record: dict | None, role: str) -> Path:
    """Write one prediction output with the input's pixel size (when it has a unit), ``record`` and the output
    marker of ``role`` in its metadata; CLIError if impossible."""
    from .io import write_tiff

    try:
        if info["unit"]:
            return write_tiff(
                target, data, axes=axes, scale=info["scale"], unit=info["unit"], record=record, output=role
            )
        return write_tiff(target, data, axes=axes, record=record, output=role)
    except OSError as e:
        raise CLIError(f"cannot write {target}: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------
# train


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .training_settings import TrainingSettings

    defaults = TrainingSettings()

    parser.add_argument(
        "--images",
        nargs="+",
        type=Path,
        metavar="IMG",
        help="TIFF images (2D, 3D stacks or volumes; with channels, e.g. RGB, all alike)",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        type=Path,
        metavar="LAB",
        help="TIFF label images, one per image: 0 = unpainted, ids 1..K = classes (at least two painted)",
    )
    dataset = parser.add_argument_group(
        "training from an annotated dataset (instead of --images/--labels)",
        "dense masks: value k is class k (0 too), 255 is void; predictions come back with the masks' values",
    )
    dataset.add_argument(
        "--dataset",
        type=Path,
        metavar="DIR",
        help="a dataset folder: VOC layout (JPEGImages/ or images/, SegmentationClass/ palette PNGs, "
        "ImageSets/Segmentation/train.txt and val.txt) or images/ + masks/ (or labels/) with matching names "
        "(TIFF, PNG, JPEG; 2D or 3D); optional classes.txt, one class name per line in mask-value order",
    )
    dataset.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULT_EPOCHS,
        metavar="N",
        help=f"epochs (one: as many patches as cover the training images once; default {DEFAULT_EPOCHS}); each "
        "ends with a validation on the whole validation images, and --out holds the best model by mean IoU",
    )
    dataset.add_argument(
        "--patience",
        type=_positive_int,
        metavar="EPOCHS",
        help="stop after this many epochs without a better validation mean IoU (default: run every epoch)",
    )
    dataset.add_argument(
        "--val-fraction",
        type=_non_negative_float,
        default=0.1,
        metavar="F",
        help="without val.txt: this seeded share of the images validates (at least one; 0: none) (default 0.1)",
    )
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default="auto",
        metavar="auto|off|T",
        help="softmax temperature stored in the model (calibrated probabilities): auto fits it on the validation "
        "pixels of a --dataset, or on the --calibration-holdout share of the painted pixels, which training then does "
        "not use; off: none; a number from 0.05 to 20: that one (default auto)",
    )
    parser.add_argument(
        "--calibration-holdout",
        type=_non_negative_float,
        default=defaults.calibration_holdout,
        metavar="F",
        help="with --temperature auto and strokes: this share of the painted pixels (whole blocks of 32 px) is held "
        f"out of training to fit the temperature; 0: none (default {defaults.calibration_holdout})",
    )
    dataset.add_argument(
        "--resume",
        action="store_true",
        help="go on from the last checkpoint (MODEL.last.safetensors beside --out, written each epoch and each "
        "--checkpoint-every seconds; kept after the run, so --resume with more --epochs extends it)",
    )
    parser.add_argument(
        "--out",
        "-o",
        required=True,
        type=Path,
        metavar="MODEL",
        help="model file to write (.safetensors); it holds the latest checkpoint while training runs",
    )
    _add_axes_argument(parser, "every --images file")
    parser.add_argument(
        "--time-budget",
        type=_positive_float,
        metavar="SECONDS",
        help=f"training time (default {defaults.time_budget:g} s unless --iterations)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_non_negative_float,
        default=DEFAULT_CHECKPOINT_SECONDS,
        metavar="SECONDS",
        help="write the model trained so far to --out at this interval, atomically, so a killed run leaves a "
        f"loadable model (default {DEFAULT_CHECKPOINT_SECONDS:g}; 0: only at the end). Ctrl-C or SIGTERM stop "
        "training and save the model trained so far (exit code 130 or 143)",
    )
    parser.add_argument(
        "--iterations",
        type=_positive_int,
        metavar="N",
        help=f"training iterations (default {defaults.iterations}); training ends at whichever of "
        "--iterations/--time-budget comes first",
    )
    parser.add_argument(
        "--ndim", type=int, choices=(2, 3), default=defaults.ndim, help="2: 2D net (stacks slice by slice), 3: 3D net"
    )
    parser.add_argument("--depth", type=_positive_int, help=f"U-Net depth (poolings; default {defaults.depth})")
    parser.add_argument("--filters", type=_positive_int, help=f"base filters (default {defaults.base_filters})")
    parser.add_argument(
        "--patch-size",
        type=_positive_int,
        metavar="N",
        help=f"output tile size per axis (default {defaults.patch_size})",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, metavar="N", help=f"tiles per iteration (default {defaults.batch_size})"
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        metavar="LR",
        help=f"peak Adam learning rate (default {defaults.learning_rate:g})",
    )
    parser.add_argument(
        "--block",
        choices=BLOCKS,
        help="convolution blocks: plain (2 per level, the paper), residual, vgg (3 per level), vgg16 (the VGG16 "
        f"encoder: 2-2-3-3-3 convolutions at 1-2-4-8-8 x --filters, depth 4 at most) (default {defaults.block})",
    )
    parser.add_argument(
        "--encoder-weights",
        type=Path,
        metavar="FILE",
        help="start the encoder from a torchvision VGG16 state dict (torch.save(vgg16().state_dict(), FILE); read "
        "as tensors only, nothing downloaded); needs --block vgg16 --filters 64",
    )
    parser.add_argument(
        "--freeze-encoder",
        type=int,
        default=0,
        metavar="ITER",
        help="keep the encoder's weights fixed for the first ITER iterations: the decoder learns first (default 0)",
    )
    parser.add_argument("--border-weight", action="store_true", help="U-Net border weights between touching objects")
    parser.add_argument(
        "--consistency",
        type=_non_negative_float,
        default=defaults.consistency,
        metavar="WEIGHT",
        help="weight of the intensity-consistency term: from a tenth of the budget on, half of each batch are "
        "strong intensity variants (gamma, uneven illumination, debris) of the other half's tiles, pulled towards "
        "the tiles' predictions, so that images brighter, dimmer or less even than the painted ones segment alike; "
        "0: off (default %(default)g)",
    )
    parser.add_argument(
        "--init", type=Path, metavar="MODEL", help="fine-tune this saved model (keeps its classes and normalization)"
    )
    _add_device_argument(parser, defaults.device)
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"random seed (default {defaults.seed})")
    parser.add_argument("--float32", action="store_true", help="no mixed precision (default: float16 on CUDA)")
    parser.add_argument(
        "--cpu-bfloat16",
        action="store_true",
        help="bfloat16 on CPUs that run it natively: 1.5x faster, slightly less accurate on fine structures",
    )
    parser.add_argument(
        "--normalization",
        choices=list(NORMALIZATIONS),
        default=next(k for k, v in NORMALIZATIONS.items() if v == defaults.normalization),
        help="intensity scaling of each whole image: robust (1st-99.8th percentiles, bright specks and debris left "
        "out), background (robust after subtracting each image's smooth background: uneven illumination, haze), "
        "percentile (plain percentiles), dataset (one mapping fixed from the training images, for acquisitions "
        "known to be alike) (default: %(default)s)",
    )


def _read_training_pair(
    files: contextlib.ExitStack,
    image_path: Path,
    labels_path: Path,
    in_channels: int | None = None,
    axes: str | None = None,
) -> tuple:
    """``(image, labels)`` for training: the image (with ``axes``, ``--axes``, instead of the file's) channels first
    when it has several (as many as its channel axis holds, or ``in_channels`` when fine-tuning a model), the
    labels its spatial shape. The image is a lazy view of its file, open until ``files`` closes (the trainer reads
    of a stack only the slices with strokes, after a streaming pass for its percentiles); the labels are read. Labels
    of the image's whole shape when it has channels: the error names the ``--axes`` that makes them fit."""
    import numpy as np

    from .io import open_image, read_image
    from .training import integer_labels

    stored, info = files.enter_context(open_image(image_path, axes))
    if in_channels is None:
        in_channels = 1 if info["channel_axis"] is None else stored.shape[info["channel_axis"]]
    image, _ = model_input(stored, info, in_channels, image_path)
    spatial = image.shape[1:] if in_channels > 1 else image.shape
    labels, _ = read_image(labels_path)
    labels = np.squeeze(labels) if labels.ndim > len(spatial) else labels
    if labels.shape != spatial:
        hint = _axes_hint(info["axes"], stored.shape, 1) if labels.shape == stored.shape else ""
        raise CLIError(
            f"{labels_path}: labels shape {labels.shape} does not match image {image_path} "
            f"{'spatial ' if in_channels > 1 else ''}shape {spatial} (axes {info['axes']}){hint}"
        )
    try:
        return image, integer_labels(labels, str(labels_path))
    except ValueError as e:
        raise CLIError(str(e)) from None


def _run_train(args: argparse.Namespace) -> int:
    if args.dataset is not None:
        if args.images or args.labels:
            raise CLIError("give --dataset or --images/--labels, not both")
        return _run_train_dataset(args)
    if not args.images or not args.labels:
        raise CLIError("give --images and --labels (sparse strokes), or --dataset DIR (dense masks)")
    if args.resume:
        raise CLIError("--resume is for --dataset training; to go on from a model, use --init MODEL")
    if len(args.images) != len(args.labels):
        raise CLIError(
            f"got {len(args.images)} image(s) but {len(args.labels)} label file(s): give one labels file per image"
        )
    from .ome_zarr_io import is_zarr_path

    missing = [str(p) for p in [*args.images, *args.labels] if not (p.is_file() or (p.is_dir() and is_zarr_path(p)))]
    if missing:
        raise CLIError(f"file not found: {', '.join(missing)}")
    _check_model_path(args.out, [*args.images, *args.labels])
    from .io import load_model

    init = load_model(args.init) if args.init is not None else None  # its architecture wins over --depth/--filters
    in_channels = None if init is None else init[0].config["in_channels"]
    with contextlib.ExitStack() as files:
        return _train_and_save(
            args,
            [_read_training_pair(files, i, lab, in_channels, args.axes) for i, lab in zip(args.images, args.labels)],
            init,
        )


def _check_model_path(out: Path, inputs: list[Path]) -> None:
    """Before training: ``--out`` is not a folder nor another non-file, not one of ``inputs`` (the same file by
    any path), and its folder exists and takes a new file (probed), so no training is lost to an unwritable
    path."""
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder: give the model file's path, e.g. {out / 'model.safetensors'}")
    if out.exists() and not out.is_file():
        raise CLIError(f"--out {out} exists and is not a file")
    identity = _file_identity(out)
    same = next((p for p in inputs if identity is not None and _file_identity(p) == identity), None)
    if same is not None:
        raise CLIError(f"--out {out} is the input {same}: napari-unet never writes over an input")
    folder = out.parent
    if not folder.is_dir():
        raise CLIError(f"output folder {folder} does not exist")
    _check_writable(folder)


DEFAULT_CHECKPOINT_SECONDS = CHECKPOINT_SECONDS


def _load_encoder(trainer, args: argparse.Namespace, init) -> None:
    """``--encoder-weights`` into a new model (``encoders.load_vgg16``), said on stderr; ValueError as one line."""
    if args.encoder_weights is None:
        return
    if init is not None:
        raise ValueError("--encoder-weights starts a new model: not with --init or --resume")
    from .encoders import load_vgg16

    count = load_vgg16(trainer.model, args.encoder_weights)
    print(f"encoder: {count} convolutions from {args.encoder_weights}", file=sys.stderr, flush=True)


class _Checkpoints:
    """Writes the model trained so far to ``path`` (``Trainer.save``: atomic, so the file is always a whole model)
    each ``interval`` seconds of training (0: never); a failed write is a warning and training goes on."""

    def __init__(self, trainer, path: Path, interval: float):
        self.trainer, self.path, self.interval = trainer, path, interval
        self.last = time.monotonic()

    def maybe_save(self) -> None:
        if not self.interval or time.monotonic() - self.last < self.interval:
            return
        try:
            self.trainer.save(self.path)
        except OSError as e:
            _warn(f"checkpoint to {self.path} failed: {e.strerror or e}; training goes on")
        else:
            print(f"checkpoint at iteration {self.trainer.iteration}: {self.path}", file=sys.stderr, flush=True)
        self.last = time.monotonic()


def _training_settings(args: argparse.Namespace, **fields):
    """The ``TrainingSettings`` that ``train``'s arguments set (stroke and dataset training alike), with ``fields``
    (what differs between the two) on top; ``ValueError`` for a value out of range."""
    from .devices import available_cores
    from .training_settings import TrainingSettings

    architecture = {
        "depth": args.depth,
        "base_filters": args.filters,
        "patch_size": args.patch_size,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "block": args.block,
    }
    return TrainingSettings(
        ndim=args.ndim,
        border_weight=args.border_weight,
        consistency=args.consistency,
        freeze_encoder=args.freeze_encoder,
        device=args.device,
        seed=args.seed,
        amp=not args.float32,
        cpu_bfloat16=args.cpu_bfloat16,
        normalization=dict(NORMALIZATIONS[args.normalization]),
        cpu_threads=available_cores(),  # headless: no interface to keep responsive
        temperature=args.temperature,
        calibration_holdout=args.calibration_holdout,
        **{k: v for k, v in architecture.items() if v is not None},
        **fields,
    )


def _train_and_save(args: argparse.Namespace, pairs: list[tuple], init) -> int:
    from .io import save_model
    from .training import Trainer, TrainingSettings

    channels = {image.ndim - lab.ndim for image, lab in pairs}  # 1: channels first, 0: one channel
    if len(channels) > 1:
        raise CLIError("some images have several channels and some one: train on images alike")
    try:
        settings = _training_settings(
            args,
            iterations=args.iterations or TrainingSettings.iterations,
            time_budget=args.time_budget
            if args.time_budget is not None
            else (None if args.iterations else TrainingSettings.time_budget),
        )
        trainer = Trainer(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            settings,
            init=init,
            channel_axis=0 if channels == {1} else None,
        )
        _load_encoder(trainer, args, init)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(
        f"training a {settings.ndim}D U-Net on {len(pairs)} image(s) with {trainer.in_channels} channel(s), "
        f"classes {trainer.class_ids}, "
        f"tiles {trainer.input_shape} -> {trainer.output_shape}",
        file=sys.stderr,
        flush=True,
    )
    with _StopOnSignals(trainer) as stop:
        code = _train(trainer, _Checkpoints(trainer, args.out, args.checkpoint_every), stop)
        if trainer.iteration == 0 and code:
            print("interrupted before the first iteration: nothing saved", file=sys.stderr, flush=True)
            return code
        try:
            save_model(trainer.model, args.out, trainer.metadata)
        except OSError as e:
            raise CLIError(f"cannot write {args.out}: {e.strerror or e}") from None
    why = (
        f"fewer than {MIN_HELD_OUT} held-out painted pixels of two classes"
        if trainer.settings.calibration_holdout
        else "no strokes held out for it: --calibration-holdout 0.1 holds out a tenth"
    )
    _print_calibration(trainer, "held-out painted pixels", why)
    print(args.out, flush=True)
    return stop.code or code


def _print_calibration(trainer, held_out: str, none_because: str) -> None:
    """The training summary's calibration line: the temperature and the expected calibration error before and
    after it on the ``held_out`` pixels, or that none was fitted and why."""
    c = trainer.calibration
    if c is not None:
        print(
            f"calibration: temperature {c['temperature']:.3f} on {c['pixels']} {held_out}: expected "
            f"calibration error {c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> "
            f"{c['nll_after']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    elif trainer.settings.temperature == "auto" and trainer.iteration > 0:
        print(
            f"calibration: no temperature fitted ({none_because})",
            file=sys.stderr,
            flush=True,
        )


def _train(trainer, checkpoints: _Checkpoints, stop: _StopOnSignals, on_event=None) -> int:
    """Run ``trainer`` with a progress line each 5 s and checkpoints (and ``on_event(event)`` for every event);
    returns 0, or the exit code of the signal (Ctrl-C, SIGTERM) that ended it (the model trained so far is then the
    trainer's)."""
    events, last = trainer.run(), -float("inf")
    try:
        for event in events:
            if on_event is not None:
                on_event(event)
            if event.iteration == 1 and not event.done:
                record = trainer.run_record
                print(f"on {record['device']}, {record['precision']}", file=sys.stderr, flush=True)
            if event.done or event.elapsed - last >= 5:
                last = event.elapsed
                print(
                    f"iteration {event.iteration}  loss {event.loss:.4f}  {event.elapsed:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
            if event.done and event.reason == "not_finite":
                if event.iteration == 0:
                    raise CLIError(f"{event.message}: {checkpoints.path} not written")
                _warn(event.message)
            if not event.done:
                checkpoints.maybe_save()
    except KeyboardInterrupt as e:  # a second signal (or Ctrl-C where its handler could not be set)
        events.close()
        print(
            f"interrupted at iteration {trainer.iteration}: saving the model trained so far",
            file=sys.stderr,
            flush=True,
        )
        return getattr(e, "code", _INTERRUPT_CODE)
    except ValueError as e:  # a device that cannot be used
        raise CLIError(str(e)) from None
    if stop.code:
        print(
            f"stopped by {stop.name} at iteration {trainer.iteration}: saving the model trained so far",
            file=sys.stderr,
            flush=True,
        )
    return stop.code


DEFAULT_EPOCHS = 50


def last_checkpoint_path(out: Path) -> Path:
    """Where ``train --dataset`` keeps the last model (and what ``--resume`` needs) beside the best one, ``out``."""
    return out.with_name(f"{out.name.removesuffix('.safetensors')}.last.safetensors")


def _run_train_dataset(args: argparse.Namespace) -> int:
    """``train --dataset``: epochs over a dataset's training images, validated each epoch; --out holds the best
    model (written whenever an epoch beats the best so far, and at the end), ``last_checkpoint_path`` the last."""
    from .dataset_training import DatasetTrainer
    from .datasets import DatasetError, open_dataset
    from .io import load_model, save_model

    if args.iterations is not None:
        raise CLIError("--iterations is for --images/--labels training: a --dataset training counts --epochs")
    _check_model_path(args.out, [])
    last = last_checkpoint_path(args.out)
    try:
        dataset = open_dataset(args.dataset, val_fraction=args.val_fraction, seed=args.seed, spatial_ndim=args.ndim)
    except DatasetError as e:
        raise CLIError(str(e)) from None
    init, resume = (load_model(args.init) if args.init is not None else None), None
    if args.resume:
        if not last.is_file():
            raise CLIError(f"--resume: there is no checkpoint {last} to go on from")
        init = load_model(last)
        resume = init[1].get("dataset_training")
        if not isinstance(resume, dict):
            raise CLIError(f"--resume: {last} is not a checkpoint of a dataset training")
    try:
        settings = _training_settings(args, time_budget=args.time_budget)
        trainer = DatasetTrainer(
            dataset,
            settings,
            epochs=args.epochs,
            patience=args.patience,
            init=init,
            resume=resume,
        )
        _load_encoder(trainer, args, init)
    except (ValueError, DatasetError) as e:
        raise CLIError(str(e)) from None
    names = ", ".join(f"{v} {n}" for v, n in zip(dataset.class_values, dataset.class_names))
    print(
        f"training a {settings.ndim}D U-Net on {len(dataset.train)} image(s), validating on {len(dataset.val)} "
        f"({dataset.layout} layout, {dataset.channels} channel(s)); classes {names}; "
        f"{trainer.epoch_iterations} iterations per epoch, tiles {trainer.input_shape} -> {trainer.output_shape}",
        file=sys.stderr,
        flush=True,
    )

    def after_epoch(event) -> None:
        scores = event.validation
        if scores is None:
            return
        best = trainer.best_epoch == scores["epoch"]
        per_class = "  ".join(
            f"{name} IoU {_score(i)} Dice {_score(d)}"
            for name, i, d in zip(dataset.class_names, scores["iou"], scores["dice"])
        )
        print(
            f"epoch {scores['epoch']}/{args.epochs}  val loss {scores['val_loss']:.4f}  mean IoU "
            f"{scores['mean_iou']:.4f}{'  (best)' if best else ''}  {per_class}",
            file=sys.stderr,
            flush=True,
        )
        for path in [last, args.out] if best else [last]:
            try:
                trainer.save(path)
            except OSError as e:
                _warn(f"checkpoint to {path} failed: {e.strerror or e}; training goes on")

    start = trainer.iteration
    with _StopOnSignals(trainer) as stop:
        code = _train(trainer, _Checkpoints(trainer, last, args.checkpoint_every), stop, on_event=after_epoch)
        if trainer.iteration == start and code:
            print("interrupted before the first iteration: nothing saved", file=sys.stderr, flush=True)
            return code
        try:
            if trainer.found_best or not dataset.val or trainer.best_epoch is None:
                save_model(trainer.model, args.out, trainer.metadata)
            else:
                print(
                    f"no epoch of this run beat epoch {trainer.best_epoch} (mean IoU {trainer.best_mean_iou:.4f}): "
                    f"{args.out} keeps that model",
                    file=sys.stderr,
                    flush=True,
                )
        except OSError as e:
            raise CLIError(f"cannot write {args.out}: {e.strerror or e}") from None
    if trainer.best_epoch is not None:
        print(
            f"best epoch {trainer.best_epoch}: validation mean IoU {trainer.best_mean_iou:.4f}",
            file=sys.stderr,
            flush=True,
        )
    _print_calibration(trainer, "validation pixels", "no validation images")
    print(args.out, flush=True)
    return stop.code or code


def _score(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------------------
# signals

_INTERRUPT_CODE = 128 + signal.SIGINT
"""The exit code of a command that Ctrl-C ended (130), as shells report a process that SIGINT ended."""


class Interrupted(KeyboardInterrupt):
    """A signal that ends a command: Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption, ``timeout``, ``kill``).
    ``code`` is the exit code, ``128 + signal number`` (130, 143), as shells report a process the signal ended."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


@contextlib.contextmanager
def _handling(handler, signals: tuple[int, ...]):
    """``handler`` for ``signals`` inside the block, the previous handlers restored after it. Only in the main
    thread (the only one Python runs handlers in), and never for a signal the parent process set to be ignored
    (``nohup``, a shell's background job): that choice stands."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


class _StopOnSignals:
    """For the duration of a training: the first Ctrl-C or SIGTERM asks the trainer to stop after its current
    iteration (``Trainer.request_stop``; the model it leaves is then saved and the command exits with ``code``,
    130 or 143), a second one raises :class:`Interrupted` at once."""

    def __init__(self, trainer):
        self.trainer, self.code, self.name = trainer, 0, None
        self._handling = _handling(self._handle, (signal.SIGINT, signal.SIGTERM))

    def _handle(self, signum, frame) -> None:
        if self.code:
            raise Interrupted(signum)
        self.code, self.name = 128 + signum, signal.Signals(signum).name
        self.trainer.request_stop()

    def __enter__(self) -> _StopOnSignals:
        self._handling.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._handling.__exit__(*exc_info)


# --------------------------------------------------------------------------------------
# demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .training_settings import TrainingSettings

    defaults = TrainingSettings()

    parser.add_argument(
        "--time-budget",
        type=float,
        default=defaults.time_budget,
        metavar="SECONDS",
        help=f"training time (default {defaults.time_budget:g})",
    )
    parser.add_argument(
        "--out",
        "-o",
        type=Path,
        default=Path("napari-unet-demo"),
        metavar="DIR",
        help="output folder (default ./napari-unet-demo)",
    )
    _add_device_argument(parser, defaults.device)
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"random seed (default {defaults.seed})")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _prepare_output_folder(args.out)
    if not 0 < args.time_budget < float("inf"):  # also NaN
        raise CLIError(f"--time-budget must be a finite number greater than 0, got {args.time_budget:g}")
    try:
        run_demo(args.time_budget, args.out, device=args.device, seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return 0


# --------------------------------------------------------------------------------------
# export


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, type=Path, metavar="MODEL", help="saved model (.safetensors)")
    parser.add_argument(
        "--image",
        required=True,
        type=Path,
        metavar="IMG",
        help="an image like those the model is for: a crop of it becomes the package's test input",
    )
    parser.add_argument("--out", "-o", required=True, type=Path, metavar="ZIP", help="package to write (.zip)")
    _add_axes_argument(parser, "--image")
    parser.add_argument("--name", default="napari-unet model", help="model name (default: napari-unet model)")
    parser.add_argument("--description", help="one-line description (default: network, classes)")
    parser.add_argument("--author", action="append", metavar="NAME", help="author name (repeat for several)")
    parser.add_argument("--license", default="CC-BY-4.0", help="SPDX license id of the weights (default CC-BY-4.0)")


def _run_export(args: argparse.Namespace) -> int:
    from .io import load_model, open_image

    if args.out.suffix.lower() != ".zip":
        raise CLIError(f"--out must name a .zip file, got {args.out}")
    if not args.image.is_file():
        raise CLIError(f"file not found: {args.image}")
    try:
        from .bioimageio_export import export_bioimageio
    except ImportError:
        raise CLIError('exporting needs bioimageio.spec: pip install "bioimageio.spec>=0.5.12"') from None
    model, metadata = load_model(args.model)
    with open_image(args.image, args.axes) as (lazy, info):  # the export reads only the slice its test crop comes from
        image, _ = model_input(lazy, info, model.config["in_channels"], args.image)
        try:
            export_bioimageio(
                model,
                metadata,
                image,
                args.out,
                name=args.name,
                description=args.description,
                authors=args.author or ["napari-unet user"],
                license=args.license,
            )
        except ValueError as e:
            raise CLIError(str(e).splitlines()[0]) from None
        except OSError as e:
            raise CLIError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(args.out, flush=True)
    return 0


COMMANDS: dict[str, Command] = {
    "predict": Command(
        help="segment TIFF images with a saved model",
        add_arguments=_add_predict_arguments,
        run=_run_predict,
    ),
    "train": Command(
        help="train a U-Net from sparse painted labels, or from an annotated dataset folder (--dataset)",
        add_arguments=_add_train_arguments,
        run=_run_train,
    ),
    "demo": Command(
        help="train on the bundled nuclei strokes, predict the other sample images, print Dice",
        add_arguments=_add_demo_arguments,
        run=_run_demo,
    ),
    "export-bioimageio": Command(
        help="write a saved model as a BioImage.IO model package (zip) for other tools",
        add_arguments=_add_export_arguments,
        run=_run_export,
    ),
}


# --------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per entry of :data:`COMMANDS`."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Valid-padding U-Net segmentation: the napari-unet engine without napari."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def _warn(message: str) -> None:
    """One warning line on stderr (the exit code does not change)."""
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """napari-unet's own warnings (``memory.OutOfMemoryRetry``: a prediction redone with smaller tiles) as one
    :func:`_warn` line; the others as Python shows them."""
    from .memory import OutOfMemoryRetry

    if issubclass(category, OutOfMemoryRetry):
        _warn(str(message))
    else:
        _default(message, category, filename, lineno, file, line)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # corrupt files: our one-line error says it
    warnings.showwarning = _show_warning  # each distinct warning once (Python's default filter), on one line
    try:
        with _handling(_raise_interrupted, (signal.SIGTERM,)):  # like Ctrl-C: `finally` blocks clean up
            return COMMANDS[args.command].run(args)
    except KeyboardInterrupt as e:
        return _fail(f"interrupted ({e.args[0] if e.args else 'SIGINT'})", getattr(e, "code", _INTERRUPT_CODE))
    except (CLIError, ModelFileError, ImageFileError) as e:
        return _fail(str(e), 2)
    except Exception as e:
        if os.environ.get("NAPARI_UNET_DEBUG"):
            raise
        return _fail(f"unexpected {type(e).__name__}: {e} (set NAPARI_UNET_DEBUG=1 for a traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
