"""Block-wise prediction of a synthetic OME-Zarr volume: in-process vs a Dask LocalCluster of 1 and 2 workers (not
named distributed.py: run as a script, that name would shadow the distributed package).

Writes a random uint8 ``Z x Y x X`` volume (``--gib`` of it on disk, chunks of the block) as OME-Zarr and a 3D
model (``--network tiny``: depth 2, 4 filters; ``default``: the CLI's default architecture) into ``--folder`` (a
temporary one by default), then predicts it with ``distributed_predict.predict_volume`` into fresh stores each
time: in this process, on ``LocalCluster(n_workers=1)`` and ``n_workers=2``. Reported per run: wall time (the
normalization pass and store creation included), blocks, and the peak resident memory of each worker process
(``ru_maxrss``; for the in-process run, this process's). ``--overhead`` also times a thousand no-op tasks on the
2-worker cluster: the scheduling overhead per task that each block pays on top of its prediction. One pass
(``--no-test-time-flips``), no refinement: the network and the scheduling are what is measured.

    python bench/distributed_blocks.py [--gib 4] [--block 128] [--network tiny|default] [--overhead]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _volume(folder: Path, gib: float, block: int) -> tuple[Path, tuple[int, ...]]:
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    side = round((gib * 1024**3) ** (1 / 3))
    shape = (side, side, side)
    path = folder / "volume.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("0", shape=shape, chunks=(block,) * 3, dtype="uint8")
    rng = np.random.default_rng(0)
    for z in range(0, side, block):  # slab by slab: never the whole volume in memory
        array[z : z + block] = rng.integers(0, 256, (min(block, side - z), side, side), dtype=np.uint8)
    write_multiscales_metadata(
        group,
        [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
        fmt=FormatV04(),
        axes=["z", "y", "x"],
    )
    return path, shape


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(gib: float, block: int, network: str, overhead: bool, folder: Path) -> dict:
    from napari_unet.distributed_predict import ImageSource, dask_client, predict_volume
    from napari_unet.io import open_image, save_model
    from napari_unet.model import UNet
    from napari_unet.predict import PredictionSettings

    torch.manual_seed(0)
    config = {"depth": 2, "base_filters": 4} if network == "tiny" else {}
    model_path = save_model(UNet(ndim=3, n_classes=2, **config), folder / "m.safetensors")
    image_path, shape = _volume(folder, gib, block)
    settings = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)
    results = {"shape": shape, "gib": math.prod(shape) / 1024**3, "block": block, "network": network}

    def predict(name, client=None, threads=None):
        out = folder / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        started = time.perf_counter()
        with open_image(image_path) as (lazy, info):
            result = predict_volume(
                model_path, ImageSource(str(image_path), None, 1), lazy, info, "ZYX",
                (out / "p.zarr", out / "l.zarr"), settings, block=block, client=client, torch_threads=threads,
            )  # fmt: skip
        seconds = time.perf_counter() - started
        peaks = [_peak_rss_mib()] if client is None else sorted(client.run(_peak_rss_mib).values())
        return {"seconds": round(seconds, 2), "blocks": result.predicted, "peak_rss_mib": [round(p) for p in peaks]}

    results["in_process"] = predict("here")
    for workers in (1, 2):
        with dask_client(workers=workers, log=lambda line: None) as (client, threads):
            client.wait_for_workers(workers)
            results[f"workers_{workers}"] = predict(f"w{workers}", client, threads)
            if overhead and workers == 2:
                client.gather(client.map(_noop, range(50)))  # warm up
                started = time.perf_counter()
                client.gather(client.map(_noop, range(1000)))
                results["overhead_ms_per_task"] = round((time.perf_counter() - started) * 1000 / 1000, 3)
    return results


def _noop(i):
    return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="volume size on disk (uint8), GiB")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--network", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--folder", type=Path, help="where the volume and outputs go (default: a temporary folder)")
    args = parser.parse_args()
    if args.folder is not None:
        args.folder.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args.gib, args.block, args.network, args.overhead, args.folder)))
        return
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(run(args.gib, args.block, args.network, args.overhead, Path(folder))))


if __name__ == "__main__":
    main()
