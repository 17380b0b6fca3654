"""``TrainingSettings``: everything that controls a training run, with its defaults.

Kept apart from :mod:`napari_unet.training` so that what only needs the settings (the command line's help texts and
defaults, the dock widget's forms) does not import torch. ``napari_unet.training.TrainingSettings`` is this class.
Fields with a ``"label"`` in their metadata appear in the widget's forms (``widgets/settings_form.py``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .calibration import TEMPERATURE_RANGE
from .normalization import (
    BACKGROUND_RECIPE,
    DATASET_RECIPE,
    DEFAULT_RECIPE,
    PERCENTILE_RECIPE,
    ROBUST_RECIPE,
    check_recipe,
)


@dataclass
class TrainingSettings:
    """Everything that controls a training run. The defaults suit 2D fluorescence/EM on a CPU laptop."""

    ndim: int = field(
        default=2, metadata={"label": "Network", "choices": [("2D (stacks slice by slice)", 2), ("3D", 3)]}
    )
    """2: a 2D net (3D arrays are stacks trained slice by slice); 3: a 3D net on volumes."""
    depth: int = field(
        default=3,
        metadata={"label": "Depth", "min": 1, "max": 6, "tooltip": "Poolings; more = more context, larger halo"},
    )
    base_filters: int = field(
        default=16,
        metadata={
            "label": "Base filters",
            "min": 2,
            "max": 256,
            "tooltip": "Filters of the first level (doubling per level)",
        },
    )
    block: str = field(default="plain", metadata={"label": "Blocks", "choices": ["plain", "residual", "vgg", "vgg16"]})
    batch_norm: bool = True
    dropout: float = 0.0
    freeze_encoder: int = 0
    """Iterations at the start of a run during which the encoder and bottleneck weights stay fixed, so the decoder
    learns first (on pretrained encoder weights, ``encoders.load_vgg16``); batch-norm statistics still follow the
    data. 0: off."""
    patch_size: int | tuple[int, ...] = field(
        default=96,
        metadata={
            "label": "Patch size",
            "min": 8,
            "max": 1024,
            "tooltip": "Output tile size per axis used for training patches",
        },
    )
    """Minimum output tile size per spatial axis; the input tile adds the model's halo."""
    batch_size: int = field(
        default=4, metadata={"label": "Batch size", "min": 1, "max": 256, "tooltip": "Patches per iteration"}
    )
    learning_rate: float = field(
        default=2e-3, metadata={"label": "Learning rate", "min": 1e-5, "max": 1.0, "step": 1e-4}
    )
    """Peak Adam learning rate; a short warm-up then cosine decay over the iteration/time budget."""
    iterations: int | None = field(
        default=2000,
        metadata={
            "label": "Max iterations",
            "min": 0,
            "max": 10_000_000,
            "none": 0,
            "none_text": "no limit",
            "tooltip": "0: no limit (time budget only)",
        },
    )
    """Training ends at whichever of ``iterations``/``time_budget`` comes first (None: no limit of that kind).
    With sparse strokes longer is not better: past ~2,000 iterations the network fits the strokes ever more
    tightly and thin structures shrink (ISBI membranes, 2,850 instead of 1,900 iterations: Dice -0.012 to
    -0.015; nuclei +0.002 to +0.005; docs/benchmarks.md). On a CPU a 60 s budget ends first (365 iterations on
    2 cores in ``napari-unet demo``); on a GPU, or with a long budget, this does."""
    time_budget: float | None = field(
        default=60.0,
        metadata={
            "label": "Time budget (s)",
            "widget_type": "SpinBox",
            "min": 1,
            "max": 24 * 3600,
            "tooltip": "Training time budget; Stop ends earlier and keeps the model",
        },
    )
    """Seconds (None: no limit of that kind)."""
    patience: int | None = None
    """Early stop after this many iterations without a 1 % improvement of the smoothed loss (None: off)."""
    weight_averaging: float = 0.5
    """Final fraction of the iteration/time budget over which the weights (and batch-norm statistics) are
    averaged, iteration by iteration, into the model that training leaves (stochastic weight averaging,
    Izmailov et al. 2018); 0: off. Late in training a network fits the strokes ever more tightly and its
    boundaries drift (ISBI membranes: Dice 0.75 at mid-training, 0.73 at the end); the average keeps the
    sharpness of the end without that drift (docs/benchmarks.md). Training stopped before the window leaves
    the last weights."""
    flips: bool = True
    rotations: bool = True
    elastic: bool = True
    intensity: bool = True
    """Image-only intensity augmentation (the eight fields below; False: none of them, whatever their values)."""
    gain_range: float = 0.07
    """Random gain of the normalized training tile, ``exp(+-gain_range)`` (``Augmenter.scale_range``); 0: off."""
    gamma_range: float = 0.1
    """Random gamma of the normalized training tile, ``exp(+-gamma_range)`` (``Augmenter.gamma_range``); 0: off.
    Kept mild: exp(+-0.3) gamma with exp(+-0.2) gain and +-0.1 offset cost 0.02 Dice on nuclei through
    over-segmentation (docs/benchmarks.md)."""
    offset_range: float = 0.03
    """Random offset added to the normalized training tile, uniform in ``+-offset_range``
    (``Augmenter.shift_range``); 0: off."""
    illumination: float = 0.0
    """Uneven illumination: standard deviation of the log-gain of a smooth multiplicative field over each
    training tile (3 points per axis, cubic splines, geometric mean 1; ``Augmenter.illumination``); 0: off."""
    background: float = 0.0
    """Uneven background: the largest level (normalized units) of a smooth additive field over each training tile
    (3 points per axis, cubic splines, level uniform in [0, background]; ``Augmenter.background``); 0: off."""
    specks: float = 0.5
    """Fraction of training tiles that get bright debris: 1-5 px discs covering 0.2-2 % of the tile at 1.5-4
    normalized units, half of them saturated, labels untouched (``Augmenter.specks``); 0: off. On by default: with
    debris on 0.5 % of a held-out image's pixels the network otherwise takes the specks for objects (DSB validation
    of the robustness benchmark, docs/benchmarks.md); illumination, blur and noise stay off (no gain measured)."""
    blur: float = 0.0
    """Fraction of training tiles blurred in-plane by a Gaussian of 0.3-1.5 px (``Augmenter.blur``); 0: off."""
    noise: float = 0.0
    """Maximum Poisson-Gaussian noise level of the training tiles: standard deviation uniform in [0, noise] at
    normalized intensity 1 (``Augmenter.noise``); 0: off."""
    zoom: float = 0.3
    """Random magnification of the augmentation, ``exp(+-zoom)`` (0.74-1.35x; ``Augmenter.zoom_range``); 0: off.
    Shows objects at sizes the painted images do not have (fixed-iteration diagnostics: DSB Dice +0.006 and
    -0.002 for two seeds, ISBI +0.005; docs/benchmarks.md)."""
    paste_mix: float = 0.5
    """Fraction of tiles that get a box pasted from another tile of the batch, labels included
    (``augment.paste_mix``); it counters the over-segmentation that stroke labels far from boundaries cause."""
    class_balance: float = 0.5
    """Class weight power (``losses.class_weights``): 1 balances the painted classes fully in the
    cross-entropy, 0 not at all. Full balancing makes the rarer-painted class grow into the unpainted
    band around it (over-segmentation from strokes); 0.5 keeps rare classes heard without that bias."""
    class_sampling: float = 0.5
    """Patch centres: a class is drawn with probability ~ painted pixels ** class_sampling (0: every
    painted class equally often, 1: every painted pixel equally often)."""
    border_weight: bool = field(default=False, metadata={"label": "Border weights between touching objects"})
    """Add the U-Net border weight map (w0 = 10, sigma = 5 px) between touching painted objects."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term added to the cross-entropy."""
    consistency: float = field(
        default=0.0,
        metadata={
            "label": "Intensity consistency",
            "min": 0.0,
            "max": 100.0,
            "step": 0.1,
            "tooltip": "For images that vary in brightness, contrast or illumination (e.g. 0.3): teaches the network "
            "to segment a tile alike under strong intensity changes. Leave at 0 when classes differ by brightness "
            "alone (bright vs dim cells) and for complete labels",
        },
    )
    """Weight of the intensity-consistency term (``losses.consistency_loss``); 0: off. When on, from a tenth of the
    budget on (``training.CONSISTENCY_RAMP``, the weight rising to full by 0.3) half of each batch are strong intensity
    variants of the other half's tiles (``augment.STRONG_INTENSITY``: gamma 0.5-2, uneven illumination, gain, offset,
    debris, blur, noise; the geometry and the labels shared), and the network's prediction of each variant is pulled,
    on every output pixel, towards its (fixed) prediction of the tile (the strokes' loss is on the tiles only):
    strokes say nothing about where a class boundary lies at another intensity, the tile's own prediction does. For
    acquisitions known to vary (``--consistency 0.3``; 0.3 kept clean Dice and raised it under gamma, illumination
    and combined shifts on both benchmark sets, docs/benchmarks.md). Off by default because it teaches that a tile's
    brightness does not decide its class: classes told apart by brightness alone (bright vs dim nuclei, positive vs
    negative cells) are then confused, and complete labels (a dataset), which already place every boundary, lost
    Dice with it."""
    temperature: str | float = "auto"
    """The softmax temperature the trained model keeps (``calibration.py``): "auto" fits it when the run ends on
    labelled pixels training did not use (a dataset's validation images; for strokes the ``calibration_holdout``
    share of the painted pixels), "off" keeps 1, a number is that temperature."""
    calibration_holdout: float = 0.0
    """With ``temperature="auto"`` and strokes: the share of painted pixels held out of training for the
    temperature fit, as whole blocks of one class (``holdout.py``), e.g. 0.1; 0 (default): none held out, no
    temperature fitted. Off by default: holding out a tenth of the strokes cost ISBI membranes 0.032 Dice in the
    300 s benchmark (DSB nuclei +0.005; docs/benchmarks.md), more than the calibration gains are worth."""
    normalization: dict = field(
        default_factory=lambda: dict(DEFAULT_RECIPE),
        metadata={
            "label": "Normalization",
            "choices": [
                ("robust percentiles (debris left out)", ROBUST_RECIPE),
                ("robust, uneven background subtracted", BACKGROUND_RECIPE),
                ("percentiles of each image", PERCENTILE_RECIPE),
                ("fixed from the training images", DATASET_RECIPE),
            ],
            "tooltip": "How intensities are scaled before the network sees them, computed over each whole image: "
            "its 1st-99.8th percentiles with bright specks and debris left out (default), the same after subtracting a "
            "smooth background (uneven illumination, haze; objects well above it), plain percentiles, or one "
            "mapping fixed from the painted images for acquisitions known to be alike (same exposure and gain)",
        },
    )
    """Normalization recipe (``normalization.normalize_image``), applied to each whole image; a "dataset" recipe is
    fixed from the training images when training starts."""
    device: str = "auto"
    seed: int | None = 0
    cpu_threads: int | None = None
    """Torch CPU threads; None: cores - 1 so an interface stays responsive."""
    amp: bool = True
    """Mixed precision (``devices.amp_dtype``): float16 on CUDA, bfloat16 on a CPU if ``cpu_bfloat16``;
    False: float32 everywhere."""
    cpu_bfloat16: bool = field(
        default=False,
        metadata={
            "label": "bfloat16 on this CPU (1.5x faster)",
            "tooltip": "Mixed bfloat16 precision when training on a CPU that runs it natively (AVX512-BF16 or AMX): "
            "1.5x faster steps, slightly less accurate on fine structures (docs/benchmarks.md)",
        },
    )
    """With ``amp``, bfloat16 autocast on a CPU with native bfloat16 convolutions (AVX512-BF16/AMX):
    1.5x faster steps, the same Dice on nuclei, but 0.002-0.018 lower on ISBI membranes in our paired runs
    (docs/benchmarks.md), so off by default."""

    def __post_init__(self):
        """Every value checked up front (types, finite, in range): a ValueError naming the field, before any data
        is read or any network built."""
        if self.ndim not in (2, 3) or isinstance(self.ndim, bool):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        if self.iterations is None and self.time_budget is None:
            raise ValueError("set iterations, time_budget or both")
        for name, low, high in _INTEGERS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not _is_int(value) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if self.time_budget is not None and not (_is_number(self.time_budget) and self.time_budget > 0):
            raise ValueError(f"time_budget must be a finite number of seconds greater than 0, got {self.time_budget!r}")
        if not (_is_number(self.learning_rate) and 0.0 < self.learning_rate <= MAX_LEARNING_RATE):
            raise ValueError(
                f"learning_rate must be a finite number in (0, {MAX_LEARNING_RATE:g}], got {self.learning_rate!r}"
            )
        if not (_is_number(self.weight_averaging) and 0.0 <= self.weight_averaging < 1.0):
            raise ValueError(f"weight_averaging is a fraction of the budget in [0, 1), got {self.weight_averaging!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout is a probability in [0, 1), got {self.dropout!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        sizes = self.patch_size if isinstance(self.patch_size, (tuple, list)) else [self.patch_size] * self.ndim
        if not (len(sizes) == self.ndim and all(_is_int(n) and 1 <= n <= MAX_PATCH_SIZE for n in sizes)):
            raise ValueError(
                f"patch_size must be an integer from 1 to {MAX_PATCH_SIZE}, or {self.ndim} of them, "
                f"got {self.patch_size!r}"
            )
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, top, what in _FRACTIONS + _INTENSITY_AUGMENTATION:
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value <= top):
                raise ValueError(f"{name} is {what} in [0, {top:g}], got {value!r}")
        low, high = TEMPERATURE_RANGE
        if not (
            self.temperature in ("auto", "off") or (_is_number(self.temperature) and low <= self.temperature <= high)
        ):
            raise ValueError(
                f"temperature must be auto, off or a number from {low:g} to {high:g}, got {self.temperature!r}"
            )
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a name such as 'auto', 'cpu' or 'cuda', got {self.device!r}")
        check_recipe(self.normalization)


CHECKPOINT_SECONDS = 120.0
"""How often a long training writes the model trained so far (``napari-unet train --checkpoint-every``, the widget's
recovery file): a killed run loses at most this much training."""
MAX_LEARNING_RATE = 1.0
"""Largest peak learning rate accepted (Adam; the default is 2e-3)."""
MAX_PATCH_SIZE = 4096
"""Largest output tile size per axis accepted."""
BLOCKS = ("plain", "residual", "vgg", "vgg16")
"""``model.BLOCKS``' names (not imported: that module imports torch)."""
_INTEGERS = (
    ("depth", 1, 8),
    ("base_filters", 1, 4096),
    ("batch_size", 1, 65536),
    ("iterations", 1, 2**63 - 1),
    ("patience", 1, 2**63 - 1),
    ("seed", 0, 2**64 - 1),
    ("cpu_threads", 1, 65536),
    ("freeze_encoder", 0, 2**63 - 1),
)
"""Integer fields with their inclusive ranges."""
_OPTIONAL = {"iterations", "patience", "seed", "cpu_threads"}
"""Integer fields that may be None."""
_SWITCHES = ("batch_norm", "flips", "rotations", "elastic", "intensity", "border_weight", "amp", "cpu_bfloat16")
_FRACTIONS = (
    ("zoom", 1.0, "a log-magnification range"),
    ("paste_mix", 1.0, "a probability"),
    ("class_balance", 1.0, "a class weight power"),
    ("class_sampling", 1.0, "a sampling power"),
    ("dice_weight", 100.0, "a loss weight"),
    ("consistency", 100.0, "a loss weight"),
    ("calibration_holdout", 0.5, "a share of the painted pixels"),
)
"""Other real fields with their largest value."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite real number (not a bool): NaN and infinities are refused."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


_INTENSITY_AUGMENTATION = (
    ("gain_range", 3.0, "a log-gain range"),
    ("gamma_range", 2.0, "a log-gamma range"),
    ("offset_range", 1.0, "an offset range in normalized units"),
    ("illumination", 1.0, "a log-gain standard deviation"),
    ("background", 1.0, "a level in normalized units"),
    ("specks", 1.0, "a probability"),
    ("blur", 1.0, "a probability"),
    ("noise", 1.0, "a noise level in normalized units"),
)
"""The intensity augmentation fields with their largest value."""
