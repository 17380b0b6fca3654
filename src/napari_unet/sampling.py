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

from collections import OrderedDict
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
            painted.append(painted_index(target))
        self._painted[index] = painted
        self._table = None

    def targets_of(self, index: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """The targets and weights of image ``index`` (what :meth:`set_targets` takes back)."""
        return self._targets[index], self._weights[index]

    def image_piece(self, index: int, piece: int):
        """Piece ``piece`` of image ``index`` as the sampler reads it (normalized, channels first if any)."""
        return self._images[index][piece]

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
        weights = self._weights[i]
        return crop_tile(
            self._images[i][j],
            self._targets[i][j],
            None if weights is None else weights[j],
            pixel,
            self.input_shape,
            self.output_shape,
            self.rng,
        )


def painted_index(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The painted pixels of ``target`` (flat indices, sorted by class) and where each class's run starts
    (``starts[k]:starts[k + 1]``): O(1) draws of a pixel of a class."""
    flat = np.flatnonzero(target.ravel() >= 0)
    classes = target.ravel()[flat]
    order = np.argsort(classes, kind="stable")
    counts = np.bincount(classes, minlength=1) if classes.size else np.zeros(1, dtype=np.int64)
    return flat[order], np.concatenate([[0], np.cumsum(counts)])


def crop_tile(image, target, weight, pixel, input_shape, output_shape, rng) -> tuple:
    """The tile of ``input_shape`` whose output tile (centred) holds ``pixel`` at a random position: image
    (float32, mirrored outside the image), target (int16, -1 outside) and weight (or None, clipped at the border)."""
    spatial = target.shape
    halo = [(i - o) // 2 for i, o in zip(input_shape, output_shape)]
    channels = (slice(None),) * (image.ndim - len(spatial))
    starts = [int(p) - int(rng.integers(o)) - h for p, o, h in zip(pixel, output_shape, halo)]
    ranges = [np.arange(s, s + n) for s, n in zip(starts, input_shape)]
    mirrored = np.ix_(*[mirror_index(r, size) for r, size in zip(ranges, spatial)])
    inside = [(r >= 0) & (r < size) for r, size in zip(ranges, spatial)]
    clipped = np.ix_(*[np.clip(r, 0, size - 1) for r, size in zip(ranges, spatial)])
    mask = np.ones(tuple(input_shape), dtype=bool)
    for axis, ok in enumerate(inside):
        shape = [1] * len(inside)
        shape[axis] = -1
        mask &= ok.reshape(shape)
    tile = np.ascontiguousarray(image[channels + mirrored], dtype=np.float32)
    target = np.where(mask, target[clipped], -1).astype(np.int16)
    weight = None if weight is None else np.ascontiguousarray(weight[clipped], dtype=np.float32)
    return tile, target, weight


class LazyPatchSampler:
    """Draw (image, target, None) tiles from images that are loaded only when sampled (a dataset on disk).

    Like :class:`PatchSampler` a class is drawn first (probability ~ pixel count ** ``class_power``), then an
    image in proportion to its pixels of that class (``counts``, known without loading the image), then a pixel of
    that class in it. ``load(i)`` returns image ``i``'s pieces (float32, channels first) and their int16 targets
    (-1: void); loaded images are kept, least recently used dropped first, up to ``cache_bytes``. This is
    :class:`PatchSampler` without its all-images-in-memory index: it serves datasets larger than memory.
    """

    def __init__(
        self,
        load,
        counts: np.ndarray,
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        rng: np.random.Generator,
        class_power: float = 0.0,
        cache_bytes: int = 1 << 29,
    ):
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape = tuple(int(s) for s in output_shape)
        self.halo = tuple((i - o) // 2 for i, o in zip(self.input_shape, self.output_shape))
        self.rng, self.class_power, self.cache_bytes = rng, class_power, cache_bytes
        self._load, self._counts = load, np.asarray(counts, dtype=np.int64)
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._cached_bytes = 0

    def class_counts(self, n_classes: int) -> np.ndarray:
        """Pixel count per class index over all images."""
        totals = self._counts.sum(axis=0)[:n_classes]
        return np.pad(totals, (0, n_classes - totals.size))

    def _loaded(self, index: int) -> tuple:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        images, targets = self._load(index)
        entry = (images, targets, [painted_index(t) for t in targets])
        size = sum(a.nbytes for a in images) + sum(t.nbytes + f.nbytes for t, (f, _) in zip(targets, entry[2]))
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old[3]
        self._cache[index] = (*entry, size)
        self._cached_bytes += size
        return self._cache[index]

    def sample(self) -> tuple[np.ndarray, np.ndarray, None]:
        """One tile: image (float32, channels first if it has them), target (int16, -1 void/outside), None."""
        totals = self._counts.sum(axis=0)
        present = np.flatnonzero(totals)
        if present.size == 0:
            raise ValueError("no annotated pixels")
        odds = totals[present].astype(np.float64) ** self.class_power
        cls = present[self.rng.choice(present.size, p=odds / odds.sum())]
        index = int(self.rng.choice(len(self._counts), p=self._counts[:, cls] / totals[cls]))
        images, targets, painted, _ = self._loaded(index)
        piece_counts = np.array([np.diff(starts)[cls] if cls + 1 < starts.size else 0 for _, starts in painted])
        if not piece_counts.sum():
            raise ValueError(f"image {index} has no pixels of class {cls} although its counts say so")
        j = int(self.rng.choice(len(painted), p=piece_counts / piece_counts.sum()))
        flat, starts = painted[j]
        pixel = flat[starts[cls] + self.rng.integers(starts[cls + 1] - starts[cls])]
        tile = crop_tile(
            images[j],
            targets[j],
            None,
            np.unravel_index(pixel, targets[j].shape),
            self.input_shape,
            self.output_shape,
            self.rng,
        )
        return tile
