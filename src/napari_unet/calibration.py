"""Calibrated probabilities: a softmax temperature fitted on held-out pixels, and the calibration error.

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): one scalar ``T`` divides the
logits, chosen to minimise the negative log-likelihood of held-out pixels; the argmax, so the segmentation, is
unchanged, only the confidence moves. ``T`` is stored as the model's ``temperature`` (``model.UNet``), so every
prediction path applies it. Log-probabilities serve as logits (softmax does not change when a pixel's logits shift
by one constant), so the probabilities that ``tiling.predict_tiled`` returns are enough to fit it.

A default prediction averages the probabilities of the test-time flips (``tiling.flip_transforms``), each pass with
the temperature applied, and averaging already softens them. So the temperature is fitted through that average:
the held-out pixels' logits come as ``(F, N, K)``, one set per flip pass (:func:`flip_logits`), and the NLL is that
of ``mean_f softmax(z_f / T)``; ``(N, K)`` logits (one pass) are the case ``F = 1``.

The one-dimensional minimisation is SciPy's bounded Brent search over ``log T`` (``scipy.optimize.minimize_scalar``);
the expected calibration error is the usual equal-width-bins estimate (15 bins over the top-class confidence).
"""

from __future__ import annotations

import math

import numpy as np

MAX_PIXELS = 1 << 20
"""Held-out pixels a fit uses at most (a seeded sample beyond that): the NLL is an average, a million is plenty."""
LOG_T_RANGE = (math.log(0.05), math.log(20.0))
"""The temperatures a fit may choose."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _passes(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    return logits[None] if logits.ndim == 2 else logits


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` (class indices, ``(N,)``) under ``softmax(logits / T)``
    (``logits``: ``(N, K)``), or under the mean over passes of it (``(F, N, K)``: flip passes)."""
    log_p = np.log(np.clip(softmax(logits, temperature), 1e-300, None))
    return float(-log_p[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising :func:`nll` on these held-out pixels (``LOG_T_RANGE`` bounds it)."""
    from scipy.optimize import minimize_scalar

    logits = _passes(logits)
    result = minimize_scalar(
        lambda log_t: nll(logits, targets, math.exp(log_t)),
        bounds=LOG_T_RANGE,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


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


def calibrate(logits: np.ndarray, targets: np.ndarray, temperature: str | float = "auto") -> dict:
    """The temperature (``"auto"``: :func:`fit_temperature`, a number: that one) and what it does on these pixels
    (``logits``: ``(N, K)`` or ``(F, N, K)``, module docstring): ``{"temperature", "pixels", "passes", "nll_before",
    "nll_after", "ece_before", "ece_after"}`` (the model file's ``calibration`` metadata)."""
    chosen = fit_temperature(logits, targets) if temperature == "auto" else float(temperature)
    return {
        "temperature": chosen,
        "pixels": len(targets),
        "passes": len(_passes(logits)),
        "nll_before": nll(logits, targets),
        "nll_after": nll(logits, targets, chosen),
        "ece_before": expected_calibration_error(softmax(logits), targets),
        "ece_after": expected_calibration_error(softmax(logits, chosen), targets),
    }


def sample_indices(targets: np.ndarray, rng: np.random.Generator, limit: int) -> np.ndarray:
    """Flat indices of up to ``limit`` labelled pixels (``targets >= 0``) of one image, chosen uniformly with
    ``rng``, in ascending order."""
    flat = np.flatnonzero(targets.ravel() >= 0)
    if flat.size > limit:
        flat = np.sort(rng.choice(flat, limit, replace=False))
    return flat


def flip_logits(model, image: np.ndarray, indices: np.ndarray, *, flips: bool = True, device=None) -> np.ndarray:
    """``(F, N, K)`` logits (log-probabilities) at the flat ``indices`` of ``image``'s spatial pixels (normalized,
    channels first for a multi-channel ``model``; the whole of what is predicted: its border is mirrored), one set
    per test-time flip pass (``tiling.flip_transforms``; ``flips=False``: the one plain pass): the passes that
    ``predict_tiled(test_time_flips=True)`` averages, each predicted on its own."""
    from .tiling import flip_transforms, predict_tiled

    transforms = flip_transforms(model.ndim) if flips else [((), False)]
    passes = []
    for transform in transforms:
        p = predict_tiled(model, image, device=device, test_time_flips=[transform])
        passes.append(np.log(np.clip(p.reshape(p.shape[0], -1)[:, indices].T, 1e-8, 1.0)))
    return np.stack(passes)
