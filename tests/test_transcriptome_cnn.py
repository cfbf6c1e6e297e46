"""The transcriptome CNN: backbones, geometry, loss weighting, dense maps, artifacts."""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from milbench.api import Bag, DataSpec, RunContext, Splits
from milbench.config import resolve
from milbench.protocol import PROTOCOL_PARAMS
from milbench.errors import ConfigError
from milbench_plugins.transcriptome_cnn.classifier import (DEFAULT_BACKBONES, PatchClassifier, balanced_weights,
                                                          build_backbone)
from milbench_plugins.transcriptome_cnn.dense_map import dense_class_map, sliding_window_probs

torch.set_num_threads(1)



tc = importlib.import_module("milbench_plugins.transcriptome_cnn")
METHOD = tc.TranscriptomeCNN()
SPEC4 = DataSpec(channels=1, instance_size=32, n_classes=4,
                 instance_classes=("background", "gene_a", "gene_b", "tissue"), key_class=1)


def config(**over):
    return resolve({**PROTOCOL_PARAMS, **METHOD.params}, [("method", METHOD.defaults)], over)


class CentrePixelOracle(nn.Module):
    """Logits that pick class round(3 * centre pixel) -- what a perfect classifier of an
    image whose intensity encodes its class map would say."""

    def __init__(self, n_classes: int = 4):
        super().__init__()
        self.n = n_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        f = x.shape[-1]
        cls = torch.round(x[:, 0, f // 2, f // 2] * (self.n - 1)).long()
        return nn.functional.one_hot(cls, self.n).float() * 10 + self.dummy


def _region_bag(classes: np.ndarray, p: int = 8) -> Bag:
    rows, cols = classes.shape[0] // p, classes.shape[1] // p
    img = torch.from_numpy(classes.astype(np.float32) / 3)[None]
    inst = img.reshape(1, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, 1, p, p)
    cells = torch.arange(rows * cols)
    return Bag(inst, 1, torch.stack([cells // cols, cells % cols], 1), (rows, cols),
               torch.zeros(rows * cols, dtype=torch.long), mask=torch.from_numpy(classes.astype(np.int64)))


@pytest.mark.parametrize("name", DEFAULT_BACKBONES)
def test_default_backbones_build_and_classify_32px_grey_patches(name):
    model = PatchClassifier(build_backbone(name, 1, 4), 4, 1, 32, 32)
    model.check_input()
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, 48, 48)).shape == (3, 4)  # centre-cropped to 32


def test_unknown_backbone_and_bad_geometry_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'") as e:
        build_backbone("resnet81", 1, 4)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown timm backbone"):
        METHOD.check(config(backbone="not_a_model"))
    with pytest.raises(ConfigError, match="exceeds instance_size"):
        METHOD.geometry(config(patch_size=64), SPEC4)
    METHOD.geometry(config(patch_size=64, patch_fit="resize"), SPEC4)  # resampling up is allowed
    model = PatchClassifier(build_backbone("densenet121", 1, 4), 4, 1, 16, 16)
    with pytest.raises(ConfigError, match="cannot classify 16 px"):
        model.check_input()


def test_geometry_crop_and_resize():
    assert METHOD.geometry(config(), SPEC4) == (32, 32, 16)
    assert METHOD.geometry(config(patch_size=16, stride=4), SPEC4) == (16, 16, 4)
    assert METHOD.geometry(config(patch_size=16, patch_fit="resize"), SPEC4) == (32, 16, 16)
    m = PatchClassifier(nn.Identity(), 4, 1, field=16, input_size=16)
    x = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32)
    crop = m.fit_patches(x)
    assert crop.shape == (1, 1, 16, 16)
    assert crop[0, 0, 8, 8] == x[0, 0, 16, 16]  # the instance's centre pixel stays at the centre
    r = PatchClassifier(nn.Identity(), 4, 1, field=32, input_size=16).fit_patches(x)
    assert r.shape == (1, 1, 16, 16)


def test_balanced_weights_are_inverse_frequency():
    w = balanced_weights(torch.tensor([10.0, 30.0, 0.0, 60.0]))
    assert torch.allclose(w, torch.tensor([100 / 30, 100 / 90, 1.0, 100 / 180], dtype=torch.float64))
    m = PatchClassifier(nn.Identity(), 3, 1, 8, 8)
    m.loss_weights(torch.tensor([0, 0, 0, 1]))
    w2 = m.loss_weights(torch.tensor([1, 2]))
    assert m.class_counts.tolist() == [3, 2, 1]
    assert torch.allclose(w2.double(), torch.tensor([6 / 9, 6 / 6, 6 / 3], dtype=torch.float64))
    assert PatchClassifier(nn.Identity(), 3, 1, 8, 8, class_weights="none").loss_weights(torch.tensor([0])) is None


def test_bn_recalibration_uses_one_batch_of_the_latest_training_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 1, bias=False)
    bn = nn.BatchNorm2d(3)
    backbone = nn.Sequential(conv, bn, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    model = PatchClassifier(backbone, 2, 1, 8, 8, bn_recalibrate=5)
    batches = [torch.rand(3, 1, 8, 8) + k for k in range(3)]
    for b in batches:
        model.remember(b)
    model.eval()
    assert model.recalibrate_bn() is True
    assert not bn.training and bn.momentum == 0.1  # restored
    latest = torch.cat(batches)[-5:]
    with torch.no_grad():
        feats = conv(latest)
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, feats.var(dim=(0, 2, 3), unbiased=True))
    assert model.recalibrate_bn() is False  # nothing trained since: statistics stay
    off = PatchClassifier(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), 2, 1, 8, 8, bn_recalibrate=0)
    off.remember(batches[0])
    assert off.recalibrate_bn() is False and off._recent == []


def test_sliding_window_reproduces_a_class_map_with_a_perfect_classifier():
    rng = np.random.default_rng(0)
    classes = np.kron(rng.integers(0, 4, (6, 5)), np.ones((8, 8), int))  # 48 x 40 blocks
    model = PatchClassifier(CentrePixelOracle(), 4, 1, field=16, input_size=16).eval()
    image = torch.from_numpy(classes.astype(np.float32) / 3)[None]
    with torch.no_grad():
        pred1, key1 = dense_class_map(model, image, 1, 500, key_class=1)
        pred8, _ = dense_class_map(model, image, 8, 500, key_class=1)
        probs = sliding_window_probs(model, image, 5, 7)  # odd stride, tiny batches
    np.testing.assert_array_equal(pred1.numpy(), classes)  # every pixel: the window centred on it
    np.testing.assert_array_equal(key1.numpy() > 0.5, classes == 1)
    np.testing.assert_array_equal(pred8.numpy(), classes)  # stride = block size: cell centres inside blocks
    assert probs.shape == (4, 10, 8)
    np.testing.assert_array_equal(probs.argmax(0).numpy(), classes[2::5, 2::5])


def test_backward_and_predict_on_a_region_bag():
    torch.manual_seed(0)
    model = METHOD.build(SPEC4, config(backbone="resnet18"), RunContext(device="cpu", seed=0))
    bag = _region_bag(np.kron(np.arange(4).reshape(2, 2), np.ones((32, 32), int)), p=32)
    bag.instance_labels = torch.tensor([0, 1, 2, 3])
    model.train()
    loss = METHOD.backward(model, bag, config())
    assert np.isfinite(loss) and loss > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.class_counts.tolist() == [1, 1, 1, 1]
    model.eval()
    with torch.no_grad():
        pred = METHOD.predict(model, bag, config(stride=8))
    assert pred.instance_scores.shape == (4,)
    assert pred.bag_prob == pytest.approx(float(pred.instance_scores.max()))
    assert pred.pixel_classes.shape == bag.mask.shape and pred.pixel_classes.dtype == torch.long
    assert pred.pixel_scores.shape == bag.mask.shape
    assert pred.loss is not None and pred.loss > 0
    with torch.no_grad():
        share = METHOD.predict(model, bag, config(stride=8, bag_score="mean"))
    # bag_score=mean: the bag's expected key share (mouse-brain's region rule), not its most key-like tile
    assert share.bag_prob == pytest.approx(float(share.instance_scores.mean()))
    assert share.bag_prob < pred.bag_prob


def test_bag_score_is_max_or_mean():
    with pytest.raises(ConfigError, match="bag_score"):
        config(bag_score="median")


def test_bad_instance_label_is_reported():
    model = PatchClassifier(CentrePixelOracle(2), 2, 1, 8, 8)
    bag = _region_bag(np.zeros((8, 16), int))
    bag.instance_labels = torch.tensor([0, 5])
    with pytest.raises(Exception, match="instance label 5 outside 0..1"):
        METHOD.backward(model, bag, config())


def test_learns_a_two_class_instance_task_and_scores_bags_by_max():
    """The qmnist/imagenette role: bright-centre patches are key instances."""
    torch.manual_seed(0)
    spec = DataSpec(channels=1, instance_size=32)
    cfg = config(backbone="resnet10t")
    model = METHOD.build(spec, cfg, RunContext(device="cpu", seed=0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def bag(label: int, n: int = 8) -> Bag:
        x = torch.rand(n, 1, 32, 32) * 0.3
        y = torch.zeros(n, dtype=torch.long)
        if label:
            x[:2, :, 8:24, 8:24] += 0.7
            y[:2] = 1
        return Bag(x, label, torch.zeros(n, 2, dtype=torch.long), (1, n), y)

    model.train()
    for step in range(30):
        opt.zero_grad()
        METHOD.backward(model, bag(step % 2), cfg)
        opt.step()
    model.eval()
    with torch.no_grad():
        pos = [METHOD.predict(model, bag(1), cfg) for _ in range(4)]
        neg = [METHOD.predict(model, bag(0), cfg) for _ in range(4)]
    assert min(p.bag_prob for p in pos) > max(p.bag_prob for p in neg)
    assert all(p.pixel_classes is None for p in pos)  # no mask -> no dense map
    assert all(p.instance_scores[:2].min() > p.instance_scores[2:].max() for p in pos)  # the key instances


def test_artifacts_draw_and_score_the_test_area(tmp_path):
    classes = np.kron(np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3]]), np.ones((16, 16), int))
    area = SimpleNamespace(image=classes.astype(np.float32) / 3, classes=classes.astype(np.uint8), x0=100, x1=164,
                           section="synthetic")
    splits = Splits(SPEC4, [], [], SimpleNamespace(area=area), {"genes": {"gene_a": "Plp1", "gene_b": "Neurod6"}})
    model = PatchClassifier(CentrePixelOracle(), 4, 1, 16, 16)
    model.train()
    model.loss_weights(torch.tensor([0, 0, 1, 2, 3, 3]))
    out = METHOD.artifacts(model, splits, config(stride=4), RunContext("cpu", 0, artifact_dir=str(tmp_path)))
    assert model.training  # restored
    assert out["area_mean_dice"] == pytest.approx(1.0)
    assert out["area_dice_gene_a"] == pytest.approx(1.0)
    assert out["class_weight_background"] == pytest.approx(6 / (4 * 2))
    path = out["area_figure"]
    assert os.path.basename(path) == "transcriptome_cnn_test_area.png" and os.path.getsize(path) > 5000
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > im.size[1] / 3  # three panels side by side
    # no artifact dir (or no area): only the class weights come back
    assert set(METHOD.artifacts(model, splits, config(), RunContext("cpu", 0))) == {
        "class_weight_background", "class_weight_gene_a", "class_weight_gene_b", "class_weight_tissue"}


def test_plugin_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import milbench_plugins.transcriptome_cnn as m; "
            "assert callable(m.milbench_register_methods); "
            "print('torch' in sys.modules, sorted(k for k in sys.modules if k.startswith(m.__name__ + '.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False []"


def test_cli_run_on_the_embedded_section_writes_record_and_figure(tmp_path):
    """`milbench run -m transcriptome-cnn -d mouse-brain` on a fresh install: no data root,
    the embedded CA1 section; the record carries dense-map Dice and names its figure
    relative to the results folder (so a committed results folder stays readable)."""
    from conftest import records_in, run_cli

    env = {"MILBENCH_DATA_ROOT": "", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "MILBENCH_PLUGINS": "transcriptome-cnn,mouse-brain"}
    out = tmp_path / "runs"
    res = run_cli("run", "-m", "transcriptome-cnn", "-d", "mouse-brain", "--smoke", "--device", "cpu",
                  "--results", str(out), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    (rec,) = records_in(out)
    assert rec["status"] == "ok" and rec["data"]["source"] == "embedded"
    m = rec["metrics"]
    assert 0.0 <= m["mean_dice"] <= 1.0 and 0.0 <= m["area_mean_dice"] <= 1.0
    for key in ("dice_gene_a", "precision_tissue", "recall_background", "area_dice_gene_b"):
        assert m[key] is None or 0.0 <= m[key] <= 1.0, key  # None: class absent from truth and prediction
    fig = rec["artifacts"]["area_figure"]
    assert not fig.startswith("/") and (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the slow artifact step says what it is doing, and run says where the figure is
    assert "predicting the" in res.stderr and "drawing its figure" in res.stderr
    assert f"artifacts: {out / 'artifacts' / rec['run_id']} (area_figure)" in res.stdout
