"""Dice / precision / recall on hand-made class maps."""

import numpy as np
import pytest

from milbench.errors import ConfigError
from milbench.segmentation_metrics import confusion_matrix, dense_class_metrics, metric_key

NAMES = ["background", "gene_a", "gene_b", "tissue"]


def test_perfect_prediction_scores_one():
    true = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    m = dense_class_metrics([true.copy()], [true], 4, NAMES)
    for n in NAMES:
        assert m[f"dice_{n}"] == 1.0
        assert m[f"precision_{n}"] == 1.0
        assert m[f"recall_{n}"] == 1.0
    assert m["mean_dice"] == 1.0
    assert m["pixel_accuracy"] == 1.0
    assert m["n_pixels"] == 8


def test_disjoint_prediction_scores_zero():
    true = np.zeros((4, 4), int)
    true[:, 2:] = 1
    pred = 1 - true  # every pixel swapped
    m = dense_class_metrics([pred], [true], 2, ["a", "b"])
    assert m["dice_a"] == 0.0 and m["dice_b"] == 0.0
    assert m["precision_a"] == 0.0 and m["recall_b"] == 0.0
    assert m["mean_dice"] == 0.0
    assert m["pixel_accuracy"] == 0.0


def test_partial_overlap_known_values():
    # class 1: truth 4 pixels, prediction 6 pixels, 3 shared -> Dice 6/10, precision 3/6, recall 3/4
    true = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0, 0])
    m = dense_class_metrics([pred], [true], 2, ["bg", "key"])
    assert m["dice_key"] == pytest.approx(0.6)
    assert m["precision_key"] == pytest.approx(0.5)
    assert m["recall_key"] == pytest.approx(0.75)
    # class 0: truth 6, prediction 4, shared 3 -> Dice 6/10
    assert m["dice_bg"] == pytest.approx(0.6)
    assert m["mean_dice"] == pytest.approx(0.6)
    assert m["confusion"] == [[3, 3], [1, 3]]


def test_absent_class_is_none_and_left_out_of_mean():
    true = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 0], [1, 0]])
    m = dense_class_metrics([pred], [true], 3, ["x", "y", "z"])
    assert m["dice_z"] is None and m["precision_z"] is None and m["recall_z"] is None
    # x: tp 2, truth 2, pred 3 -> 0.8; y: tp 1, truth 2, pred 1 -> 2/3
    assert m["mean_dice"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_pooled_over_maps_not_averaged_per_map():
    # map 1: perfect on 1 key pixel; map 2: 9 key pixels all missed.
    t1, p1 = np.array([1, 0]), np.array([1, 0])
    t2, p2 = np.ones(9, int), np.zeros(9, int)
    m = dense_class_metrics([p1, p2], [t1, t2], 2, ["bg", "key"])
    assert m["recall_key"] == pytest.approx(0.1)  # pooled, where a per-map mean would say 0.5
    assert m["n_pixels"] == 11


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    t = torch.tensor([[0, 1], [1, 1]])
    m = dense_class_metrics([t.clone()], [t], 2, ["a", "b"])
    assert m["mean_dice"] == 1.0


def test_bad_maps_raise_one_line_errors():
    with pytest.raises(ConfigError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ConfigError, match="valid: 0..1") as e:
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        dense_class_metrics([np.zeros(2)], [], 2, ["a", "b"])
    with pytest.raises(ConfigError):
        dense_class_metrics([], [], 2, ["only-one"])


def test_metric_key_is_safe():
    assert metric_key("gene A: Plp1") == "gene_a_plp1"
    assert metric_key("background") == "background"
