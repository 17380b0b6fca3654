"""napari sample data: the bundled nuclei images open, one with its strokes as a Labels layer."""

from __future__ import annotations

import numpy as np

from napari_unet._sample_data import nuclei, nuclei_with_strokes


def test_sample_functions_return_layer_data():
    layers = nuclei()
    assert len(layers) == 4 and all(kind == "image" for _, _, kind in layers)
    (image, image_kwargs, _), (strokes, kwargs, kind) = nuclei_with_strokes()
    assert kind == "labels" and strokes.shape == image.shape
    assert set(np.unique(strokes)) == {0, 1, 2}
    assert kwargs["metadata"]["class_names"] == {1: "background", 2: "nucleus"}


def test_sample_data_opens_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-unet", "nuclei_strokes")
    assert [layer.name for layer in viewer.layers] == ["nuclei1", "nuclei1 strokes"]
    assert viewer.layers["nuclei1 strokes"]._type_string == "labels"
    viewer.open_sample("napari-unet", "nuclei")
    assert len(viewer.layers) == 6
