"""Peak memory of the widget's prediction worker (``_workers.predict_steps``) on a large uint8 stack.

A random ``Z x SIZE x SIZE`` uint8 stack and a tiny 2-class network (depth 2, 4 filters: the network is not what is
measured), one pass with the default edge refinement, after a warm-up on a small image; peak memory traced by
``tracemalloc`` (numpy buffers and Python objects; torch's allocator is not traced) and the wall time of that run.
The worker's outputs (probabilities, segmentation) stay in memory: the widget turns them into layers.

    python bench/widget_predict_memory.py [--z 32] [--size 1024]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from napari_unet import UNet
from napari_unet._workers import PredictJob, predict_steps
from napari_unet.refine import DEFAULT_RADIUS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--z", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=2, base_filters=4).eval()
    metadata = {"class_ids": [1, 2], "normalization": {"method": "percentile", "low": 1.0, "high": 99.8}}
    stack = (np.random.default_rng(0).random((args.z, args.size, args.size)) * 255).astype(np.uint8)

    def run(image):
        messages = predict_steps(model, metadata, [PredictJob("image", image)], device="cpu",
                                 refine_radius=DEFAULT_RADIUS)
        return [m[1] for m in messages if m[0] == "result"][0]

    run(stack[:1, :64, :64].copy())
    tracemalloc.start()
    start = time.perf_counter()
    result = run(stack)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{args.z}x{args.size}x{args.size} uint8 ({stack.nbytes / 2**20:.0f} MiB): peak traced {peak / 2**20:.0f} MiB "
          f"(probabilities {result.probabilities.nbytes / 2**20:.0f} MiB, segmentation "
          f"{result.segmentation.nbytes / 2**20:.0f} MiB), {seconds:.1f} s")


if __name__ == "__main__":
    main()
