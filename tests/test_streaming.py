"""The streaming engine gives the whole-image feature map and gradients.

Exactness is the engine's whole contract: streamed output, parameter gradients
and input gradient must equal the plain (non-streamed) network's to float
rounding (float64: max abs diff <= 1e-9; float32: max relative diff <= 1e-4),
for odd image sizes and tile sizes that do not divide the image.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from milbench.errors import ConfigError
from milbench.models.norms import FrozenBatchNorm2d, freeze_batch_norms
from milbench.models.streaming import StreamingTrunk, geometry, plan_tiles, streamed_forward_backward

torch.set_num_threads(1)
# torch warns that an even 'same' kernel pads a copy of the input; that layer is here on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def _randomise_norms(trunk: nn.Module) -> nn.Module:
    """Give frozen norms non-trivial statistics so that they are really tested."""
    g = torch.Generator().manual_seed(3)
    for m in trunk.modules():
        if isinstance(m, FrozenBatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return trunk


def plain_trunk() -> nn.Module:
    """Strided convs, max and avg pooling (ceil mode, padding excluded from the
    mean), dilation, 'same' padding with an even kernel, frozen norm."""
    torch.manual_seed(0)
    return _randomise_norms(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2), nn.LeakyReLU(0.1),
        nn.Conv2d(6, 8, 4, padding="same"), nn.ReLU(),
    ))


def resnet_trunk() -> nn.Module:
    """torchvision ResNet-18 up to layer2 (residual blocks, a strided 1x1
    shortcut), batch norms frozen."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    trunk = freeze_batch_norms(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2))
    return _randomise_norms(trunk)


# trunk builder, image size (odd), tile sizes (none divides the image)
TRUNKS = {"plain": (plain_trunk, (97, 131), [89, 95]), "resnet18-layer2": (resnet_trunk, (161, 197), [150, 130])}


def _reference(trunk: nn.Module, x: torch.Tensor, g_seed: int = 1):
    x = x.detach().clone().requires_grad_(True)
    trunk.zero_grad(set_to_none=True)
    out = trunk(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(g_seed), dtype=out.dtype).to(out.device)
    out.backward(grad)
    return out.detach(), grad, [p.grad.clone() for p in trunk.parameters()], x.grad.clone()


def _streamed(trunk: nn.Module, x: torch.Tensor, grad: torch.Tensor, tile: int, shape: str = "square"):
    stream = StreamingTrunk(trunk, tile, shape)
    trunk.zero_grad(set_to_none=True)
    out = stream.forward_streamed(x)
    gx = stream.backward_streamed(x, grad, input_grad=True)
    return stream, out, [p.grad.clone() for p in trunk.parameters()], gx


@pytest.mark.parametrize("shape", ["square", "area"])
@pytest.mark.parametrize("name", list(TRUNKS))
def test_float64_streamed_equals_plain(name, shape):
    """Square tiles stream both axes; area tiles (rectangles of at most tile**2
    pixels) may be strips, but still more than one tile."""
    build, (h, w), tiles = TRUNKS[name]
    trunk = build().double()
    x = torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref, grad, ref_grads, ref_gx = _reference(trunk, x)
    for tile in tiles:
        stream, out, grads, gx = _streamed(trunk, x, grad, tile, shape)
        plan = stream.tiles(h, w)
        if shape == "square":
            assert len({t.rows.start for t in plan}) > 1 and len({t.cols.start for t in plan}) > 1, "both axes"
        assert len(plan) > 1
        assert h % tile and w % tile
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-9
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max().item() <= 1e-9
        assert (gx - ref_gx).abs().max().item() <= 1e-9


@pytest.mark.parametrize("name", list(TRUNKS))
def test_float32_streamed_equals_plain(name):
    build, (h, w), tiles = TRUNKS[name]
    trunk = build()
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    ref, grad, ref_grads, ref_gx = _reference(trunk, x)
    stream, out, grads, gx = _streamed(trunk, x, grad, tiles[0])

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(out, ref) <= 1e-4
    assert max(rel(g, r) for g, r in zip(grads, ref_grads)) <= 1e-4
    assert rel(gx, ref_gx) <= 1e-4


def test_three_dim_image_and_batches():
    """(C, H, W) gives (C', H', W'); a batch streams every image at once."""
    trunk = plain_trunk().double()
    x = torch.randn(2, 3, 121, 135, dtype=torch.float64)
    stream = StreamingTrunk(trunk, 90)
    with torch.no_grad():
        ref = trunk(x)
    assert torch.allclose(stream.forward_streamed(x), ref, atol=1e-12, rtol=0)
    assert torch.allclose(stream.forward_streamed(x[1]), ref[1], atol=1e-12, rtol=0)


def test_tile_at_least_image_is_one_plain_pass():
    trunk = plain_trunk()
    x = torch.randn(1, 3, 97, 131)
    stream = StreamingTrunk(trunk, 131)
    tiles = stream.tiles(97, 131)
    assert len(tiles) == 1 and tiles[0].rows == slice(0, 97) and tiles[0].cols == slice(0, 131)
    with torch.no_grad():
        assert torch.equal(stream.forward_streamed(x), trunk(x))


@pytest.mark.parametrize("shape", ["square", "area"])
def test_tiles_cover_feature_map_once(shape):
    geo = geometry(resnet_trunk())
    h, w = 301, 257
    tiles = plan_tiles(geo, h, w, 150, shape)
    assert len(tiles) > 1
    cover = torch.zeros(geo.output_size(h, w), dtype=torch.int64)
    for t in tiles:
        cover[t.out_rows, t.out_cols] += 1
        th, tw = t.rows.stop - t.rows.start, t.cols.stop - t.cols.start
        if shape == "square":
            assert th <= 150 and tw <= 150
        assert th * tw <= 150 * 150, "the memory bound: a tile holds at most tile_size**2 pixels"
        assert t.rows.start % geo.stride[0] == 0 and t.cols.start % geo.stride[1] == 0
    assert bool((cover == 1).all())


def test_area_tiles_recompute_less_under_the_same_bound():
    """ResNet-34 at 2048 px with 1920-px tiles: 2x2 squares read 2.1x the image,
    full-height strips of at most 1920**2 pixels read 1.45x."""
    from milbench.models.clam import build_trunk
    from milbench.models.streaming import describe

    geo = geometry(build_trunk("resnet34", 3))
    square, area = describe(geo, 2048, 2048, 1920), describe(geo, 2048, 2048, 1920, "area")
    assert square["tiles"] == 4 and abs(square["overlap_factor"] - 2.1116) < 1e-3
    assert area["tiles"] == 2 and area["overlap_factor"] < 1.5
    assert area["largest_tile"][0] * area["largest_tile"][1] <= 1920 * 1920
    for side, tile in [(3000, 1500), (4096, 3200), (8192, 3200), (2500, 1100)]:
        assert describe(geo, side, side, tile, "area")["overlap_factor"] <= describe(geo, side, side, tile)["overlap_factor"]
    with pytest.raises(ConfigError, match="tile shape 'round'; valid: square, area"):
        StreamingTrunk(build_trunk("resnet34", 3), 1920, "round")


def test_geometry_is_computed_from_layers():
    """ResNet-34's trunk: stride 32 and the well-known 899-px receptive field."""
    from milbench.models.clam import build_trunk

    geo = geometry(build_trunk("resnet34", 3))
    assert geo.stride == (32, 32)
    assert geo.receptive_field == (899, 899)
    assert geo.margin_before == (449, 449)
    assert geo.output_size(2048, 2048) == (64, 64)
    assert geometry(nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding=(1, 0))).receptive_field == (3, 5)


def test_tile_too_small_is_a_clear_error():
    stream = StreamingTrunk(resnet_trunk(), 64)
    with pytest.raises(ConfigError, match=r"tile_size 64 is too small .* at least 112 px"):
        stream.forward_streamed(torch.randn(3, 200, 200))


@pytest.mark.parametrize("seed", range(12))
def test_random_sequential_trunks(seed):
    """Random stacks of convs and pools (strides, paddings, dilations, ceil mode)
    stream exactly at random sizes and tiles."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 2
    for _ in range(rng.randint(2, 5)):
        kind = rng.choice(["conv", "conv", "max", "avg"])
        if kind == "conv":
            k = rng.choice([1, 2, 3, 5])
            co = rng.randint(1, 4)
            layers += [nn.Conv2d(c, co, k, rng.choice([1, 2, 3]), rng.randint(0, k), rng.choice([1, 2])), nn.ReLU()]
            c = co
        elif kind == "max":
            k = rng.choice([2, 3])
            layers.append(nn.MaxPool2d(k, rng.choice([1, 2]), rng.randint(0, k // 2), ceil_mode=rng.random() < 0.5))
        else:
            k = rng.choice([2, 3])
            layers.append(nn.AvgPool2d(k, rng.choice([1, 2]), rng.randint(0, k // 2), ceil_mode=rng.random() < 0.5,
                                       count_include_pad=rng.random() < 0.5))
    trunk = nn.Sequential(*layers).double()
    geo = geometry(trunk)
    h, w = rng.randint(40, 90), rng.randint(40, 90)
    try:
        geo.output_size(h, w)
    except ConfigError:
        pytest.skip("random trunk leaves no output at this size")
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    ref, grad, ref_grads, ref_gx = _reference(trunk, x)
    _, out, grads, gx = _streamed(trunk, x, grad, geo.min_tile_size + rng.randint(0, 20))
    assert (out - ref).abs().max().item() <= 1e-9
    assert all((g - r).abs().max().item() <= 1e-9 for g, r in zip(grads, ref_grads))
    assert (gx - ref_gx).abs().max().item() <= 1e-9


def test_streamed_forward_backward_matches_plain_step():
    trunk = plain_trunk().double()
    head = nn.Conv2d(8, 1, 1).double()
    x = torch.randn(1, 3, 90, 101, dtype=torch.float64)

    def head_fn(f):
        return head(f).square().mean()

    loss_ref = head_fn(trunk(x))
    loss_ref.backward()
    ref = [p.grad.clone() for p in [*trunk.parameters(), *head.parameters()]]
    trunk.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    loss = streamed_forward_backward(StreamingTrunk(trunk, 85), x, head_fn)
    got = [p.grad for p in [*trunk.parameters(), *head.parameters()]]
    assert abs(loss.item() - loss_ref.item()) <= 1e-12
    assert max((g - r).abs().max().item() for g, r in zip(got, ref)) <= 1e-9


def test_frozen_trunk_costs_no_backward():
    trunk = plain_trunk()
    for p in trunk.parameters():
        p.requires_grad_(False)
    stream = StreamingTrunk(trunk, 85)
    x = torch.randn(1, 3, 120, 120)
    f = stream.forward_streamed(x)
    assert stream.backward_streamed(x, torch.ones_like(f)) is None
    assert all(p.grad is None for p in trunk.parameters())


def test_training_mode_batch_norm_is_refused():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ConfigError, match=r"layer '1' \(BatchNorm2d\).*training mode"):
        StreamingTrunk(trunk, 32)
    stream = StreamingTrunk(trunk.eval(), 32)  # eval-mode batch norm is point-wise: fine
    trunk.train()
    with pytest.raises(ConfigError, match="training mode"):
        stream.forward_streamed(torch.randn(3, 40, 40))


@pytest.mark.parametrize("layer, word", [
    (nn.GroupNorm(2, 4), "GroupNorm"),
    (nn.AdaptiveAvgPool2d(1), "AdaptiveAvgPool2d"),
    (nn.InstanceNorm2d(4), "InstanceNorm2d"),
    (nn.Upsample(scale_factor=2), "Upsample"),
])
def test_unstreamable_layers_are_refused(layer, word):
    with pytest.raises(ConfigError, match=rf"cannot stream layer '1' \({word}\)") as err:
        StreamingTrunk(nn.Sequential(nn.Conv2d(3, 4, 3), layer), 32)
    assert "\n" not in str(err.value)


def test_unknown_function_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return torch.flatten(self.conv(x), 1)

    with pytest.raises(ConfigError, match="flatten"):
        StreamingTrunk(Flat(), 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streamed_equals_plain():
    trunk = resnet_trunk().double().cuda()
    x = torch.randn(1, 3, 161, 197, dtype=torch.float64, device="cuda")
    ref, grad, ref_grads, ref_gx = _reference(trunk, x)
    _, out, grads, gx = _streamed(trunk, x, grad, 130)
    assert (out - ref).abs().max().item() <= 1e-9
    assert all((g - r).abs().max().item() <= 1e-9 for g, r in zip(grads, ref_grads))
    assert (gx - ref_gx).abs().max().item() <= 1e-9
    # the image may stay in host memory: tiles move to the trunk's device one at a time
    _, out, grads, gx = _streamed(trunk, x.cpu(), grad, 130)
    assert out.device.type == "cuda" and gx.device.type == "cpu"
    assert (out - ref).abs().max().item() <= 1e-9
    assert all((g - r).abs().max().item() <= 1e-9 for g, r in zip(grads, ref_grads))
    assert (gx - ref_gx.cpu()).abs().max().item() <= 1e-9
