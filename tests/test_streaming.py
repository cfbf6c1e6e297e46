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
from milbench.models.streaming import (StreamingTrunk, activation_bytes_per_pixel, auto_tile_size, geometry,
                                       plan_tiles, streamed_forward_backward)

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


def _shapes(plan) -> set[tuple[int, int]]:
    return {(t.rows.stop - t.rows.start, t.cols.stop - t.cols.start) for t in plan}


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
        assert len(_shapes(plan)) == 1, "edge tiles shifted inward, not shorter"
        assert all(t.rows.stop <= h and t.cols.stop <= w for t in plan), "no tile reads past the image"
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
    """ResNet-34 at 2048 px with 1920-px tiles: 2x2 squares read 2.16x the image
    (2 x 1504 px per axis, one shape; mixed 1920 + 1056 read 2.11x), full-height
    strips of at most 1920**2 pixels read 1.45x."""
    from milbench.models.streaming import describe
    from milbench_plugins.streamingclam.trunk import build_trunk

    geo = geometry(build_trunk("resnet34", 3))
    square, area = describe(geo, 2048, 2048, 1920), describe(geo, 2048, 2048, 1920, "area")
    assert square["tiles"] == 4 and abs(square["overlap_factor"] - 2.1572) < 1e-3
    assert square["largest_tile"] == [1504, 1504] and square["distinct_tile_shapes"] == 1
    assert area["tiles"] == 2 and area["overlap_factor"] < 1.5
    assert area["largest_tile"][0] * area["largest_tile"][1] <= 1920 * 1920
    for side, tile in [(3000, 1500), (4096, 3200), (8192, 3200), (2500, 1100)]:
        assert describe(geo, side, side, tile, "area")["overlap_factor"] <= describe(geo, side, side, tile)["overlap_factor"]
    with pytest.raises(ConfigError, match="tile shape 'round'; valid: square, area"):
        StreamingTrunk(build_trunk("resnet34", 3), 1920, "round")


@pytest.mark.parametrize("shape", ["square", "area"])
@pytest.mark.parametrize("side", [1600, 2048, 3001, 4100])
def test_resnet34_tiles_share_one_shape(side, shape):
    """The first-epoch penalty came from edge tiles of other shapes: every tile of
    a plan now has one shape, the last one shifted inward to end on the border."""
    from milbench_plugins.streamingclam.trunk import build_trunk

    geo = geometry(build_trunk("resnet34", 3))
    plan = plan_tiles(geo, side, side + 77, 1500, shape)
    assert len(plan) >= 2 and len(_shapes(plan)) == 1
    assert max(t.rows.stop for t in plan) == side and max(t.cols.stop for t in plan) == side + 77
    assert all(t.rows.start % 32 == 0 and t.cols.start % 32 == 0 for t in plan)


def test_activation_cost_is_counted_per_pixel():
    """conv(3->8) + ReLU + conv(8->4) keeps the input (3 channels) and the ReLU's
    output (8 channels, shared with the second conv's input) per pixel: 11 values,
    times the headroom; float64 doubles it."""
    from milbench.models.streaming import ACTIVATION_HEADROOM

    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    assert activation_bytes_per_pixel(trunk) == pytest.approx(11 * 4 * ACTIVATION_HEADROOM)
    assert activation_bytes_per_pixel(trunk.double()) == pytest.approx(11 * 8 * ACTIVATION_HEADROOM)


def test_auto_tile_size_is_the_largest_that_fits():
    geo = geometry(resnet_trunk())
    per_pixel = activation_bytes_per_pixel(resnet_trunk())
    s = geo.stride[0]
    for budget in (50 * 2**20, 200 * 2**20, 2**30):
        tile = auto_tile_size(geo, per_pixel, budget)
        assert tile % s == 0 and tile >= geo.min_tile_size
        assert tile * tile * per_pixel <= budget < (tile + s) ** 2 * per_pixel
    assert auto_tile_size(geo, per_pixel, 2**30) > auto_tile_size(geo, per_pixel, 50 * 2**20)
    with pytest.raises(ConfigError, match=r"tile_size=auto: a tile budget of 0 MiB .* at least 112 px"):
        auto_tile_size(geo, per_pixel, 100_000)


def test_geometry_is_computed_from_layers():
    """ResNet-34's trunk: stride 32 and the well-known 899-px receptive field."""
    from milbench_plugins.streamingclam.trunk import build_trunk

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
    # a tile near the minimum (the plan may fall back to mixed lengths), then one a stride longer or more,
    # where every tile must share one shape (interior tiles then end off the stride grid)
    small = geo.min_tile_size + rng.randint(0, 20)
    larger = geo.min_tile_size + max(geo.stride) + rng.randint(0, 30)
    for tile, shape in ((small, "square"), (larger, rng.choice(["square", "area"]))):
        stream, out, grads, gx = _streamed(trunk, x, grad, tile, shape)
        assert (out - ref).abs().max().item() <= 1e-9
        assert all((g - r).abs().max().item() <= 1e-9 for g, r in zip(grads, ref_grads))
        assert (gx - ref_gx).abs().max().item() <= 1e-9
    assert len(_shapes(stream.tiles(h, w))) == 1


@pytest.mark.parametrize("split, tiles", [((), 85), ((4,), [60, 40]), ((2, 7), [50, 40, 10])])
def test_streamed_forward_backward_matches_plain_step(split, tiles):
    """The training step keeps the last tile's graph (and the maps between
    stages) from the forward; the gradients are still the plain ones."""
    trunk = plain_trunk().double()
    head = nn.Conv2d(8, 1, 1).double()
    x = torch.randn(1, 3, 90, 101, dtype=torch.float64)
    stream = StreamingTrunk(trunk, tiles, "square", split)
    assert all(len(st.tiles(*st_in)) > 1 for st, st_in in zip(stream.stages[:1], [(90, 101)]))

    def head_fn(f):
        return head(f).square().mean()

    loss_ref = head_fn(trunk(x))
    loss_ref.backward()
    ref = [p.grad.clone() for p in [*trunk.parameters(), *head.parameters()]]
    trunk.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    loss = streamed_forward_backward(stream, x, head_fn)
    got = [p.grad for p in [*trunk.parameters(), *head.parameters()]]
    assert abs(loss.item() - loss_ref.item()) <= 1e-12
    assert max((g - r).abs().max().item() for g, r in zip(got, ref)) <= 1e-9
    assert stream._saved is None, "nothing kept after the step"


@pytest.mark.parametrize("budget, kept", [(1.0, [False, False, True]), (1e12, [True, True, True])])
def test_kept_stages_follow_the_budget(budget, kept):
    """With costs and a budget, earlier stages keep their last tile too while it
    all fits (a whole image that fits trains without recomputation); the step's
    gradients are the plain ones either way."""
    trunk = plain_trunk().double()
    head = nn.Conv2d(8, 1, 1).double()
    x = torch.randn(1, 3, 90, 101, dtype=torch.float64)

    def head_fn(f):
        return head(f).square().mean()

    head_fn(trunk(x)).backward()
    ref = [p.grad.clone() for p in [*trunk.parameters(), *head.parameters()]]
    trunk.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    stream = StreamingTrunk(trunk, [50, 40, 10], "square", (2, 7), [100.0, 100.0, 100.0], budget)
    assert stream._keep_plan(90, 101) == kept
    streamed_forward_backward(stream, x, head_fn)
    got = [p.grad for p in [*trunk.parameters(), *head.parameters()]]
    assert max((g - r).abs().max().item() for g, r in zip(got, ref)) <= 1e-9


@pytest.mark.parametrize("shape", ["square", "area"])
def test_split_stages_equal_plain(shape):
    """A trunk cut into stages (ResNet-18 to layer2 before layer1 and before layer2),
    each streamed with several tiles of its own size: output, parameter and
    input gradients equal the plain network's (float64)."""
    trunk = resnet_trunk().double()
    h, w = 161, 197
    x = torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref, grad, ref_grads, ref_gx = _reference(trunk, x)
    stream = StreamingTrunk(trunk, [100, 30, 24], shape, [4, 5])
    assert [len(st.module) for st in stream.stages] == [4, 1, 1]
    size = (h, w)
    for st in stream.stages:
        assert len(st.tiles(*size)) > 1, "every stage really streams"
        size = st.geometry.output_size(*size)
    trunk.zero_grad(set_to_none=True)
    out = stream.forward_streamed(x)
    gx = stream.backward_streamed(x, grad, input_grad=True)
    assert (out - ref).abs().max().item() <= 1e-9
    for g, r in zip([p.grad for p in trunk.parameters()], ref_grads):
        assert (g - r).abs().max().item() <= 1e-9
    assert (gx - ref_gx).abs().max().item() <= 1e-9
    assert sum(1 for _ in stream.parameters()) == sum(1 for _ in trunk.parameters()), "stages register nothing"


def test_bad_split_is_a_clear_error():
    with pytest.raises(ConfigError, match="only an nn.Sequential trunk splits"):
        StreamingTrunk(nn.Conv2d(3, 3, 3), 50, split=[1])
    with pytest.raises(ConfigError, match="cuts must lie between the trunk's 6 children"):
        StreamingTrunk(resnet_trunk(), 100, split=[6])
    with pytest.raises(ConfigError, match="3 stages need 3 tile sizes, got 2"):
        StreamingTrunk(resnet_trunk(), [100, 50], split=[2, 4])


def test_auto_stages_cut_resnet34_where_tiles_are_widest():
    """ResNet-34 at a 2 GiB budget: streamed as one, a tile is under two receptive
    fields wide; cut before layer3, the early stage's tiles are many of its own
    (small) fields wide and the late stage's are too, each within the budget."""
    from milbench.models.streaming import auto_stages
    from milbench_plugins.streamingclam.trunk import build_trunk

    trunk = build_trunk("resnet34", 3)
    plan = auto_stages(trunk, 2 * 2**30)
    one = auto_stages(trunk, 2 * 2**30, max_stages=1)
    assert one.split == () and one.tile_sizes[0] / 899 < 2
    assert len(plan.split) == 1
    stream = StreamingTrunk(trunk, list(plan.tile_sizes), "area", plan.split)
    for st, t, c in zip(stream.stages, plan.tile_sizes, plan.bytes_per_pixel):
        assert t * t * c <= 2 * 2**30
        assert t / max(st.geometry.receptive_field) > 2 * one.tile_sizes[0] / 899


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


def test_auto_stages_subtracts_the_kept_maps_of_the_image():
    """Sized for an image, auto_stages gives tiles what the maps kept whole leave of the
    tile_share of the budget (the rest is headroom), and refuses with one line when those
    maps alone do not fit in that share."""
    from milbench.errors import ConfigError as _ConfigError
    from milbench.models.streaming import auto_stages, kept_map_bytes, stage_maps

    trunk = plain_trunk()
    free = 64 * 2**20
    plan = auto_stages(trunk, free, image_shape=(1024, 1024), tile_share=0.5)
    maps = stage_maps(trunk, plan.split, plan.out_channels, 1024, 1024)
    assert plan.kept_map_bytes == kept_map_bytes(maps, 4) > 0
    assert plan.budget_bytes == pytest.approx(0.5 * free - plan.kept_map_bytes)
    with pytest.raises(_ConfigError, match=r"^a 8192x8192 image needs \d+ MiB .*more than the budget of 64 MiB; "
                                           r"raise --max-memory"):
        auto_stages(trunk, free, image_shape=(8192, 8192), tile_share=0.5)
    # maps that fit the whole budget but not its tile_share are refused too: no room left for tiles
    kept = auto_stages(trunk, 2**40, image_shape=(2048, 2048), tile_share=0.5, max_stages=1).kept_map_bytes
    with pytest.raises(_ConfigError, match=r"^a 2048x2048 image needs"):
        auto_stages(trunk, 1.5 * kept, image_shape=(2048, 2048), tile_share=0.5, max_stages=1)
