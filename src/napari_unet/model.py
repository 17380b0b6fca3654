"""The valid-padding U-Net (Ronneberger et al. 2015) for 2D and 3D, and its size arithmetic.

Every 3x3(x3) convolution is unpadded, so each block trims ``convs_per_block`` pixels per side at its
scale; 2x2(x2) max-pooling halves, 2x2(x2) transposed convolutions double, and each skip connection is
center-cropped to the decoder's size before concatenation. The network therefore maps an input tile to a
smaller output tile, and an output pixel only sees real context: this is what makes overlap-tile
prediction exact (see ``tiling.py``).

Size arithmetic, per spatial axis, for depth ``d`` and ``c`` convolutions per block (c = 2 in the paper; the
"vgg16" layout has its own count per level, and its sizes are found by following a size through the network):
a legal input has size ``2**d * (b + 2c) + 2c * (2**d - 1)`` for an integer bottom size ``b``, and then the
output has size ``2**d * b - 2c * (2**d - 1)``. Depth 4 with two convolutions per block gives
572 -> 388 (the paper's tile) and a halo of 92 pixels per side.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from .calibration import TEMPERATURE_RANGE

BLOCKS = {"plain": 2, "residual": 2, "vgg": 3, "vgg16": None}
"""Block kinds and the number of 3x3 convolutions each holds (None: per level, ``VGG16_LEVELS``)."""
VGG16_LEVELS = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))
"""The VGG16 layout (Simonyan & Zisserman 2015, configuration D) per level: convolutions, and filters in units of
``base_filters`` (2-2-3-3-3 convolutions at 64-128-256-512-512 with the default 64); four poolings at most."""


def _conv(ndim):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _batch_norm(ndim):
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


def center_crop(x: torch.Tensor, shape) -> torch.Tensor:
    """Crop the trailing spatial axes of ``x`` (N, C, *spatial) to ``shape``, keeping the center."""
    slices = [slice(None), slice(None)]
    for size, want in zip(x.shape[2:], shape):
        start = (size - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


class ConvNormAct(nn.Module):
    """One unpadded convolution, optional batch norm, optional ReLU."""

    def __init__(self, ndim, in_channels, out_channels, kernel_size=3, batch_norm=True, activation=True):
        super().__init__()
        self.conv = _conv(ndim)(in_channels, out_channels, kernel_size, padding=0)
        self.norm = _batch_norm(ndim)(out_channels) if batch_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if activation else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))

    def fold_batch_norm(self):
        """Fold an eval-mode batch norm into the convolution's weights (exact up to float rounding)."""
        if not isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            return
        norm, conv = self.norm, self.conv
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.data = conv.weight.data * scale.reshape(shape)
        conv.bias.data = (conv.bias.data - norm.running_mean) * scale + norm.bias
        self.norm = nn.Identity()


class Block(nn.Module):
    """``convs`` unpadded 3x3 convolutions; with ``residual`` a projected, center-cropped shortcut is added."""

    def __init__(self, ndim, in_channels, out_channels, convs=2, batch_norm=True, residual=False):
        super().__init__()
        self.layers = nn.Sequential(
            *[
                ConvNormAct(
                    ndim,
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    batch_norm=batch_norm,
                    activation=not (residual and i == convs - 1),
                )
                for i in range(convs)
            ]
        )
        self.shortcut = (
            ConvNormAct(ndim, in_channels, out_channels, 1, batch_norm, activation=False) if residual else None
        )

    def forward(self, x):
        y = self.layers(x)
        if self.shortcut is None:
            return y
        return F.relu(y + center_crop(self.shortcut(x), y.shape[2:]))


def _check_temperature(value) -> None:
    low, high = TEMPERATURE_RANGE
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"temperature must be a number from {low:g} to {high:g}, got {value!r}")


class UNet(nn.Module):
    """Valid-padding U-Net, 2D or 3D.

    Parameters
    ----------
    in_channels, n_classes : int
        Input channels and output classes (logits; apply softmax over dim 1 for probabilities).
    ndim : {2, 3}
        Spatial dimensions.
    depth : int
        Number of 2x2 poolings (4 in the paper).
    base_filters : int
        Channels of the first level; doubled at every level.
    batch_norm : bool
        Batch norm after every convolution (before the ReLU).
    dropout : float
        Dropout probability at the end of the contracting path (as in the paper).
    temperature : float
        The logits are divided by it (temperature scaling, Guo et al. 2017: calibrated probabilities); 1 while
        training, then fitted on held-out pixels (``calibration.py``). Part of ``config``, so a model file keeps it
        and every prediction path (tiles, previews, the BioImage.IO export's TorchScript) applies it.
    block : {"plain", "residual", "vgg", "vgg16"}
        "plain": two 3x3 convolutions per level (the paper); "residual": the same plus a 1x1 projected
        shortcut (Res-U-Net); "vgg": three 3x3 convolutions per level; "vgg16": the VGG16 encoder
        (``VGG16_LEVELS``: 2-2-3-3-3 convolutions, filters 1-2-4-8-8 x ``base_filters``, so 64 gives VGG16's own;
        depth 4 is the whole of it, less takes its first levels) with a decoder of the same convolutions per
        level, all unpadded (``encoders.load_vgg16`` puts torchvision VGG16 weights into it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        ndim: int = 2,
        depth: int = 4,
        base_filters: int = 64,
        batch_norm: bool = True,
        dropout: float = 0.0,
        block: str = "plain",
        temperature: float = 1.0,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if block == "vgg16" and depth > len(VGG16_LEVELS) - 1:
            raise ValueError(f"the vgg16 layout has {len(VGG16_LEVELS) - 1} poolings: depth 1 to 4, got {depth}")
        if in_channels < 1 or n_classes < 1 or base_filters < 1:
            raise ValueError("in_channels, n_classes and base_filters must be positive")
        _check_temperature(temperature)
        self.config = dict(
            in_channels=int(in_channels),
            n_classes=int(n_classes),
            ndim=int(ndim),
            depth=int(depth),
            base_filters=int(base_filters),
            batch_norm=bool(batch_norm),
            dropout=float(dropout),
            block=block,
            temperature=float(temperature),
        )
        self.in_channels, self.n_classes, self.ndim, self.depth = in_channels, n_classes, ndim, depth
        self.convs_per_block = BLOCKS[block]
        if block == "vgg16":
            self.level_convs = [c for c, _ in VGG16_LEVELS[: depth + 1]]
            widths = [base_filters * f for _, f in VGG16_LEVELS[: depth + 1]]
        else:
            self.level_convs = [self.convs_per_block] * (depth + 1)
            widths = [base_filters * 2**level for level in range(depth + 1)]
        """3x3 convolutions per level, encoder and decoder alike (the last: the bottleneck)."""
        make_block = dict(batch_norm=batch_norm, residual=block == "residual")

        self.encoder = nn.ModuleList()
        channels = in_channels
        for width, convs in zip(widths[:-1], self.level_convs):
            self.encoder.append(Block(ndim, channels, width, convs, **make_block))
            channels = width
        self.pool = (nn.MaxPool2d if ndim == 2 else nn.MaxPool3d)(2)
        self.bottleneck = Block(ndim, channels, widths[-1], self.level_convs[-1], **make_block)
        self.dropout = (nn.Dropout2d if ndim == 2 else nn.Dropout3d)(dropout) if dropout > 0 else nn.Identity()
        transpose = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in reversed(range(depth)):
            width = widths[level]
            self.upsample.append(transpose(widths[level + 1], width, kernel_size=2, stride=2))
            self.decoder.append(Block(ndim, 2 * width, width, self.level_convs[level], **make_block))
        self.head = _conv(ndim)(widths[0], n_classes, kernel_size=1)
        self._he_init()
        self._smallest_input = next(n for n in itertools.count(1) if self._size_through(n) is not None)
        self._halo = (self._smallest_input - self._size_through(self._smallest_input)) // 2

    def _he_init(self):
        for module in self.modules():
            # On the meta device (shapes only: io.load_model's checks) there is nothing to initialise, and torch's
            # meta normal_ would import its reference implementations (seconds).
            convolution = isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))
            if convolution and not module.weight.is_meta:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for up, block, skip in zip(self.upsample, self.decoder, reversed(skips)):
            x = up(x)
            x = block(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))
        logits = self.head(x)
        temperature = self.config["temperature"]
        return logits if temperature == 1.0 else logits / temperature

    @property
    def temperature(self) -> float:
        """The softmax temperature the logits are divided by (1: none; ``calibration.fit_temperature``)."""
        return self.config["temperature"]

    @temperature.setter
    def temperature(self, value: float) -> None:
        _check_temperature(value)
        self.config["temperature"] = float(value)

    # --- size arithmetic -------------------------------------------------------------------------

    @property
    def grid(self) -> int:
        """Input stride (2**depth) between tiles that keeps every pooling grid aligned."""
        return 2**self.depth

    @property
    def halo(self) -> tuple[int, ...]:
        """Context lost per side, per spatial axis: ``c * (3 * 2**depth - 2)`` for ``c`` convolutions per level (92
        for the paper's net)."""
        return (self._halo,) * self.ndim

    def _size_through(self, size: int) -> int | None:
        """The output size of an input ``size`` on one axis, followed through every convolution, pooling and
        up-convolution; None where it is not legal (a pooling of an odd size, or nothing left)."""
        for convs in self.level_convs[:-1]:
            size -= 2 * convs
            if size <= 0 or size % 2:
                return None
            size //= 2
        size -= 2 * self.level_convs[-1]
        for convs in reversed(self.level_convs[:-1]):
            if size <= 0:
                return None
            size = 2 * size - 2 * convs
        return size if size > 0 else None

    def _describe_blocks(self) -> str:
        if self.config["block"] == "vgg16":
            return "the vgg16 layout"
        return f"{self.convs_per_block} convolutions per block"

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """Output spatial shape for a legal input spatial shape; ``ValueError`` naming the nearest legal sizes."""
        input_shape = self._spatial(input_shape)
        smallest, grid = self._smallest_input, self.grid
        out = []
        for size in input_shape:
            if size < smallest or (size - smallest) % grid:
                lower = smallest + grid * max(0, (size - smallest) // grid)
                nearest = sorted({lower, lower + grid if size > smallest else lower})
                raise ValueError(
                    f"input size {size} is not legal for a depth-{self.depth} valid U-Net with "
                    f"{self._describe_blocks()}; nearest legal sizes: {' and '.join(map(str, nearest))} "
                    f"(legal sizes are {smallest} + {grid}k)"
                )
            out.append(size - 2 * self._halo)
        return tuple(out)

    def legal_output_shape(self, min_output_shape) -> tuple[int, ...]:
        """Smallest legal output shape that is at least ``min_output_shape`` on every axis."""
        shape = self._spatial(min_output_shape)
        smallest = self._smallest_input - 2 * self._halo
        return tuple(smallest + self.grid * max(0, -(-(s - smallest) // self.grid)) for s in shape)

    def legal_input_shape(self, min_output_shape) -> tuple[int, ...]:
        """Smallest legal input shape whose output is at least ``min_output_shape`` on every axis."""
        out = self.legal_output_shape(min_output_shape)
        return tuple(o + 2 * h for o, h in zip(out, self.halo))

    def _spatial(self, shape) -> tuple[int, ...]:
        shape = (shape,) * self.ndim if isinstance(shape, int) else tuple(int(s) for s in shape)
        if len(shape) != self.ndim:
            raise ValueError(f"expected {self.ndim} spatial sizes, got {shape}")
        return shape

    # --- inference -------------------------------------------------------------------------------

    def inference_copy(self) -> UNet:
        """An eval-mode copy with batch norm folded into the convolutions (same outputs, fewer passes)."""
        fused = copy.deepcopy(self).eval()
        for module in fused.modules():
            if isinstance(module, ConvNormAct):
                module.fold_batch_norm()
        for parameter in fused.parameters():
            parameter.requires_grad_(False)
        return fused
