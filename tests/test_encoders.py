"""VGG16 weights into the vgg16 U-Net: the mapping (torchvision's own layout), channel adaptation, refusals, and the
encoder frozen for the first iterations."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from napari_unet.encoders import encoder_parameters, load_vgg16
from napari_unet.model import UNet
from napari_unet.training import Trainer, TrainingSettings


def _torchvision():
    """torchvision, or None where it is missing or its build does not match torch's (a CUDA torchvision wheel
    beside a CPU torch fails at import with a RuntimeError, not an ImportError)."""
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError):
        return None
    return torchvision


def vgg16_features() -> torch.nn.Sequential:
    """torchvision's ``vgg16().features`` as it defines them (configuration "D"): the same modules at the same
    indices, so the same state dict keys."""
    layers, channels = [], 3
    for width in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if width == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU(inplace=True)]
            channels = width
    return torch.nn.Sequential(*layers)


@pytest.fixture(scope="module", params=["torchvision", "by hand"])
def vgg_file(request, tmp_path_factory):
    """A VGG16 state dict in torchvision's format (random weights: nothing is downloaded): torchvision's own
    ``vgg16(weights=None)`` where torchvision works, and the same layout built here; the classifier is replaced by
    one small tensor (the mapping ignores it; the real one holds 100M weights)."""
    torch.manual_seed(0)
    if request.param == "torchvision":
        torchvision = _torchvision()
        if torchvision is None:
            pytest.skip("torchvision is not installed or does not match this torch build")
        vgg = torchvision.models.vgg16(weights=None)
        state, features = vgg.state_dict(), vgg.features
    else:
        features = vgg16_features()
        state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state = {k: v for k, v in state.items() if k.startswith("features.")}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path, features.eval()


def test_weights_map_onto_the_encoder_and_compute_what_vgg_computes(vgg_file):
    path, features = vgg_file
    model = UNet(in_channels=3, n_classes=2, depth=4, base_filters=64, block="vgg16", batch_norm=False)
    assert load_vgg16(model, path) == 13
    convs = [m for m in features if isinstance(m, torch.nn.Conv2d)]
    ours = [layer.conv for block in [*model.encoder, model.bottleneck] for layer in block.layers]
    for theirs, mine in zip(convs, ours, strict=True):
        assert torch.equal(theirs.weight, mine.weight) and torch.equal(theirs.bias, mine.bias)
    # the first level, unpadded, is VGG's (padded) first level away from the border
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        expected = features[:4](x)[..., 2:-2, 2:-2]
        got = model.encoder[0](x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_first_layer_adapted_to_the_channels(vgg_file):
    path, features = vgg_file
    grey = UNet(in_channels=1, depth=2, base_filters=64, block="vgg16")
    assert load_vgg16(grey, path) == 2 + 2 + 3  # a shallower U-Net takes the first levels
    first = grey.encoder[0].layers[0].conv.weight
    torch.testing.assert_close(first, features[0].weight.mean(dim=1, keepdim=True))
    torch.testing.assert_close(grey.bottleneck.layers[2].conv.weight, features[14].weight)
    two = UNet(in_channels=2, depth=1, base_filters=64, block="vgg16")
    load_vgg16(two, path)
    assert two.encoder[0].layers[0].conv.weight.shape[1] == 2


def test_refusals_are_one_line(vgg_file, tmp_path):
    path, _ = vgg_file
    for model in (UNet(block="vgg16", base_filters=32, depth=1), UNet(block="plain", base_filters=64, depth=1)):
        with pytest.raises(ValueError, match="needs the 2D vgg16 layout"):
            load_vgg16(model, path)
    model = UNet(block="vgg16", base_filters=64, depth=1)

    class Code:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Code()))
    with pytest.raises(ValueError, match="not a torch state dict of tensors") as error:
        load_vgg16(model, evil)
    assert "\n" not in str(error.value)
    small = tmp_path / "small.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}, small)
    with pytest.raises(ValueError, match="holds 1 VGG convolutions"):
        load_vgg16(model, small)
    with pytest.raises(ValueError, match="not found"):
        load_vgg16(model, tmp_path / "missing.pth")


def test_freeze_encoder_trains_the_decoder_first():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 40)).astype(np.float32)
    labels = np.zeros((40, 40), np.uint8)
    labels[:, :5], labels[:, -5:] = 1, 2
    settings = TrainingSettings(
        depth=1, base_filters=4, block="vgg16", patch_size=16, iterations=3, time_budget=None, device="cpu",
        amp=False, freeze_encoder=3, weight_averaging=0.0, batch_norm=False,
    )  # fmt: skip
    trainer = Trainer(image, labels, settings)
    before = [p.detach().clone() for p in encoder_parameters(trainer.model)]
    decoder = [p.detach().clone() for p in trainer.model.decoder.parameters()]
    list(trainer.run())
    assert all(torch.equal(a, b) for a, b in zip(before, encoder_parameters(trainer.model)))
    assert any(not torch.equal(a, b) for a, b in zip(decoder, trainer.model.decoder.parameters()))
    trainer.settings.freeze_encoder = 0
    list(trainer.run())
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder_parameters(trainer.model)))
