"""``napari-unet predict`` into OME-Zarr, block by block, optionally on a Dask cluster (``distributed_predict.py``).

The flags (:func:`add_arguments`): ``--out-format zarr`` (the default when ``--out`` ends in ``.zarr``, an input is
an OME-Zarr store, or ``--scheduler``/``--workers`` is given), ``--block``, ``--probabilities-dtype``,
``--pyramid``, ``--zarr-version``, ``--scheduler ADDRESS`` (an existing Dask scheduler) and ``--workers N`` (a
``LocalCluster`` of N processes here). Without ``--scheduler``/``--workers`` the blocks run in this process. Each
image writes ``<out>/<stem>_probabilities.zarr`` and ``<out>/<stem>_labels.zarr``; running the same command again
predicts only the blocks an interrupted run left (``--skip-existing`` semantics per block, always on).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import time
from pathlib import Path

ZARR_ROLES = ("probabilities", "labels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The OME-Zarr and Dask flags of ``predict``."""
    from .distributed_predict import PROBABILITY_DTYPES
    from .ome_zarr_io import FORMATS

    group = parser.add_argument_group("OME-Zarr output and Dask distributed prediction")
    group.add_argument(
        "--out-format",
        choices=("auto", "tif", "zarr"),
        default="auto",
        help="tif: one TIFF per output; zarr: OME-Zarr stores written block by block (resumable); auto (default): "
        "zarr when --out ends in .zarr, an input is OME-Zarr, or --scheduler/--workers is given, else tif",
    )
    group.add_argument(
        "--block",
        nargs="+",
        metavar="N",
        help="output block size of the zarr output (one work unit and one chunk): Y X, Z Y X, or one size for all "
        "axes, rounded up to the network's pooling grid (default 512 512 in 2D, 128 128 128 in 3D)",
    )
    group.add_argument(
        "--probabilities-dtype",
        choices=PROBABILITY_DTYPES,
        default="float32",
        help="how the zarr probabilities are stored: float32 as predicted, float16 or uint8 (255 = 1) to save space",
    )
    group.add_argument(
        "--pyramid",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="LEVELS",
        help="add LEVELS (default 3) levels halved in y and x to each zarr output, for viewing",
    )
    group.add_argument("--zarr-version", choices=FORMATS, default="0.4", help="NGFF version written (default 0.4)")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="run the blocks on the Dask scheduler at ADDRESS")
    where.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="start a Dask LocalCluster of N worker processes here (each with cores / N torch threads)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def wanted(args: argparse.Namespace, images: list[Path]) -> bool:
    """Whether ``predict`` writes OME-Zarr stores (``--out-format`` and its ``auto`` rule)."""
    from .ome_zarr_io import is_zarr_path

    distributed = args.scheduler is not None or args.workers is not None
    if args.out_format == "tif" and distributed:
        from .cli import CLIError

        raise CLIError("--scheduler and --workers write OME-Zarr outputs: leave out --out-format tif")
    if args.pyramid < 0:
        from .cli import CLIError

        raise CLIError(f"--pyramid must be at least 0 levels, got {args.pyramid}")
    if args.out_format != "auto":
        zarr = args.out_format == "zarr"
    else:
        zarr = distributed or str(args.out).lower().rstrip("/").endswith(".zarr") or any(map(is_zarr_path, images))
    given = [
        option
        for option, used in (
            ("--block", args.block is not None),
            ("--probabilities-dtype", args.probabilities_dtype != "float32"),
            ("--pyramid", args.pyramid != 0),
            ("--zarr-version", args.zarr_version != "0.4"),
        )
        if used
    ]
    if given and not zarr:
        from .cli import CLIError

        raise CLIError(
            f"{', '.join(given)}: for OME-Zarr outputs, and these are TIFFs: add --out-format zarr (or an --out "
            "ending in .zarr)"
        )
    return zarr


def output_store(out: Path, stem: str, role: str) -> Path:
    """Where the ``role`` output of the image ``stem`` goes in zarr mode."""
    return out / f"{stem}_{role}.zarr"


def block_sizes(tokens, images: list[Path]) -> tuple[tuple[int, ...] | None, list[Path]]:
    """``--block`` sizes, and the image paths its greedy ``nargs`` swallowed."""
    from .cli import CLIError

    if tokens is None:
        return None, images
    sizes = []
    for i, token in enumerate(tokens):
        if not token.isdigit():
            images = [*images, *(Path(t) for t in tokens[i:])]
            break
        sizes.append(int(token))
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise CLIError(f"--block needs 1 to 3 positive sizes, got {' '.join(map(str, sizes)) or 'none'}")
    return (sizes[0] if len(sizes) == 1 else tuple(sizes)), images


def run(args: argparse.Namespace, model_path: Path, jobs: list[tuple[Path, str]], settings, inputs) -> int:
    """Predict every ``(image, stem)`` of ``jobs`` into OME-Zarr stores in ``args.out`` (module docstring)."""
    from .cli import CLIError, _file_identity, _prepare_output_folder, model_input, progress_bar
    from .distributed_predict import ImageSource, OutputRefused, SchedulerUnreachable, dask_client, predict_volume
    from .io import ImageFileError, load_model, open_image

    block = args.block_sizes
    identities = {_file_identity(p): p for p in inputs}
    identities.pop(None, None)
    for image, stem in jobs:
        for role in ZARR_ROLES:
            same = identities.get(_file_identity(output_store(args.out, stem, role)))
            if same is not None:
                raise CLIError(f"the {role} of {image} would replace {same}, an input: choose another --out folder")
    model, _ = load_model(model_path)
    _prepare_output_folder(args.out)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def predict_all(client, threads) -> int:
        for path, stem in jobs:
            started = time.monotonic()
            stores = tuple(output_store(args.out, stem, role) for role in ZARR_ROLES)
            try:
                with open_image(path, args.axes) as (lazy, info):
                    image, spatial_axes = model_input(lazy, info, model.in_channels, path)
                    source = ImageSource(str(path), args.axes, model.in_channels)
                    with progress_bar(path.name, unit="blocks") as progress:
                        result = predict_volume(
                            model_path, source, image, info, spatial_axes, stores, settings,
                            block=block, client=client, progress=progress,
                            probabilities_dtype=args.probabilities_dtype, pyramid=args.pyramid,
                            overwrite=args.overwrite, version=args.zarr_version, torch_threads=threads,
                        )  # fmt: skip
            except (OutputRefused, ImageFileError) as e:
                raise CLIError(str(e)) from None
            except ValueError as e:
                raise CLIError(f"{path}: {e}") from None
            except OSError as e:  # a full disk, a quota, a read-only file system: what and where, in one line
                if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
                    raise
                raise CLIError(
                    f"{path}: cannot write its outputs in {args.out}: {e.strerror} (blocks already written stay: "
                    "the same command resumes)"
                ) from None
            except Exception as e:  # the cluster itself failed (scheduler lost, workers gone): what, and what to do
                if not type(e).__module__.startswith("distributed"):
                    raise
                raise CLIError(
                    f"{path}: the Dask cluster failed ({type(e).__name__}: {e}); blocks already written stay: the "
                    "same command resumes"
                ) from None
            done = f", {result.skipped} were done before" if result.skipped else ""
            print(
                f"{path} -> {result.labels}, {result.probabilities} ({result.predicted} blocks predicted{done}; "
                f"{time.monotonic() - started:.1f}s)",
                flush=True,
            )
        return 0

    with contextlib.ExitStack() as stack:
        client = threads = None
        if args.scheduler is not None or args.workers is not None:
            try:
                client, threads = stack.enter_context(dask_client(args.scheduler, args.workers, log=log))
            except SchedulerUnreachable as e:
                raise CLIError(str(e)) from None
        return predict_all(client, threads)
