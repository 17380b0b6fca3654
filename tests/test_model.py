"""UNet architecture and size arithmetic."""

import pytest
import torch

from napari_unet import UNet


def test_paper_tile_depth4():
    model = UNet(depth=4)
    assert model.halo == (92, 92)
    assert model.output_shape((572, 572)) == (388, 388)
    assert model.legal_input_shape((388, 388)) == (572, 572)
    assert model.legal_input_shape(1) == (188, 188)
    assert model.legal_output_shape(1) == (4, 4)


def test_3d_unet_tile_depth3():
    # 3D U-Net (Cicek et al.): 132x132x116 -> 44x44x28 at depth 3.
    model = UNet(ndim=3, depth=3, base_filters=2)
    assert model.output_shape((132, 132, 116)) == (44, 44, 28)
    assert model.halo == (44, 44, 44)


@pytest.mark.parametrize(
    ("depth", "block"),
    [(d, b) for d in (1, 2, 3, 4, 5) for b in ("plain", "residual", "vgg")] + [(d, "vgg16") for d in (1, 2, 3, 4)],
)
def test_legal_sizes_match_the_network(depth, block):
    model = UNet(depth=depth, base_filters=1, block=block, batch_norm=False).eval()
    smallest = model.legal_input_shape(1)
    for size in (smallest[0], smallest[0] + model.grid):
        expected = model.output_shape((size, size))
        with torch.no_grad():
            got = model(torch.zeros(1, 1, size, size)).shape[2:]
        assert tuple(got) == expected
        assert size - expected[0] == 2 * model.halo[0]
    # Every size between two legal ones is refused, naming the neighbours.
    for size in range(smallest[0] + 1, smallest[0] + model.grid):
        with pytest.raises(ValueError, match=f"{smallest[0]} and {smallest[0] + model.grid}"):
            model.output_shape((size, size))


def test_too_small_input_is_refused():
    model = UNet(depth=4)
    with pytest.raises(ValueError, match="188"):
        model.output_shape((172, 188))


def test_legal_output_is_smallest_at_least_wanted():
    model = UNet(depth=3, base_filters=1)
    for want in range(1, 60):
        out = model.legal_output_shape(want)[0]
        assert out >= want
        assert model.output_shape(model.legal_input_shape(want)) == (out, out)
        smaller = out - model.grid
        assert smaller < want or smaller < model.legal_output_shape(1)[0]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("block", ["plain", "residual", "vgg", "vgg16"])
def test_forward_shapes_and_fused_copy(ndim, block):
    model = UNet(in_channels=2, n_classes=3, ndim=ndim, depth=2, base_filters=4, block=block, dropout=0.1)
    # Give batch norm non-trivial statistics so folding is really tested.
    model.train()
    for _ in range(3):
        model(torch.randn(4, 2, *model.legal_input_shape(4)))
    model.eval()
    x = torch.randn(2, 2, *model.legal_input_shape(6))
    with torch.no_grad():
        y = model(x)
        fused = model.inference_copy()
        assert y.shape == (2, 3, *model.output_shape(x.shape[2:]))
        assert torch.allclose(fused(x), y, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d) for m in fused.modules())
    assert model.training is False and any(p.requires_grad for p in model.parameters())


def test_config_rebuilds_architecture():
    model = UNet(in_channels=3, n_classes=4, depth=2, base_filters=8, block="residual", dropout=0.2)
    clone = UNet(**model.config)
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())


def test_he_initialisation():
    model = UNet(depth=2, base_filters=16)
    conv = model.encoder[1].layers[0].conv
    fan_in = conv.in_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_in) ** 0.5) < 0.2 * (2 / fan_in) ** 0.5


def test_vgg16_layout():
    """2-2-3-3-3 convolutions at 64-128-256-512-512 filters, four poolings, the decoder mirrored."""
    model = UNet(in_channels=3, depth=4, base_filters=64, block="vgg16", batch_norm=False)
    convs = [len(b.layers) for b in [*model.encoder, model.bottleneck]]
    widths = [b.layers[0].conv.out_channels for b in [*model.encoder, model.bottleneck]]
    assert convs == [2, 2, 3, 3, 3] and widths == [64, 128, 256, 512, 512]
    assert [len(b.layers) for b in model.decoder] == [3, 3, 2, 2]
    assert [(u.in_channels, u.out_channels) for u in model.upsample] == [(512, 512), (512, 256), (256, 128), (128, 64)]
    # per side, c convolutions at scale 2**level lose c * 2**level pixels: encoder and decoder alike, and the bottom
    side = 2 * 1 + 2 * 2 + 3 * 4 + 3 * 8
    assert model.halo == (2 * side + 3 * 16,) * 2
    assert model.output_shape(model.legal_input_shape(100)) == model.legal_output_shape(100)


@pytest.mark.parametrize(
    "kwargs", [dict(ndim=4), dict(block="dense"), dict(depth=0), dict(n_classes=0), dict(block="vgg16", depth=5)]
)
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)
