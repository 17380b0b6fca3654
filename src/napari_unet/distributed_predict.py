"""One volume predicted block by block into OME-Zarr stores, in this process or on a Dask distributed cluster.

:func:`predict_volume` settles what couples the blocks (``blockwise.volume_settings``: the whole volume's
normalization, the refinement radius), creates the two output stores (``<stem>_probabilities.zarr``: classes and
the spatial axes; ``<stem>_labels.zarr``; chunked by the block, so no two writers share a chunk), and has every
block that is not done yet predicted and written by :func:`run_block`: by this process in turn, or as one task
per block on the cluster of a ``distributed.Client`` (:func:`dask_client`: an existing scheduler, or a
``LocalCluster`` of worker processes). Dask does the scheduling, retries and replaces workers that die; nothing
here schedules.

- The model travels once per worker: its safetensors bytes are scattered to every worker (``broadcast=True``),
  loaded there by ``io.load_model`` (all its checks) and kept per worker process (``_MODELS``).
- The whole volume's normalization is counted on the cluster too: the histograms of its slabs of planes (and of
  their area openings for the robust recipe), in tasks of ``NORMALIZATION_TASK_PIXELS`` read by the workers from
  the image's source (:class:`ClusterSlabs`, :class:`SourceArray`); exact, so the parameters equal a
  single-process prediction's. A float volume's percentiles are selected by this process (streamed, several
  passes: ``normalization._selected_percentiles``).
- One precision for every block: "auto" becomes the precision every worker resolves it to, or float32 where they
  differ (:func:`cluster_precision`); the stores keep it, so a resumed run predicts the rest in it too.
- Every block's output chunks are written whole (idempotent: a task run twice writes the same bytes), then the
  block is marked done in a small array of the labels store (``napari_unet_blocks``, one chunk per block).
- Resumable: the stores' attributes hold the run (image, model digest, settings, block size) and the settings
  decided for the volume; running the same prediction again predicts only the blocks not marked done. A store
  that exists and is not napari-unet's (no output marker, ``ome_zarr_io.output_store_role``) is refused unless
  ``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .blockwise import BlockPlan, BlockSettings, plan_blocks, predict_block, volume_settings
from .normalization import chunk_shape

DONE_ARRAY = "napari_unet_blocks"
"""The array of the labels store that marks each block done (1) or not (0)."""
PROBABILITY_DTYPES = ("float32", "float16", "uint8")
"""How the probabilities may be stored: float32 as predicted; float16 or uint8 (``round(255 p)``) to save space."""
NORMALIZATION_TASK_PIXELS = 1 << 24
"""Pixels one normalization task of :class:`ClusterSlabs` counts (16 Mi, a 128³ block: a second or two of work,
so that even a volume of a few hundred million voxels spreads over the workers; a task holds one slab at a time)."""
SCHEDULER_TIMEOUT = 10.0
"""Seconds to wait for a scheduler given by address before giving up (:class:`SchedulerUnreachable`)."""


class OutputRefused(ValueError):
    """An output store exists and is not napari-unet's (or is one of the inputs): not replaced."""


class SchedulerUnreachable(ConnectionError):
    """The Dask scheduler at the given address did not answer within the timeout."""


@dataclass(frozen=True)
class ImageSource:
    """Where a worker reads the image from: a TIFF file or OME-Zarr store, its ``--axes`` override and the model's
    input channels (``cli.model_input`` arranges it, as for a single-process prediction)."""

    path: str
    axes: str | None
    in_channels: int

    def open(self):
        """The image as the model takes it (lazy: ``io.lazy_image``)."""
        from .cli import model_input
        from .io import lazy_image

        array, info = lazy_image(self.path, self.axes)
        return model_input(array, info, self.in_channels, self.path)[0]


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs for any block of one volume besides the model bytes (small: shipped per task)."""

    source: ImageSource
    settings: BlockSettings
    plan: BlockPlan
    probabilities: str
    labels: str
    class_ids: tuple[int, ...]
    probabilities_dtype: str
    model_digest: str
    torch_threads: int | None = None


_MODELS: dict[str, tuple] = {}
_IMAGES: dict[ImageSource, object] = {}


def _model(job: BlockJob, model_bytes: bytes):
    """The job's model, loaded once per process from its safetensors bytes (``io.load_model`` of a private
    temporary file, removed at once)."""
    if job.model_digest not in _MODELS:
        from .io import load_model

        fd, name = tempfile.mkstemp(suffix=".safetensors", prefix="napari-unet-model-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model_bytes)
            _MODELS[job.model_digest] = load_model(name)
        finally:
            os.unlink(name)
        if job.torch_threads:
            import torch

            torch.set_num_threads(job.torch_threads)
    return _MODELS[job.model_digest]


def _image(source: ImageSource):
    if source not in _IMAGES:
        _IMAGES[source] = source.open()
    return _IMAGES[source]


@dataclass(frozen=True)
class SourceArray:
    """The image of ``source`` as a lazy array that pickles as its source: read wherever it is indexed (the first
    read in a process opens the source, once: ``_image``)."""

    source: ImageSource
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None = None
    """The source's chunk shape (``normalization.chunk_shape``): the parts the normalization reads follow it."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key):
        return np.asarray(_image(self.source)[key])


def _counted_slabs(function, combine, values, bounds: list[tuple[slice, ...]]):
    """One normalization task: ``function`` of each of ``bounds``' parts, combined (``normalization.reduce_slabs``)."""
    import functools

    import dask

    with dask.config.set(scheduler="synchronous"):  # a lazy image read inside a task: never through the cluster
        return functools.reduce(combine, (function(values, b) for b in bounds))


class ClusterSlabs:
    """A ``normalization.reduce_slabs`` mapper that counts the parts on ``client``'s cluster: tasks of about
    ``NORMALIZATION_TASK_PIXELS`` pixels (consecutive parts: slabs, or blocks of whole chunks), combined here as they
    complete (retried by Dask where a worker dies)."""

    def __init__(self, client):
        self.client = client

    def __call__(self, function, combine, values, bounds: list[tuple[slice, ...]]):
        import math

        from distributed import as_completed

        shape = tuple(values.shape)
        first = math.prod(s.stop - s.start for s in bounds[0]) * math.prod(shape[len(bounds[0]) :])
        per_task = max(1, NORMALIZATION_TASK_PIXELS // max(1, first))
        groups = [bounds[i : i + per_task] for i in range(0, len(bounds), per_task)]
        futures = self.client.map(
            _counted_slabs, *zip(*[(function, combine, values, g) for g in groups]), pure=False, retries=2
        )
        result = None
        try:
            for future in as_completed(futures):
                part = future.result()
                result = part if result is None else combine(result, part)
        finally:
            self.client.cancel(futures)
        return result


def stored_probabilities(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in the stored dtype (:data:`PROBABILITY_DTYPES`)."""
    if dtype == "uint8":
        return np.round(probabilities * 255).astype(np.uint8)
    return probabilities.astype(dtype)


def run_block(job: BlockJob, model_bytes: bytes, index: tuple[int, ...]) -> tuple[int, ...]:
    """Predict block ``index`` of ``job``'s volume, write its probabilities and labels, mark it done; returns
    ``index``. Run twice, it writes the same chunks again (a retried task is harmless)."""
    import dask

    from .class_ids import segmentation_from_probabilities
    from .normalization import NormalizedView
    from .ome_zarr_io import open_level

    model, _ = _model(job, model_bytes)
    region = job.plan.region(index)
    with dask.config.set(scheduler="synchronous"):  # a lazy image read inside a task: never through the cluster
        normalized = NormalizedView(_image(job.source), job.settings.params)
        probabilities = predict_block(model, normalized, region, job.settings)
    labels = segmentation_from_probabilities(probabilities, job.class_ids)
    open_level(job.probabilities)[(slice(None), *region)] = stored_probabilities(probabilities, job.probabilities_dtype)
    open_level(job.labels)[region] = labels
    _done_array(job.labels)[index] = 1
    return index


def _done_array(labels_path, mode: str = "r+"):
    import zarr

    return zarr.open_group(str(labels_path), mode=mode)[DONE_ARRAY]


def model_digest(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()


@dataclass(frozen=True)
class VolumeResult:
    """What :func:`predict_volume` did: the two stores, the blocks predicted now and those done before."""

    probabilities: Path
    labels: Path
    predicted: int
    skipped: int


def predict_volume(
    model_path,
    source: ImageSource,
    image,
    info: dict,
    spatial_axes: str,
    outputs: tuple[Path, Path],
    prediction_settings,
    *,
    block=None,
    client=None,
    progress: Callable[[int, int], None] | None = None,
    probabilities_dtype: str = "float32",
    pyramid: int = 0,
    overwrite: bool = False,
    version: str = "0.4",
    torch_threads: int | None = None,
) -> VolumeResult:
    """Predict ``image`` (``source`` opened here: the model's input, lazy) with the model file ``model_path`` into
    the OME-Zarr stores ``outputs`` (probabilities, labels), block by block (module docstring).

    ``info`` (``io.read_image``'s: scale and unit) and ``spatial_axes`` (e.g. ``"ZYX"``) go into the stores'
    metadata; ``block``: output block size (``blockwise.plan_blocks``); ``client``: a ``distributed.Client`` whose
    cluster runs the blocks, None: this process; ``progress(done, total)`` counts blocks (those done before
    included); ``pyramid``: that many extra levels halved in y and x; ``version``: the NGFF version written.
    Raises :class:`OutputRefused` for an output store that is not napari-unet's (unless ``overwrite``).
    """
    from .io import load_model
    from .predict import model_class_ids

    if probabilities_dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"probabilities dtype {probabilities_dtype!r}: use one of {', '.join(PROBABILITY_DTYPES)}")
    model_bytes = Path(model_path).read_bytes()
    digest = model_digest(model_bytes)
    model, metadata = load_model(model_path)
    channels = model.in_channels > 1
    spatial = tuple(image.shape[1:] if channels else image.shape)
    plan = plan_blocks(model, spatial, block)
    run = _jsonable(
        {
            "image": str(Path(source.path).resolve()),
            "image_state": source_state(source.path),
            "shape": list(image.shape),
            "model_sha256": digest,
            "settings": {k: v for k, v in asdict(prediction_settings).items() if k != "device"},
            "block": list(plan.block),
            "probabilities_dtype": probabilities_dtype,
            "pyramid": pyramid,
            "version": version,
        }
    )
    probabilities_path, labels_path = (Path(p) for p in outputs)
    decided = _resumable(probabilities_path, labels_path, run, overwrite)
    if decided is None:
        import dask

        with dask.config.set(scheduler="threads"):  # read here, not through the cluster (a TIFF's view stays local)
            if client is None:
                decided = volume_settings(model, metadata, image, prediction_settings)
            else:  # the slabs counted by the workers, each reading the source
                lazy = SourceArray(source, tuple(image.shape), np.dtype(image.dtype), chunk_shape(image))
                decided = volume_settings(model, metadata, lazy, prediction_settings, ClusterSlabs(client))
        if decided.precision == "auto":  # one precision for every block, whichever process predicts it
            device = decided.device
            precision = here_precision(device) if client is None else cluster_precision(client, device, torch_threads)
            decided = dataclasses.replace(decided, precision=precision)
        record = {"run": run, "block_settings": _jsonable(asdict(decided))}
        _create_stores(
            model,
            metadata,
            plan,
            probabilities_path,
            labels_path,
            spatial_axes,
            info,
            record,
            probabilities_dtype,
            version,
        )
    job = BlockJob(
        source=source,
        settings=decided,
        plan=plan,
        probabilities=str(probabilities_path),
        labels=str(labels_path),
        class_ids=tuple(model_class_ids(model, metadata)),
        probabilities_dtype=probabilities_dtype,
        model_digest=digest,
        torch_threads=torch_threads,
    )
    done = np.asarray(_done_array(labels_path, "r")[...])
    missing = [index for index in plan.indices() if not done[index]]
    skipped = len(plan) - len(missing)
    if progress is not None:
        progress(skipped, len(plan))
    if client is None:
        _MODELS[digest] = (model, metadata)
        for count, index in enumerate(missing, skipped + 1):
            run_block(job, model_bytes, index)
            if progress is not None:
                progress(count, len(plan))
    else:
        _run_on_cluster(client, job, model_bytes, missing, skipped, len(plan), progress)
    if pyramid:
        from .ome_zarr_io import write_pyramid

        write_pyramid(probabilities_path, pyramid, labels=False)
        write_pyramid(labels_path, pyramid, labels=True)
    return VolumeResult(probabilities_path, labels_path, len(missing), skipped)


def here_precision(device: str, torch_threads: int | None = None) -> str:
    """The precision "auto" resolves to in this process for ``device`` (``devices.prediction_dtype``) with
    ``torch_threads`` torch threads (the blocks' count: a CPU's bfloat16 measurement is per thread count)."""
    import torch

    from .devices import prediction_dtype, resolve_device

    if torch_threads:
        torch.set_num_threads(torch_threads)
    dtype = prediction_dtype("auto", resolve_device(device))
    return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def cluster_precision(client, device: str, torch_threads: int | None = None) -> str:
    """The one precision that every block of a volume is predicted in on ``client``'s cluster when the settings
    say "auto": what each worker resolves it to (:func:`here_precision`), where they agree; float32 where they do
    not (a warning says so). Each worker would otherwise choose for its own CPU or GPU, and a volume would hold
    blocks of different roundings side by side (bfloat16 moved a probability by up to 0.2 near a boundary in
    docs/benchmarks.md's measurement), seams where two meet. A worker that joins later predicts in the same one."""
    answers = client.run(here_precision, device, torch_threads)
    chosen = sorted(set(answers.values()))
    if len(chosen) == 1:
        return chosen[0]
    by_choice = {c: sum(v == c for v in answers.values()) for c in chosen}
    warnings.warn(
        "the workers' precisions differ under precision auto ("
        + ", ".join(f"{n} worker(s) {c}" for c, n in by_choice.items())
        + "): every block is predicted in float32; name a precision (--precision) to choose another",
        stacklevel=3,
    )
    return "float32"


def _run_on_cluster(client, job: BlockJob, model_bytes: bytes, missing, skipped: int, total: int, progress) -> None:
    """One task per missing block on ``client``'s cluster; the model bytes scattered once to every worker."""
    from distributed import as_completed

    if not missing:
        return
    model_future = client.scatter(model_bytes, broadcast=True, hash=False)
    prefix = f"napari-unet-block-{job.model_digest[:8]}-{hashlib.sha256(repr(job).encode()).hexdigest()[:8]}"
    futures = [
        client.submit(run_block, job, model_future, index, key=f"{prefix}-{'-'.join(map(str, index))}", retries=2)
        for index in missing
    ]
    try:
        for count, future in enumerate(as_completed(futures), skipped + 1):
            future.result()
            if progress is not None:
                progress(count, total)
    finally:
        client.cancel(futures)
        client.cancel([model_future])


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))


def source_state(path) -> list[int]:
    """What changes when an input is written again: a file's size and modification time; a store's (a folder)
    file count, total size and newest modification time over its files. Part of a run's identity, so an image
    edited in place (same path, same shape) is predicted anew instead of resumed from the old blocks."""
    path = Path(path)
    if not path.is_dir():
        info = path.stat()
        return [info.st_size, info.st_mtime_ns]
    count = size = newest = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file gone meanwhile: the next run sees the store as it is then
                info = os.stat(os.path.join(folder, name))
                count, size, newest = count + 1, size + info.st_size, max(newest, info.st_mtime_ns)
    return [count, size, newest]


def _resumable(probabilities: Path, labels: Path, run: dict, overwrite: bool) -> BlockSettings | None:
    """The settings of an earlier run of the same prediction into these stores (resume it), or None (create them
    anew); :class:`OutputRefused` for a store there that is not napari-unet's output of that role."""
    from .ome_zarr_io import output_store_role, store_record

    records = []
    for path, role in ((probabilities, "probabilities"), (labels, "labels")):
        if path.exists() and output_store_role(path) != role and not overwrite:
            raise OutputRefused(
                f"{path} exists and is not a napari-unet {role} output: not replaced (--overwrite replaces it)"
            )
        records.append(store_record(path))
    if any(r is None or r.get("run") != run for r in records):
        return None
    try:
        _done_array(labels, "r")
        stored = records[1]["block_settings"]
        tile = stored.get("tile_shape")
        return BlockSettings(**{**stored, "tile_shape": None if tile is None else tuple(tile)})
    except (KeyError, TypeError):
        return None


def _create_stores(model, metadata, plan: BlockPlan, probabilities, labels, spatial_axes, info, record, dtype, version):
    """The two output stores, empty, chunked by the block, and the labels store's done array (all 0)."""
    import zarr

    from .class_ids import labels_dtype
    from .ome_zarr_io import create_output
    from .predict import model_class_ids

    scale, unit = (info["scale"], info["unit"]) if info.get("unit") else ((1.0,) * len(plan.shape), None)
    create_output(
        probabilities,
        role="probabilities",
        shape=(model.n_classes, *plan.shape),
        axes="C" + spatial_axes,
        scale=scale,
        unit=unit,
        chunks=(model.n_classes, *plan.block),
        dtype=dtype,
        record=record,
        version=version,
    )
    create_output(
        labels,
        role="labels",
        shape=plan.shape,
        axes=spatial_axes,
        scale=scale,
        unit=unit,
        chunks=plan.block,
        dtype=labels_dtype(model_class_ids(model, metadata)),
        record=record,
        version=version,
    )
    group = zarr.open_group(str(labels), mode="r+")
    group.create_array(DONE_ARRAY, shape=plan.counts, chunks=(1,) * len(plan.counts), dtype="uint8", fill_value=0)


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None, workers: int | None = None, *, timeout: float = SCHEDULER_TIMEOUT, log=print
):
    """A ``distributed.Client``: of the scheduler at ``scheduler`` (:class:`SchedulerUnreachable` when it does not
    answer within ``timeout`` seconds), or of a ``LocalCluster`` of ``workers`` processes on 127.0.0.1, one task at
    a time each, whose torch threads share this machine's cores (yielded as ``(client, threads)``; ``threads`` is
    None for an existing cluster). ``log`` gets the dashboard's address (or why there is none).

    The workers of the ``LocalCluster`` run without Dask's statistical profiler: it keeps the profiles of the last
    1,000 seconds in every worker, so a worker's memory would grow with the run's length (docs/benchmarks.md). For
    the dashboard's profile, start a cluster of your own (``--scheduler``)."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise SchedulerUnreachable(
                f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s ({type(e).__name__})"
            ) from None
        with client:
            try:  # a scheduler without workers would take the blocks and never run them
                client.wait_for_workers(1, timeout=timeout)
            except (OSError, TimeoutError):
                raise SchedulerUnreachable(
                    f"the Dask scheduler at {scheduler} has no workers (none joined within {timeout:g} s): start "
                    "some (dask worker ADDRESS), or use --workers N"
                ) from None
            log(
                f"Dask scheduler {scheduler}, {len(client.scheduler_info()['workers'])} worker(s); {_dashboard(client)}"
            )
            yield client, None
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with dask.config.set({"distributed.worker.profile.enabled": False}):  # the nannies keep it for their workers
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.CRITICAL,  # a failing block is reported once, by the command; not by each worker
        )
    with cluster, Client(cluster) as client:
        log(f"Dask LocalCluster: {workers} worker process(es), {threads} torch thread(s) each; {_dashboard(client)}")
        yield client, threads


def _dashboard(client) -> str:
    if "dashboard" not in client.scheduler_info().get("services", {}):
        return "no dashboard (install bokeh for one)"
    return f"dashboard {client.dashboard_link}"
