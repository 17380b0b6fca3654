"""The robust normalization's area opening: ``normalization._area_opening`` (Higra's max-tree) against
scikit-image's ``area_opening`` on one plane of each size, the same result checked, and ``robust_params`` of the
largest plane timed end to end.

The plane is what the robust recipe opens: a uint16 image of blobs, noise and bright specks quantized to the
recipe's 1,024 levels. Runs alternate; best of ``--repeats``. scikit-image is timed up to ``--skimage-up-to``
pixels a side (its time grows much faster than the pixel count).

    python bench/area_opening.py [--sizes 256 512 1024 2048] [--skimage-up-to 1024] [--repeats 2]
"""

import argparse
import platform
import time

import numpy as np
from scipy import ndimage
from skimage.morphology import area_opening

from napari_unet.devices import cpu_model
from napari_unet.normalization import _OPENING_LEVELS, SPECK_AREA, _area_opening, robust_params


def plane(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.random((side, side)), 6)
    image = 2000 + 20000 * (blobs > np.percentile(blobs, 70)) + rng.normal(0, 800, (side, side))
    specks = rng.random((side, side)) < 0.002
    image[specks] = 65535
    return np.clip(image, 0, 65535).astype(np.uint16)


def levels_of(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    return np.round((image - lo) / (hi - lo) * (_OPENING_LEVELS - 1)).astype(np.uint16)


def best(function, repeats: int, *args, **kwargs) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--skimage-up-to", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# {cpu_model() or platform.machine()}, speck area {SPECK_AREA}, {_OPENING_LEVELS} levels")
    print("| side | Higra s | scikit-image s | ratio | equal |")
    print("| --- | --- | --- | --- | --- |")
    for side in args.sizes:
        levels = levels_of(plane(side))
        ours, opened = best(_area_opening, args.repeats, levels, SPECK_AREA)
        if side <= args.skimage_up_to:
            theirs, expected = best(area_opening, args.repeats, levels, area_threshold=SPECK_AREA)
            print(f"| {side} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x | {np.array_equal(opened, expected)} |")
        else:
            print(f"| {side} | {ours:.2f} | not timed | | |")
    image = plane(max(args.sizes))
    seconds, params = best(robust_params, 1, image)
    print(f"# robust_params of a {max(args.sizes)}² uint16 plane: {seconds:.2f} s, high {params['high_values']}")


if __name__ == "__main__":
    main()
