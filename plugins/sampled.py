"""``sampled``: abmil trained on a random subset of each bag (Koriakina et al., ISPA 2021).

Every time a training bag is visited, ``s = ceil(p·N)`` of its instances are
drawn (``sample_fraction`` p; with replacement by default, as in the paper)
and abmil's forward/backward runs on that subset only, so activation memory
grows with p·N instead of N. The model is abmil's, built by the same builder.

Prediction (``predict``):

- ``full`` (default): abmil's prediction on the whole bag. The bag is encoded
  without gradients in chunks of s instances, so its peak memory is that of
  one training sample's forward: at inference the draw saves no memory, and
  the whole bag is what a user's slide is scored on.
- ``vote`` (the paper's, and the ``paper`` preset's): T samples of s instances
  are drawn (``vote_samples``; default the paper's T = ceil(10·N/s), so each
  instance is seen about 10 times); each sample votes positive when its bag
  probability is >= 0.5. ``bag_prob`` is the *fraction of positive votes*, so
  the harness's 0.5 threshold is the majority vote and AUC ranks bags by vote
  share. Because the encoder treats instances independently, the bag is
  encoded once (in chunks of s instances, no grad) and each sample's head runs
  on its rows of the features — the same result as encoding each sample, T
  times cheaper.

Why ``full`` is the default: on the same trained weights (training does not
depend on ``predict``) the vote scores lower, because a sample that misses
the bag's few key instances votes negative, which is the same label noise the
draw puts into training, met a second time at inference. qmnist at the
default 30 % draw, seeds 0–2: 0.954 / 0.906 / 0.907 test AUC by vote against
0.985 / 0.969 / 0.978 on the whole bag (``results/sampled-predict-full/``).

``instance_scores`` are, in both modes, the attention of the head over the
*whole* bag (normalised by its maximum, times ``bag_prob``; see
``attention_scores`` in :mod:`milbench.api`): every instance gets a
score even if no vote sample drew it, and it uses features already computed.
``Prediction.extra`` says which mode ran, T, s, the full-bag probability and
the mean probability over the vote samples.

Randomness is owned by the model, not global state: training draws use a
``torch.Generator`` seeded from the run seed at build; each vote prediction
uses a fresh generator seeded from the run seed and the bag id, so a bag's
prediction does not depend on what was predicted before it (validation
epochs, test order). Draws happen on the CPU, so a seed gives the same
indices on every device.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

# ATTENTION_MIL_PARAMS and PAPER_MODEL come from a torch-free module: importing them here keeps
# registration free of torch (the model code is imported inside the methods below).
from milbench.api import (ATTENTION_MIL_PARAMS, PAPER_MODEL, Bag, DataSpec, Method, Param, Prediction, RunContext,
                          hookimpl)

if TYPE_CHECKING:  # annotations only: this module must not import torch at registration
    import torch

    from milbench.api import AttentionMIL

PARAMS: dict[str, Param] = {
    **ATTENTION_MIL_PARAMS,
    "sample_fraction": Param(0.3, float, "share p of a bag's instances drawn per visit: ceil(p*N)",
                             low=0, high=1, low_open=True),
    "sample_replacement": Param(True, bool, "draw with replacement (the paper) or without"),
    "predict": Param("full", str, "full: the whole bag, encoded in chunks of s (no more memory than a sample); "
                     "vote: majority over T samples, the paper's (bag_prob = share of positive votes)",
                     choices=("full", "vote")),
    "vote_samples": Param(None, int, "T samples per vote (none: ceil(10*N/s), the paper's)", low=1, nullable=True),
}

#: Offsets mixed into the run seed so training draws, vote draws and the
#: harness's own streams (which use the bare seed) never share a sequence.
_TRAIN_STREAM = 0x5A3D_0001
_VOTE_STREAM = 0x5A3D_0002


def sample_size(n: int, fraction: float) -> int:
    """s = ceil(p·N), at least 1 (rounded first so 0.3·10 is 3, not 4)."""
    return max(1, math.ceil(round(fraction * n, 9)))


def default_vote_samples(n: int, s: int) -> int:
    """The paper's T = ceil(10·N/s): each instance is drawn about ten times."""
    return max(1, math.ceil(round(10 * n / s, 9)))


def draw(n: int, s: int, replacement: bool, generator: "torch.Generator") -> "torch.Tensor":
    """``s`` indices into ``range(n)`` from ``generator`` (CPU): uniform with
    replacement, or ``s`` distinct ones without."""
    import torch

    if replacement:
        return torch.randint(0, n, (s,), generator=generator)
    return torch.randperm(n, generator=generator)[:s]


def _seed_for(seed: int, stream: int, key: str = "") -> int:
    """A 63-bit seed from the run seed, a stream id and a key (e.g. a bag id), stable across runs."""
    digest = hashlib.sha256(f"{seed}:{stream}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampledABMIL(Method):
    name = "sampled"
    supervision = "bag"
    description = ("abmil trained on ceil(p*N) instances drawn per bag visit (memory ~ p*N); "
                   "predicts on the full bag (chunked) or by the paper's majority vote over samples")
    params = PARAMS
    presets = {"paper": {**PAPER_MODEL, "predict": "vote"}}
    smoke = {"vote_samples": 3}

    def check(self, config: Mapping[str, Any]) -> None:
        """An instance too small for the encoder is a one-line error in the parent, not a crash mid-run."""
        from milbench.api import check_geometry

        check_geometry(config, self.name)

    def build(self, spec: DataSpec, config: Mapping[str, Any], ctx: RunContext) -> AttentionMIL:
        """abmil's model, carrying its own sample generator seeded from the run seed.

        The generator lives on the model (a plain attribute: not a parameter,
        not in ``state_dict``), so two models built in one process never
        share a stream, and nothing else that uses torch's global RNG can
        shift this method's draws.
        """
        import torch

        from milbench.api import build_attention_mil

        model = build_attention_mil(spec, config)
        model.sample_generator = torch.Generator(device="cpu").manual_seed(_seed_for(ctx.seed, _TRAIN_STREAM))
        model.sample_seed = int(ctx.seed)
        return model

    def sample(self, model: AttentionMIL, n: int, config: Mapping[str, Any]) -> "torch.Tensor":
        """The next training draw for a bag of ``n`` instances (CPU indices)."""
        s = sample_size(n, config["sample_fraction"])
        return draw(n, s, config["sample_replacement"], model.sample_generator)

    def backward(self, model: AttentionMIL, bag: Bag, config: Mapping[str, Any]) -> float:
        from milbench.api import bag_loss

        x = bag.lazy_instances  # a lazy bag reads only the drawn instances
        idx = self.sample(model, len(bag), config).to(x.device)
        logit, _ = model(x.index_select(0, idx))
        loss = bag_loss(logit, bag.label)
        loss.backward()
        return float(loss.detach())

    def vote_indices(self, model: AttentionMIL, bag: Bag, config: Mapping[str, Any]) -> "torch.Tensor":
        """The T × s index matrix of a vote, fixed by the run seed and the bag id."""
        import torch

        n = len(bag)
        s = sample_size(n, config["sample_fraction"])
        t = config["vote_samples"] or default_vote_samples(n, s)
        key = bag.bag_id or hashlib.sha256("\0".join(map(str, bag.instance_ids)).encode()).hexdigest()
        gen = torch.Generator(device="cpu").manual_seed(_seed_for(model.sample_seed, _VOTE_STREAM, key))
        return torch.stack([draw(n, s, config["sample_replacement"], gen) for _ in range(t)])

    def predict(self, model: AttentionMIL, bag: Bag, config: Mapping[str, Any]) -> Prediction:
        import torch

        from milbench.api import attention_scores, encode_chunks

        n = len(bag)
        s = sample_size(n, config["sample_fraction"])
        h = encode_chunks(model.encoder, bag.lazy_instances, s)  # peak like one training sample's forward
        full_logit, a = model.head(h)
        full_prob = float(torch.sigmoid(full_logit))
        extra: dict[str, Any] = {"predict": config["predict"], "sample_size": s, "full_bag_prob": full_prob}
        if config["predict"] == "full":
            return Prediction(bag_prob=full_prob, instance_scores=attention_scores(a, full_prob), extra=extra)
        idx = self.vote_indices(model, bag, config).to(h.device)
        probs = torch.stack([torch.sigmoid(model.head(h.index_select(0, row))[0]) for row in idx])
        votes = probs >= 0.5
        prob = float(votes.float().mean())
        extra.update({"vote_samples": int(idx.shape[0]), "positive_votes": int(votes.sum()),
                      "mean_sample_prob": float(probs.mean())})
        return Prediction(bag_prob=prob, instance_scores=attention_scores(a, prob), extra=extra)


@hookimpl
def milbench_register_methods(register: Callable[[Method], None]) -> None:
    register(SampledABMIL())
