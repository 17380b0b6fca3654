"""Block-wise prediction of a synthetic OME-Zarr volume: in-process vs a Dask LocalCluster of 1 and 2 workers (not
named distributed.py: run as a script, that name would shadow the distributed package).

A random uint8 cube of ``--gib`` GiB (OME-Zarr, NGFF 0.4, chunks of the block; random bytes do not compress, so
that is also its size on disk) and a 3D model are written into ``--folder`` once and kept there for later runs
(``--delete-volume`` removes the volume at the end). ``--network tiny`` is depth 1 with 2 filters: the
distribution machinery is measured, not the network; ``default`` is what ``napari-unet train --ndim 3`` builds
(``TrainingSettings``: depth 3, 16 filters). Each mode of ``--modes`` (``in_process``, ``1``, ``2``: workers of a
``LocalCluster``) predicts the volume with ``distributed_predict.predict_volume`` into fresh stores (removed
afterwards), one pass (``test_time_flips=False``), no refinement.

Every mode runs in a fresh spawned process and every cluster starts fresh worker processes, because
``ru_maxrss`` is a lifetime peak: writing the volume or an earlier run must not count. Reported per mode: wall
time, setup (normalization pass over the whole volume and store creation, up to the first progress report),
seconds per block after it, the peak resident memory of the process that called ``predict_volume`` (for
``in_process`` it predicted the blocks) and of each worker process (``client.run``). ``--overhead`` times no-op
tasks on a fresh 2-worker cluster: the scheduling cost per task that a block pays on top of its prediction.
``--setup-only`` times the normalization pass alone (``blockwise.volume_settings``, what the setup is made of) in
each mode: in this process, or counted by the workers of a fresh cluster (``distributed_predict.ClusterSlabs``).
One JSON object per mode is printed and appended to ``--json``.

    python bench/distributed_blocks.py --folder F --gib 1 --modes in_process,1,2 [--network tiny|default]
        [--block 128] [--overhead] [--setup-only] [--json results.jsonl] [--delete-volume]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import time
from pathlib import Path

NETWORKS = {"tiny": {"depth": 1, "base_filters": 2}, "default": {}}
"""UNet arguments on top of ``TrainingSettings``' defaults (empty: the defaults)."""
NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8}
"""The models' recipe: percentiles, streamed as a histogram over a uint8 volume. Not the default robust recipe,
whose search for small bright components over a whole noise volume is what such a run would then measure."""


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_fresh_process(function, *args):
    """``function(*args)`` in a newly spawned process (its own ``ru_maxrss``)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def _write_volume(path: Path, side: int, block: int) -> None:
    import numpy as np
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("0", shape=(side,) * 3, chunks=(block,) * 3, dtype="uint8")
    rng = np.random.default_rng(0)
    for z in range(0, side, block):  # slab by slab: never the whole volume in memory
        array[z : z + block] = rng.integers(0, 256, (min(block, side - z), side, side), dtype=np.uint8)
    write_multiscales_metadata(
        group,
        [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
        fmt=FormatV04(),
        axes=["z", "y", "x"],
    )
    group.attrs["bench_complete"] = True


def _volume(folder: Path, gib: float, block: int) -> Path:
    """The cube of ``gib`` GiB in ``folder`` (written once, in a process of its own)."""
    import zarr

    side = round((gib * 1024**3) ** (1 / 3))
    path = folder / f"volume-{side}-{block}.zarr"
    if not (path.exists() and zarr.open_group(str(path), mode="r").attrs.get("bench_complete")):
        started = time.perf_counter()
        _in_fresh_process(_write_volume, path, side, block)
        print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def _model(folder: Path, network: str) -> Path:
    import torch

    from napari_unet.io import save_model
    from napari_unet.model import UNet
    from napari_unet.training_settings import TrainingSettings

    path = folder / f"{network}.safetensors"
    if not path.exists():
        defaults = TrainingSettings()
        config = {"depth": defaults.depth, "base_filters": defaults.base_filters, **NETWORKS[network]}
        torch.manual_seed(0)
        save_model(UNet(ndim=3, n_classes=2, **config), path, metadata={"normalization": NORMALIZATION})
    return path


def _predict(image_path: Path, model_path: Path, out: Path, block: int, workers: int | None, dtype: str) -> dict:
    """One prediction of the volume (in this process, or on a fresh LocalCluster of ``workers``)."""
    from napari_unet.distributed_predict import ImageSource, dask_client, predict_volume
    from napari_unet.io import open_image
    from napari_unet.predict import PredictionSettings

    settings = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    first = []

    def progress(done, total):
        if not first:
            first.append(time.perf_counter())

    def run(client=None, threads=None):
        started = time.perf_counter()
        with open_image(image_path) as (lazy, info):
            result = predict_volume(
                model_path, ImageSource(str(image_path), None, 1), lazy, info, "ZYX",
                (out / "p.zarr", out / "l.zarr"), settings, block=block, client=client, progress=progress,
                probabilities_dtype=dtype, torch_threads=threads,
            )  # fmt: skip
        ended = time.perf_counter()
        usage = {} if client is None else client.run(resource.getrusage, resource.RUSAGE_SELF)  # stdlib: no pickling
        workers_peak = sorted(u.ru_maxrss / 1024 for u in usage.values())  # of this module by reference
        setup = first[0] - started
        return {
            "seconds": round(ended - started, 1),
            "setup_seconds": round(setup, 1),
            "blocks": result.predicted,
            "seconds_per_block": round((ended - first[0]) / result.predicted, 3),
            "torch_threads": threads,
            "caller_peak_rss_mib": round(_peak_rss_mib()),
            "worker_peak_rss_mib": [round(p) for p in workers_peak],
        }

    try:
        if workers is None:
            import torch

            return {**run(), "torch_threads": torch.get_num_threads()}
        with dask_client(workers=workers, log=lambda line: None) as (client, threads):
            client.wait_for_workers(workers)
            return run(client, threads)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _setup(image_path: Path, model_path: Path, workers: int | None) -> dict:
    """The normalization pass over the volume (``volume_settings``) here or on a fresh cluster of ``workers``."""
    import numpy as np

    from napari_unet.blockwise import volume_settings
    from napari_unet.distributed_predict import ClusterSlabs, ImageSource, SourceArray, dask_client
    from napari_unet.io import load_model, open_image
    from napari_unet.normalization import chunk_shape
    from napari_unet.predict import PredictionSettings

    model, metadata = load_model(model_path)
    settings = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)
    with open_image(image_path) as (lazy, _):
        if workers is None:
            started = time.perf_counter()
            decided = volume_settings(model, metadata, lazy, settings)
            seconds = time.perf_counter() - started
            return {
                "setup_seconds": round(seconds, 1),
                "params": decided.params,
                "caller_peak_rss_mib": round(_peak_rss_mib()),
            }
        source = SourceArray(ImageSource(str(image_path), None, 1), lazy.shape, np.dtype(lazy.dtype), chunk_shape(lazy))
        with dask_client(workers=workers, log=lambda line: None) as (client, _):
            client.wait_for_workers(workers)
            started = time.perf_counter()
            decided = volume_settings(model, metadata, source, settings, ClusterSlabs(client))
            seconds = time.perf_counter() - started
            usage = client.run(resource.getrusage, resource.RUSAGE_SELF)
        return {
            "setup_seconds": round(seconds, 1),
            "params": decided.params,
            "caller_peak_rss_mib": round(_peak_rss_mib()),
            "worker_peak_rss_mib": sorted(round(u.ru_maxrss / 1024) for u in usage.values()),
        }


def _overhead(tasks: int) -> dict:
    """Milliseconds per no-op task on a fresh 2-worker LocalCluster (after a warm-up), one ``submit`` each, as
    ``distributed_predict`` submits its blocks."""
    from distributed import as_completed

    from napari_unet.distributed_predict import dask_client

    with dask_client(workers=2, log=lambda line: None) as (client, _):
        client.wait_for_workers(2)
        client.gather(client.map(abs, range(-50, 0), pure=False))  # abs: a no-op task
        started = time.perf_counter()
        futures = [client.submit(abs, i, key=f"noop-{i}") for i in range(tasks)]
        for future in as_completed(futures):
            future.result()
        seconds = time.perf_counter() - started
    return {"mode": "overhead", "tasks": tasks, "ms_per_task": round(seconds * 1000 / tasks, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="volume, model and outputs (the volume is kept)")
    parser.add_argument("--gib", type=float, default=4.0, help="volume size (uint8), GiB")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="tiny")
    parser.add_argument("--modes", default="in_process,1,2", help="comma-separated: in_process, 1, 2 (workers)")
    parser.add_argument("--probabilities-dtype", default="float32")
    parser.add_argument("--overhead", type=int, default=0, metavar="TASKS", help="also time TASKS no-op tasks")
    parser.add_argument("--json", type=Path, help="append each result here (one JSON object per line)")
    parser.add_argument("--delete-volume", action="store_true")
    parser.add_argument("--setup-only", action="store_true", help="time the normalization pass alone in each mode")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    image_path = _volume(args.folder, args.gib, args.block)
    model_path = _model(args.folder, args.network)
    import zarr

    shape = zarr.open_group(str(image_path), mode="r")["0"].shape
    common = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "shape": list(shape),
        "gib": round(math.prod(shape) / 1024**3, 3),
        "block": args.block,
        "network": args.network,
        "cpus": os.cpu_count(),
        "load_before": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    results = []
    for mode in args.modes.split(","):
        workers = None if mode == "in_process" else int(mode)
        out = args.folder / f"out-{mode}"
        if args.setup_only:
            result = {"setup_only": True, **_in_fresh_process(_setup, image_path, model_path, workers)}
        else:
            result = _in_fresh_process(
                _predict, image_path, model_path, out, args.block, workers, args.probabilities_dtype
            )
        results.append({**common, "mode": mode, **result, "load_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(results[-1]), flush=True)
    if args.overhead:
        results.append({**common, **_in_fresh_process(_overhead, args.overhead)})
        print(json.dumps(results[-1]), flush=True)
    if args.json is not None:
        with args.json.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    if args.delete_volume:
        shutil.rmtree(image_path)


if __name__ == "__main__":
    main()
