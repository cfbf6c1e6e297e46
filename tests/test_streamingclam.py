"""The streamingclam method: streamed gradients equal the plain model's, and
predictions have the shapes and ranges the harness scores."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from milbench.api import Bag, DataSpec, RunContext
from milbench.errors import ConfigError

torch.set_num_threads(1)
PLUGIN_FILE = Path(__file__).resolve().parents[1] / "plugins" / "streamingclam" / "__init__.py"


@pytest.fixture(scope="module")
def plugin():
    """The installed ``milbench_plugins.streamingclam``."""
    return importlib.import_module("milbench_plugins.streamingclam")


def make_bag(n=10, channels=1, p=16, rows=3, cols=4, label=1, dtype=torch.float64, seed=0) -> Bag:
    """A bag built by hand: N random patches on a rows x cols board (two cells empty)."""
    g = torch.Generator().manual_seed(seed)
    instances = torch.randn(n, channels, p, p, generator=g, dtype=dtype)
    cells = torch.randperm(rows * cols, generator=g)[:n]
    grid = torch.stack([cells // cols, cells % cols], dim=1).long()
    labels = torch.zeros(n, dtype=torch.long)
    labels[:2] = label
    return Bag(instances, label, grid, (rows, cols), labels, [f"x{i}" for i in range(n)], None, 1, "hand-made")


def make_config(method, **overrides):
    config = {k: p.default for k, p in method.params.items()}
    config.update(overrides)
    return {k: method.params[k].validate(k, v) for k, v in config.items()}


def build(plugin, channels=1, patch=16, **overrides):
    method = plugin.StreamingCLAM()
    config = make_config(method, **overrides)
    torch.manual_seed(0)
    model = method.build(DataSpec(channels=channels, instance_size=patch), config, RunContext("cpu", 0))
    return method, config, model.double()


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def plain_step(model, bag, config):
    """The reference: the same model, forward and backward over the whole image at once."""
    from milbench_plugins.streamingclam.clam import clam_loss

    model.zero_grad(set_to_none=True)
    loss = clam_loss(model(bag.image(), bag.label), bag.label, config["inst_weight"])
    loss.backward()
    return float(loss.detach()), grads(model)


@pytest.mark.parametrize("overrides", [
    {"inst_loss": "none"},  # stream_head=auto: the head runs tile by tile too
    {"inst_loss": "none", "stream_head": "never"},  # the whole feature map and dL/dF
    {"inst_loss": "none", "tile_shape": "square"},
    {"inst_loss": "svm", "inst_k": 3},
    {"inst_loss": "ce", "inst_k": 2, "head_pool": 2},
    {"inst_loss": "none", "weight_standardization": "off"},
])
def test_backward_equals_plain_small_trunk(plugin, overrides):
    from torch.nn.utils import parametrize

    method, config, model = build(plugin, tile_size=40, hidden_dim=16, attn_dim=8, **overrides)
    convs = [m for m in model.stream.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    # the default (auto) standardises the small trunk's weights: the exactness below covers it
    assert all(parametrize.is_parametrized(c, "weight") for c in convs) == \
        (overrides.get("weight_standardization", "auto") == "auto")
    bag = make_bag(label=1)
    h, w = bag.image().shape[-2:]
    assert len(model.stream.tiles(h, w)) > 1, "the test must really stream"
    ref_loss, ref = plain_step(model, bag, config)
    model.zero_grad(set_to_none=True)
    model.train()
    loss = method.backward(model, bag, config)
    got = grads(model)
    assert abs(loss - ref_loss) <= 1e-9
    for name, r in ref.items():
        if r is None:  # instance classifiers of the other class get no gradient in either
            assert got[name] is None, name
            continue
        assert (got[name] - r).abs().max().item() <= 1e-9, name
    assert any(got[n] is not None for n in got if n.startswith("stream.trunk"))
    head_streamed = overrides.get("stream_head", "auto") == "auto" and overrides["inst_loss"] == "none" \
        and overrides.get("head_pool", 0) <= 1
    assert bool(model.tile_sizing.get("stream_head_streamed")) == head_streamed


def test_weight_standardisation_fixes_each_filters_scale():
    """Every conv of a from-scratch trunk computes with a filter of mean 0 and variance
    2/fan_in whatever its raw weights, so the output ignores their scale; resnets keep
    their raw weights under auto, and off leaves plain convolutions."""
    from torch.nn.utils import parametrize

    from milbench_plugins.streamingclam.trunk import build_trunk

    torch.manual_seed(0)
    trunk = build_trunk("small", 1).double()
    convs = [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(parametrize.is_parametrized(c, "weight") for c in convs)
    for c in convs:
        w = c.weight.flatten(1)
        assert w.mean(1).abs().max().item() < 1e-12
        assert torch.allclose(w.var(1, unbiased=False) * w.shape[1], torch.full((w.shape[0],), 2.0, dtype=w.dtype),
                              rtol=1e-3)  # eps keeps it a hair under 2
    x = torch.randn(1, 1, 40, 40, dtype=torch.float64)
    before = trunk(x)
    with torch.no_grad():
        for c in convs:  # the raw weights: scaled and shifted per filter
            c.parametrizations.weight.original.mul_(3.0).add_(0.5)
    # equal up to eps's share (unstandardised, the output would be about 81x larger)
    assert ((trunk(x) - before).abs().max() / before.abs().max()).item() < 1e-3
    assert not any(parametrize.is_parametrized(m, "weight") for m in build_trunk("small", 1, None, False, "off").modules()
                   if isinstance(m, torch.nn.Conv2d))
    resnet = build_trunk("resnet18", 3, 1)
    assert not any(parametrize.is_parametrized(m, "weight") for m in resnet.modules() if isinstance(m, torch.nn.Conv2d))


def test_weight_standardisation_refused_on_pretrained_weights(plugin):
    method = plugin.StreamingCLAM()
    for tile_size in ("auto", 256):  # refused before any weights are fetched, whatever the tiles
        config = make_config(method, trunk="resnet18", pretrained=True, weight_standardization="on",
                             tile_size=tile_size)
        with pytest.raises(ConfigError, match="distort the pretrained weights") as err:
            method.check(config)
        assert "\n" not in str(err.value)


def assert_streamed_step_equals_plain(method, model, bag, config, tol: float = 1e-9) -> None:
    """The method's streamed backward gives the plain network's loss and every gradient to ``tol``."""
    ref_loss, ref = plain_step(model, bag, config)
    model.zero_grad(set_to_none=True)
    loss = method.backward(model, bag, config)
    got = grads(model)
    assert abs(loss - ref_loss) <= tol
    for name, r in ref.items():
        if r is not None:
            assert (got[name] - r).abs().max().item() <= tol, name


def test_backward_equals_plain_resnet_trunk(plugin):
    method, config, model = build(plugin, channels=3, patch=48, trunk="resnet18", trunk_depth=2, tile_size=130,
                                  hidden_dim=16, attn_dim=8)
    bag = make_bag(n=12, channels=3, p=48, label=0)  # 144 x 192 image
    assert len(model.stream.tiles(144, 192)) > 1
    assert_streamed_step_equals_plain(method, model, bag, config)


@pytest.mark.parametrize("level", ["instance", "pixel"])
def test_predict_scores(plugin, level):
    method, config, model = build(plugin, tile_size=40, hidden_dim=16, attn_dim=8, score_level=level)
    bag = make_bag()
    model.eval()
    with torch.no_grad():
        pred = method.predict(model, bag, config)
        probs = torch.softmax(model(bag.image()).logits, 0)
    assert 0.0 <= pred.bag_prob <= 1.0
    assert pred.bag_prob == pytest.approx(float(probs[1]), abs=1e-9)  # streamed == plain
    assert pred.instance_scores.shape == (len(bag),)
    assert float(pred.instance_scores.min()) >= 0.0 and float(pred.instance_scores.max()) <= 1.0
    # attention / max, times the bag probability: the most attended patch scores about the bag
    # probability (position centres fall between pixels, so the map's peak is a little lower)
    assert 0.9 * pred.bag_prob <= float(pred.instance_scores.max()) <= pred.bag_prob + 1e-6
    if level == "instance":
        assert pred.pixel_scores is None
        return
    assert pred.pixel_scores.shape == (48, 64)
    # an instance's score is the pixel map's maximum over its patch
    r, c = bag.grid[3].tolist()
    patch = pred.pixel_scores[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
    assert float(pred.instance_scores[3]) == pytest.approx(float(patch.max()))


def test_freezing_schedule(plugin):
    method, config, model = build(plugin, tile_size=40, hidden_dim=16, attn_dim=8, freeze_trunk_epochs=1)
    bag = make_bag()
    assert model.trunk_frozen
    method.on_epoch_start(model, 1, config)
    model.zero_grad(set_to_none=True)
    method.backward(model, bag, config)
    g = grads(model)
    assert all(v is None for n, v in g.items() if n.startswith("stream.trunk"))
    assert g["head.classifier.weight"] is not None
    method.on_epoch_start(model, 2, config)
    model.zero_grad(set_to_none=True)
    method.backward(model, bag, config)
    assert all(v is not None for n, v in grads(model).items() if n.startswith("stream.trunk"))


def test_check_refuses_a_too_small_tile(plugin):
    method = plugin.StreamingCLAM()
    with pytest.raises(ConfigError, match="tile_size"):
        method.check(make_config(method, tile_size=16))
    method.check(make_config(method))  # defaults are fine


def test_tile_keys_parse_and_refuse_clearly(plugin):
    from milbench.config import Param

    params = plugin.StreamingCLAM.params
    assert params["tile_size"].default == "auto" and params["tile_shape"].default == "area"
    assert params["tile_size"].parse("tile_size", "auto") == "auto"
    assert params["tile_size"].parse("tile_size", "320") == 320
    assert params["tile_size"].validate("tile_size", 320.0) == 320
    for bad in ("big", "4", "12.5"):
        with pytest.raises(ConfigError, match="bad value for 'tile_size': .*(is not|valid:) 'auto' or int >= 8"):
            params["tile_size"].parse("tile_size", bad)
    with pytest.raises(ConfigError, match="bad value for 'tile_shape'"):
        params["tile_shape"].parse("tile_shape", "round")
    assert isinstance(params["tile_size"], Param)


def test_auto_tile_size_follows_max_memory(plugin, monkeypatch):
    """--max-memory (RunContext.max_memory_bytes) sizes the tile: half of what is left
    after setup; a larger limit gives a larger tile, the choice is in the record, and
    a limit with no room left is a clear error.

    Resident memory is pinned for the test: the process's real RSS may shrink
    between two readings (the allocator hands pages back), which once made the
    budget exceed ``extra / 2`` by the pages freed, a flaky failure."""
    import psutil

    from milbench.models.streaming import DEFAULT_TILE_BUDGET_BYTES

    method = plugin.StreamingCLAM()
    config = make_config(method, hidden_dim=16, attn_dim=8)
    spec = DataSpec(channels=1, instance_size=16)
    pinned = psutil.Process().memory_info()
    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: pinned)
    rss = pinned.rss
    chosen = {}
    for extra in (64 * 2**20, 1024 * 2**20):
        model = method.build(spec, config, RunContext("cpu", 0, max_memory_bytes=rss + extra))
        rec = method.artifacts(model, None, config, RunContext("cpu", 0))
        tile = model.stream.tile_size
        assert rec["stream_tile_size"] == tile and rec["stream_tile_budget_bytes"] <= extra / 2
        assert rec["stream_tile_budget_from_max_memory"] == 1
        assert tile * tile * rec["stream_tile_bytes_per_pixel"] <= rec["stream_tile_budget_bytes"]
        assert model.stream.tile_shape == "area"
        chosen[extra] = tile
    assert chosen[64 * 2**20] < chosen[1024 * 2**20]
    default = method.build(spec, config, RunContext("cpu", 0))
    assert method.artifacts(default, None, config, RunContext("cpu", 0))["stream_tile_budget_bytes"] == \
        DEFAULT_TILE_BUDGET_BYTES
    with pytest.raises(ConfigError, match="tile_size=auto: --max-memory .* leaves no room for tiles"):
        method.build(spec, config, RunContext("cpu", 0, max_memory_bytes=rss // 2))


def test_auto_stages_backward_equals_plain(plugin, monkeypatch):
    """tile_size=auto under a tight budget (1 % of a 1 GiB margin over --max-memory):
    the ResNet trunk is cut into stages that each stream with several tiles, and
    the gradient is still the plain model's (float64)."""
    import psutil

    monkeypatch.setattr(plugin, "TILE_BUDGET_SHARE", 0.01)

    method = plugin.StreamingCLAM()
    config = make_config(method, trunk="resnet18", trunk_depth=2, hidden_dim=16, attn_dim=8)
    method.build(DataSpec(channels=3, instance_size=48), config, RunContext("cpu", 0))  # imports in the baseline
    torch.manual_seed(0)
    limit = psutil.Process().memory_info().rss + 2**30
    model = method.build(DataSpec(channels=3, instance_size=48), config,
                         RunContext("cpu", 0, max_memory_bytes=limit)).double()
    rec = method.artifacts(model, None, config, RunContext("cpu", 0))
    assert rec["stream_stages"] == 2 and len(model.stream.stages) == 2
    bag = make_bag(n=12, channels=3, p=48, label=1)  # 144 x 192 image
    assert len(model.stream.tiles(144, 192)) > 1, "the test must really stream"
    assert_streamed_step_equals_plain(method, model, bag, config)


def test_registers_and_imports_without_torch(plugin):
    seen = []
    plugin.milbench_register_methods(seen.append)
    assert [m.name for m in seen] == ["streamingclam"] and seen[0].supervision == "bag"
    code = ("import importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('p', {str(PLUGIN_FILE)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print('torch' in sys.modules)")
    env_path = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"


def test_presets_and_smoke_are_valid(plugin):
    method = plugin.StreamingCLAM()
    for overlay in [*method.presets.values(), method.smoke, method.defaults]:
        for k, v in overlay.items():
            if k in method.params:
                method.params[k].validate(k, v)


@pytest.mark.parametrize("trunk, pool", [("small", 0), ("small", 2), ("lenet", 0)])
def test_attention_lands_where_the_trunk_looked(trunk, pool):
    """A one-hot attention map peaks at the centre of that position's receptive field."""
    from milbench_plugins.streamingclam.clam import CLAMHead, StreamingCLAMModel
    from milbench_plugins.streamingclam.trunk import build_trunk

    t = build_trunk(trunk, 1)
    model = StreamingCLAMModel(t, CLAMHead(t.out_channels, 8, 4, pool=pool), 1000)
    with torch.no_grad():
        h, w = model.head.pool(t(torch.zeros(1, 1, 112, 140)))[0].shape[-2:]
    a = torch.zeros(h, w)
    a[1, 2] = 1.0
    pix = model.upsample(a, (112, 140))
    geo, k = model.stream.geometry, max(pool, 1)
    centre = [o * geo.stride[i] * k + (geo.lo[i] + geo.hi[i]) / 2 + (k - 1) / 2 * geo.stride[i]
              for i, o in enumerate((1, 2))]
    peak = (pix == pix.max()).nonzero()[0].tolist()
    assert all(abs(peak[i] - centre[i]) <= 0.5 for i in range(2))
    assert float(pix.min()) >= 0.0 and float(pix.max()) <= 1.0


def test_attention_painted_in_bands_equals_the_whole_map(plugin):
    """Prediction paints the attention map band by band (a slide's full-resolution map is never
    held): the bands equal rows of the whole map, the per-instance maxima equal those of the whole
    map, and the gather interpolation equals the dense interpolation-matrix product it replaces."""
    from milbench.api import Bag
    from milbench_plugins.streamingclam.clam import CLAMHead, StreamingCLAMModel
    from milbench_plugins.streamingclam.trunk import build_trunk

    t = build_trunk("small", 3)
    model = StreamingCLAMModel(t, CLAMHead(t.out_channels, 8, 4), 1000)
    p, rows, cols = 8, 37, 23  # more grid rows than one band, not a multiple of it
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    keep = torch.randperm(len(grid), generator=torch.Generator().manual_seed(0))[:200]
    bag = Bag(torch.zeros(len(keep), 3, p, p), 1, grid[keep], (rows, cols), torch.zeros(len(keep), dtype=torch.long))
    with torch.no_grad():
        h, w = t(torch.zeros(1, 3, rows * p, cols * p))[0].shape[-2:]
    a = torch.rand(h, w, generator=torch.Generator().manual_seed(1))
    whole = plugin.attention_pixels(model, a, bag)
    assert whole.shape == (rows * p, cols * p)
    assert torch.equal(plugin.attention_pixels(model, a, bag, (40, 97)), whole[40:97])
    assert torch.allclose(plugin.instance_attention(model, a, bag), plugin.instance_maxima(whole, bag))
    geo = model.stream.geometry

    def dense(n_px: int, n_pos: int, stride: float, c0: float) -> torch.Tensor:
        u = ((torch.arange(n_px, dtype=torch.float64) - c0) / stride).clamp(0, n_pos - 1)
        i0 = u.floor().long()
        i1 = (i0 + 1).clamp(max=n_pos - 1)
        m = torch.zeros(n_px, n_pos, dtype=torch.float64)
        m.scatter_add_(1, i0[:, None], (1 - (u - i0))[:, None])
        m.scatter_add_(1, i1[:, None], (u - i0)[:, None])
        return m

    norm = (a / a.max()).double()
    ref = dense(rows * p, h, geo.stride[0], (geo.lo[0] + geo.hi[0]) / 2) @ norm \
        @ dense(cols * p, w, geo.stride[1], (geo.lo[1] + geo.hi[1]) / 2).t()
    assert torch.allclose(whole.double(), ref, atol=1e-6)


def test_kept_map_estimate_matches_the_tensors_a_step_keeps(plugin, monkeypatch):
    """The planner's kept-map bytes (maps between stages, the trunk's output, their
    gradients, the head's saved activations) equal the sizes of the tensors a real
    streamed step keeps, measured in-process on a small image (the head's share
    without the engine's headroom factor, which the estimate adds on top)."""
    import psutil

    from milbench.models.streaming import ACTIVATION_HEADROOM, StreamingTrunk, streamed_forward_backward
    from milbench_plugins.streamingclam.clam import clam_loss

    method = plugin.StreamingCLAM()
    config = make_config(method, stream_head="never")  # the whole-map step is what this test measures
    limit = psutil.Process().memory_info().rss + 2**30
    model = method.build(DataSpec(channels=3, instance_size=32), config, RunContext("cpu", 0, max_memory_bytes=limit))
    x = torch.randn(3, 256, 320)
    plugin.fit_image(model, x.shape, config)
    rec = method.artifacts(model, None, config, RunContext("cpu", 0))
    assert rec["stream_stages"] == 2 and rec["stream_image_pixels"] == 256 * 320
    sizes: dict[str, int] = {"maps": 0, "grad_in": 0, "F": 0, "dF": 0, "head": 0}
    orig_fwd, orig_back = StreamingTrunk.forward_streamed, StreamingTrunk._stage_backward

    def forward_streamed(self, image, keep_for_backward=False):
        out = orig_fwd(self, image, keep_for_backward)
        sizes["maps"] += sum(m.numel() * m.element_size() for m in self._saved[1][1:])
        return out

    def stage_backward(self, *args, **kwargs):
        g = orig_back(self, *args, **kwargs)
        sizes["grad_in"] += 0 if g is None else g.numel() * g.element_size()
        return g

    monkeypatch.setattr(StreamingTrunk, "forward_streamed", forward_streamed)
    monkeypatch.setattr(StreamingTrunk, "_stage_backward", stage_backward)
    head_saved: dict[int, int] = {}

    def head_loss(f):
        sizes["F"] = f.numel() * f.element_size()
        skip = {t.untyped_storage().data_ptr() for t in model.head.parameters()} | {f.untyped_storage().data_ptr()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in skip:
                head_saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        f.register_hook(lambda g: sizes.__setitem__("dF", g.numel() * g.element_size()))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return clam_loss(model.head(f, 1), 1, config["inst_weight"])

    streamed_forward_backward(model.stream, x, head_loss)
    sizes["head"] = sum(head_saved.values())
    assert sizes["maps"] > 0 and sizes["maps"] == sizes["grad_in"] and sizes["F"] == sizes["dF"]
    positions = (256 // 8) * (320 // 8)
    head_estimate = model.head_bpp / ACTIVATION_HEADROOM * positions
    assert abs(head_estimate - sizes["head"]) <= 0.01 * sizes["head"]
    trunk_maps = sizes["maps"] + sizes["grad_in"] + sizes["F"] + sizes["dF"]
    estimate = rec["stream_kept_map_bytes"]
    assert estimate == pytest.approx(trunk_maps + model.head_bpp * positions, rel=1e-3)


def test_an_image_too_large_for_max_memory_is_refused_before_training(plugin):
    """When the kept maps of an image alone exceed what --max-memory leaves free,
    the first backward refuses it with one line naming the image, the bytes and the
    limit -- before any tile runs; a smaller image under the same limit trains, with
    tiles sized to what the kept maps leave."""
    import psutil

    method = plugin.StreamingCLAM()
    config = make_config(method, hidden_dim=16, attn_dim=8, stream_head="never")
    limit = psutil.Process().memory_info().rss + 48 * 2**20
    model = method.build(DataSpec(channels=1, instance_size=16), config, RunContext("cpu", 0, max_memory_bytes=limit))
    free_budget = model.tile_sizing["stream_tile_budget_bytes"]

    class Huge:  # only the shape is read before the refusal
        shape = torch.Size((1, 8192, 8192))

    bag = make_bag(channels=1, dtype=torch.float32)
    monkey = type("B", (), {"lazy_image": Huge(), "label": 1})()
    with pytest.raises(ConfigError) as err:
        method.backward(model, monkey, config)
    msg = str(err.value)
    assert "\n" not in msg and "8192x8192 image needs" in msg and "--max-memory" in msg and "MiB" in msg
    assert "out of memory" not in msg.lower()  # a clear 'failed', not mistaken for an oom
    assert all(p.grad is None for p in model.parameters())
    loss = method.backward(model, bag, config)
    assert loss == loss
    rec = method.artifacts(model, None, config, RunContext("cpu", 0))
    assert 0 < rec["stream_kept_map_bytes"] and rec["stream_tile_budget_bytes"] < free_budget


def test_stream_head_always_refuses_a_head_it_cannot_stream(plugin):
    method = plugin.StreamingCLAM()
    for bad, word in [({"head_pool": 2}, "head_pool"), ({"inst_loss": "svm"}, "inst_loss"),
                      ({"dropout": 0.25}, "dropout")]:
        with pytest.raises(ConfigError) as err:
            method.check(make_config(method, stream_head="always", tile_size=64, **bad))
        assert "\n" not in str(err.value) and word in str(err.value) and "stream_head" in str(err.value)
    method.check(make_config(method, stream_head="auto", tile_size=64, head_pool=2))  # auto falls back


def test_streamed_head_keeps_one_score_per_position(plugin):
    """The image the whole-map step refuses under a limit (test above) is planned with the head
    streamed: what it keeps whole is one float32 score per position (single stage) or that plus
    the maps between stages, far below the whole-map estimate."""
    import psutil

    method = plugin.StreamingCLAM()
    limit = psutil.Process().memory_info().rss + 48 * 2**20
    kept = {}
    for mode in ("auto", "never"):
        config = make_config(method, hidden_dim=16, attn_dim=8, stream_head=mode)
        model = method.build(DataSpec(channels=1, instance_size=16), config,
                             RunContext("cpu", 0, max_memory_bytes=limit))
        if mode == "never":
            with pytest.raises(ConfigError):
                plugin.fit_image(model, (1, 8192, 8192), config)
            from milbench.api import kept_map_bytes, stage_maps
            maps = stage_maps(model.stream.trunk, (), [128], 8192, 8192)
            kept[mode] = kept_map_bytes(maps, 4, model.head_bpp)
            continue
        assert plugin.fit_image(model, (1, 8192, 8192), config) is True
        rec = method.artifacts(model, None, config, RunContext("cpu", 0))
        assert rec["stream_head_streamed"] == 1
        kept[mode] = rec["stream_kept_map_bytes"]
        assert rec["stream_stages"] == 1 and not any(k.startswith("stream_stage2") for k in rec)
        assert kept[mode] == plugin.STREAMED_HEAD_BYTES_PER_POSITION * 1024 * 1024  # 8192/8 positions a side
    assert kept["auto"] * 10 < kept["never"]


def test_resident_image_bytes_come_off_the_tile_budget(plugin):
    """A slide's uint8 box is read after setup, so the memory measured then does not hold it;
    fit_image counts it like a kept map: the tiles get that much less."""
    import psutil

    from milbench.api import LazyImage
    from milbench_plugins.slides.bags import SlideImage

    method = plugin.StreamingCLAM()
    config = make_config(method, hidden_dim=16, attn_dim=8)
    limit = psutil.Process().memory_info().rss + 2**30
    model = method.build(DataSpec(channels=3, instance_size=32), config, RunContext("cpu", 0, max_memory_bytes=limit))
    shape = (3, 1536, 1536)
    plugin.fit_image(model, shape, config, resident_bytes=0)
    before = dict(model.tile_sizing)
    resident = 3 * 1536 * 1536
    plugin.fit_image(model, shape, config, resident_bytes=resident)
    after = dict(model.tile_sizing)
    assert after["stream_image_resident_bytes"] == resident
    assert after["stream_kept_map_bytes"] == before["stream_kept_map_bytes"], "same cut, so the sums compare"
    assert after["stream_tile_budget_bytes"] == pytest.approx(before["stream_tile_budget_bytes"] - resident, abs=2)
    # the slides' image source says what it will hold; a lazy image passes it on
    box = SlideImage(Path("unused.svs"), "s", type("R", (), {"tile_size": 32})(), (0, 10, 0, 20))
    assert box.resident_bytes == 3 * 320 * 640 and LazyImage(box).resident_bytes == box.resident_bytes
