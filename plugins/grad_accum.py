"""``grad-accum``: abmil's model and gradient with the encoder memory of one chunk
(Andersson et al., "Gradient accumulation for memory-efficient MIL", 2022).

Per bag: a no-grad encoder pass over chunks of ``chunk_size`` instances gives
the features H (N × D); the attention head and the loss run once on H as a
leaf, and one backward gives the head's gradients and dL/dH; then each chunk
is recomputed with autograd and back-propagated with its slice of dL/dH (see
``chunked_backward`` in :mod:`milbench.api`). The parameter gradients equal abmil's on the
same bag and weights up to float rounding; the price is one extra encoder
forward per bag.

The paper authors' implementation re-ran the attention head and loss over all
N features for every chunk (N/chunk attention backwards per bag); taking
dL/dH once and slicing it keeps the overhead to the extra encoder forward.

Exactness needs an encoder whose output for one instance does not depend on
the rest of the batch and that draws no random numbers: ``norm='batch'``
(training-mode batch norm) is refused by :meth:`GradAccumABMIL.check`, before
any run starts. Attention dropout (``dropout``) is allowed: it acts on H, and
the head runs once per bag exactly as in abmil.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

# ATTENTION_MIL_PARAMS and PAPER_MODEL come from a torch-free module: importing them here keeps
# registration free of torch (the model code is imported inside the methods below).
from milbench.api import (ATTENTION_MIL_PARAMS, PAPER_MODEL, Bag, ConfigError, DataSpec, Method, Param, Prediction,
                          RunContext, hookimpl)

if TYPE_CHECKING:  # pragma: no cover
    from milbench.api import AttentionMIL

PARAMS: dict[str, Param] = {
    **ATTENTION_MIL_PARAMS,
    # 8 so that the CPU default preset (bags of 20) really runs in chunks (8, 8, 4); larger chunks
    # amortise per-call overhead (32 is within ~1.3x of abmil's CPU time from 256 instances up).
    "chunk_size": Param(8, int, "instances encoded per chunk (memory ~ one chunk's activations; larger is "
                        "faster)", low=1),
}


class GradAccumABMIL(Method):
    name = "grad-accum"
    supervision = "bag"
    description = ("abmil's model and gradient, encoder run in chunks: no-grad pass, one head backward "
                   "for dL/dH, per-chunk recompute (memory flat in N)")
    params = PARAMS
    presets = {"paper": PAPER_MODEL}
    # Bags of 8 in smoke: a chunk of 3 exercises a last chunk that does not divide N.
    smoke = {"chunk_size": 3}

    def check(self, config: Mapping[str, Any]) -> None:
        """Refuse configs whose chunked gradient would silently differ from abmil's."""
        from milbench.api import check_geometry

        if config.get("norm") == "batch":
            raise ConfigError("grad-accum cannot use norm='batch': training-mode batch norm computes statistics "
                              "per chunk, so gradients would not equal abmil's; use norm='frozen', 'group' or 'none'")
        check_geometry(config, self.name)

    def build(self, spec: DataSpec, config: Mapping[str, Any], ctx: RunContext) -> AttentionMIL:
        """abmil's model (same builder, same init under the seed), checked for chunk-exactness."""
        from milbench.api import build_attention_mil, random_layers, require_batch_independent

        self.check(config)
        model = build_attention_mil(spec, config)
        require_batch_independent(model.encoder, "grad-accum")
        rnd = random_layers(model.encoder)
        if rnd:
            raise ConfigError(f"grad-accum: encoder layer '{rnd[0]}' draws random numbers (dropout/drop-path); "
                              "per-chunk masks would not equal a whole-bag pass; use an encoder without them")
        return model

    def backward(self, model: AttentionMIL, bag: Bag, config: Mapping[str, Any]) -> float:
        from milbench.api import bag_loss, chunked_backward

        loss, _, _ = chunked_backward(model.encoder, model.head, bag.lazy_instances,
                                      lambda logit: bag_loss(logit, bag.label), config["chunk_size"])
        return float(loss)

    def predict(self, model: AttentionMIL, bag: Bag, config: Mapping[str, Any]) -> Prediction:
        """abmil's prediction, with the encoder run chunk by chunk (same memory bound as training)."""
        import torch

        from milbench.api import attention_scores, encode_chunks

        logit, a = model.head(encode_chunks(model.encoder, bag.lazy_instances, config["chunk_size"]))
        prob = float(torch.sigmoid(logit))
        return Prediction(bag_prob=prob, instance_scores=attention_scores(a, prob))


@hookimpl
def milbench_register_methods(register: Callable[[Method], None]) -> None:
    register(GradAccumABMIL())
