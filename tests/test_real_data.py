"""Checks on the real, expert-annotated microscopy in ../shared/data (skipped when it is absent)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unet import UNet, normalize_image, predict_tiled
from napari_unet.io import read_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ISBI = DATA / "isbi2012_em_membranes"

pytestmark = pytest.mark.skipif(not ISBI.is_dir(), reason="../shared/data is not present")


def test_em_stack_reads_as_zyx():
    stack, info = read_image(ISBI / "stack" / "train-volume.tif")
    assert stack.shape == (30, 512, 512) and stack.dtype == np.uint8
    assert info["channel_axis"] is None and info["axes"].endswith("YX")


def test_paper_network_tiles_real_em_exactly():
    """The paper's depth-4 network (narrow, so it is fast): 4 tiles of a real EM slice equal one pass."""
    image, _ = read_image(ISBI / "images" / "0.tif")
    image = normalize_image(image)
    torch.manual_seed(0)
    model = UNet(depth=4, base_filters=2).eval()
    tiled = predict_tiled(model, image, tile_shape=256)
    pad = [(h, h + o - n) for h, o, n in zip(model.halo, model.legal_output_shape(image.shape), image.shape)]
    padded = torch.from_numpy(np.pad(image, pad, mode="reflect"))[None, None]
    with torch.no_grad():
        whole = torch.softmax(model(padded), 1)[0, :, :512, :512].numpy()
    assert np.abs(tiled - whole).max() < 1e-4
