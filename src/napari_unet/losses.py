"""Losses over painted pixels only: weighted cross-entropy + soft Dice, class weights, U-Net border weights.

Targets are class indices ``0..K-1`` with ``-1`` for unpainted pixels. Unpainted pixels have weight zero in
every term: the loss and its gradient do not depend on the logits there (they are multiplied by an exact 0
mask, never merely down-weighted).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F


def class_weights(counts, power: float = 1.0) -> np.ndarray:
    """Weights that balance the painted classes: ``(total / (K * count)) ** power`` (1 for unpainted classes).

    With ``power=1`` every painted class contributes the same total weight to the cross-entropy; smaller
    powers balance partly (0: no weighting), which keeps the classes' painted proportions as a soft prior.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.ones_like(counts)
    if present.any():
        weights[present] = (counts[present].sum() / (present.sum() * counts[present])) ** power
    return weights.astype(np.float32)


def border_weight_map(target: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The U-Net weight map term ``1 + w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` on painted background.

    Objects are the connected components of painted pixels of every class but the first (class index 0,
    the lowest painted id, is the background by convention); ``d1``/``d2`` are the distances to the nearest
    and second-nearest object. The extra weight goes to painted background pixels only (the thin gaps
    between touching objects); elsewhere the map is 1. Distances beyond ``5 sigma`` are not computed (their
    weight is below ``w0 * 1e-5``).
    """
    target = np.asarray(target)
    weights = np.ones(target.shape, dtype=np.float32)
    objects, count = ndimage.label(target > 0)
    background = target == 0
    if count < 2 or not background.any():
        return weights
    reach = int(np.ceil(5 * sigma))
    d1 = np.full(target.shape, np.inf, dtype=np.float32)
    d2 = np.full(target.shape, np.inf, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(objects), start=1):
        window = tuple(slice(max(0, s.start - reach), min(n, s.stop + reach)) for s, n in zip(box, target.shape))
        distance = ndimage.distance_transform_edt(objects[window] != index).astype(np.float32)
        near1, near2 = d1[window], d2[window]
        closer = distance < near1
        near2[...] = np.where(closer, near1, np.minimum(near2, distance))
        near1[...] = np.where(closer, distance, near1)
    extra = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    weights[background] += extra[background]
    return weights


def masked_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    *,
    weight_map: torch.Tensor | None = None,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` * soft Dice loss over painted pixels (``target >= 0``) only.

    Parameters
    ----------
    logits : (N, K, *spatial) tensor
    target : (N, *spatial) integer tensor, class index or -1 (unpainted)
    class_weight : (K,) tensor, optional
        Per-class cross-entropy weights (``class_weights``).
    weight_map : (N, *spatial) tensor, optional
        Extra per-pixel weights (``border_weight_map``), multiplied in.
    dice_weight : float
        Weight of the soft Dice term (mean over classes of ``1 - Dice``).

    The cross-entropy is the weighted mean over painted pixels; a batch without painted pixels gives 0.
    """
    n_classes = logits.shape[1]
    painted = target >= 0
    safe_target = torch.where(painted, target, torch.zeros_like(target)).long()
    mask = painted.to(logits.dtype)
    pixel_weight = mask
    if class_weight is not None:
        pixel_weight = pixel_weight * class_weight.to(logits.dtype)[safe_target]
    if weight_map is not None:
        pixel_weight = pixel_weight * weight_map.to(logits.dtype)
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, safe_target[:, None])[:, 0]
    loss = (nll * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-6)
    if dice_weight:
        probs = log_probs.exp() * mask[:, None]
        onehot = F.one_hot(safe_target, n_classes).movedim(-1, 1).to(logits.dtype) * mask[:, None]
        dims = [0] + list(range(2, logits.dim()))
        intersection = (probs * onehot).sum(dims)
        denominator = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + smooth) / (denominator + smooth)
        loss = loss + dice_weight * (1 - dice).mean()
    return loss


def consistency_loss(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the KL divergence from the softmax of ``reference_logits`` (held fixed: no gradient
    reaches it) to that of ``logits``, both ``(N, K, *spatial)``: how far a prediction of an intensity variant of a
    tile lies from the prediction of the tile, on every pixel, painted or not."""
    reference = F.log_softmax(reference_logits.detach(), dim=1)
    return F.kl_div(F.log_softmax(logits, dim=1), reference, log_target=True, reduction="none").sum(1).mean()
