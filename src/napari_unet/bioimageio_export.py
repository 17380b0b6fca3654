"""Export a trained model as a BioImage.IO model package (``bioimageio.spec`` format 0.5), so that other tools
that read the BioImage Model Zoo format (ilastik, deepImageJ, QuPath, bioimageio.core...) can run it.

What the package holds:

- **weights**: TorchScript of the network with batch norm folded and a softmax over the classes, so its output
  is the class probabilities napari-unet predicts (no custom code to install on the consumer's side);
- **input** ``raw``: ``(batch, channel, [z,] y, x)`` float32 with ``reflect`` border padding, spatial sizes
  ``min + n * step`` (``step``: the network's pooling grid), preprocessed with ``scale_range`` at the model's
  percentiles per channel (napari-unet's normalization; a consumer computes them on each image it passes);
- **output** ``probabilities``: ``(batch, channel, [z,] y, x)`` of the input's size, with a ``halo`` per side to
  crop; a consumer that tiles with it gets napari-unet's own overlap-tile probabilities (see
  :class:`_Probabilities`);
- a test input (a crop of the given sample image, of a size the package takes) with the output its weights give,
  a cover image, a README with the classes, the normalization and the training record, and ``config.napari_unet``
  with the metadata of the model file.

Needs the optional dependency ``bioimageio.spec`` (the ``bioimageio`` extra: ``pip install -e ".[bioimageio]"`` in
the clone).
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch

from .class_ids import class_colour
from .model import UNet
from .normalization import NORMALIZED_LIMIT
from .predict import model_class_ids

U_NET_CITATION = (
    "Ronneberger, Fischer & Brox: U-Net: Convolutional Networks for Biomedical Image Segmentation, MICCAI 2015",
    "10.1007/978-3-319-24574-4_28",
)
TEST_OUTPUT_SIZE = {2: 128, 3: 32}
"""Spatial output size per axis of the packaged test tensor (smaller when the sample image is)."""


class _Probabilities(torch.nn.Module):
    """What the package's weights compute: the network and a softmax over the classes, on the pooling grid of
    napari-unet's own tiles, padded back to the input's size.

    A valid U-Net computes only the centre of its input, and it is translation-exact only by multiples of its
    pooling grid ``g``. The model zoo's tiling consumers expect outputs of the input's size with a symmetric
    ``halo`` to crop, and step their blocks by ``input - 2 * halo``. So the package takes inputs ``shift`` pixels
    larger than a legal size and drops those first ``shift`` pixels per axis, with ``shift`` chosen so that the
    blocks' step is a multiple of ``g`` and their grid falls where napari-unet's tiles put it: a consumer that
    mirrors the border as napari-unet does (the package asks for ``reflect`` padding) then gets napari-unet's
    probabilities. The declared halo is ``network halo + shift``; the padding (edge values) is what it crops.
    """

    def __init__(self, network: UNet, shift: int):
        super().__init__()
        self.network, self.shift = network, shift
        # F.pad's order: last axis first, (low, high) per axis; the valid centre starts at shift + halo.
        self.padding = [p for h in reversed(network.halo) for p in (h + shift, h)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[(Ellipsis, *[slice(self.shift, None)] * self.network.ndim)]
        probabilities = torch.softmax(self.network(x), dim=1)
        return torch.nn.functional.pad(probabilities, self.padding, mode="replicate")


def grid_shift(model: UNet) -> int:
    """Pixels the package's inputs exceed a legal size by (see :class:`_Probabilities`): the remainder of the
    network's output sizes modulo its pooling grid."""
    return (model.legal_input_shape((1,) * model.ndim)[0] - 2 * model.halo[0]) % model.grid


def export_bioimageio(
    model: UNet,
    metadata: dict,
    sample_image: np.ndarray,
    out: str | Path,
    *,
    name: str = "napari-unet model",
    description: str | None = None,
    authors: Sequence[str] = ("napari-unet user",),
    license: str = "CC-BY-4.0",
) -> Path:
    """Write ``model`` (with its model-file ``metadata``) as a BioImage.IO package ``out`` (a ``.zip``).

    ``sample_image`` is an image like those the model is for (numpy or lazy, e.g. dask: only the part used is
    read), channels first when the model has several (``(C, *spatial)``; a stack for a 2D model gives its middle
    slice); a crop of its centre (mirrored where it is too small; NaN and infinite pixels set to the median) becomes
    the package's test input. The description is validated by ``bioimageio.spec`` before the package is written;
    returns ``out``. Raises ``ValueError`` for an image that does not fit the model and ``ImportError`` without
    ``bioimageio.spec``.
    """
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    out = Path(out)
    ndim, channels = model.config["ndim"], model.config["in_channels"]
    image = sample_image if hasattr(sample_image, "shape") else np.asarray(sample_image)
    lead = int(channels > 1)
    if ndim == 2 and len(image.shape) == 3 + lead:  # a stack for a 2D model: its middle slice
        image = image[(slice(None),) * lead + (image.shape[lead] // 2,)]
    image = np.asarray(image, dtype=np.float32)  # read here: the one slice (or volume) the crop comes from
    if image.ndim != ndim + lead:
        raise ValueError(
            f"the sample image has shape {image.shape}; the model takes "
            f"{'(C, ' if channels > 1 else '('}{', '.join('ZYX'[-ndim:])}) with C = {channels}"
        )
    if channels > 1 and image.shape[0] != channels:
        raise ValueError(f"the sample image has {image.shape[0]} channels, the model takes {channels}")
    image = _finite_sample(image.reshape(channels, *image.shape[-ndim:]))
    recipe = metadata.get("normalization") or {"method": "percentile", "low": 1.0, "high": 99.8}
    class_ids = model_class_ids(model, metadata)
    class_names = list(metadata.get("class_names") or [f"class {c}" for c in class_ids])

    shift = grid_shift(model)
    network = _Probabilities(model.inference_copy().cpu().eval(), shift).eval()
    test_input = _test_crop(model, image, shift)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what the model zoo's consumers run.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(network, torch.from_numpy(test_input))
        test_output = traced(torch.from_numpy(_scale_range(test_input, recipe))).numpy()

    space = ["z", "y", "x"][-ndim:]
    halo = [h + shift for h in model.halo]  # the network's context and its pooling-grid offset, per side
    input_axes = [
        spec.BatchAxis(),
        spec.ChannelAxis(channel_names=[spec.Identifier(f"channel{c}") for c in range(channels)]),
        *[
            spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=m + shift, step=model.grid))
            for a, m in zip(space, model.legal_input_shape((shift + 1,) * ndim))
        ],
    ]
    output_axes = [
        spec.BatchAxis(),
        spec.ChannelAxis(channel_names=[spec.Identifier(_identifier(n, c)) for n, c in zip(class_names, class_ids)]),
        *[
            spec.SpaceOutputAxisWithHalo(
                id=spec.AxisId(a),
                halo=h,
                size=spec.SizeReference(tensor_id=spec.TensorId("raw"), axis_id=spec.AxisId(a)),
            )
            for a, h in zip(space, halo)
        ],
    ]
    preprocessing = [spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))]
    if recipe.get("method") == "fixed":
        preprocessing.append(_scale_linear(recipe, channels))
    elif recipe.get("method", "percentile") in PERCENTILE_METHODS:
        preprocessing.append(
            spec.ScaleRangeDescr(
                kwargs=spec.ScaleRangeKwargs(
                    axes=[spec.AxisId(a) for a in space],
                    min_percentile=float(recipe.get("low", 1.0)),
                    max_percentile=float(recipe.get("high", 99.8)),
                )
            )
        )
    if len(preprocessing) > 1:  # scaled: held within the bound napari-unet holds normalized values in
        preprocessing.append(spec.ClipDescr(kwargs=spec.ClipKwargs(min=-NORMALIZED_LIMIT, max=NORMALIZED_LIMIT)))

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        np.save(folder / "test_input.npy", test_input)
        np.save(folder / "test_output.npy", test_output)
        tifffile.imwrite(folder / "sample_input.tif", test_input[0], photometric="minisblack")
        tifffile.imwrite(folder / "sample_output.tif", test_output[0], photometric="minisblack")
        traced.save(str(folder / "weights_torchscript.pt"))
        _write_cover(folder / "cover.png", test_input[0], test_output[0], halo, class_ids)
        (folder / "README.md").write_text(_documentation(name, model, class_ids, class_names, recipe, metadata, halo))
        description = spec.ModelDescr(
            name=name,
            description=description
            or (
                f"{ndim}D valid-padding U-Net (depth {model.depth}) trained with napari-unet "
                f"from painted strokes; classes: {', '.join(class_names)}"
            ),
            authors=[spec.Author(name=a) for a in authors],
            cite=[spec.CiteEntry(text=U_NET_CITATION[0], doi=spec.Doi(U_NET_CITATION[1]))],
            license=license,
            documentation=spec.FileDescr(source=folder / "README.md"),
            covers=[spec.FileDescr(source=folder / "cover.png")],
            tags=["napari-unet", "unet", "semantic-segmentation", f"{ndim}d", "pytorch"],
            inputs=[
                spec.InputTensorDescr(
                    id=spec.TensorId("raw"),
                    axes=input_axes,
                    preprocessing=preprocessing,
                    # mode set explicitly: left at its default it is written as "pad: {}", which reads as zero padding
                    pad=spec.ReflectPadding(mode="reflect"),
                    test_tensor=spec.FileDescr(source=folder / "test_input.npy"),
                    sample_tensor=spec.FileDescr(source=folder / "sample_input.tif"),
                    description=f"{channels} channel(s), normalized per channel"
                    + (" by fixed values" if recipe.get("method") == "fixed" else " by percentiles"),
                )
            ],
            outputs=[
                spec.OutputTensorDescr(
                    id=spec.TensorId("probabilities"),
                    axes=output_axes,
                    test_tensor=spec.FileDescr(source=folder / "test_output.npy"),
                    sample_tensor=spec.FileDescr(source=folder / "sample_output.tif"),
                    description="class probabilities (softmax); the class ids are in config.napari_unet",
                )
            ],
            weights=spec.WeightsDescr(
                torchscript=spec.TorchscriptWeightsDescr(
                    source=folder / "weights_torchscript.pt",
                    pytorch_version=spec.Version(torch.__version__.split("+")[0]),
                )
            ),
            config={
                "napari_unet": {
                    "class_ids": class_ids,
                    "class_names": class_names,
                    "normalization": recipe,
                    "network": dict(model.config),
                }
            },
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        save_bioimageio_package(description, output_path=out)
    return out


def _test_crop(model: UNet, image: np.ndarray, shift: int) -> np.ndarray:
    """An input ``(1, C, *spatial)`` of a size the package takes from the centre of ``image``, mirrored where the
    image is smaller."""
    spatial = image.shape[1:]
    halo = model.halo
    want = [max(shift + 1, min(TEST_OUTPUT_SIZE[model.ndim], s - 2 * h)) for s, h in zip(spatial, halo)]
    size = [n + shift for n in model.legal_input_shape(tuple(want))]
    pad = [(0, 0)] + [(max(0, (n - s + 1) // 2), max(0, (n - s + 1) // 2)) for n, s in zip(size, spatial)]
    padded = np.pad(image, pad, mode="reflect" if min(spatial) > 1 else "edge")
    starts = [(p - n) // 2 for p, n in zip(padded.shape[1:], size)]
    crop = padded[(slice(None), *[slice(a, a + n) for a, n in zip(starts, size)])]
    return np.ascontiguousarray(crop[None], dtype=np.float32)


PERCENTILE_METHODS = ("percentile", "robust")
"""Recipes the package's ``scale_range`` preprocessing stands for. For "robust" it is the plain percentile range:
the format has no step that leaves small bright structures out of the upper percentile, so on images with such
artifacts the package normalizes (and predicts) as a "percentile" model would; on images without them the two
agree closely (the README of the package says so)."""


def _linear(recipe: dict, channels: int) -> tuple[list[float], list[float]]:
    """A "fixed" recipe's ``x * gain + offset`` per channel."""
    low = np.broadcast_to(np.asarray(recipe["low_values"], np.float64), (channels,))
    high = np.broadcast_to(np.asarray(recipe["high_values"], np.float64), (channels,))
    gain = np.divide(1.0, high - low, out=np.ones(channels), where=high > low)
    return gain.tolist(), (-low * gain).tolist()


def _scale_linear(recipe: dict, channels: int):
    """A "fixed" recipe as the package's ``scale_linear`` preprocessing (exact)."""
    from bioimageio.spec.model import v0_5 as spec

    gain, offset = _linear(recipe, channels)
    if channels == 1:
        return spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=gain[0], offset=offset[0]))
    return spec.ScaleLinearDescr(
        kwargs=spec.ScaleLinearAlongAxisKwargs(axis=spec.AxisId("channel"), gain=gain, offset=offset)
    )


def _finite_sample(image: np.ndarray) -> np.ndarray:
    """``image`` (channels first) with its NaN and infinite pixels set to the median of the channel's finite ones:
    the package's test input. Its preprocessing (``scale_range``'s percentiles) has no rule for them, so one NaN
    made every value of the test output NaN, in this package's test and in every tool that runs it."""
    finite = np.isfinite(image)
    if finite.all():
        return image
    image = image.copy()
    for channel, ok in zip(image, finite):
        if not ok.any():
            raise ValueError("the sample image has a channel without a finite pixel")
        channel[~ok] = np.median(channel[ok])
    return image


def _scale_range(tensor: np.ndarray, recipe: dict) -> np.ndarray:
    """The package's preprocessing in numpy: per sample and channel, percentiles over the spatial axes (a "fixed"
    recipe: its linear map), then the clip at +/-``normalization.NORMALIZED_LIMIT``."""
    if recipe.get("method") == "fixed":
        gain, offset = _linear(recipe, tensor.shape[1])
        shape = (1, -1) + (1,) * (tensor.ndim - 2)
        scaled = tensor * np.reshape(gain, shape) + np.reshape(offset, shape)
    elif recipe.get("method", "percentile") in PERCENTILE_METHODS:
        axes = tuple(range(2, tensor.ndim))
        low = np.percentile(tensor, recipe.get("low", 1.0), axis=axes, keepdims=True)
        high = np.percentile(tensor, recipe.get("high", 99.8), axis=axes, keepdims=True)
        scaled = (tensor - low) / (high - low + 1e-6)
    else:
        return tensor
    return np.clip(scaled, -NORMALIZED_LIMIT, NORMALIZED_LIMIT).astype(np.float32)


def _identifier(name: str, class_id: int) -> str:
    """A channel name the spec accepts (letters, digits, underscores) for a class."""
    cleaned = re.sub(r"\W+", "_", str(name)).strip("_")
    return cleaned if cleaned and not cleaned[0].isdigit() else f"class_{class_id}"


def _write_cover(
    path: Path, image: np.ndarray, probabilities: np.ndarray, halo: Sequence[int], class_ids: Sequence[int]
) -> None:
    """A 2:1 cover: the test input (first channel, middle slice) beside its most probable class in the widget's
    class colours, without the halo."""
    from skimage.io import imsave
    from skimage.transform import resize

    valid = (slice(None), *[slice(h, -h) for h in halo])
    image, probabilities = image[valid], probabilities[valid]
    while image.ndim > 3:
        image = image[:, image.shape[1] // 2]
    while probabilities.ndim > 3:
        probabilities = probabilities[:, probabilities.shape[1] // 2]
    plane = image[0]
    low, high = np.percentile(plane, [1, 99.8])
    grey = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
    palette = np.array([[int(class_colour(c)[i : i + 2], 16) for i in (1, 3, 5)] for c in class_ids]) / 255.0
    classes = palette[probabilities.argmax(0)]
    left = resize(np.repeat(grey[..., None], 3, axis=-1), (256, 256), order=1)
    right = resize(classes, (256, 256), order=0)
    imsave(path, (np.concatenate([left, right], axis=1) * 255).astype(np.uint8), check_contrast=False)


def _preprocessing_note(recipe: dict) -> str:
    method = recipe.get("method", "percentile")
    if recipe.get("background_grid"):
        return (
            f"napari-unet first subtracts each image's smooth background (the low percentile of "
            f"{recipe['background_grid']} x {recipe['background_grid']} cells, interpolated); the package has no such "
            f"step, so it normalizes without it: {_preprocessing_note({**recipe, 'background_grid': 0})}, and its "
            "predictions differ where a background is uneven"
        )
    if method == "fixed":
        return "`scale_linear` in the package, exactly"
    if method == "robust":
        return (
            "`scale_range` in the package: napari-unet takes the upper percentile without bright structures "
            f"smaller than {recipe.get('speck_area')} px (debris); the package cannot, so on images with such "
            "artifacts it normalizes as plain percentiles do"
        )
    return "`scale_range` in the package"


def _documentation(name, model, class_ids, class_names, recipe, metadata, halo: Sequence[int]) -> str:
    history = (metadata.get("training") or {}).get("history") or []
    return "\n".join(
        [
            f"# {name}",
            "",
            f"A {model.config['ndim']}D valid-padding U-Net (Ronneberger et al. 2015) trained with napari-unet from "
            "sparse painted strokes.",
            "",
            "## Classes",
            "",
            *[f"- output channel {i}: id {c}, {n}" for i, (c, n) in enumerate(zip(class_ids, class_names))],
            "",
            "## Input and output",
            "",
            f"- input: {model.config['in_channels']} channel(s); normalized per channel, over the whole image, with "
            f"the recipe `{json.dumps(recipe)}` ({_preprocessing_note(recipe)}).",
            f"- output: class probabilities of the input's size, of which the declared halo ({halo[0]} px per side: "
            "the network's context and its pooling-grid offset) is edge padding; tile with that overlap, mirroring "
            "only at the image border, and crop it for seamless results.",
            "",
            "## Network",
            "",
            f"`{json.dumps(dict(model.config))}`",
            "",
            "## Training",
            "",
            *[f"- {json.dumps({k: v for k, v in run.items() if k != 'settings'})}" for run in history],
            "",
            "## Validation",
            "",
            "The test tensors are a crop of an image the exporter was given and the probabilities this package's "
            "weights give for it; napari-unet's test suite checks that its packages reproduce its own overlap-tile "
            "prediction. The model was trained on the strokes of its user's images: check its segmentations on your "
            "images before relying on them (napari-unet's benchmarks of the training method: docs/benchmarks.md in "
            "its repository).",
            "",
        ]
    )
