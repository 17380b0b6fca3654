"""Peak memory and time of ``napari-unet predict`` on a large 2D image.

Writes a random ``SIZE x SIZE`` TIFF (uint8, or ``--dtype float32``: its percentiles are then selected in
streaming passes instead of counted in a histogram) and a tiny 3-class model (depth 2, 4 filters: the network is not
what is measured) to a temporary folder, runs the CLI once on a small image (so imports are not counted), then runs
it on the large image twice: under ``tracemalloc`` (peak traced memory: numpy buffers and Python objects; torch's own
allocator and memory maps are not traced) and without it (wall time). One pass (``--no-test-time-flips``), with the
CLI's default edge refinement unless ``--refine-radius`` says otherwise (0: off).

    python bench/predict_memory.py [--size 8000] [--threads 2] [--refine-radius PX] [--dtype uint8|float32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from napari_unet.cli import main as cli
from napari_unet.io import save_model, write_tiff
from napari_unet.model import UNet
from napari_unet.refine import DEFAULT_RADIUS


def run(size: int, threads: int, refine_radius: int = DEFAULT_RADIUS, dtype: str = "uint8") -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        model = save_model(
            UNet(n_classes=3, depth=2, base_filters=4), folder / "m.safetensors", {"class_ids": [1, 2, 3]}
        )
        pixels = (np.random.default_rng(0).random((size, size)) * 255).astype(dtype)
        image = write_tiff(folder / "big.tif", pixels)
        del pixels
        small = write_tiff(folder / "small.tif", np.zeros((64, 64), np.uint8))

        def predict(path, out):
            assert (
                cli(
                    [
                        "predict",
                        "-m",
                        str(model),
                        str(path),
                        "-o",
                        str(folder / out),
                        "--no-test-time-flips",
                        "--refine-radius",
                        str(refine_radius),
                    ]
                )
                == 0
            )

        predict(small, "warm-up")
        tracemalloc.start()
        predict(image, "traced")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        start = time.perf_counter()
        predict(image, "timed")
        seconds = time.perf_counter() - start
    return {
        "size": size,
        "dtype": dtype,
        "refine_radius": refine_radius,
        "peak_traced_mib": peak / 2**20,
        "seconds": seconds,
        "image_mib": size * size * np.dtype(dtype).itemsize / 2**20,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refine-radius", type=int, default=DEFAULT_RADIUS)
    parser.add_argument("--dtype", choices=["uint8", "float32"], default="uint8")
    args = parser.parse_args(argv)
    result = run(args.size, args.threads, args.refine_radius, args.dtype)
    print(
        f"{result['size']}x{result['size']} {result['dtype']} ({result['image_mib']:.0f} MiB), refine radius "
        f"{result['refine_radius']}: peak traced {result['peak_traced_mib']:.0f} MiB, {result['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
