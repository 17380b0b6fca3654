"""Patch sampling from sparse painted labels.

Every patch is placed around a painted pixel: a class is drawn with a probability that grows with its
painted pixel count to the power ``class_power`` (0: all painted classes equally often, so a class painted
with a few strokes is seen as often as a big one; 1: in proportion to the paint), then a painted pixel of
that class, and the output tile is laid so that this pixel falls at a random position inside it. A patch therefore
always holds painted pixels, and unpainted slices of a volume or stack are never sampled for nothing.

Tiles have the network's legal input size. Context outside the image comes from mirror padding (numpy
"reflect", ``tiling.mirror_index``) and only there: inside the image the real neighbours are read.
Targets (class indices, -1 = unpainted) are returned at the same input size with -1 outside the image;
the caller crops them to the output tile (the centre) after augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tiling import mirror_index


class PatchSampler:
    """Draw (image, target, weight) tiles of ``input_shape`` around painted pixels.

    Parameters
    ----------
    images : list of lists of float32 arrays
        For each input image, its pieces (one array, or the slices of a stack trained with a 2D net); a
        multi-channel piece has its channels first, ``(C, *spatial)``.
    targets : list of lists of int16 arrays
        Class indices 0..K-1, -1 where unpainted; same layout and (spatial) shapes as ``images``.
    input_shape, output_shape : tuple of int
        Network input tile and output tile (centred in the input).
    rng : numpy.random.Generator
    weights : list of lists of float32 arrays, optional
        Per-pixel loss weights (border weight map), cropped along with the targets.
    class_power : float
        A class is drawn with probability proportional to its painted pixel count to this power:
        0 draws every painted class equally often, 1 draws every painted pixel equally often.
    """

    def __init__(
        self,
        images: Sequence[Sequence[np.ndarray]],
        targets: Sequence[Sequence[np.ndarray]],
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        rng: np.random.Generator,
        weights: Sequence[Sequence[np.ndarray]] | None = None,
        class_power: float = 0.0,
    ):
        self.class_power = class_power
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape = tuple(int(s) for s in output_shape)
        self.halo = tuple((i - o) // 2 for i, o in zip(self.input_shape, self.output_shape))
        self.rng = rng
        self._images = [list(pieces) for pieces in images]
        self._targets: list[list[np.ndarray]] = [[] for _ in self._images]
        self._weights: list[list[np.ndarray] | None] = [None for _ in self._images]
        self._painted: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in self._images]
        self._table = None
        for index, pieces in enumerate(targets):
            self.set_targets(index, pieces, None if weights is None else weights[index])

    def set_targets(self, index: int, targets: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None):
        """Replace the targets (and weights) of image ``index``; painted pixels are re-indexed."""
        targets = list(targets)
        spatial = [im.shape[im.ndim - t.ndim :] for t, im in zip(targets, self._images[index])]  # after channels
        if [t.shape for t in targets] != spatial:
            raise ValueError("targets must have the same pieces and shapes as the image")
        self._targets[index] = targets
        self._weights[index] = None if weights is None else list(weights)
        painted = []
        for target in targets:
            if target.size and not any(target.strides) and target.flat[0] < 0:  # a constant view: unpainted
                painted.append((np.empty(0, np.intp), np.zeros(2, np.int64)))
                continue
            flat = np.flatnonzero(target.ravel() >= 0)
            classes = target.ravel()[flat]
            order = np.argsort(classes, kind="stable")
            counts = np.bincount(classes, minlength=1) if classes.size else np.zeros(1, dtype=np.int64)
            # pixels sorted by class, and where each class's run starts: O(1) draws per class
            painted.append((flat[order], np.concatenate([[0], np.cumsum(counts)])))
        self._painted[index] = painted
        self._table = None

    def _count_table(self) -> tuple[list[tuple[int, int]], np.ndarray]:
        """(image, piece) keys and their painted counts per class (rows: pieces, columns: classes)."""
        if self._table is None:
            keys = [(i, j) for i, pieces in enumerate(self._painted) for j in range(len(pieces))]
            n_classes = max(len(self._painted[i][j][1]) - 1 for i, j in keys)
            table = np.zeros((len(keys), n_classes), dtype=np.int64)
            for row, (i, j) in enumerate(keys):
                counts = np.diff(self._painted[i][j][1])
                table[row, : counts.size] = counts
            self._table = keys, table
        return self._table

    def class_counts(self, n_classes: int) -> np.ndarray:
        """Painted pixel count per class index over all images."""
        totals = self._count_table()[1].sum(axis=0)[:n_classes]
        return np.pad(totals, (0, n_classes - totals.size))

    def _draw_pixel(self) -> tuple[int, int, tuple[int, ...]]:
        """A painted pixel: a class (see ``class_power``), then uniform among that class's pixels."""
        keys, table = self._count_table()
        totals = table.sum(axis=0)
        present = np.flatnonzero(totals)
        if present.size == 0:
            raise ValueError("nothing is painted")
        odds = totals[present].astype(np.float64) ** self.class_power
        cls = present[self.rng.choice(present.size, p=odds / odds.sum())]
        row = self.rng.choice(len(keys), p=table[:, cls] / totals[cls])
        i, j = keys[row]
        flat, starts = self._painted[i][j]
        pixel = flat[starts[cls] + self.rng.integers(starts[cls + 1] - starts[cls])]
        return i, j, np.unravel_index(pixel, self._targets[i][j].shape)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One tile: image (float32, channels first if it has them), target (int16, -1 unpainted/outside) and
        weights (or None)."""
        i, j, pixel = self._draw_pixel()
        image, spatial = self._images[i][j], self._targets[i][j].shape
        channels = (slice(None),) * (image.ndim - len(spatial))
        starts = [int(p) - int(self.rng.integers(o)) - h for p, o, h in zip(pixel, self.output_shape, self.halo)]
        ranges = [np.arange(s, s + n) for s, n in zip(starts, self.input_shape)]
        mirrored = np.ix_(*[mirror_index(r, size) for r, size in zip(ranges, spatial)])
        inside = [(r >= 0) & (r < size) for r, size in zip(ranges, spatial)]
        clipped = np.ix_(*[np.clip(r, 0, size - 1) for r, size in zip(ranges, spatial)])
        mask = np.ones(self.input_shape, dtype=bool)
        for axis, ok in enumerate(inside):
            shape = [1] * len(inside)
            shape[axis] = -1
            mask &= ok.reshape(shape)
        tile = np.ascontiguousarray(image[channels + mirrored], dtype=np.float32)
        target = np.where(mask, self._targets[i][j][clipped], -1).astype(np.int16)
        weights = self._weights[i]
        weight = None if weights is None else np.ascontiguousarray(weights[j][clipped], dtype=np.float32)
        return tile, target, weight
