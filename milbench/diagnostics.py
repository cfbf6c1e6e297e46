"""What a record's training history says about the run: did it learn at all?

Computed in the parent from the child's ``history`` (one entry per epoch with
``val_loss`` and ``val_bag_auc``), so it needs no torch and applies to old
records too (``milbench report`` derives it for records written before the
``warnings`` field existed).

**"Did not learn"** (the definition the README repeats): an ``ok``, non-smoke
run whose validation loss stayed within :data:`CHANCE_TOL` nats of ln 2 in
*every* epoch. ln 2 ≈ 0.693 is the binary cross-entropy of answering 0.5 for
every bag, whatever the labels are, so a loss pinned there means the bag
probabilities never moved away from 0.5: accuracy at the 0.5 threshold is then
meaningless (typically 0.500) and the test metrics describe an untrained
model. 0.01 nats is 1.4 % of ln 2; a model that ranks every bag correctly
but keeps its outputs within 0.5 ± 0.005 still sits inside it, one whose
outputs reach 0.5 ± 0.05 on the right side does not.

The validation AUC decides only the wording: when it never exceeded
0.5 + 3·σ₀ — σ₀ = √((n₊ + n₋ + 1) / (12 n₊ n₋)), the spread of a random
ranking's AUC (Hanley & McNeil 1982), with the validation bags taken as half
positive, as every built-in dataset draws them — the run never left chance at
all; when it did, the scores rank bags but the probabilities stayed at 0.5
(more epochs or a higher ``lr`` usually help). Smoke runs are too short to
learn and are not judged.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

#: Prefix of every warning about a run that did not learn (the report matches on it).
DID_NOT_LEARN = "did not learn"
#: The loss of answering 0.5 for every bag, whatever the labels.
CHANCE_LOSS = math.log(2)
#: How close (nats) to ln 2 every epoch's validation loss must stay to count as "at chance".
CHANCE_TOL = 0.01
#: How many null standard deviations above 0.5 a validation AUC must reach to count as ranking.
AUC_Z = 3.0


def auc_chance_bound(n_val_bags: int | None) -> float | None:
    """0.5 + :data:`AUC_Z` σ₀ for ``n_val_bags`` balanced validation bags (None when unknown or too few)."""
    if not n_val_bags or n_val_bags < 2:
        return None
    pos = n_val_bags // 2
    neg = n_val_bags - pos
    return 0.5 + AUC_Z * math.sqrt((pos + neg + 1) / (12 * pos * neg))


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def learning_warnings(record: Mapping[str, Any]) -> list[str]:
    """Warnings about how a run learned, from its ``history``; empty when there is nothing to say
    (not ``ok``, a smoke run, no validation losses, or a loss that left chance)."""
    if record.get("status") != "ok" or record.get("smoke"):
        return []
    history = record.get("history") or []
    losses = [_number(e.get("val_loss")) for e in history if isinstance(e, Mapping)]
    if not losses or any(v is None for v in losses):
        return []
    if max(abs(v - CHANCE_LOSS) for v in losses) > CHANCE_TOL:
        return []
    aucs = [a for a in (_number(e.get("val_bag_auc")) for e in history if isinstance(e, Mapping)) if a is not None]
    n_val = (record.get("config") or {}).get("n_val_bags")
    bound = auc_chance_bound(n_val if isinstance(n_val, int) else None)
    epochs = f"all {len(losses)} epochs" if len(losses) > 1 else "its only epoch"
    head = (f"{DID_NOT_LEARN}: validation loss stayed within {CHANCE_TOL} of ln 2 = {CHANCE_LOSS:.3f} "
            f"(the loss of answering 0.5 for every bag) in {epochs}")
    best = max(aucs) if aucs else None
    if best is not None and bound is not None and best > bound:
        return [f"{head}; val AUC reached {best:.3f} (> {bound:.3f}, chance for {n_val} bags), so the scores rank "
                "bags but the probabilities never left 0.5 — try more epochs or a higher lr"]
    tail = f"; val AUC at most {best:.3f}" if best is not None else ""
    if tail and bound is not None:
        tail += f" (a random ranking of {n_val} bags reaches {bound:.3f})"
    return [f"{head}{tail}: treat its metrics as those of an untrained model"]


def did_not_learn(warnings: Any) -> bool:
    """Whether a record's ``warnings`` list says the run did not learn."""
    return isinstance(warnings, list) and any(str(w).startswith(DID_NOT_LEARN) for w in warnings)
