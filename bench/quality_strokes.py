"""Simulated user strokes from dense ground truth (used by ``bench/quality.py`` and for the demo data).

For each class: its skeleton, kept only where the class mask survives a one-pixel erosion (so a radius-1
brush stays inside the class), is cut into short random walks (segments of about 15 px) that are painted
with a radius-1 brush, in random order, until 2 % of the class's pixels are painted. Fixed seeds make the
strokes reproducible.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _walk(skeleton: np.ndarray, start: tuple[int, int], length: int, rng) -> list[tuple[int, int]]:
    path, visited = [start], {start}
    y, x = start
    for _ in range(length - 1):
        options = [
            (y + dy, x + dx)
            for dy, dx in _NEIGHBOURS
            if 0 <= y + dy < skeleton.shape[0]
            and 0 <= x + dx < skeleton.shape[1]
            and skeleton[y + dy, x + dx]
            and (y + dy, x + dx) not in visited
        ]
        if not options:
            break
        y, x = options[rng.integers(len(options))]
        visited.add((y, x))
        path.append((y, x))
    return path


def simulate_strokes(
    classes: np.ndarray,
    class_ids: dict[int, int],
    *,
    fraction: float = 0.02,
    segment_length: int = 15,
    seed: int = 0,
) -> np.ndarray:
    """Paint strokes on a 2D dense class map.

    Parameters
    ----------
    classes : (H, W) integer array
        Dense ground-truth classes.
    class_ids : dict
        Ground-truth value -> painted id (e.g. ``{0: 1, 1: 2}``: background painted as 1, foreground as 2).
    fraction : float
        Stop painting a class once this fraction of its pixels is painted.
    segment_length : int
        Skeleton pixels per stroke segment.
    seed : int

    Returns
    -------
    (H, W) uint8 labels: 0 = unpainted, painted ids elsewhere.
    """
    rng = np.random.default_rng(seed)
    strokes = np.zeros(classes.shape, dtype=np.uint8)
    brush = ndimage.generate_binary_structure(2, 1)
    for value, painted_id in class_ids.items():
        mask = classes == value
        total = int(mask.sum())
        if total == 0:
            continue
        skeleton = skeletonize(mask) & ndimage.binary_erosion(mask, brush)
        if not skeleton.any():
            skeleton = skeletonize(mask)
        points = np.argwhere(skeleton)
        painted = np.zeros(classes.shape, dtype=bool)
        for index in rng.permutation(len(points)):
            if painted.sum() >= fraction * total:
                break
            start = tuple(int(v) for v in points[index])
            if painted[start]:
                continue
            segment = np.zeros(classes.shape, dtype=bool)
            for y, x in _walk(skeleton, start, segment_length, rng):
                segment[y, x] = True
            painted |= ndimage.binary_dilation(segment, brush) & mask
        strokes[painted] = painted_id
    return strokes
