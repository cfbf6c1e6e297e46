"""The bag metrics agree with their definitions on any input (property-based)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from milbench.metrics import bag_accuracy, bag_auc, bag_bce

probs = st.floats(0, 1, allow_nan=False).map(lambda p: round(p, 2))  # rounding makes ties common
bags = st.lists(st.tuples(probs, st.integers(0, 1)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(bags)
def test_auc_is_the_probability_a_positive_outranks_a_negative(pairs):
    p = [a for a, _ in pairs]
    y = [b for _, b in pairs]
    pos = [a for a, b in pairs if b == 1]
    neg = [a for a, b in pairs if b == 0]
    auc = bag_auc(p, y)
    if not pos or not neg:
        assert auc is None
        return
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    assert math.isclose(auc, wins / (len(pos) * len(neg)), abs_tol=1e-12)


@settings(max_examples=200, deadline=None)
@given(bags)
def test_bce_and_accuracy_match_their_definitions(pairs):
    p = [a for a, _ in pairs]
    y = [b for _, b in pairs]
    eps = 1e-7
    want = -sum(math.log(min(max(a, eps), 1 - eps)) if b else math.log(1 - min(max(a, eps), 1 - eps))
                for a, b in pairs) / len(pairs)
    assert math.isclose(bag_bce(p, y), want, rel_tol=1e-9, abs_tol=1e-12)
    assert bag_accuracy(p, y) == sum((a >= 0.5) == (b == 1) for a, b in pairs) / len(pairs)
