"""Attention pooling streamed with the trunk (milbench.models.streamed_attention):
proven by equality with the whole-map computation, in float64, for a trunk
streamed as one stage and cut into stages, and through streamingclam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from milbench.models.streamed_attention import attention_pool, attention_pool_step
from milbench.models.streaming import StreamingTrunk
from test_streaming import plain_trunk


class _Pooling(nn.Module):
    """A gated-attention head like CLAM's: embed, score, classify."""

    def __init__(self, c: int = 8, d: int = 6) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Sequential(nn.Linear(c, d), nn.ReLU())
        self.v, self.u, self.w = nn.Linear(d, 5), nn.Linear(d, 5), nn.Linear(5, 1)
        self.classifier = nn.Linear(d, 2)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)

    def loss(self, z: torch.Tensor, label: int = 1) -> torch.Tensor:
        return nn.functional.cross_entropy(self.classifier(z)[None], torch.tensor([label]))

    def whole(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.embed(f[0].flatten(1).t())
        a = torch.softmax(self.score(h), 0)
        z = a @ h
        return self.loss(z), z, a.view(f.shape[-2], f.shape[-1])


def _params(*mods: nn.Module) -> list[nn.Parameter]:
    return [p for m in mods for p in m.parameters()]


@pytest.mark.parametrize("split, tiles", [((), 85), ((4,), [60, 40]), ((), 1000)])
def test_step_gradients_equal_the_whole_map(split, tiles):
    """Every parameter's gradient (trunk, embed, score, classifier) and the loss equal
    autograd through the whole feature map, with many tiles, a split trunk, and one tile."""
    trunk, head = plain_trunk().double(), _Pooling().double()
    x = torch.randn(1, 3, 90, 101, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss_ref, z_ref, a_ref = head.whole(trunk(x))
    loss_ref.backward()
    ref = [p.grad.clone() for p in _params(trunk, head)]
    for p in _params(trunk, head):
        p.grad = None
    stream = StreamingTrunk(trunk, tiles, "square", split)
    if tiles != 1000:
        assert stream.tile_count(90, 101) > 1, "the test must really stream"
    loss, pooled = attention_pool_step(stream, x, head.embed, head.score, head.loss)
    assert abs(loss.item() - loss_ref.item()) <= 1e-12
    assert (pooled.z - z_ref.detach()).abs().max().item() <= 1e-12
    assert (pooled.attention().double() - a_ref.detach()).abs().max().item() <= 1e-6  # stored float32
    got = [p.grad for p in _params(trunk, head)]
    assert all(g is not None for g in got)
    assert max((g - r).abs().max().item() for g, r in zip(got, ref)) <= 1e-10


def test_frozen_trunk_gets_no_gradient_but_the_head_does():
    trunk, head = plain_trunk().double(), _Pooling().double()
    x = torch.randn(1, 3, 130, 120, dtype=torch.float64)
    loss_ref, _, _ = head.whole(trunk(x))
    loss_ref.backward()
    ref = [p.grad.clone() for p in _params(head)]
    for p in _params(trunk, head):
        p.grad = None
    attention_pool_step(StreamingTrunk(trunk, 85), x, head.embed, head.score, head.loss, train_trunk=False)
    assert all(p.grad is None for p in trunk.parameters())
    assert max((p.grad - r).abs().max().item() for p, r in zip(_params(head), ref)) <= 1e-10


def test_pool_without_grad_matches_and_keeps_one_score_per_position():
    """Prediction: z and the attention map equal the whole map's; only an (h', w') float32 score map is returned."""
    trunk, head = plain_trunk(), _Pooling()
    x = torch.randn(3, 130, 150)  # (C, H, W) as a bag image is
    with torch.no_grad():
        _, z_ref, a_ref = head.whole(trunk(x[None]))
    pooled = attention_pool(StreamingTrunk(trunk, 85, "area"), x, head.embed, head.score)
    assert pooled.scores.dtype == torch.float32 and pooled.scores.shape == a_ref.shape
    assert torch.allclose(pooled.z, z_ref, atol=1e-5)
    assert torch.allclose(pooled.attention(), a_ref, atol=1e-6)
    assert abs(pooled.attention().sum().item() - 1) < 1e-5


def test_large_scores_do_not_overflow():
    """The online softmax rescales by the running maximum: logits in the thousands stay finite."""
    trunk, head = plain_trunk().double(), _Pooling().double()
    with torch.no_grad():
        head.w.weight.mul_(1e4)
    x = torch.randn(1, 3, 90, 101, dtype=torch.float64)
    _, z_ref, _ = head.whole(trunk(x))
    pooled = attention_pool(StreamingTrunk(trunk, 85), x, head.embed, head.score)
    assert torch.isfinite(pooled.z).all() and (pooled.z - z_ref).abs().max().item() <= 1e-9
