"""Painted pixels held out of training, for fitting the softmax temperature of a model trained from strokes.

Temperature scaling (``calibration.py``) needs labelled pixels the network did not learn from. A dataset has its
validation images; strokes have none, so a share of the painted pixels is kept out of the loss and the patch
sampler, and predicted once when the run ends (``Trainer._calibrate``).

The unit held out is a block of ``BLOCK`` pixels per axis and one class: a pixel of class ``k`` in block ``b`` is
held out when a hash of ``(seed, image, piece, k, b)`` falls under the share. A short stroke lies in one or two
blocks and is held out whole (or not at all); a long one is held out in segments. The choice is a function of the
position alone, so a stroke painted later, while training runs, falls into the same blocks as the earlier ones, and
a pixel never moves between the training and the held-out side as the labels grow. Where every painted pixel of a
class in a piece would be held out, none of them is: a class painted only there keeps its training pixels.

Why own code: scikit-learn's and MONAI's splitters split whole samples (images or patches) at random, not the
pixels of one image by position, and a stable split under label updates is the point here.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
"""Side of the blocks that are held out or not (pixels per spatial axis)."""
MIN_PIXELS = 64
"""Fewer held-out pixels than this (or held-out pixels of only one class) fit no temperature."""
PREDICTED_PIXELS = 1 << 20
"""Input pixels per flip pass that predicting the held-out blocks may read at a run's end (a seeded choice of the
blocks when they need more): tens of thousands of held-out pixels, plenty for one parameter, in seconds."""

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: uint64 in, uniformly mixed uint64 out (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def held_out(target: np.ndarray, share: float, key: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of the pixels of ``target`` (class indices, ``-1`` unpainted) kept out of training.

    ``share``: the expected fraction of painted blocks held out per class (0: none); ``key``: integers that make the
    choice differ between images and pieces (seed, image index, piece index). Only the painted pixels are looked at.
    """
    mask = np.zeros(target.shape, bool)
    painted = np.flatnonzero(target >= 0)
    if share <= 0 or painted.size == 0:
        return mask
    classes = target.ravel()[painted].astype(np.uint64)
    block = np.zeros(painted.size, np.uint64)
    for coordinate in np.unravel_index(painted, target.shape):
        block = block * np.uint64(1 << 16) + (coordinate // BLOCK).astype(np.uint64)
    seed = np.uint64(0)
    with np.errstate(over="ignore"):
        for part in key:
            seed = _splitmix(seed * _MIX + np.uint64(int(part) % (1 << 63)))
        hashed = _splitmix(block ^ _splitmix(seed + classes + np.uint64(1)))
    chosen = hashed < np.uint64(min(int(share * 2.0**64), 2**64 - 1))
    for cls in np.unique(classes):
        of_class = classes == cls
        if chosen[of_class].all():  # the class would lose every training pixel of this piece
            chosen[of_class] = False
    mask.ravel()[painted[chosen]] = True
    return mask
