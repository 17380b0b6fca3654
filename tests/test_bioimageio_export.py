"""BioImage.IO export: a package bioimageio.spec validates, whose weights reproduce napari-unet's predictions."""

import zipfile

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("bioimageio.spec")

from bioimageio.spec import load_description
from bioimageio.spec.model.v0_5 import ModelDescr

from napari_unet import UNet, normalize_image, predict_tiled
from napari_unet.bioimageio_export import _scale_range, export_bioimageio, grid_shift
from napari_unet.cli import main
from napari_unet.io import save_model
from napari_unet.normalization import NORMALIZED_LIMIT

METADATA = {
    "class_ids": [1, 3],
    "class_names": ["background", "cell nucleus"],
    "normalization": {"method": "percentile", "low": 1.0, "high": 99.8},
}


def _package_arrays(path):
    with zipfile.ZipFile(path) as package, package.open("test_input.npy") as a, package.open("test_output.npy") as b:
        test_input, test_output = np.load(a), np.load(b)
        with package.open("weights_torchscript.pt") as weights:
            scripted = torch.jit.load(weights)
    return test_input, test_output, scripted


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "ndim, channels, depth, shape",
    [(2, 1, 2, (150, 170)), (2, 3, 2, (3, 60, 70)), (3, 1, 1, (30, 40, 36)), (2, 1, 3, (230, 250))],
)
def test_export_is_valid_and_reproduces_napari_unet(tmp_path, ndim, channels, depth, shape):
    """Depth 3 is the case where the package's inputs are shifted off the legal sizes (grid_shift 4)."""
    torch.manual_seed(0)
    model = UNet(n_classes=2, in_channels=channels, ndim=ndim, depth=depth, base_filters=4).eval()
    image = (np.random.default_rng(0).random(shape) * 4000).astype(np.uint16)
    path = export_bioimageio(model, METADATA, image, tmp_path / "model.zip", authors=["A. Tester"])

    description = load_description(path)
    assert isinstance(description, ModelDescr), description.validation_summary.format()
    assert description.validation_summary.status in ("valid-format", "passed")
    # The border padding napari-unet's tiles use (reflect) survives the round trip through rdf.yaml (an unset
    # mode is written as "pad: {}", which reads back as zero padding).
    assert description.inputs[0].pad.mode == "reflect"
    output = description.outputs[0]
    assert [str(a.id) for a in output.axes] == ["batch", "channel", *"zyx"[-ndim:]]
    assert [str(n) for n in output.axes[1].channel_names] == ["background", "cell_nucleus"]
    assert all(a.halo == model.halo[0] + grid_shift(model) and a.size.offset == 0 for a in output.axes[2:])
    assert description.config.napari_unet["class_ids"] == [1, 3]

    # The packaged weights give the packaged test output (what a consumer checks), and a consumer's blocks (reflect
    # padding, stepped by input - 2 * halo) give napari-unet's own whole-image prediction.
    test_input, test_output, scripted = _package_arrays(path)
    assert test_input.shape[:2] == (1, channels) and test_output.shape == (1, 2, *test_input.shape[2:])
    with torch.no_grad():
        again = scripted(torch.from_numpy(_scale_range(test_input, METADATA["normalization"]))).numpy()
    np.testing.assert_allclose(again, test_output, atol=1e-5)
    normalized = normalize_image(image, METADATA["normalization"], channel_axis=0 if channels > 1 else None)
    normalized = normalized.reshape(channels, *shape[-ndim:])
    ours = predict_tiled(model, normalized if channels > 1 else normalized[0])
    halo = output.axes[2].halo
    block = test_input.shape[2]
    step = block - 2 * halo
    padded = np.pad(normalized, [(0, 0)] + [(halo, block)] * ndim, mode="reflect")
    for corner in [(0,) * ndim, (step,) * ndim, (0,) + (step,) * (ndim - 1)]:
        window = padded[(slice(None), *[slice(c, c + block) for c in corner])]
        with torch.no_grad():
            predicted = scripted(torch.from_numpy(np.ascontiguousarray(window[None]))).numpy()[0]
        inner = predicted[(slice(None), *[slice(halo, block - halo)] * ndim)]
        image_part = tuple(slice(c, min(c + step, n)) for c, n in zip(corner, shape[-ndim:]))
        expected = ours[(slice(None), *image_part)]
        np.testing.assert_allclose(
            inner[(slice(None), *[slice(0, e) for e in expected.shape[1:]])], expected, atol=1e-4, err_msg=str(corner)
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_export_refuses_an_image_that_does_not_fit(tmp_path):
    model = UNet(n_classes=2, in_channels=3, depth=1, base_filters=2)
    with pytest.raises(ValueError, match="channels"):
        export_bioimageio(model, METADATA, np.zeros((2, 40, 40)), tmp_path / "m.zip")
    with pytest.raises(ValueError, match="shape"):
        export_bioimageio(model, METADATA, np.zeros((40, 40)), tmp_path / "m.zip")
    grey = UNet(n_classes=2, depth=1, base_filters=2)
    stack = np.random.default_rng(2).random((5, 40, 40)).astype(np.float32)  # a stack: its middle slice
    path = export_bioimageio(grey, METADATA, stack, tmp_path / "stack.zip")
    test_input = _package_arrays(path)[0]
    assert test_input.shape[:2] == (1, 1) and test_input.ndim == 4


def test_a_sample_image_with_nan_and_inf_gives_a_finite_test_output(tmp_path):
    """One NaN pixel in the sample image made every value of the package's test output NaN (the package's
    percentiles have no rule for them): its bad pixels are set to the median of the finite ones."""
    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=1, base_filters=2).eval()
    image = np.random.default_rng(3).random((40, 40)).astype(np.float32)
    image[20, 20], image[3, 4], image[30, 1] = np.nan, np.inf, -np.inf
    test_input, test_output, _ = _package_arrays(export_bioimageio(model, METADATA, image, tmp_path / "nan.zip"))
    assert np.isfinite(test_input).all() and np.isfinite(test_output).all()
    assert np.median(image[np.isfinite(image)]) in test_input
    with pytest.raises(ValueError, match="without a finite pixel"):
        export_bioimageio(model, METADATA, np.full((40, 40), np.nan, np.float32), tmp_path / "none.zip")


def test_export_command_writes_a_package_and_errors_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    model_path = save_model(UNet(n_classes=2, depth=1, base_filters=2), tmp_path / "m.safetensors", METADATA)
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(1).random((50, 60)).astype(np.float32))
    out = tmp_path / "pkg" / "model.zip"
    assert (
        main(
            [
                "export-bioimageio",
                "-m",
                str(model_path),
                "--image",
                str(tmp_path / "img.tif"),
                "-o",
                str(out),
                "--name",
                "Nuclei",
                "--author",
                "A. Tester",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    description = load_description(out)
    assert isinstance(description, ModelDescr) and description.name == "Nuclei"
    assert [a.name for a in description.authors] == ["A. Tester"]
    (tmp_path / "blocked").write_text("a file where the package's folder would be")
    for bad, message in (
        (["-o", str(tmp_path / "m.txt")], ".zip"),
        (["--image", str(tmp_path / "no.tif")], "not found"),
        (["-o", str(tmp_path / "blocked" / "m.zip")], "cannot write"),
    ):
        args = {"-o": str(out), "--image": str(tmp_path / "img.tif")}
        args[bad[0]] = bad[1]
        code = main(["export-bioimageio", "-m", str(model_path), *[x for kv in args.items() for x in kv]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err


def test_a_fixed_recipe_is_the_packages_linear_map_and_a_robust_one_says_what_it_cannot_do(tmp_path):
    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=2, base_filters=4).eval()
    image = (np.random.default_rng(0).random((150, 170)) * 4000).astype(np.uint16)
    fixed = {"method": "fixed", "low_values": [200.0], "high_values": [3000.0]}
    path = export_bioimageio(model, {**METADATA, "normalization": fixed}, image, tmp_path / "fixed.zip")
    description = load_description(path)
    assert isinstance(description, ModelDescr), description.validation_summary.format()
    steps = {step.id: step for step in description.inputs[0].preprocessing}
    step = steps["scale_linear"]
    assert "scale_range" not in steps and list(steps)[-1] == "clip"
    np.testing.assert_allclose([step.kwargs.gain, step.kwargs.offset], [1 / 2800, -200 / 2800])
    clip = steps["clip"].kwargs
    assert [clip.min, clip.max] == [-1000, 1000] == [-NORMALIZED_LIMIT, NORMALIZED_LIMIT]  # the clip
    crop = image[:64, :64].astype(np.float32)[None, None]
    crop[0, 0, 5, 5] = 1e12  # held at the bound by napari-unet and by the package alike
    np.testing.assert_allclose(_scale_range(crop, fixed)[0, 0], normalize_image(crop[0, 0], fixed), rtol=1e-5)

    robust = {"method": "robust", "low": 1.0, "high": 99.8, "speck_area": 100}
    path = export_bioimageio(model, {**METADATA, "normalization": robust}, image, tmp_path / "robust.zip")
    description = load_description(path)
    assert "scale_range" in [step.id for step in description.inputs[0].preprocessing]
    with zipfile.ZipFile(path) as package:
        readme = package.read("README.md").decode()
    assert "smaller than 100 px" in readme and "the package cannot" in readme
