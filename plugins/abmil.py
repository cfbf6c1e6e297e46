"""``abmil``: the baseline — gated-attention MIL (Ilse et al., ICML 2018).

The encoder runs over every instance of the bag with autograd, so activation
memory grows linearly with the bag size. Its gradient is the reference that
the memory-saving methods (grad-accum, sampled) are measured against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

# ATTENTION_MIL_PARAMS and PAPER_MODEL come from a torch-free module: importing them here keeps
# registration free of torch (the model code is imported inside the methods below).
from milbench.api import ATTENTION_MIL_PARAMS, PAPER_MODEL, Bag, DataSpec, Method, Prediction, RunContext, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from milbench.api import AttentionMIL


class ABMIL(Method):
    name = "abmil"
    supervision = "bag"
    description = "gated-attention MIL; encoder over the whole bag with autograd (memory grows with N)"
    params = ATTENTION_MIL_PARAMS
    presets = {"paper": PAPER_MODEL}

    def check(self, config: Mapping[str, Any]) -> None:
        """An instance too small for the encoder is a one-line error in the parent, not a crash mid-run."""
        from milbench.api import check_geometry

        check_geometry(config, self.name)

    def build(self, spec: DataSpec, config: Mapping[str, Any], ctx: RunContext) -> AttentionMIL:
        from milbench.api import build_attention_mil

        return build_attention_mil(spec, config)

    def backward(self, model: AttentionMIL, bag: Bag, config: Mapping[str, Any]) -> float:
        from milbench.api import bag_loss

        logit, _ = model(bag.instances)
        loss = bag_loss(logit, bag.label)
        loss.backward()
        return float(loss.detach())

    def predict(self, model: AttentionMIL, bag: Bag, config: Mapping[str, Any]) -> Prediction:
        import torch

        from milbench.api import attention_scores

        logit, a = model(bag.instances)
        prob = float(torch.sigmoid(logit))
        return Prediction(bag_prob=prob, instance_scores=attention_scores(a, prob))


@hookimpl
def milbench_register_methods(register: Callable[[Method], None]) -> None:
    register(ABMIL())
