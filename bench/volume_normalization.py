"""The whole-volume normalization pass of a block-wise prediction: in this process vs counted by the workers of a
Dask ``LocalCluster`` (``distributed_predict.ClusterSlabs``), for the robust and the percentile recipe.

A synthetic 16-bit volume (OME-Zarr, NGFF 0.4, 64³ chunks: smooth blobs on a background with Poisson-like noise and
a few bright specks, nothing like pure noise, the area opening's worst case) is written into ``--folder`` once.
Each mode computes ``normalization.image_params`` of the lazy volume; the parameters of every mode must be equal
(exact), and the wall time of each is printed (JSON lines appended to ``--json``).

    python bench/volume_normalization.py --folder F [--side 512] [--workers 2] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RECIPES = {
    "robust": {"method": "robust", "low": 1.0, "high": 99.8, "speck_area": 100},
    "percentile": {"method": "percentile", "low": 1.0, "high": 99.8},
}


def _write_volume(path: Path, side: int) -> None:
    import numpy as np
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata
    from scipy import ndimage

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("0", shape=(side,) * 3, chunks=(64,) * 3, dtype="uint16")
    rng = np.random.default_rng(0)
    for z in range(0, side, 64):  # slab by slab: never the whole volume in memory
        depth = min(64, side - z)
        field = ndimage.gaussian_filter(rng.random((depth, side, side), np.float32), 6)
        blobs = field > np.quantile(field, 0.8)  # a fifth of the voxels, blobs ~20 px across
        slab = 400 + 1500 * ndimage.gaussian_filter(blobs.astype(np.float32), 1.5)
        slab += rng.normal(0, 40, slab.shape)
        specks = rng.random(slab.shape) < 2e-4
        slab[specks] = 12000
        array[z : z + depth] = np.clip(slab, 0, 65535).astype(np.uint16)
    write_multiscales_metadata(
        group,
        [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}],
        fmt=FormatV04(),
        axes=["z", "y", "x"],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from napari_unet.distributed_predict import ClusterSlabs, ImageSource, SourceArray, dask_client
    from napari_unet.io import lazy_image
    from napari_unet.normalization import image_params

    path = args.folder / f"volume_{args.side}.zarr"
    if not path.exists():
        _write_volume(path, args.side)
    source = ImageSource(str(path), None, 1)
    lazy, _ = lazy_image(str(path))
    volume = SourceArray(source, tuple(lazy.shape), lazy.dtype)
    rows = []
    with dask_client(workers=args.workers, log=lambda line: None) as (client, _):
        client.wait_for_workers(args.workers, timeout=120)
        for name in args.recipes:
            found = {}
            for mode in ("in_process", f"{args.workers}_workers"):
                start = time.perf_counter()
                mapper = None if mode == "in_process" else ClusterSlabs(client)
                found[mode] = image_params(volume, RECIPES[name], None, mapper)
                row = {
                    "recipe": name,
                    "mode": mode,
                    "side": args.side,
                    "gib": round(volume.dtype.itemsize * args.side**3 / 1024**3, 3),
                    "seconds": round(time.perf_counter() - start, 1),
                    "high_values": found[mode]["high_values"],
                    "machine": platform.processor() or platform.machine(),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
            assert found["in_process"] == found[f"{args.workers}_workers"], found
    if args.json:
        with args.json.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
