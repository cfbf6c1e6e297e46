"""sampled draws ceil(p·N) instances per visit (with or without replacement),
reproducibly under the run seed and independently of global RNG use; the vote
uses the paper's T and is a deterministic function of seed and bag."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_cli
from milbench.api import Bag, DataSpec, RunContext
from milbench.errors import ConfigError
from milbench_plugins.abmil import ABMIL
from milbench_plugins.sampled import PARAMS, SampledABMIL, default_vote_samples, sample_size


def config(**kw):
    cfg = {k: p.default for k, p in PARAMS.items()}
    cfg.update(kw)
    return cfg


def make_bag(n: int, bag_id: str = "bag-0", label: int = 1, seed: int = 0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return Bag(x, label, torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1), (1, n),
               torch.zeros(n, dtype=torch.long), [f"d{i}" for i in range(n)], bag_id=bag_id)


def build(seed: int = 0, **kw):
    cfg = config(attn_dim=16, **kw)
    torch.manual_seed(0)
    return SampledABMIL().build(DataSpec(1, 28), cfg, RunContext("cpu", seed)), cfg


@pytest.mark.parametrize("n,p,expected", [(10, 0.3, 3), (50, 0.3, 15), (7, 0.3, 3), (1, 0.3, 1),
                                          (100, 0.05, 5), (33, 1.0, 33), (3, 0.01, 1)])
def test_sample_size_is_ceil_p_n(n, p, expected):
    # 0.3 * 10 is 3.0000000000000004 in floating point: still 3 instances, not 4
    assert sample_size(n, p) == expected


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("n,p,s", [(10, 0.3, 3), (50, 0.3, 15), (37, 0.5, 19), (20, 1.0, 20)])
def test_training_draw_has_ceil_p_n_instances(n, p, s, replacement):
    model, cfg = build(sample_fraction=p, sample_replacement=replacement)
    for _ in range(20):
        idx = SampledABMIL().sample(model, n, cfg)
        assert idx.shape == (s,)
        assert int(idx.min()) >= 0 and int(idx.max()) < n
        if not replacement:
            assert len(set(idx.tolist())) == len(idx)


def test_with_replacement_repeats_instances():
    """With replacement, a full-size draw (p = 1) almost surely repeats an
    instance (1 - 50!/50^50 ≈ 1); without replacement it is a permutation."""
    model, cfg = build(sample_fraction=1.0, sample_replacement=True)
    idx = SampledABMIL().sample(model, 50, cfg)
    assert len(set(idx.tolist())) < 50
    model, cfg = build(sample_fraction=1.0, sample_replacement=False)
    assert sorted(SampledABMIL().sample(model, 50, cfg).tolist()) == list(range(50))


def test_training_draws_reproducible_under_seed_and_isolated_from_global_rng():
    m1, cfg = build(seed=3)
    m2, _ = build(seed=3)
    m3, _ = build(seed=4)
    a = [SampledABMIL().sample(m1, 40, cfg) for _ in range(5)]
    torch.manual_seed(999)  # other code using the global RNG must not shift the method's draws
    torch.rand(100)
    b = [SampledABMIL().sample(m2, 40, cfg) for _ in range(5)]
    c = [SampledABMIL().sample(m3, 40, cfg) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(a[0], x) for x in a[1:]), "each visit draws a new subset"


def test_backward_trains_on_the_drawn_subset():
    """The gradient of one visit is abmil's gradient on exactly the drawn instances."""
    model, cfg = build(seed=1)
    model.train()
    bag = make_bag(20)
    replay = torch.Generator().set_state(model.sample_generator.get_state())
    idx = torch.randint(0, 20, (6,), generator=replay)  # what the method will draw
    model.zero_grad()
    loss = SampledABMIL().backward(model, bag, cfg)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sub = Bag(bag.instances[idx], bag.label, bag.grid[idx], bag.grid_shape, bag.instance_labels[idx])
    ref_loss = ABMIL().backward(model, sub, cfg)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("n,p,expected_t", [(50, 0.3, 34), (10, 0.3, 34), (100, 0.5, 20), (4096, 0.3, 34),
                                            (7, 1.0, 10)])
def test_default_vote_samples_is_ceil_10n_over_s(n, p, expected_t):
    s = sample_size(n, p)
    assert default_vote_samples(n, s) == expected_t == math.ceil(10 * n / s - 1e-9)


def test_vote_uses_default_t_and_is_deterministic():
    model, cfg = build(seed=5, predict="vote")
    model.eval()
    bag = make_bag(30, "bag-a")
    method = SampledABMIL()
    with torch.no_grad():
        p1 = method.predict(model, bag, cfg)
        torch.rand(10)  # global RNG use in between changes nothing
        method.predict(model, make_bag(30, "bag-b", seed=1), cfg)  # neither does predicting another bag
        p2 = method.predict(model, bag, cfg)
    assert p1.extra["predict"] == "vote"
    assert p1.extra["vote_samples"] == default_vote_samples(30, 9) == 34
    assert p1.extra["sample_size"] == 9
    assert p1.bag_prob == p2.bag_prob and p1.extra == p2.extra
    assert torch.equal(p1.instance_scores, p2.instance_scores)
    # bag_prob is the share of positive votes
    assert p1.bag_prob == pytest.approx(p1.extra["positive_votes"] / 34)
    assert p1.instance_scores.shape == (30,)


def test_vote_indices_depend_on_seed_and_bag():
    method = SampledABMIL()
    m1, cfg = build(seed=1, vote_samples=5)
    m2, _ = build(seed=2, vote_samples=5)
    bag_a, bag_b = make_bag(20, "a"), make_bag(20, "b")
    ia = method.vote_indices(m1, bag_a, cfg)
    assert ia.shape == (5, 6)
    assert torch.equal(ia, method.vote_indices(m1, bag_a, cfg))
    assert not torch.equal(ia, method.vote_indices(m1, bag_b, cfg))
    assert not torch.equal(ia, method.vote_indices(m2, bag_a, cfg))


def test_vote_equals_running_abmil_on_each_sample():
    """Encoding the bag once and pooling each sample's rows gives the same votes
    as running the whole model on each sample (the encoder is per-instance)."""
    model, cfg = build(seed=2, vote_samples=7, predict="vote")
    model.eval()
    bag = make_bag(25)
    method = SampledABMIL()
    with torch.no_grad():
        pred = method.predict(model, bag, cfg)
        probs = [torch.sigmoid(model(bag.instances[row])[0]).item() for row in method.vote_indices(model, bag, cfg)]
    assert pred.extra["positive_votes"] == sum(p >= 0.5 for p in probs)
    assert pred.extra["mean_sample_prob"] == pytest.approx(sum(probs) / len(probs), abs=1e-5)


def test_full_predict_is_the_default_and_equals_abmil():
    """The default scores the whole bag with abmil's own prediction; the vote is the paper preset's."""
    assert PARAMS["predict"].default == "full"
    assert SampledABMIL.presets["paper"]["predict"] == "vote"
    model, cfg = build()
    model.eval()
    bag = make_bag(17)
    with torch.no_grad():
        got = SampledABMIL().predict(model, bag, cfg)
        ref = ABMIL().predict(model, bag, cfg)
    assert got.extra["predict"] == "full"
    assert got.bag_prob == pytest.approx(ref.bag_prob, abs=1e-6)
    assert torch.allclose(got.instance_scores, ref.instance_scores, atol=1e-6)


def test_bad_values_are_one_line_errors(tmp_path):
    for key, value in (("sample_fraction", "0"), ("sample_fraction", "1.5"), ("predict", "mean"),
                       ("vote_samples", "0")):
        proc = run_cli("run", "-m", "sampled", "-d", "qmnist", "--set", f"{key}={value}", "--results", str(tmp_path),
                       env={"MILBENCH_PLUGINS": "sampled,qmnist"}, timeout=60)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and key in lines[0], proc.stderr
    with pytest.raises(ConfigError):
        PARAMS["sample_fraction"].validate("sample_fraction", 0.0)


@pytest.mark.slow
def test_sampled_run_records_predict_mode(tmp_path, data_root):
    import json

    proc = run_cli("run", "-m", "sampled", "-d", "qmnist", "--smoke", "--device", "cpu", "--seed", "1",
                   "--results", str(tmp_path), "--data-root", str(data_root),
                   env={"MILBENCH_PLUGINS": "sampled,qmnist", "OMP_NUM_THREADS": "1"}, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert rec["status"] == "ok"
    assert rec["config"]["predict"] == "full" and rec["config"]["sample_fraction"] == 0.3
    assert rec["config"]["sample_replacement"] is True
