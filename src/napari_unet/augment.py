"""Data augmentation applied identically to an image tile and its label tiles.

Geometric transforms (flips, 90-degree rotations, random zoom, elastic deformation) move the image (linear
interpolation; all its channels alike when it has them, first) and the targets/weights (nearest neighbour, so
class indices stay class indices) together; intensity transforms (scale, shift, gamma) touch the image only
(each channel its own draw), and are mild by default: stroke labels
never reach a class boundary, so the network places boundaries by the intensity profile it has seen, and
strong gamma/contrast changes teach it that the edge of a nucleus sits at no particular intensity (on the DSB
nuclei benchmark, the ranges exp(+-0.3) / exp(+-0.2) / +-0.1 cost 0.02 Dice through over-segmentation;
docs/benchmarks.md). Elastic deformation follows the U-Net
paper: random displacement vectors on a coarse 3x3 grid (10 px standard deviation), interpolated smoothly
(cubic spline: ``scipy.ndimage.zoom``'s, as one small matrix per axis, ``_spline_field``) to a dense field; the
random zoom (magnification about the tile centre) shares that resampling. In 3D the deformation, the zoom and
the rotations act in the last two (in-plane) axes only, which is safe for anisotropic volumes.

Five more image-only pieces imitate how the images of one experiment differ (uneven illumination, a hazy or
uneven background, bright debris, focus, noise); each has its own strength, and each draws random numbers only when
on, so with all of them off a seeded run is bit-identical to one without them. Per channel (each its own draws) and
after the geometry, in this order: ``blur`` (in-plane Gaussian), ``illumination`` (a smooth multiplicative in-plane
field), ``background`` (a smooth additive in-plane field), the mild gamma / scale / shift above, ``specks`` (bright
blobs in normalized units), ``noise`` (additive, signal-dependent); the pixels that specks saturate stay at the top
value after the noise, as a clipped sensor's do.
``intensity=False`` switches all image-only changes off, these included.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage


class Augmenter:
    """Random augmentation of ``(image, target, weight)`` tiles.

    Parameters
    ----------
    rng : numpy.random.Generator
    flips, rotations, elastic, intensity : bool
        Switch each family on or off.
    elastic_sigma : float
        Standard deviation (pixels) of the coarse-grid displacements.
    elastic_grid : int
        Points per axis of the coarse displacement grid.
    elastic_probability : float
        Fraction of tiles that are deformed (the others keep their exact geometry).
    zoom_range : float
        Random magnification ``exp(z)``, ``z`` uniform in ``+-zoom_range``, in the same warp as the elastic
        deformation (0: off); it shows the network objects at sizes the painted images do not have.
    gamma_range, scale_range, shift_range : float
        Intensity changes of a normalized tile: ``gamma = exp(u)``, ``scale = exp(v)``, ``+ shift`` with
        ``u``, ``v``, ``shift`` uniform in ``+-gamma_range``, ``+-scale_range``, ``+-shift_range``.
    blur : float
        Probability that a tile (channel) is blurred by a Gaussian of ``sigma`` uniform in ``BLUR_SIGMA``
        (0.3-1.5 px), in-plane (the last two axes; a volume's slices are not mixed); 0: off.
    illumination : float
        Uneven illumination / vignetting: the tile is multiplied by ``exp(g)``, ``g`` a smooth in-plane field
        (a volume's slices get the same one, safe for anisotropic volumes): values with standard deviation
        ``illumination`` on a coarse grid of ``ILLUMINATION_GRID`` (3x3) points, interpolated with cubic
        splines (as the elastic field) and centred (mean of ``g`` over the tile 0, so the geometric mean gain is
        1: global gain is ``scale_range``'s). 0.3: gains of roughly 0.6-1.7 within a tile. 0: off.
    background : float
        Uneven background (out-of-focus haze, autofluorescence, illumination acting on a background that is not
        at zero): a smooth in-plane field is added to the tile, ``level * h``, ``h`` interpolated (cubic splines,
        as the illumination field) from uniform [0, 1] values on the coarse ``ILLUMINATION_GRID`` and clipped to
        [0, 1], ``level`` uniform in ``[0, background]`` (normalized units, objects are about 1; a volume's slices
        get the same field). Per-image normalization puts a flat background at 0 and cancels a global offset, but
        not a background that rises across the image, which a network that has only seen backgrounds at 0 takes
        for objects. Off by default: the lifted backgrounds overlap the levels of dim objects, which it then
        misses (docs/benchmarks.md). 0: off.
    specks : float
        Probability that a tile (channel) gets bright debris: discs (balls in 3D, the radius along the first
        axis uniform in 1 to the in-plane radius) of radius uniform in ``SPECK_RADIUS`` (1-5 px) at uniform
        random positions, added one by one (each shrunk to the budget left, but not below 1 px) until the next
        would cover more than a fraction uniform in ``SPECK_COVER`` (0.2-2 %) of the tile (rims counted; so a
        tile under ~25x25 px may get none). Each has a value uniform in 1.5-6.5 (normalized units, objects are
        about 1), clipped at ``SPECK_TOP`` (4.0): half of them saturate, a plateau at exactly 4.0 that noise
        does not touch. Their rim blends into the image over 2 px (smoothstep of the distance). The labels
        under a speck are left as they are. 0: off.
    noise : float
        Maximum noise level ``s`` (uniform in ``[0, noise]`` per tile and channel), Poisson-Gaussian: a
        fraction ``m`` (uniform in [0, 1]) of the variance grows with the signal, variance
        ``s**2 * ((1 - m) + m * max(x, 0))``, so the standard deviation is ``s`` at intensity 1 (the top
        percentile) and ``s * sqrt(1 - m)`` in a dark background. 0: off.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        flips: bool = True,
        rotations: bool = True,
        elastic: bool = True,
        intensity: bool = True,
        elastic_sigma: float = 10.0,
        elastic_grid: int = 3,
        elastic_probability: float = 0.5,
        zoom_range: float = 0.0,
        gamma_range: float = 0.1,
        scale_range: float = 0.07,
        shift_range: float = 0.03,
        blur: float = 0.0,
        illumination: float = 0.0,
        background: float = 0.0,
        specks: float = 0.0,
        noise: float = 0.0,
    ):
        self.rng = rng
        self.flips, self.rotations, self.elastic, self.intensity = flips, rotations, elastic, intensity
        self.elastic_sigma = elastic_sigma
        self.elastic_grid = elastic_grid
        self.elastic_probability = elastic_probability
        self.zoom_range = zoom_range
        self.gamma_range, self.scale_range, self.shift_range = gamma_range, scale_range, shift_range
        self.blur, self.illumination, self.specks, self.noise = blur, illumination, specks, noise
        self.background = background

    def __call__(self, image: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None):
        """Return augmented ``(image, target, weight)``; target pixels moved in from outside become -1. A
        multi-channel ``image`` is ``(C, *target.shape)``."""
        arrays = [image, target] + ([] if weight is None else [weight])
        if self.flips:
            for axis in range(-target.ndim, 0):
                if self.rng.random() < 0.5:
                    arrays = [np.flip(a, axis) for a in arrays]
        if self.rotations and image.shape[-1] == image.shape[-2]:
            k = int(self.rng.integers(4))
            arrays = [np.rot90(a, k, axes=(-2, -1)) for a in arrays]
        arrays = [np.ascontiguousarray(a) for a in arrays]
        deform = self.elastic and self.rng.random() < self.elastic_probability
        zoom = float(np.exp(self.rng.uniform(-self.zoom_range, self.zoom_range))) if self.zoom_range else 1.0
        if deform or zoom != 1.0:
            arrays = self._warp(arrays, deform, zoom)
        if self.intensity:
            arrays[0] = (
                self._intensity(arrays[0])
                if image.ndim == target.ndim
                else np.stack([self._intensity(channel) for channel in arrays[0]])
            )
        return arrays[0], arrays[1], (arrays[2] if weight is not None else None)

    def _warp(self, arrays: list[np.ndarray], deform: bool, zoom: float) -> list[np.ndarray]:
        """Resample in-plane: magnify by ``zoom`` about the tile centre, then add an elastic field if ``deform``."""
        shape = arrays[1].shape  # the spatial shape (the image may have channels first)
        plane = shape[-2:]
        grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
        in_plane = [(g - (s - 1) / 2) / zoom + (s - 1) / 2 for g, s in zip(grid[-2:], plane)]
        if deform:
            coarse = self.rng.normal(0.0, self.elastic_sigma, size=(2, self.elastic_grid, self.elastic_grid))
            in_plane = [g + _spline_field(c, plane).astype(np.float32) for g, c in zip(in_plane, coarse)]
        coords = [np.broadcast_to(g, shape) for g in grid[:-2]] + [np.broadcast_to(g, shape) for g in in_plane]
        image = arrays[0]
        if image.ndim > len(shape):  # channels first: each channel moves alike
            image = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="mirror") for c in image])
        else:
            image = ndimage.map_coordinates(image, coords, order=1, mode="mirror")
        out = [image.astype(np.float32, copy=False)]
        out.append(ndimage.map_coordinates(arrays[1], coords, order=0, mode="constant", cval=-1))
        if len(arrays) > 2:
            out.append(ndimage.map_coordinates(arrays[2], coords, order=0, mode="nearest"))
        return out

    def _intensity(self, image: np.ndarray) -> np.ndarray:
        """The image-only changes of one channel (its spatial shape): each piece draws only when it is on."""
        if self.blur and self.rng.random() < self.blur:
            sigma = float(self.rng.uniform(*BLUR_SIGMA))
            image = ndimage.gaussian_filter(image, [0.0] * (image.ndim - 2) + [sigma, sigma], mode="mirror")
        if self.illumination:
            image = image * self._illumination_field(image.shape[-2:])  # a volume's slices alike
        if self.background:
            image = image + self._background_field(image.shape[-2:])  # a volume's slices alike
        gamma = float(np.exp(self.rng.uniform(-self.gamma_range, self.gamma_range)))
        scale = float(np.exp(self.rng.uniform(-self.scale_range, self.scale_range)))
        shift = float(self.rng.uniform(-self.shift_range, self.shift_range))
        image = np.sign(image) * np.abs(image) ** gamma
        image = (image * scale + shift).astype(np.float32, copy=False)
        saturated = self._add_specks(image) if self.specks and self.rng.random() < self.specks else None
        if self.noise:
            level = float(self.rng.uniform(0.0, self.noise))
            mix = float(self.rng.uniform(0.0, 1.0))
            spread = level * np.sqrt((1.0 - mix) + mix * np.maximum(image, 0.0))
            image = image + spread * self.rng.standard_normal(image.shape, dtype=np.float32)
            if saturated is not None:
                image[saturated] = SPECK_TOP
        return image

    def _illumination_field(self, plane: tuple[int, int]) -> np.ndarray:
        """``exp(g)`` over ``plane``: ``g`` interpolated (cubic spline) from a coarse grid of N(0, illumination)
        values, centred."""
        grid = ILLUMINATION_GRID
        log_gain = _spline_field(self.rng.normal(0.0, self.illumination, size=(grid, grid)), plane)
        return np.exp((log_gain - log_gain.mean()).astype(np.float32))

    def _background_field(self, plane: tuple[int, int]) -> np.ndarray:
        """``level * h`` over ``plane``: ``h`` interpolated (cubic spline) from a coarse grid of uniform [0, 1]
        values and clipped to [0, 1], ``level`` uniform in ``[0, background]``."""
        grid = ILLUMINATION_GRID
        level = float(self.rng.uniform(0.0, self.background))
        field = _spline_field(self.rng.uniform(0.0, 1.0, size=(grid, grid)), plane)
        return (level * np.clip(field, 0.0, 1.0)).astype(np.float32)

    def _add_specks(self, image: np.ndarray) -> np.ndarray | None:
        """Composite bright blobs into ``image`` in place; return the mask of their saturated pixels (or None)."""
        shape, budget = image.shape, self.rng.uniform(*SPECK_COVER) * image.size
        covered, saturated = 0, None
        while True:
            # shrink a speck to the budget left (its footprint is about pi (r + 1)^2 pixels, a ball's more)
            radius = min(float(self.rng.uniform(*SPECK_RADIUS)), np.sqrt((budget - covered) / np.pi) - 1.0)
            if radius < SPECK_RADIUS[0]:
                break
            radii = [radius] * len(shape)
            if len(shape) == 3:
                radii[0] = float(self.rng.uniform(SPECK_RADIUS[0], radius))
            centre = [self.rng.uniform(0, s) for s in shape]
            value = min(float(self.rng.uniform(*SPECK_VALUE)), SPECK_TOP)
            box = tuple(
                slice(max(0, int(np.floor(c - r - 1))), min(s, int(np.ceil(c + r + 1)) + 1))
                for c, r, s in zip(centre, radii, shape)
            )
            axes = np.ogrid[box]
            # distance in units of the in-plane radius, back in pixels: the rim is 2 px wide in-plane
            distance = np.sqrt(sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii))) * radius
            t = np.clip((radius + 1.0 - distance) / 2.0, 0.0, 1.0)
            alpha = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
            footprint = int(np.count_nonzero(alpha))
            if covered + footprint > budget:
                break
            covered += footprint
            window = image[box]
            window *= 1.0 - alpha  # a plateau (alpha 1) becomes exactly value
            window += alpha * value
            if value == SPECK_TOP:
                if saturated is None:
                    saturated = np.zeros(shape, bool)
                saturated[box] |= alpha == 1.0
        return saturated


def _spline_field(coarse: np.ndarray, plane: tuple[int, int]) -> np.ndarray:
    """The ``(grid, grid)`` values ``coarse`` zoomed to ``plane`` by cubic splines, as ``ndimage.zoom`` would; the
    zoom is separable, so one small ``(size, grid)`` matrix per axis does it (10x faster than ``ndimage.zoom``)."""
    grid = coarse.shape[0]
    return _spline_matrix(plane[0], grid) @ coarse @ _spline_matrix(plane[1], grid).T


@functools.lru_cache(maxsize=64)
def _spline_matrix(size: int, grid: int) -> np.ndarray:
    """``(size, grid)``: cubic-spline zoom of ``grid`` points to ``size`` (``ndimage.zoom``'s, on one axis)."""
    matrix = ndimage.zoom(np.eye(grid), (size / grid, 1), order=3, mode="nearest", grid_mode=True)
    matrix.setflags(write=False)
    return matrix


BLUR_SIGMA = (0.3, 1.5)
"""Range of the blur's standard deviation (pixels, in-plane)."""
ILLUMINATION_GRID = 3
"""Points per axis of the coarse grid of the illumination field."""
SPECK_RADIUS = (1.0, 5.0)
"""Range of a speck's radius (pixels)."""
SPECK_COVER = (0.002, 0.02)
"""Range of the fraction of a tile that its specks cover (rims included)."""
SPECK_VALUE = (1.5, 6.5)
"""Range of a speck's value (normalized units) before it is clipped at ``SPECK_TOP``."""
SPECK_TOP = 4.0
"""The saturation value of specks (normalized units): values drawn above it are clipped to it."""


STRONG_INTENSITY = {
    "gamma_range": 0.7,
    "scale_range": 0.3,
    "shift_range": 0.1,
    "illumination": 0.3,
    "specks": 0.5,
    "blur": 0.2,
    "noise": 0.05,
}
"""The image-only changes of the intensity-consistency variants (``TrainingSettings.consistency``), on top of the
tile's own augmentation: gamma 0.5-2, gain exp(+-0.3), offset +-0.1, illumination fields (log-gain sd 0.3), debris
on half of the tiles, blur on a fifth, noise up to 0.05: how the images of one experiment differ after per-image
normalization (which cancels a global gain and offset of the raw image, not these)."""


def intensity_variant(rng: np.random.Generator) -> Augmenter:
    """An augmenter of image-only ``STRONG_INTENSITY`` changes (geometry off: a variant stays aligned with its
    tile and the tile's labels)."""
    return Augmenter(rng, flips=False, rotations=False, elastic=False, **STRONG_INTENSITY)


def paste_mix(images, targets, weights, rng: np.random.Generator, probability: float, region) -> None:
    """CutMix for sparse labels, in place: paste a box from another tile of the batch into some tiles.

    ``images``, ``targets`` (and ``weights`` unless None) are batches ``(B, *tile)`` (images may have channels:
    ``(B, C, *tile)``); ``region`` holds the slices
    of the tile where the loss is computed (the output tile). With ``probability``, a tile receives a box of 1/4
    to 1/2 of the region's size per axis, placed inside the region, taken from the same place of another (unmixed) tile,
    image and labels together (unpainted pixels stay unpainted). Stroke labels sit far from class boundaries, so
    a painted pixel is otherwise never seen next to another class's structures, and the network learns "near an
    object is the object" (over-segmentation); pasted boxes put painted pixels next to foreign content.
    """
    count = len(images)
    if count < 2 or probability <= 0:
        return
    batches = (images, targets) if weights is None else (images, targets, weights)
    originals = [batch.copy() for batch in batches]
    for i in range(count):
        if rng.random() >= probability:
            continue
        source = (i + 1 + int(rng.integers(count - 1))) % count
        box = []
        for axis in region:
            size = axis.stop - axis.start
            extent = int(rng.integers(max(1, size // 4), max(1, size // 2) + 1))
            start = axis.start + int(rng.integers(0, size - extent + 1))
            box.append(slice(start, start + extent))
        box = (Ellipsis, *box)  # the last axes: the tile's, after any channels
        for batch, original in zip(batches, originals):
            batch[i][box] = original[source][box]
