"""grad-accum computes abmil's gradient: same bag, same weights, same parameter
gradients (to float rounding), chunked; and it refuses configs that would
silently break that (training-mode batch norm, random encoder layers)."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from milbench.api import Bag, DataSpec, RunContext
from milbench.errors import ConfigError
from milbench.models.chunked import chunk_slices, chunked_backward, encode_chunks
from milbench_plugins.abmil import ABMIL
from milbench_plugins.grad_accum import PARAMS, GradAccumABMIL

# w.bias shifts every attention logit equally and softmax ignores shifts, so
# its exact gradient is 0 and both methods hold only rounding noise there.
ZERO_GRAD = {"head.attention.w.bias"}


def config(**kw):
    cfg = {k: p.default for k, p in PARAMS.items()}
    cfg.update(kw)
    return cfg


def make_bag(n: int, channels: int, size: int, label: int, dtype, seed: int = 0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    return Bag(x, label, torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1), (1, n),
               torch.zeros(n, dtype=torch.long), bag_id=f"test-{n}")


def build(encoder: str, norm: str, channels: int, size: int, dtype, **kw):
    torch.manual_seed(0)
    cfg = config(encoder=encoder, norm=norm, attn_dim=16, **kw)
    model = GradAccumABMIL().build(DataSpec(channels, size), cfg, RunContext("cpu", 0)).to(dtype)
    if norm == "frozen":  # non-trivial statistics, so the frozen affine map is exercised
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("running_mean"):
                    buf.uniform_(-0.5, 0.5)
                elif name.endswith("running_var"):
                    buf.uniform_(0.5, 2.0)
    return model.train(), cfg


def grads_of(method, model, bag: Bag, cfg) -> tuple[dict[str, torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    loss = method.backward(model, bag, cfg)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, loss


# (encoder, norm, channels, size): LeNet on digits, the small CNN on photos.
MODELS = [("lenet", "none", 1, 28), ("lenet", "group", 1, 28), ("cnn", "frozen", 3, 16), ("cnn", "group", 3, 16)]
# (N, chunk): divides N, does not divide N, chunk of 1, chunk larger than N.
SHAPES = [(12, 4), (13, 5), (7, 1), (5, 8)]


@pytest.mark.parametrize("encoder,norm,channels,size", MODELS)
@pytest.mark.parametrize("n,chunk", SHAPES)
def test_float64_gradients_equal_abmil(encoder, norm, channels, size, n, chunk):
    model, cfg = build(encoder, norm, channels, size, torch.float64, chunk_size=chunk)
    bag = make_bag(n, channels, size, label=n % 2, dtype=torch.float64)
    ref, ref_loss = grads_of(ABMIL(), model, bag, cfg)
    got, loss = grads_of(GradAccumABMIL(), model, bag, cfg)
    assert loss == pytest.approx(ref_loss, abs=1e-12)
    assert set(got) == set(ref)
    for name in ref:
        diff = (got[name] - ref[name]).abs().max().item()
        assert diff <= 1e-10, f"{name}: max abs diff {diff:.3e}"
    # the gradient is not trivially zero
    assert max(ref[n].abs().max().item() for n in ref if n.startswith("encoder")) > 1e-6


@pytest.mark.parametrize("encoder,norm,channels,size", MODELS)
@pytest.mark.parametrize("n,chunk", [(13, 5), (7, 1), (16, 16)])
def test_float32_gradients_equal_abmil(encoder, norm, channels, size, n, chunk):
    """float32: max relative difference over the whole gradient <= 1e-5, and per
    tensor grad-accum is as close to the float64 gradient as abmil itself is.

    Relative difference = max |g_ga - g_abmil| / max |g_abmil|, both maxima over
    all parameters. A per-tensor ratio is no measure for tensors whose exact
    gradient is a cancelling sum (the attention parameters): abmil's own float32
    gradient differs from float64 there by ~1e-3 relative, so the per-tensor
    check compares grad-accum's float32 error with abmil's.
    """
    model, cfg = build(encoder, norm, channels, size, torch.float32, chunk_size=chunk)
    bag = make_bag(n, channels, size, label=1, dtype=torch.float32)
    ref, _ = grads_of(ABMIL(), model, bag, cfg)
    got, _ = grads_of(GradAccumABMIL(), model, bag, cfg)
    scale = max(g.abs().max().item() for g in ref.values())
    rel = max((got[k] - ref[k]).abs().max().item() for k in ref) / scale
    assert rel <= 1e-5, f"max relative diff {rel:.3e}"

    model64 = model.double()
    exact, _ = grads_of(ABMIL(), model64, Bag(bag.instances.double(), bag.label, bag.grid, bag.grid_shape,
                                              bag.instance_labels), cfg)
    for k in ref:
        err_abmil = (ref[k].double() - exact[k]).abs().max().item()
        err_ga = (got[k].double() - exact[k]).abs().max().item()
        assert err_ga <= 10 * err_abmil + 1e-7 * scale, f"{k}: grad-accum err {err_ga:.2e} vs abmil {err_abmil:.2e}"


def test_attention_dropout_keeps_equality():
    """Dropout acts on the attention hidden layer, which runs once per bag in
    both methods and after the encoder, which draws no random numbers; with
    the same RNG state both see the same mask, so gradients stay equal."""
    model, cfg = build("lenet", "none", 1, 28, torch.float64, chunk_size=3, dropout=0.5)
    bag = make_bag(10, 1, 28, label=1, dtype=torch.float64)
    torch.manual_seed(123)
    ref, _ = grads_of(ABMIL(), model, bag, cfg)
    torch.manual_seed(123)
    got, _ = grads_of(GradAccumABMIL(), model, bag, cfg)
    for k in ref:
        assert (got[k] - ref[k]).abs().max().item() <= 1e-10, k
    torch.manual_seed(124)  # a different mask gives a different gradient: dropout was really on
    other, _ = grads_of(ABMIL(), model, bag, cfg)
    assert any((other[k] - ref[k]).abs().max().item() > 1e-8 for k in ref)


def test_recompute_replays_rng_for_random_encoders():
    """A random layer inside the encoder (what the plugin refuses, but library
    users may have) sees the same numbers in the recomputation as in the
    no-grad pass, so the gradient is the true gradient of the chunked forward."""
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Dropout(0.5), torch.nn.Tanh()).double()
    head = torch.nn.Linear(5, 1).double()

    def head_fn(h):
        return head(h).sum(), h

    x = torch.randn(9, 6, dtype=torch.float64)
    torch.manual_seed(7)
    chunked_backward(enc, head_fn, x, lambda logit: logit, 4)
    got = enc[0].weight.grad.clone()
    after = torch.rand(1)
    enc.zero_grad()
    # reference: the same chunked forward with autograd all the way
    torch.manual_seed(7)
    h = torch.cat([enc(x[s]) for s in chunk_slices(9, 4)])
    head(h).sum().backward()
    assert torch.allclose(got, enc[0].weight.grad, atol=1e-12)
    # and the RNG stream after the call continues where the single pass left it
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_predict_equals_abmil(chunk):
    model, cfg = build("cnn", "group", 3, 16, torch.float64, chunk_size=chunk)
    model.eval()
    bag = make_bag(11, 3, 16, label=1, dtype=torch.float64)
    with torch.no_grad():
        ref = ABMIL().predict(model, bag, cfg)
        got = GradAccumABMIL().predict(model, bag, cfg)
    assert got.bag_prob == pytest.approx(ref.bag_prob, abs=1e-12)
    assert torch.allclose(got.instance_scores, ref.instance_scores, atol=1e-12)


def test_encode_chunks_matches_whole_bag():
    model, _ = build("lenet", "none", 1, 28, torch.float64)
    x = torch.randn(10, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        whole = model.encoder(x)
    assert torch.allclose(encode_chunks(model.encoder, x, 3), whole, atol=1e-13)
    assert [(s.start, s.stop) for s in chunk_slices(10, 4)] == [(0, 4), (4, 8), (8, 10)]


def test_check_refuses_batch_norm():
    with pytest.raises(ConfigError) as err:
        GradAccumABMIL().check(config(norm="batch"))
    msg = str(err.value)
    assert "\n" not in msg and "norm='batch'" in msg and "frozen" in msg
    for ok in ("none", "group", "frozen", "auto"):
        GradAccumABMIL().check(config(norm=ok))


def test_build_refuses_batch_norm_too():
    """``build`` checks again (a caller that skips ``check`` still cannot get an inexact model)."""
    with pytest.raises(ConfigError, match="norm='batch'"):
        GradAccumABMIL().build(DataSpec(1, 28), config(norm="batch"), RunContext("cpu", 0))


def test_cli_refuses_batch_norm_in_one_line(tmp_path):
    proc = run_cli("run", "-m", "grad-accum", "-d", "qmnist", "--set", "norm=batch", "--results", str(tmp_path),
                   env={"MILBENCH_PLUGINS": "abmil,grad-accum,qmnist"}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "norm='batch'" in lines[0] and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.json")), "a refused config must not start a run"


@pytest.mark.slow
def test_grad_accum_trains_through_the_harness(tmp_path, data_root):
    """A smoke run end to end: the record is ok and says chunk_size."""
    import json

    proc = run_cli("run", "-m", "grad-accum", "-d", "qmnist", "--smoke", "--device", "cpu",
                   "--results", str(tmp_path), "--data-root", str(data_root),
                   env={"MILBENCH_PLUGINS": "grad-accum,qmnist", "OMP_NUM_THREADS": "1"}, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert rec["status"] == "ok" and rec["config"]["chunk_size"] == 3
    assert rec["timing"]["train_s_per_bag"] > 0 and rec["memory"]["cpu_peak_rss_bytes"] > 0


def test_frozen_encoder_gets_no_gradient_and_head_matches_abmil():
    """With every encoder parameter frozen there is nothing to recompute; the
    head's gradient is still abmil's."""
    model, cfg = build("lenet", "none", 1, 28, torch.float64, chunk_size=3)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    bag = make_bag(8, 1, 28, label=1, dtype=torch.float64)
    ref, _ = grads_of(ABMIL(), model, bag, cfg)
    assert not any(n.startswith("encoder") for n in ref)
    model.zero_grad(set_to_none=True)
    GradAccumABMIL().backward(model, bag, cfg)
    for n, p in model.named_parameters():
        if n.startswith("encoder"):
            assert p.grad is None
        else:
            assert (p.grad - ref[n]).abs().max().item() <= 1e-12, n


def test_adam_trajectories_equal_abmil_float64():
    """Five Adam steps over different bags: the weights stay equal to abmil's
    (float64), so training with grad-accum is training abmil."""
    bags = [make_bag(n, 1, 28, label=n % 2, dtype=torch.float64, seed=n) for n in (9, 6, 11, 4, 7)]
    weights = []
    for method in (ABMIL(), GradAccumABMIL()):
        model, cfg = build("lenet", "group", 1, 28, torch.float64, chunk_size=4)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for bag in bags:
            opt.zero_grad(set_to_none=True)
            method.backward(model, bag, cfg)
            opt.step()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    ref, got = weights
    for n in ref:
        assert (got[n] - ref[n]).abs().max().item() <= 1e-10, n
