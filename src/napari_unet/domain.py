"""Does an image look like the images the model was trained on? A cheap, bounded, explainable check.

"Paint one image, segment a hundred": across one experiment images differ (gain, offset, illumination, debris,
density). Percentile normalization cancels gain and offset; what it cannot cancel changes where the classes land
on the normalized scale, and a network trained on one image places its boundaries by the intensities it saw there.
This module compares each predicted image with the training images and says when it is far outside them, so the
user knows which images to paint a few strokes on.

Profile
    An image's *profile* (:func:`profile`) is computed on a bounded sample of its NORMALIZED pixels, normalized
    with the model's own recipe exactly as prediction normalizes them (``predict.predict_image`` passes its
    ``NormalizedView``): :func:`sample_regions` spreads at most ``SAMPLE_TILES`` tiles of ``SAMPLE_TILE`` x
    ``SAMPLE_TILE`` pixels evenly over the image (each centred in its cell of a grid; a stack or volume: over up
    to ``SAMPLE_PLANES`` planes), at most 65,536 pixels whatever the image's size, so a lazy image larger than
    memory costs a few small reads. It holds, per channel, the intensity quantiles ``QUANTILES`` of the sample and,
    from the class probabilities of the same pixels, the fraction of them each class wins (``class_fractions``),
    the quantiles ``CLASS_QUANTILES`` of the normalized intensity of the pixels each class wins
    (``class_intensity``, per class and channel; None for a class with fewer than ``MIN_CLASS_PIXELS`` pixels) and
    the mean normalized entropy.
    The training side (``training.Trainer``) stores the profiles of its training images, sampled alike (at most
    ``TRAINING_TILES`` tiles in all, within ``TRAINING_STEPS``), the class part from a prediction of those tiles
    with the weights each run leaves, under ``metadata["training_profile"]`` (:func:`training_profile`).

Distance
    :func:`compare` scores an image against the training images in *tolerances*. Two kinds of terms, each 1.0 at
    its own tolerance:

    - class level: for each class and channel, how far the median intensity of the pixels the class wins lies
      outside the range of that median over the training images, as a fraction of the way from there to the
      nearest other class's median in that direction (that gap at least ``GAP_FLOOR``); ``TOWARD`` of the way is
      one tolerance. A network trained on the painted images confuses classes whose levels approach each other:
      objects that bright debris (the upper percentile moves) or a strong gamma push toward the background level,
      a background that uneven illumination pushes toward the objects'. Moving away from every other class keeps
      the contrast and costs less: one tolerance is ``AWAY`` gaps to the nearest class.
    - class fraction: for each class (of two classes, the one with the smaller training share), how far the
      log-odds of the fraction of pixels it wins lie outside the training images' range; ``FRACTION_LOGIT``
      (odds 12x) is one tolerance. It fires when a class (nearly) vanishes or floods the image: objects the
      network no longer sees, an image of other content.

    Both rest on the span of the training images, and a model painted on ten diverse images spans so much (DSB
    nuclei medians 0.26-1.17 in normalized units) that perturbed images stay inside it while the network fails
    on them: missed dim objects join the background, whose median hardly moves. Two more kinds of terms look at
    the network's behaviour on the image instead, from one-pass predictions (no flips, no refinement: what the
    training profiles hold) of :func:`stability_regions` (one large tile in the middle of the image, a bounded
    share of a prediction's cost):

    - stability: the same tile predicted from the image x ``STABILITY_GAIN`` and / ``STABILITY_GAIN``
      (1.5, :class:`Scaled`); per class, the pixels more than ``STABILITY_BAND`` pixels from a boundary that enter
      or leave the class (:func:`stability`), as a share of the class's area (the larger of the image's and the
      training images' mean, at least ``MIN_CLASS_PIXELS``); ``STABILITY_TOLERANCE`` (30 %) is one tolerance.
      On the images of an experiment a gain moves boundaries by a pixel or two; whole objects that appear or
      vanish say the image's classes sit where the network decides between them.
    - entropy: the mean normalized entropy of that one-pass prediction above the training images' highest, in
      units of ``ENTROPY_RATIO - 1`` (half) of it (that highest at least ``ENTROPY_FLOOR``).

    The score is the larger of two root sums of squares (``SCORE_GROUPS``): of the largest class-level and
    class-fraction terms, and of the stability and entropy terms (two half-way differences of a group together
    count as one whole); the image looks unlike the training images above ``THRESHOLD`` = 1, and the reason names
    the largest finding of each kind that reaches ``REASON_TERM`` tolerances, in figures. The network-behaviour
    group was chosen on DSB 2018 and ISBI 2012 validation images (``bench/robustness.py``'s validation split)
    under a model trained on ten images (``docs/benchmarks.md``): it stays silent on the clean images and fires on
    most images whose Dice falls under gamma 0.5 and all perturbations combined; it does not see failures the
    network is sure of and that a gain does not undo (gamma 2, 2 % merged debris): no term here sees those.

    The whole-image quantiles are recorded and not scored: they mix intensity with content (a field with few
    nuclei has its 95th percentile in the background: 0.03 against 0.57 for a field of the same experiment with 6x
    more nuclei, both segmented with Dice > 0.92).

Background
    A third group, of one kind: the :func:`background_spread` of each image (how far the background level of the
    blocks of its sample varies across it) above the highest the network saw (the training images', recorded in
    their profiles, or the level of the background augmentation it trained with), ``BACKGROUND_TOLERANCE`` (0.15)
    being one tolerance. Uneven illumination and haze lift the background of part of a field, which per-image
    percentiles leave in place and a network trained on even backgrounds calls objects; neither the class terms
    (the lifted background is won by the objects' class, at the objects' level) nor the behaviour terms (the
    network is sure of it) see that reliably. When this term is part of a warning (``REASON_TERM`` or more) and the
    model does not subtract a smooth background already, the warning adds :attr:`DomainCheck.hint`: train with the
    normalization that does (``normalization.BACKGROUND_RECIPE``). Chosen on DSB 2018 and ISBI 2012 validation
    images (``docs/benchmarks.md``): it separates a haze from clean nuclei fields; on EM slices, whose texture
    fills every block, clean slices already spread nearly as far as hazy ones, so it stays mostly silent there.

Threshold
    The class-level and class-fraction tolerances were chosen on real data, before the behaviour terms existed
    (the figures below are of those two terms alone; the one-image models were not scored again with the
    stability and entropy terms): three calibration models (depth 3, 16 filters, 250 iterations from simulated
    strokes on one image each: a DSB 2018 U2OS field of 520x696, a DSB 360x360 field, ISBI 2012 EM slice 0),
    every other image of the same experiment and of the others, and synthetic changes of the training image (predicted
    without flips or refinement; with them the training image scores 0.01-0.04). "Dice" is the change of the
    foreground Dice against the training image's own:

    - silent: gain x0.3 and x3, offsets (0.00: the normalization cancels them), Gaussian noise of 1 % of the
      range (<= 0.18), illumination from x0.5 to x1.5 across a nuclei field (<= 0.30), 9 of the 11 other U2OS
      fields (<= 0.99), the 9 other 360x360 fields (<= 0.64), the 29 other EM slices (<= 0.66);
    - fire: 0.5-2 % saturated debris specks on nuclei (1.60-2.19; Dice -0.34 to -0.95), gamma 2 and 3 on the
      normalized scale (1.02-2.72; Dice -0.10 to -0.95), gamma 0.5 and 0.4 (1.12-2.34; Dice -0.42 to -0.68),
      illumination x0.5 to x1.5 across an EM slice (1.68; Dice -0.28), a gain that saturates an EM slice (1.55),
      EM slices under nuclei models and nuclei under the EM model (1.32-3.73; Dice -0.59 to -0.75), and two U2OS
      fields: the densest (313 nuclei where the training field has 107: 1.30, Dice -0.17, the lowest of its
      experiment) and the sparsest (18 nuclei: 1.09 from its class fraction alone, Dice -0.03: a false alarm,
      which its reason, "covers 1.8 % of the image (training 19.5 %)", lets the user see through);
    - near the threshold: 0.2 % debris (0.53-1.00; Dice -0.02 to -0.14), gamma 1.5 (0.58-0.87; Dice -0.02 to
      -0.10), illumination x0.75 to x1.25 across an EM slice (0.86; Dice -0.12).

    Models still undecided on their own training images (tiny test models after a few dozen iterations, mean
    entropy ~0.9) have class statistics that mean little; the check is for models that learned their strokes.

    A model whose metadata has no usable ``training_profile`` (files from before this check, ``{"class_ids": ...}``
    only, a trainer that never ran) gets no check: :func:`check_prediction` returns None.

No Qt, no torch: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

PROFILE_VERSION = 1
QUANTILES = (1, 5, 25, 50, 75, 95, 99)
"""Whole-image intensity quantiles (percent) of a profile, per channel."""
CLASS_QUANTILES = (25, 50, 75)
"""Quantiles (percent) of the normalized intensity of the pixels each class wins, per class and channel."""
SAMPLE_TILE = 64
"""Side of the sampled tiles (pixels)."""
SAMPLE_TILES = 16
"""Sampled tiles per image at most (a 4 x 4 grid of a plane; 4 planes of 2 x 2 in a stack)."""
SAMPLE_PLANES = 4
"""Planes of a stack or volume sampled at most (each centred in its share of the stack)."""
MIN_CLASS_PIXELS = 100
"""A class that wins fewer sampled pixels has no ``class_intensity`` (its median would be noise)."""
TRAINING_TILES = 64
"""Tiles a trainer samples over all its training images at most (``SAMPLE_TILES`` per image, as every predicted
image). The end of each run predicts them, each with the network's context (or the whole planes they lie in, where
that reads fewer pixels), so fewer where the network is large: see ``TRAINING_STEPS``."""
TRAINING_STEPS = 2
"""The tiles a trainer samples read, with their context, at most the input pixels of this many training steps
(forward and backward: 3 x batch x input tile each) or ``TRAINING_MIN_PIXELS``, whichever is more; images beyond
one tile each are chosen evenly."""
TRAINING_MIN_PIXELS = 1 << 18
"""The smallest input-pixel budget of the training tiles (0.1-0.3 s of a depth-3, 16-filter net on one CPU core)."""
MAX_TRAINING_IMAGES = 32
"""Training-image profiles a model keeps at most (the latest; fine-tuning adds to those of the model it starts
from)."""

THRESHOLD = 1.0
"""Score (in tolerances) above which an image looks unlike the training images."""
TOWARD = 0.45
"""One tolerance of the class-level term: a class's median moved this fraction of the way to another class's."""
AWAY = 1.5
"""One tolerance of the class-level term away from every other class, in gaps to the nearest class."""
GAP_FLOOR = 0.2
"""Smallest gap between class medians (normalized units) the class-level term divides by."""
FRACTION_LOGIT = 2.5
"""One tolerance of the class-fraction term: log-odds of a class's fraction outside the training range."""
SCORE_GROUPS = (("class_level", "class_fraction"), ("stability", "entropy"), ("background",))
"""Kinds of terms that add up (root sum of squares) into one score; the check's score is the larger group's."""
REASON_TERM = 0.5
"""The reason names each kind of term at least this large (else the largest one)."""
FRACTION_CLIP = 1e-3
"""Fractions are clipped to ``[FRACTION_CLIP, 1 - FRACTION_CLIP]`` before their log-odds."""
STABILITY_GAIN = 1.5
"""The sampled tiles are also predicted this many times brighter and darker (normalized intensities x and /)."""
STABILITY_TOLERANCE = 0.3
"""One tolerance of the stability term: this share of a class's pixels changes class under ``STABILITY_GAIN``."""
STABILITY_BAND = 2
"""Pixels this close (in-plane, pixels) to a class boundary of the one-pass prediction are left out of the stability
count: a gain moves a boundary by a pixel or two on any image."""
STABILITY_TILES = 1
"""Tiles of the stability sample (:func:`stability_regions`): one, in the middle of the image (of its middle plane
in a stack); a tile's context costs more than the tile, so one large tile holds the most pixels for its cost."""
STABILITY_PIXELS = 1 << 17
"""Input pixels (with context) of the stability sample at most, per version of the image."""
STABILITY_MIN_PIXELS = 1 << 16
"""Input pixels of the stability sample at least, per version (a whole image up to 256 x 256)."""
STABILITY_SHARE = 0.1
"""The stability sample reads this share of the image's pixels per version, within the two bounds above."""
ENTROPY_RATIO = 1.5
"""One tolerance of the entropy term: the image's mean entropy at this multiple of the training images' highest (the
term is 0 up to the training images' highest)."""
ENTROPY_FLOOR = 0.05
"""The training images' highest mean entropy counts as at least this much (a model sure of every training pixel
would otherwise call any hesitation unlike)."""
BACKGROUND_BLOCK = 32
"""Side (pixels, in-plane) of the blocks of the sampled regions whose low quantile is the local background level
(:func:`background_spread`)."""
BACKGROUND_QUANTILE = 5
"""The quantile (percent) of a block that stands for its background level."""
BACKGROUND_SPREAD = (10, 90)
"""The background spread is the distance between these quantiles (percent) of the blocks' levels: a few blocks
filled by objects do not count."""
BACKGROUND_TOLERANCE = 0.15
"""One tolerance of the background term: an image's background spread this far (normalized units: 15 % of the way
from the background to the upper percentile) above the highest the network saw (the training images', or the
level of the background augmentation it trained with)."""
BACKGROUND_HINT = (
    "if these images have uneven illumination or haze, train with the normalization that subtracts a smooth "
    "background ({how})"
)
"""The :attr:`DomainCheck.hint` of an image whose background term is part of its warning; ``{how}`` is filled in
with the choice as the surface that shows the warning names it (``HINT_WORDING``)."""
HINT_WORDING = {
    "cli": "--normalization background",
    "widget": "Advanced settings > Normalization: 'robust, uneven background subtracted'",
    "record": "'robust, uneven background subtracted' in the widget, --normalization background on the command line",
}
"""How each surface names the background-subtracting normalization: the command line, the dock widget, and the
outputs' metadata record (read from either)."""


# --- sampling ------------------------------------------------------------------------------------------------


def sample_regions(
    spatial_shape: Sequence[int], tiles: int = SAMPLE_TILES, tile: int = SAMPLE_TILE
) -> list[tuple[slice, ...]]:
    """Evenly spread regions of an image with ``spatial_shape`` (2 axes, or 3 for a stack or volume).

    The last two axes get a square grid of ``tile`` x ``tile`` tiles, each centred in its cell of the grid (an axis
    no longer than the grid's tiles together is taken whole); leading axes get up to ``SAMPLE_PLANES`` planes,
    each centred in its share of the stack (each region is one plane thick), sharing ``tiles``: at most ``tiles``
    regions and about ``tiles * tile**2`` pixels. They depend only on the shape, so the same image is always
    sampled alike.
    """
    shape = tuple(int(n) for n in spatial_shape)
    if len(shape) < 2:
        raise ValueError(f"sample_regions needs 2 or more spatial axes, got shape {shape}")
    lead, plane = shape[:-2], shape[-2:]
    lead_count = math.prod(lead)
    n_planes = min(lead_count, SAMPLE_PLANES, max(1, tiles))
    grid = max(1, math.isqrt(max(1, tiles) // n_planes))
    spans = []
    for size in plane:
        if size <= grid * tile:
            spans.append([slice(0, size)])
        else:
            starts = ((np.arange(grid) + 0.5) * (size / grid) - tile / 2).round().astype(int)
            spans.append([slice(int(s), int(s) + tile) for s in starts])
    if lead:
        planes = sorted({int((i + 0.5) * lead_count / n_planes) for i in range(n_planes)})
        leads = [tuple(slice(int(i), int(i) + 1) for i in np.unravel_index(p, lead)) for p in planes]
    else:
        leads = [()]
    return [(*lead_key, ys, xs) for lead_key in leads for ys in spans[0] for xs in spans[1]]


def read_regions(normalized, regions: Sequence[tuple[slice, ...]], channels: bool = False) -> list[np.ndarray]:
    """The normalized pixels of each of ``regions``, as ``(C, *region)`` float32 arrays (C = 1 without
    ``channels``).

    ``normalized`` is the normalized image (a ``normalization.NormalizedView`` reads and normalizes only the
    regions), channels first when ``channels``.
    """
    lead = (slice(None),) if channels else ()
    parts = []
    for region in regions:
        values = np.asarray(normalized[lead + tuple(region)], dtype=np.float32)
        parts.append(values if channels else values[np.newaxis])
    return parts


def flatten_regions(parts: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`read_regions`' arrays as one ``(C, N)`` array, region after region."""
    return np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1)


def background_spread(parts: Sequence[np.ndarray]) -> list[float] | None:
    """How much the background level varies across an image, per channel, from :func:`read_regions`' arrays.

    Each region's planes are cut into ``BACKGROUND_BLOCK`` x ``BACKGROUND_BLOCK`` blocks (a plane smaller than a
    block is one block); a block's ``BACKGROUND_QUANTILE`` percentile is its background level, and the spread is
    the distance between the ``BACKGROUND_SPREAD`` quantiles of those levels (normalized units). Uneven
    illumination or a haze lifts the background of part of the field, which per-image percentiles leave in place;
    objects fill only some blocks, which the inner quantiles leave out. None with fewer than 4 blocks.
    """
    levels = None
    for part in parts:
        values = np.where(np.isfinite(part), part, 0.0)
        height, width = values.shape[-2:]
        planes = values.reshape(values.shape[0], -1, height, width)
        if height >= BACKGROUND_BLOCK and width >= BACKGROUND_BLOCK:
            ny, nx = height // BACKGROUND_BLOCK, width // BACKGROUND_BLOCK
            cut = planes[:, :, : ny * BACKGROUND_BLOCK, : nx * BACKGROUND_BLOCK]
            blocks = cut.reshape(*planes.shape[:2], ny, BACKGROUND_BLOCK, nx, BACKGROUND_BLOCK).swapaxes(3, 4)
        else:
            blocks = planes
        blocks = blocks.reshape(values.shape[0], -1, blocks.shape[-2] * blocks.shape[-1])
        found = np.percentile(blocks, BACKGROUND_QUANTILE, axis=-1)
        levels = found if levels is None else np.concatenate([levels, found], axis=1)
    if levels is None or levels.shape[1] < 4:
        return None
    low, high = np.percentile(levels, BACKGROUND_SPREAD, axis=1)
    return _rounded(high - low)


def sample_probabilities(probabilities, regions: Sequence[tuple[slice, ...]]) -> np.ndarray:
    """The class probabilities ``(n_classes, *spatial)`` at ``regions`` as ``(n_classes, N)`` float32, in the
    order of :func:`flatten_regions`."""
    parts = []
    for region in regions:
        values = np.asarray(probabilities[(slice(None), *region)], dtype=np.float32)
        parts.append(values.reshape(values.shape[0], -1))
    return np.concatenate(parts, axis=1)


def stability(base: Sequence[np.ndarray], shifted: Sequence[Sequence[np.ndarray]]) -> list[int]:
    """Per class, how many sampled pixels away from its boundaries change class when the image changes in gain.

    ``base``: the one-pass probabilities ``(n_classes, *region)`` of each sampled region; ``shifted``: the same
    regions predicted from the image x ``STABILITY_GAIN`` and / ``STABILITY_GAIN`` (any number of such versions).
    A pixel counts for class ``k`` where it enters or leaves ``k`` in a shifted version and lies more than
    ``STABILITY_BAND`` pixels (in-plane) from a boundary of the base's classes; per class the largest count over the
    versions. Models learn a boundary at no exact intensity, so a gain moves boundaries by a pixel or two on any
    image; whole objects that appear or vanish under a 1.5x change say the image's classes sit at the intensity
    where the network decides between them: dimmed objects, a brightened background.
    """
    n_classes = int(base[0].shape[0]) if len(base) else 0
    counts = np.zeros((max(1, len(shifted)), n_classes), np.int64)
    for r, probabilities in enumerate(base):
        winner = np.argmax(probabilities, axis=0)
        size = (1,) * (winner.ndim - 2) + (2 * STABILITY_BAND + 1,) * min(2, winner.ndim)
        inside = ndimage.grey_dilation(winner, size=size) == ndimage.grey_erosion(winner, size=size)
        for v, version in enumerate(shifted):
            other = np.argmax(version[r], axis=0)
            moved = inside & (other != winner)
            for classes in (winner[moved], other[moved]):  # the class a pixel leaves and the one it joins
                counts[v] += np.bincount(classes, minlength=n_classes)
    return [int(c) for c in counts.max(axis=0)]


# --- profiles --------------------------------------------------------------------------------------------------


def _rounded(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def profile(
    values: np.ndarray, probabilities: np.ndarray | None = None, background: Sequence[float] | None = None
) -> dict:
    """The profile of one image from its sampled normalized pixels ``values`` ``(C, N)`` and, once predicted, the
    one-pass class probabilities ``(n_classes, N)`` of the same pixels (see the module docstring).

    Returns ``{"pixels", "intensity"}`` (``intensity``: per channel the ``QUANTILES``), ``"background_spread"``
    (per channel, :func:`background_spread`) when ``background`` is given, and, with ``probabilities``,
    ``"class_fractions"`` (per class), ``"class_intensity"`` (per class: None or per channel the
    ``CLASS_QUANTILES``) and ``"entropy"`` (mean normalized entropy). JSON-ready: floats rounded to 4 digits.
    """
    values = np.asarray(values, dtype=np.float32)
    finite = np.where(np.isfinite(values), values, 0.0)
    record = {"pixels": int(values.shape[1]), "intensity": [_rounded(np.percentile(c, QUANTILES)) for c in finite]}
    if background is not None:
        record["background_spread"] = _rounded(background)
    if probabilities is None:
        return record
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.shape[1] != values.shape[1]:
        raise ValueError(f"{probabilities.shape[1]} probabilities for {values.shape[1]} sampled pixels")
    n_classes = probabilities.shape[0]
    winner = np.argmax(probabilities, axis=0)
    counts = np.bincount(winner, minlength=n_classes)
    record["class_fractions"] = _rounded(counts / max(1, winner.size))
    record["class_intensity"] = [
        [_rounded(np.percentile(c[winner == k], CLASS_QUANTILES)) for c in finite]
        if counts[k] >= MIN_CLASS_PIXELS
        else None
        for k in range(n_classes)
    ]
    record["entropy"] = _mean_entropy(probabilities)
    return record


def _mean_entropy(probabilities: np.ndarray) -> float:
    """The mean normalized entropy of ``(n_classes, N)`` probabilities, rounded to 4 digits."""
    n_classes = probabilities.shape[0]
    if n_classes < 2:
        return 0.0
    p = np.clip(probabilities, 1e-7, 1.0)
    return round(float((-(p * np.log(p)).sum(axis=0) / math.log(n_classes)).mean()), 4)


def image_profile(normalized, probabilities=None, *, channels: bool = False, tiles: int = SAMPLE_TILES) -> dict:
    """:func:`profile` of a whole image: ``normalized`` (channels first when ``channels``) and, when given, its
    class probabilities ``(n_classes, *spatial)`` are read at :func:`sample_regions` only."""
    spatial = tuple(normalized.shape[1:] if channels else normalized.shape)
    regions = sample_regions(spatial, tiles)
    parts = read_regions(normalized, regions, channels)
    sampled = None if probabilities is None else sample_probabilities(probabilities, regions)
    return profile(flatten_regions(parts), sampled, background_spread(parts))


def training_profile(images: Sequence[dict], earlier: dict | None = None) -> dict:
    """The ``metadata["training_profile"]`` of a model: the profiles of its training ``images`` after those of
    ``earlier`` (the profile of the model it was fine-tuned from, if usable), the latest ``MAX_TRAINING_IMAGES``."""
    kept = []
    if isinstance(earlier, dict) and earlier.get("version") == PROFILE_VERSION:
        kept = _profile_images(earlier)
    kept = [*kept, *images][-MAX_TRAINING_IMAGES:]
    return {
        "version": PROFILE_VERSION,
        "quantiles": list(QUANTILES),
        "class_quantiles": list(CLASS_QUANTILES),
        "images": [dict(p) for p in kept],
    }


# --- the check -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainCheck:
    """How far one image lies outside the training images (see the module docstring)."""

    score: float
    """In tolerances: the root sum of squares of the largest term of each kind (0: inside the training images'
    range)."""
    threshold: float
    """``THRESHOLD``: above it the image looks unlike the training images."""
    unlike: bool
    """``score > threshold``."""
    reason: str
    """What differs, in words and figures: the largest finding of each kind that reaches ``REASON_TERM``, else the
    largest one."""
    terms: dict = field(default_factory=dict)
    """The largest term of each kind: ``{"class_level": ..., "class_fraction": ...}``."""
    profile: dict = field(default_factory=dict)
    """The image's :func:`profile`."""
    hint: str = ""
    """``BACKGROUND_HINT`` for an unlike image whose background term is part of the warning (``REASON_TERM`` or
    more) and a model that does not subtract a smooth background already; else empty."""

    def as_metadata(self) -> dict:
        """A JSON-ready record (TIFF metadata of the CLI's outputs, ``layer.metadata`` in the widget)."""
        return {
            "score": round(self.score, 3),
            "threshold": self.threshold,
            "unlike": self.unlike,
            "reason": self.reason,
            "terms": {k: round(v, 3) for k, v in self.terms.items()},
            "hint": self.hint.format(how=HINT_WORDING["record"]),
            "profile": self.profile,
        }

    def message(self, name: str, surface: str = "cli") -> str:
        """The warning for an unlike image called ``name``, its hint worded for ``surface`` (a key of
        ``HINT_WORDING``: ``"cli"`` or ``"widget"``)."""
        hint = self.hint.format(how=HINT_WORDING[surface])
        advice = "paint a few strokes on it and train on" + (f"; {hint}" if hint else "")
        score = f"score {self.score:.2f} > {self.threshold:g}"
        return f"'{name}' looks unlike the training images ({score}: {self.reason}): {advice}"


@dataclass(frozen=True)
class _Finding:
    term: float
    kind: str
    text: str


def _logit(fraction: float) -> float:
    f = min(max(float(fraction), FRACTION_CLIP), 1.0 - FRACTION_CLIP)
    return math.log(f / (1.0 - f))


def _profile_images(training) -> list[dict]:
    """The image profiles of a training profile read from a model file: only its list's dicts (a file edited by
    hand may hold anything there)."""
    images = training.get("images") if isinstance(training, dict) else None
    return [entry for entry in images if isinstance(entry, dict)] if isinstance(images, list) else []


def _usable(training: dict, n_classes: int, n_channels: int) -> list[dict]:
    """The training profiles that hold class statistics of ``n_classes`` classes and ``n_channels`` channels."""
    if not isinstance(training, dict) or training.get("version") != PROFILE_VERSION:
        return []
    usable = []
    for entry in _profile_images(training):
        try:
            fractions = [float(f) for f in entry["class_fractions"]]
            levels = entry["class_intensity"]
            if len(fractions) != n_classes or len(levels) != n_classes:
                continue
            medians = [None if lv is None else [float(c[1]) for c in lv] for lv in levels]
            if any(m is not None and len(m) != n_channels for m in medians):
                continue
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        numbers = fractions + [v for m in medians if m is not None for v in m]
        entropy = entry.get("entropy")
        entropy = float(entropy) if isinstance(entropy, (int, float)) and math.isfinite(entropy) else None
        if all(math.isfinite(v) for v in numbers):
            usable.append({"fractions": fractions, "medians": medians, "entropy": entropy})
    return usable


def _fraction_findings(image: dict, usable: list[dict], names: list[str]) -> list[_Finding]:
    n_classes = len(names)
    fractions = [float(f) for f in image["class_fractions"]]
    classes = range(n_classes)
    if n_classes == 2:  # one number: speak of the class with the smaller training share (the objects, usually)
        mean = [np.mean([u["fractions"][k] for u in usable]) for k in classes]
        classes = [int(np.argmin(mean))]
    findings = []
    for k in classes:
        trained = [u["fractions"][k] for u in usable]
        lo, hi = _logit(min(trained)), _logit(max(trained))
        x = _logit(fractions[k])
        excess = max(lo - x, x - hi, 0.0)
        span = f"{min(trained):.1%}" if max(trained) - min(trained) < 5e-4 else f"{min(trained):.1%}-{max(trained):.1%}"
        text = f"{names[k]} covers {fractions[k]:.1%} of the image (training {span})"
        findings.append(_Finding(excess / FRACTION_LOGIT, "class_fraction", text))
    return findings


def _level_findings(image: dict, usable: list[dict], names: list[str], n_channels: int) -> list[_Finding]:
    findings = []
    levels = image["class_intensity"]
    for c in range(n_channels):
        trained = {}
        for k in range(len(names)):
            values = [u["medians"][k][c] for u in usable if u["medians"][k] is not None]
            if values:
                trained[k] = (min(values), max(values), float(np.mean(values)))
        for k, (lo, hi, _) in trained.items():
            if levels[k] is None:
                continue
            median = float(levels[k][c][1])
            shift = median - min(max(median, lo), hi)
            if shift == 0.0:
                findings.append(_Finding(0.0, "class_level", f"{names[k]} pixels inside the training range"))
                continue
            edge = lo if shift < 0 else hi
            ahead = {j: m for j, (_, _, m) in trained.items() if j != k and (m - edge) * shift > 0}
            channel = f" (channel {c})" if n_channels > 1 else ""
            span = f"{lo:.2f}" if hi - lo < 5e-3 else f"{lo:.2f}-{hi:.2f}"
            text = f"{names[k]} pixels{channel} at {median:.2f} (training {span})"
            if ahead:
                j = min(ahead, key=lambda j: abs(ahead[j] - edge))
                gap = max(abs(ahead[j] - edge), GAP_FLOOR)
                way = abs(shift) / gap
                term = way / TOWARD
                text += f", {way:.0%} of the way to {names[j]} ({ahead[j]:.2f})"
            else:
                others = [abs(m - edge) for j, (_, _, m) in trained.items() if j != k]
                gap = max(min(others, default=GAP_FLOOR), GAP_FLOOR)
                term = abs(shift) / gap / AWAY
            findings.append(_Finding(term, "class_level", text))
    return findings


def _stability_findings(image: dict, usable: list[dict], names: list[str]) -> list[_Finding]:
    record = image.get("stability")
    if not isinstance(record, dict):
        return []
    pixels, findings = int(record["pixels"]), []
    for k, changed in enumerate(record["changed"]):
        trained = float(np.mean([u["fractions"][k] for u in usable]))
        area = max(float(record["fractions"][k]) * pixels, trained * pixels, MIN_CLASS_PIXELS)
        share = changed / area
        gain = record["gain"]
        text = f"{share:.0%} of the {names[k]} pixels change class when the image is {gain:g}x brighter or darker"
        findings.append(_Finding(share / STABILITY_TOLERANCE, "stability", text))
    return findings


def _entropy_findings(image: dict, usable: list[dict]) -> list[_Finding]:
    trained = [u["entropy"] for u in usable if u["entropy"] is not None]
    if not trained or not isinstance(image.get("entropy"), (int, float)):
        return []
    highest = max(trained)
    tolerance = (ENTROPY_RATIO - 1.0) * max(highest, ENTROPY_FLOOR)
    text = f"mean uncertainty {image['entropy']:.2f} (training at most {highest:.2f})"
    return [_Finding(max(0.0, float(image["entropy"]) - highest) / tolerance, "entropy", text)]


def _background_findings(image: dict, training: dict, seen: float) -> list[_Finding]:
    """The background term per channel: ``image``'s background spread above the highest the network saw (the
    training images', at least ``seen``); none when either side lacks the figure (models saved before it)."""
    spread = image.get("background_spread")
    if not isinstance(spread, list):
        return []
    trained = [e.get("background_spread") for e in _profile_images(training)]
    trained = [t for t in trained if isinstance(t, list) and len(t) == len(spread)]
    findings = []
    for c in range(len(spread) if trained else 0):
        try:
            value, highest = float(spread[c]), max(float(t[c]) for t in trained)
        except (TypeError, ValueError):
            return []  # a malformed record: no term rather than a failed prediction
        if not (math.isfinite(value) and math.isfinite(highest)):
            continue
        channel = f" (channel {c})" if len(spread) > 1 else ""
        reference = max(highest, seen)
        text = f"background level varies by {value:.2f} across the image{channel} (training at most {reference:.2f})"
        findings.append(_Finding(max(0.0, value - reference) / BACKGROUND_TOLERANCE, "background", text))
    return findings


def compare(
    image: dict,
    training: dict,
    class_names: Sequence[str] | None = None,
    *,
    background_seen: float = 0.0,
    background_subtracted: bool = False,
) -> DomainCheck | None:
    """Score the :func:`profile` ``image`` (with its class part) against a :func:`training_profile`.

    Returns None when ``training`` holds no usable class statistics for the image's classes and channels (no
    check is possible: models saved before this check, a trainer that never ran). ``class_names`` name the
    classes in the reason (default "class 1", "class 2", ...). ``background_seen``: the background spread the
    network saw in training beyond its images' (the level of its background augmentation);
    ``background_subtracted``: the model's normalization subtracts a smooth background already (no
    :attr:`DomainCheck.hint` then).
    """
    if "class_fractions" not in image:
        raise ValueError("compare needs the profile of a predicted image (with its class probabilities)")
    n_classes, n_channels = len(image["class_fractions"]), len(image["intensity"])
    usable = _usable(training, n_classes, n_channels)
    if not usable:
        return None
    names = [str(n) for n in class_names or []]
    names = names + [f"class {k + 1}" for k in range(len(names), n_classes)] if len(names) < n_classes else names
    findings = _fraction_findings(image, usable, names) + _level_findings(image, usable, names, n_channels)
    findings += _stability_findings(image, usable, names) + _entropy_findings(image, usable)
    findings += _background_findings(image, training, background_seen)
    top: dict[str, _Finding] = {}
    for f in findings:
        if f.kind not in top or f.term > top[f.kind].term:
            top[f.kind] = f
    terms = {kind: f.term for kind, f in top.items()}
    score = max(math.hypot(*(terms.get(kind, 0.0) for kind in group)) for group in SCORE_GROUPS)
    ranked = sorted(top.values(), key=lambda f: -f.term)
    shown = [f.text for f in ranked if f.term >= REASON_TERM] or [f.text for f in ranked[:1]]
    unlike = score > THRESHOLD
    hinted = unlike and not background_subtracted and terms.get("background", 0.0) >= REASON_TERM
    hint = BACKGROUND_HINT if hinted else ""
    return DomainCheck(float(score), THRESHOLD, unlike, "; ".join(shown), terms, image, hint)


class Scaled:
    """A normalized image (or a view of one) whose values read multiplied by ``gain``: the brighter and darker
    versions of :func:`check_prediction`."""

    def __init__(self, normalized, gain: float):
        self._normalized, self._gain = normalized, np.float32(gain)
        self.shape, self.ndim = tuple(normalized.shape), len(normalized.shape)

    def __getitem__(self, key):
        return np.asarray(self._normalized[key], dtype=np.float32) * self._gain


def stability_regions(spatial_shape: Sequence[int], halo: Sequence[int], grid: int) -> list[tuple[slice, ...]]:
    """Where :func:`check_prediction` predicts the image three times (as it is, brighter, darker): up to
    ``STABILITY_TILES`` tiles spread as :func:`sample_regions` spreads them, as large as a budget of input pixels
    (with the network's in-plane ``halo`` and pooling ``grid``) allows: ``STABILITY_SHARE`` of the image, at least
    ``STABILITY_MIN_PIXELS`` (a few objects make a noisy count) and at most ``STABILITY_PIXELS`` per version."""
    shape = tuple(int(n) for n in spatial_shape)
    budget = int(min(STABILITY_PIXELS, max(STABILITY_MIN_PIXELS, STABILITY_SHARE * math.prod(shape))))
    reach = 2 * max(int(h) for h in list(halo)[-2:]) + int(grid)
    tiles = int(min(STABILITY_TILES, max(1, budget // (SAMPLE_TILE + reach) ** 2)))
    side = max(SAMPLE_TILE, math.isqrt(budget // tiles) - reach)
    return sample_regions(shape, tiles, side)


def check_prediction(
    metadata: dict,
    normalized,
    probabilities,
    predict_regions,
    *,
    halo: Sequence[int],
    grid: int,
    channels: bool = False,
    one_pass: bool = False,
) -> DomainCheck | None:
    """The check ``predict.predict_image`` runs on each image, compared with ``metadata["training_profile"]``;
    None when the model has no usable training profile (nothing is read or predicted then).

    ``normalized`` is the image as the model's recipe normalized it (channels first when ``channels``),
    ``probabilities`` ``(n_classes, *spatial)`` its prediction. The :func:`profile` holds the intensities and the
    class part of ``probabilities`` at :func:`sample_regions`; the entropy and the :func:`stability` come from
    one-pass predictions (no flips, no refinement, as the training profiles hold them) at
    :func:`stability_regions` (``halo``, ``grid``: the network's): ``predict_regions(image, regions)`` gives them,
    with the network's context, for ``normalized`` (unless ``one_pass``: ``probabilities`` are one pass already)
    and its :class:`Scaled` versions x and / ``STABILITY_GAIN``.
    """
    training = metadata.get("training_profile") if isinstance(metadata, dict) else None
    if not isinstance(training, dict) or training.get("version") != PROFILE_VERSION:
        return None
    names = metadata.get("class_names") or [f"class {i}" for i in metadata.get("class_ids") or []]
    n_classes = int(probabilities.shape[0])
    record = image_profile(normalized, probabilities, channels=channels)
    if not _usable(training, n_classes, len(record["intensity"])):
        return None  # nothing to compare with: predict nothing more
    checked = stability_regions(tuple(probabilities.shape[1:]), halo, grid)
    if one_pass:
        base = [np.asarray(probabilities[(slice(None), *region)], dtype=np.float32) for region in checked]
    else:
        base = predict_regions(normalized, checked)
    shifted = [predict_regions(Scaled(normalized, g), checked) for g in (STABILITY_GAIN, 1.0 / STABILITY_GAIN)]
    sampled = np.concatenate([p.reshape(n_classes, -1) for p in base], axis=1)
    winner = np.argmax(sampled, axis=0)
    record["entropy"] = _mean_entropy(sampled)
    record["stability"] = {
        "gain": STABILITY_GAIN,
        "pixels": int(winner.size),
        "fractions": _rounded(np.bincount(winner, minlength=n_classes) / winner.size),
        "changed": stability(base, shifted),
    }
    recipe = metadata.get("normalization")
    subtracted = isinstance(recipe, dict) and bool(recipe.get("background_grid"))
    return compare(
        record, training, names, background_seen=_background_seen(metadata), background_subtracted=subtracted
    )


def _background_seen(metadata: dict) -> float:
    """The largest background augmentation level (``TrainingSettings.background``) of the model's training runs."""
    training = metadata.get("training")
    history = training.get("history") if isinstance(training, dict) else None
    levels = [0.0]
    for run in history if isinstance(history, list) else []:
        settings = run.get("settings") if isinstance(run, dict) else None
        level = settings.get("background") if isinstance(settings, dict) else None
        if isinstance(level, (int, float)) and math.isfinite(level):
            levels.append(float(level))
    return max(levels)
