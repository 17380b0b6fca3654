"""Peak memory of building a trainer and training a few iterations on a large stack with a few painted slices.

A random ``Z x SIZE x SIZE`` uint8 stack with strokes of two classes on ``--painted`` of its slices, a tiny 2D
network (depth 2, 4 filters: the network is not what is measured), ``--iterations`` steps on 1 thread; peak memory
traced by ``tracemalloc`` (numpy buffers and Python objects; torch's allocator is not traced), counted from the
trainer's construction on (the stack and its labels exist before, as a napari layer's data would).

    python bench/training_memory.py [--z 64] [--size 1024] [--painted 2] [--iterations 20]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from napari_unet.training import Trainer, TrainingSettings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--z", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--painted", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    stack = (rng.random((args.z, args.size, args.size)) * 255).astype(np.uint8)
    labels = np.zeros(stack.shape, np.uint8)
    for z in np.linspace(0, args.z - 1, args.painted).astype(int):
        labels[z, 10:13, 10:-10] = 1
        labels[z, args.size // 2 : args.size // 2 + 3, 10:-10] = 2
    settings = TrainingSettings(
        depth=2, base_filters=4, iterations=args.iterations, time_budget=None, device="cpu", cpu_threads=1, seed=0
    )
    tracemalloc.start()
    start = time.perf_counter()
    trainer = Trainer(stack, labels, settings)
    built = time.perf_counter() - start
    for _ in trainer.run():
        pass
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        f"{args.z}x{args.size}x{args.size} uint8 ({stack.nbytes / 2**20:.0f} MiB), {args.painted} painted slices: "
        f"peak traced {peak / 2**20:.0f} MiB, trainer built in {built:.1f} s, {seconds:.1f} s with "
        f"{trainer.iteration} iterations"
    )


if __name__ == "__main__":
    main()
