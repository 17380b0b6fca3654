"""Calibrated probabilities: a softmax temperature fitted on held-out pixels, and the calibration error.

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): one scalar ``T`` divides the
logits, chosen to minimise the negative log-likelihood of held-out pixels; the argmax, so the segmentation, is
unchanged, only the confidence moves. ``T`` is stored as the model's ``temperature`` (``model.UNet``), so every
prediction path applies it. Log-probabilities serve as logits (softmax does not change when a pixel's logits shift
by one constant), so the probabilities that ``tiling.predict_tiled`` returns are enough to fit it.

A default prediction averages the probabilities of the test-time flips (``tiling.flip_transforms``), each pass with
the temperature applied, and averaging already softens them; then the edge refinement (``refine``) filters the
average, which moves the confidence near every edge again. So the temperature is fitted through what a default
prediction returns: :func:`held_out_patch` predicts each flip pass of a patch around the held-out pixels (with the
context that makes them exact) and keeps the passes whole; :class:`FlipPasses` gives, for any ``T``, the refined
``mean_f softmax(z_f / T)`` at the held-out pixels, and the NLL is taken of that. Plain ``(N, K)`` logits (one pass,
no refinement) or ``(F, N, K)`` (flip passes, no refinement) are accepted everywhere too.

The one-dimensional minimisation is SciPy's bounded Brent search over ``log T`` (``scipy.optimize.minimize_scalar``);
the expected calibration error is the usual equal-width-bins estimate (15 bins over the top-class confidence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .refine import AUTO, DEFAULT_EPS, DEFAULT_RADIUS, MAX_AUTO_RADIUS

MAX_PIXELS = 1 << 20
"""Held-out pixels a fit uses at most (a seeded sample beyond that): the NLL is an average, a million is plenty."""
TEMPERATURE_RANGE = (0.05, 20.0)
"""Softmax temperatures a model may have, fitted or given (``model.UNet``, ``--temperature``): dividing the logits
by much less overflows them (a temperature of 1e-40 made every probability NaN), by much more makes every pixel
equally likely."""
LOG_T_RANGE = tuple(math.log(t) for t in TEMPERATURE_RANGE)
"""The temperatures a fit may choose."""
REFINEMENT_REACH = 2 * MAX_AUTO_RADIUS
"""Pixels beyond a held-out pixel that the default edge refinement reads (its two box means of the widest radius)."""
NLL_FLOOR = 1e-6
"""The least probability the NLL counts: the edge refinement clips at 0, and one such pixel of its true class would
otherwise outweigh millions of others and decide the fit alone."""
_TINY = np.finfo(np.float32).tiny
"""The floor under probabilities taken as logits: a float32 softmax that underflowed to 0 had a logit gap of ~87 or
more, which its logarithm then keeps (a higher floor would lift such pixels at high temperatures)."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _passes(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    return logits[None] if logits.ndim == 2 else logits


@dataclass(frozen=True)
class FlipPasses:
    """The held-out pixels of one patch as a default prediction sees them (:func:`held_out_patch`): ``passes``,
    ``(F, K, *spatial)`` log-probabilities of the patch, one per flip pass; ``guide``, the normalized patch the
    refinement follows (``(*spatial)`` or channels first); ``radius``/``eps``, the refinement's (radius 0: none);
    ``indices``, the flat spatial indices of the held-out pixels in the patch."""

    passes: np.ndarray
    guide: np.ndarray
    radius: int
    eps: float
    spatial_ndim: int
    indices: np.ndarray

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        """``(N, K)``: the held-out pixels' probabilities at ``temperature``, flip-averaged, then refined."""
        from .refine import refine_probabilities

        k = self.passes.shape[1]
        if not self.radius:  # the pixels alone: nothing else reaches them
            return softmax(
                self.passes.reshape(len(self.passes), k, -1)[:, :, self.indices].transpose(0, 2, 1), temperature
            )
        scaled = self.passes / np.float32(temperature)
        scaled -= scaled.max(axis=1, keepdims=True)
        np.exp(scaled, out=scaled)
        scaled /= scaled.sum(axis=1, keepdims=True)
        mean = scaled.mean(axis=0)
        refined = refine_probabilities(
            mean, self.guide, spatial_ndim=self.spatial_ndim, radius=self.radius, eps=self.eps
        )
        return refined.reshape(k, -1)[:, self.indices].T.astype(np.float64)


Held = np.ndarray | Sequence[FlipPasses]
"""Held-out pixels: ``(N, K)`` or ``(F, N, K)`` logits, or patches whose pixels are concatenated in order."""


def probabilities_of(held: Held, temperature: float = 1.0) -> np.ndarray:
    """``(N, K)`` probabilities of the held-out pixels at ``temperature`` (:data:`Held`)."""
    if isinstance(held, np.ndarray):
        return softmax(held, temperature)
    return np.concatenate([patch.probabilities(temperature) for patch in held])


def nll(held: Held, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` (class indices, ``(N,)``) under the held-out pixels' probabilities
    at ``temperature``: ``softmax(logits / T)`` of ``(N, K)`` logits, the mean over passes of it for ``(F, N, K)``,
    the refined flip average for patches (:class:`FlipPasses`). Probabilities are floored at ``NLL_FLOOR``."""
    log_p = np.log(np.maximum(probabilities_of(held, temperature), NLL_FLOOR))
    return float(-log_p[np.arange(len(targets)), targets].mean())


def fit_temperature(held: Held, targets: np.ndarray) -> float:
    """The temperature minimising :func:`nll` on these held-out pixels (``LOG_T_RANGE`` bounds it)."""
    from scipy.optimize import minimize_scalar

    if isinstance(held, np.ndarray):
        held = _passes(held)
    result = minimize_scalar(
        lambda log_t: nll(held, targets, math.exp(log_t)),
        bounds=LOG_T_RANGE,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(min(max(math.exp(result.x), TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1]))  # exp(log(t)) may miss t


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: over equal-width bins of the top-class confidence, the pixel-weighted mean of
    ``|accuracy - confidence|`` (``probabilities``: ``(N, K)``, ``targets``: ``(N,)``)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / max(1, count.sum()))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / T)`` of ``(N, K)`` logits; of ``(F, N, K)``, its mean over the ``F`` passes."""
    return np.exp(_log_softmax(_passes(logits) / temperature)).mean(axis=0)


def calibrate(held: Held, targets: np.ndarray, temperature: str | float = "auto") -> dict:
    """The temperature (``"auto"``: :func:`fit_temperature`, a number: that one) and what it does on these pixels
    (:data:`Held`, module docstring): ``{"temperature", "pixels", "passes", "refined", "nll_before", "nll_after",
    "ece_before", "ece_after"}`` (the model file's ``calibration`` metadata; ``refined``: the fit went through the
    edge refinement)."""
    if isinstance(held, np.ndarray):
        held = _passes(held)
        passes, refined = len(held), False
    else:
        passes, refined = (len(held[0].passes) if held else 1), any(patch.radius for patch in held)
    chosen = fit_temperature(held, targets) if temperature == "auto" else float(temperature)
    before, after = probabilities_of(held), probabilities_of(held, chosen)
    return {
        "temperature": chosen,
        "pixels": len(targets),
        "passes": passes,
        "refined": refined,
        "nll_before": nll(held, targets),
        "nll_after": nll(held, targets, chosen),
        "ece_before": expected_calibration_error(before, targets),
        "ece_after": expected_calibration_error(after, targets),
    }


def sample_window(shape: tuple[int, ...], limit: int, rng: np.random.Generator) -> tuple[slice, ...]:
    """A window of at most ``limit`` pixels of an image of ``shape`` (the whole image where it has no more), with
    the image's aspect ratio, placed uniformly with ``rng``: a contiguous region, so that what the edge refinement
    reads around its pixels is predicted with them."""
    total = math.prod(shape)
    if total <= limit:
        return tuple(slice(0, n) for n in shape)
    scale = (limit / total) ** (1.0 / len(shape))
    sides = [max(1, math.floor(n * scale)) for n in shape]
    return tuple(
        slice(start, start + side)
        for start, side in ((int(rng.integers(0, n - s + 1)), s) for n, s in zip(shape, sides))
    )


def held_out_patch(
    model,
    image,
    coordinates: tuple[np.ndarray, ...],
    *,
    flips: bool = True,
    radius: int | str = DEFAULT_RADIUS,
    eps: float = DEFAULT_EPS,
    device=None,
) -> FlipPasses:
    """The held-out pixels at ``coordinates`` (index arrays over the spatial axes) of ``image`` (normalized, channels
    first for a multi-channel ``model``; any array that slices) as a default prediction gives them: the bounding
    box of the pixels, grown by twice the refinement's widest radius (what the filter reads) and by the network's
    context (``predict.region_with_context``: mirrored only at the image's border), is predicted once per
    test-time flip pass (``tiling.flip_transforms``; ``flips=False``: the one plain pass) and kept whole; ``radius``
    ("auto": ``refine.auto_radius`` of the patch's prediction, as ``predict_tiled`` measures it on an image; 0: no
    refinement) and ``eps`` are the refinement's."""
    from .predict import region_with_context
    from .refine import auto_radius
    from .tiling import flip_transforms, predict_tiled

    spatial = tuple(image.shape[image.ndim - len(coordinates) :])
    channels = image.ndim - len(spatial)
    reach = REFINEMENT_REACH if radius == AUTO else 2 * int(radius)
    region = tuple(
        slice(max(0, int(c.min()) - reach), min(n, int(c.max()) + 1 + reach)) for c, n in zip(coordinates, spatial)
    )
    crop, _ = region_with_context(region, spatial, model.halo, model.grid)
    patch = np.asarray(image[(slice(None),) * channels + crop], np.float32)
    transforms = flip_transforms(model.ndim) if flips else [((), False)]
    passes = np.stack(
        [np.log(np.maximum(predict_tiled(model, patch, device=device, test_time_flips=[t]), _TINY)) for t in transforms]
    )
    if radius == AUTO:
        radius = auto_radius(np.exp(passes).mean(axis=0), model.ndim)
    inside = np.ravel_multi_index(tuple(c - s.start for c, s in zip(coordinates, crop)), patch.shape[channels:])
    return FlipPasses(passes, patch, int(radius), float(eps), model.ndim, inside)
