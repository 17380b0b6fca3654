"""Pretrained encoder weights: a torchvision-format VGG16 state dict into a ``block="vgg16"`` U-Net.

torchvision's VGG16 (``torchvision.models.vgg16().state_dict()``) keeps its 13 convolutions as
``features.<index>.weight``/``.bias`` in network order (ReLUs and poolings between them hold no weights); the
``vgg16`` U-Net's encoder and bottleneck hold the same 13 convolutions, level by level (``model.VGG16_LEVELS``). The
3x3 kernels carry over unchanged: VGG pads its convolutions, the U-Net does not, and a kernel does the same on real
pixels either way; only the border handling differs, and the valid U-Net has none. The first convolution is adapted
to the image's channels: unchanged for three (RGB), their mean for one (grey), the mean repeated for any other
count. A shallower U-Net (depth < 4) takes the first levels. Batch norm (when on) starts from its identity.

The file is read with ``torch.load(weights_only=True)``: tensors only, no code is unpickled; nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .model import UNet

_FEATURE = re.compile(r"^(?:module\.)?features\.(\d+)\.(weight|bias)$")


def vgg16_convolutions(state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(weight, bias)`` of every convolution in a torchvision VGG state dict, in network order (4-D
    ``features.N.weight`` tensors; a VGG16 with batch norm has its norms' 1-D tensors there too, left out)."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _FEATURE.match(key)
        if match and isinstance(value, torch.Tensor):
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return [(p["weight"], p["bias"]) for _, p in sorted(found.items()) if p.get("weight", torch.empty(0)).dim() == 4]


def load_vgg16(model: UNet, path) -> int:
    """Put the VGG16 weights of the state dict file ``path`` into ``model``'s encoder and bottleneck; returns how
    many convolutions were set. ``ValueError`` (one line) for a model that is not a 2D ``vgg16`` U-Net with 64 base
    filters, or a file that is not a VGG16 state dict."""
    path = Path(path)
    config = model.config
    if config["block"] != "vgg16" or config["ndim"] != 2 or config["base_filters"] != 64:
        raise ValueError(
            "--encoder-weights needs the 2D vgg16 layout with 64 base filters (--block vgg16 --filters 64 --ndim 2)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"encoder weights not found: {path}") from None
    except Exception as e:  # pickle, zip and unpickler errors: one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not a torch state dict of tensors ({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    pretrained = vgg16_convolutions(state) if isinstance(state, dict) else []
    targets = [layer.conv for block in [*model.encoder, model.bottleneck] for layer in block.layers]
    if len(pretrained) < len(targets):
        raise ValueError(f"{path} holds {len(pretrained)} VGG convolutions (features.N.weight); VGG16 has 13")
    with torch.no_grad():
        for index, (conv, (weight, bias)) in enumerate(zip(targets, pretrained)):
            if index == 0:
                weight = _first_layer(weight, conv.in_channels)
            if weight.shape != conv.weight.shape or bias.shape != conv.bias.shape:
                raise ValueError(
                    f"{path}: convolution {index + 1} is {tuple(weight.shape)}, the vgg16 U-Net's "
                    f"{tuple(conv.weight.shape)}: not a VGG16 state dict"
                )
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
    return len(targets)


def _first_layer(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """VGG's RGB kernels for an image of ``channels`` channels: as they are for 3, their mean over RGB otherwise
    (repeated over the channels)."""
    if channels == weight.shape[1]:
        return weight
    return weight.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1)


def encoder_parameters(model: UNet) -> list[torch.nn.Parameter]:
    """The parameters of the encoder and the bottleneck (what ``freeze_encoder`` holds fixed)."""
    return [p for module in [*model.encoder, model.bottleneck] for p in module.parameters()]
