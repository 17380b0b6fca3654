"""Peak memory of the widget's prediction worker (``_workers.predict_steps``) on a large uint8 stack.

A random ``Z x SIZE x SIZE`` uint8 stack and a tiny 2-class network (depth 2, 4 filters: the network is not what is
measured), one pass (no test-time flips) with the default edge refinement, after a warm-up on a small image; peak
memory traced by ``tracemalloc`` (numpy buffers and Python objects; torch's allocator is not traced) and the wall time
of that run.
The worker's outputs (probabilities, segmentation) become the widget's layers: in memory up to
``arrays.IN_MEMORY_OUTPUT_BYTES`` (1 GiB), memory-mapped temporary files beyond (not traced: they live on disk).

``--source memory`` (default): the image is a layer's in-memory data, which the widget hands the worker as it is
(``--copy``: copied first, as the widget did before the ninth session).
``--source file``: the stack is written to an uncompressed TIFF and opened as the napari reader opens a large
image (lazily, a dask view of a memory map; the reader's 1 GiB threshold is lowered to 0 so that a small stack
takes that path), and the worker reads it tile by tile without a copy. ``--outputs-in-memory``: keep outputs of
any size in memory (what the widget did before memory-mapped outputs).

    python bench/widget_predict_memory.py [--z 32] [--size 1024] [--source memory|file] [--copy]
        [--outputs-in-memory]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_unet import UNet, _reader, arrays
from napari_unet._workers import ImageDone, PredictJob, predict_steps
from napari_unet.predict import PredictionSettings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--z", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--source", choices=("memory", "file"), default="memory")
    parser.add_argument("--outputs-in-memory", action="store_true")
    parser.add_argument("--copy", action="store_true")
    args = parser.parse_args(argv)
    if args.outputs_in_memory:
        arrays.IN_MEMORY_OUTPUT_BYTES = float("inf")
    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=2, base_filters=4).eval()
    metadata = {"class_ids": [1, 2], "normalization": {"method": "percentile", "low": 1.0, "high": 99.8}}
    stack = (np.random.default_rng(0).random((args.z, args.size, args.size)) * 255).astype(np.uint8)

    def run(image):
        messages = predict_steps(
            model, metadata, [PredictJob("image", image)], PredictionSettings(device="cpu", test_time_flips=False)
        )
        return next(m.result for m in messages if isinstance(m, ImageDone))

    run(stack[:1, :64, :64].copy())
    with tempfile.TemporaryDirectory() as folder:
        if args.source == "file":
            path = Path(folder) / "stack.tif"
            tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZYX"})
            del stack
            _reader.LAZY_READ_BYTES = 0
        tracemalloc.start()
        start = time.perf_counter()
        if args.source == "file":
            [(image, _, _)] = _reader.read_tiff(str(path))  # what napari's layer holds
        else:
            image = stack.copy() if args.copy else stack
        result = run(image)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        kinds = {
            name: "memory map" if isinstance(array, np.memmap) else "in memory"
            for name, array in (("probabilities", result.probabilities), ("segmentation", result.segmentation))
        }
        print(
            f"{args.z}x{args.size}x{args.size} uint8 ({image.nbytes / 2**20:.0f} MiB) from {args.source} "
            f"({type(image).__module__.split('.')[0]}): peak traced {peak / 2**20:.0f} MiB (probabilities "
            f"{result.probabilities.nbytes / 2**20:.0f} MiB {kinds['probabilities']}, segmentation "
            f"{result.segmentation.nbytes / 2**20:.0f} MiB {kinds['segmentation']}), {seconds:.1f} s"
        )
        del result


if __name__ == "__main__":
    main()
