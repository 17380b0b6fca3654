"""The dock widget predicts layers backed by OME-Zarr stores: as napari-unet's reader opens them (a dask array over
level 0) and as a multiscale layer (what napari's OME-Zarr readers give), without a copy of the store."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_widget import setup, wait_idle  # noqa: F401  (the viewer and widget fixture)


def test_zarr_layers_predict_like_in_memory_ones(setup, qtbot, tmp_path):  # noqa: F811
    import dask.array as da
    import torch
    from ome_zarr.writer import write_image

    from napari_unet import UNet
    from napari_unet.predict import PredictionSettings, predict_image

    viewer, widget = setup
    torch.manual_seed(0)
    model = UNet(n_classes=2, depth=1, base_filters=4).eval()
    widget.set_model(model, {"class_ids": [1, 2]}, "test")
    widget.prediction.form["test_time_flips"].value = False
    widget.prediction.form["refine_radius"].value = 0
    image = (np.random.default_rng(0).random((64, 80)) * 1000).astype(np.uint16)
    write_image(image, str(tmp_path / "vol.zarr"), axes="yx", scale_factors=(2,), storage_options={"chunks": (16, 16)})
    expected = predict_image(
        model, {"class_ids": [1, 2]}, image, PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)
    )

    [opened] = viewer.open(str(tmp_path / "vol.zarr"), plugin="napari-unet")
    assert isinstance(opened.data, da.Array)
    level0 = da.from_zarr(str(tmp_path / "vol.zarr"), component="s0")
    viewer.add_image([level0, level0[::2, ::2]], name="multi", multiscale=True)
    for name in ("vol", "multi"):
        widget.data.image_combo.setCurrentText(name)
        widget.predict()
        wait_idle(qtbot, widget)
        assert widget.last_error is None
        np.testing.assert_array_equal(viewer.layers[f"{name} segmentation"].data, expected.labels)
        np.testing.assert_allclose(viewer.layers[f"{name} probabilities"].data, expected.probabilities, atol=1e-5)
