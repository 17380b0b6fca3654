"""Masked losses: unpainted pixels weigh nothing; class weights; the U-Net border weight map."""

import numpy as np
import pytest
import torch

from napari_unet.losses import border_weight_map, class_weights, consistency_loss, masked_loss


def _loss_and_grad(logits, target, **kwargs):
    logits = logits.clone().requires_grad_(True)
    loss = masked_loss(logits, target, **kwargs)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
@pytest.mark.parametrize("ndim", [2, 3])
def test_unpainted_pixels_change_nothing(dice_weight, ndim):
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3) + (6,) * ndim
    logits = torch.randn(shape, generator=gen)
    target = torch.randint(-1, 3, (shape[0],) + shape[2:], generator=gen)
    unpainted = (target < 0)[:, None].expand_as(logits)
    changed = logits + torch.where(unpainted, 50 * torch.randn(shape, generator=gen), torch.zeros(shape))
    kwargs = dict(
        class_weight=torch.tensor([0.5, 1.0, 2.0]),
        weight_map=1 + torch.rand(target.shape, generator=gen),
        dice_weight=dice_weight,
    )
    loss_a, grad_a = _loss_and_grad(logits, target, **kwargs)
    loss_b, grad_b = _loss_and_grad(changed, target, **kwargs)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)
    assert torch.all(grad_a[unpainted] == 0)
    assert grad_a.abs().sum() > 0


def test_nothing_painted_gives_zero_loss():
    logits = torch.randn(1, 2, 5, 5, requires_grad=True)
    loss = masked_loss(logits, torch.full((1, 5, 5), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_perfect_prediction_has_low_loss():
    target = torch.tensor([[[0, 1], [1, -1]]])
    logits = torch.nn.functional.one_hot(target.clamp_min(0), 2).movedim(-1, 1).float() * 30
    assert masked_loss(logits, target).item() < 1e-3


def test_class_weights_balance_painted_classes():
    weights = class_weights([300, 100, 0])
    assert weights[0] * 300 == pytest.approx(weights[1] * 100)
    assert weights[2] == 1.0
    partial = class_weights([300, 100], power=0.5)
    assert partial[1] / partial[0] == pytest.approx(3**0.5)
    assert list(class_weights([300, 100], power=0.0)) == [1.0, 1.0]


def test_border_weight_map_weighs_gaps_between_objects():
    target = np.zeros((40, 60), dtype=np.int16)
    target[10:30, 10:28] = 1
    target[10:30, 30:50] = 1  # a 2-pixel gap at columns 28-29
    target[0, :] = -1
    weights = border_weight_map(target)
    assert weights[20, 28] > 8  # w0 * exp(-(1 + 2)^2 / 50) ~ 8.4
    assert weights[20, 15] == 1.0  # inside an object
    assert weights[39, 0] < 1.01  # far from both objects
    assert weights[0, 29] == 1.0  # unpainted


def test_border_weight_map_single_object_is_flat():
    target = np.zeros((20, 20), dtype=np.int16)
    target[5:10, 5:10] = 1
    assert np.all(border_weight_map(target) == 1)


def test_consistency_loss_is_zero_for_equal_predictions_and_reaches_only_the_variant():
    reference = torch.randn(2, 3, 8, 8, requires_grad=True)
    same = reference.detach().clone().requires_grad_(True)
    assert float(consistency_loss(reference, same).detach()) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = consistency_loss(reference, other)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert reference.grad is None and other.grad is not None and other.grad.abs().sum() > 0
    # the KL divergence per pixel, averaged: a closer variant costs less
    closer = (reference.detach() + 0.1 * (other.detach() - reference.detach())).requires_grad_(True)
    assert float(consistency_loss(reference, closer).detach()) < float(loss.detach())
