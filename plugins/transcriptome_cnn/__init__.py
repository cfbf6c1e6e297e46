"""The ``transcriptome-cnn`` method: a patch classifier supervised by instance labels.

After the seed paper (arXiv 2312.04605): a CNN on any timm backbone learns to
tell, from the nuclei image alone, the tissue classes that in situ sequencing
spots define (on mouse-brain: background, gene A, gene B, tissue). It trains
on the instance labels of the training bags (``supervision = "instance"``) --
on mouse-brain the spot-centred patches -- with cross-entropy, class
imbalance handled by inverse-frequency weights (``class_weights``), batch
norms recalibrated on recent training patches before predicting
(``bn_recalibrate``, see :meth:`.classifier.PatchClassifier.recalibrate_bn`), and
predicts

* per instance: class probabilities; ``instance_scores`` = P(key class),
  ``bag_prob`` = the maximum over instances (``bag_score = max``: the bag
  rule of qmnist/imagenette, positive iff a key instance is present) or their
  mean (``bag_score = mean``: the bag's expected key share, the rule of
  mouse-brain's region bags, positive iff enough of the region is gene A).
  With the rule that matches the dataset this is the instance-supervised
  upper bound the MIL methods are read against;
* per pixel, for bags with a ground-truth ``mask``: a dense class map by a
  sliding window (``stride``, batched) as ``pixel_classes`` and P(key) as
  ``pixel_scores``; the harness scores them with
  :func:`milbench.api.dense_class_metrics`.

``artifacts`` predicts the whole held-out test area (when the test split
exposes one as ``area``, as mouse-brain's does) and writes
``transcriptome_cnn_test_area.png`` -- nuclei image, ground truth and
prediction side by side with a legend -- plus Dice/precision/recall on that
contiguous area (``area_*`` metrics). The method does not chunk a bag, so
batch norm in training mode is fine here.

The package. This module declares the method's keys and registers it without
importing torch; the model is in :mod:`.classifier`, dense prediction by a
sliding window in :mod:`.dense_map`, the test-area figure in :mod:`.figure`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from milbench.api import (Bag, ConfigError, DataError, DataSpec, Method, Param, Prediction, RunContext, Splits,
                          did_you_mean, hookimpl)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .classifier import PatchClassifier


class TranscriptomeCNN(Method):
    """The ``transcriptome-cnn`` method (module docstring)."""

    name = "transcriptome-cnn"
    supervision = "instance"
    description = "patch classifier (any timm backbone) trained on instance labels; dense class maps, Dice"
    params = {
        "backbone": Param("resnet18", str, "timm model name, random init (e.g. resnet18, efficientnet_b0, "
                          "mobilenetv3_small_100, densenet121, convnext_atto)"),
        "patch_size": Param(None, int, "side the classifier sees (none: instance_size)", low=8, nullable=True),
        "patch_fit": Param("crop", str, "crop: centre patch_size px of an instance (smaller field of view); "
                           "resize: the whole instance resampled to patch_size", choices=("crop", "resize")),
        "stride": Param(None, int, "sliding-window stride of dense prediction, px (none: field // 2)", low=1,
                        nullable=True),
        "class_weights": Param("balanced", str, "loss weights: inverse class frequency of the labels seen, or none",
                               choices=("balanced", "none")),
        "bag_score": Param("max", str, "bag probability from the instances' P(key): max (positive iff a key "
                           "instance is present) or mean (the bag's key share, for share-based bag labels)",
                           choices=("max", "mean")),
        "eval_batch": Param(256, int, "patches per forward pass at prediction", low=1),
        "bn_recalibrate": Param(256, int, "before predicting, batch norms take the statistics of the latest this "
                                "many training patches as one batch (precise BN; 0: PyTorch running averages)",
                                low=0),
    }
    # No defaults or presets of protocol keys (lr, epochs, ...): the training protocol is the
    # same for every method on a dataset (milbench.protocol); the paper's 20 epochs are the
    # mouse-brain dataset's paper preset.
    smoke: Mapping[str, Any] = {"eval_batch": 64}

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def geometry(config: Mapping[str, Any], spec: DataSpec) -> tuple[int, int, int]:
        """(field of view, input size, stride) for this config and data."""
        size = config["patch_size"] or spec.instance_size
        if config["patch_fit"] == "crop":
            if size > spec.instance_size:
                raise ConfigError(f"patch_size={size} exceeds instance_size={spec.instance_size} with "
                                  f"patch_fit=crop; lower patch_size, raise instance_size or use patch_fit=resize")
            field = size
        else:
            field = spec.instance_size
        stride = config["stride"] or max(1, field // 2)
        return field, size, stride

    def check(self, config: Mapping[str, Any]) -> None:
        """A misspelt backbone fails in the parent, before any run starts; the
        patch geometry needs the data's instance size and is checked in ``build``."""
        import timm

        if not timm.is_model(config["backbone"]):
            raise ConfigError(f"unknown timm backbone {config['backbone']!r}"
                              f"{did_you_mean(config['backbone'], timm.list_models())}")
        # the patch geometry, as far as the config decides it (the dataset's instance_size is a config key),
        # so a size the backbone cannot take is refused here rather than in the child's build()
        inst, patch = config.get("instance_size"), config.get("patch_size")
        if inst is not None and patch is not None and config.get("patch_fit") == "crop" and patch > inst:
            raise ConfigError(f"patch_size={patch} exceeds instance_size={inst} with patch_fit=crop; lower "
                              f"patch_size, raise instance_size or use patch_fit=resize")
        size = patch or inst
        if size is not None:
            from .classifier import check_backbone_input

            # each bag's patches are one training batch: the smallest bag (Gaussian sizes are clipped at 2)
            bag = config.get("bag_size") or 2
            smallest = min(int(bag), 2) if config.get("bag_size_std") else int(bag)
            check_backbone_input(config["backbone"], int(size), smallest)

    def build(self, spec: DataSpec, config: Mapping[str, Any], ctx: RunContext) -> "PatchClassifier":
        from .classifier import PatchClassifier, build_backbone

        field, size, _ = self.geometry(config, spec)
        backbone = build_backbone(config["backbone"], spec.channels, spec.n_classes)
        model = PatchClassifier(backbone, spec.n_classes, spec.channels, field, size, spec.key_class,
                                config["class_weights"], config["bn_recalibrate"])
        model.to(ctx.device)
        model.check_input()
        return model

    # ------------------------------------------------------------------ training / prediction
    def backward(self, model: "PatchClassifier", bag: Bag, config: Mapping[str, Any]) -> float:
        import torch.nn.functional as F

        x = bag.instances  # read once (a lazy bag materialises on each access)
        labels = self._labels(model, bag).to(x.device)
        model.remember(x)
        logits = model(x)
        loss = F.cross_entropy(logits, labels, weight=model.loss_weights(labels))
        loss.backward()
        return float(loss.detach())

    @staticmethod
    def _labels(model: "PatchClassifier", bag: Bag) -> "torch.Tensor":
        if not getattr(bag, "instance_labels_known", True):
            raise DataError(f"bag {bag.bag_id} has no instance labels; transcriptome-cnn trains on instance labels "
                            f"(slides: give the manifest an annotation column with GeoJSON files)")
        labels = bag.instance_labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= model.n_classes):
            raise DataError(f"bag {bag.bag_id}: instance label {int(labels.max())} outside 0..{model.n_classes - 1}")
        return labels

    def predict(self, model: "PatchClassifier", bag: Bag, config: Mapping[str, Any]) -> Prediction:
        import torch
        import torch.nn.functional as F

        from .classifier import predict_batched
        from .dense_map import dense_class_map

        batch = config["eval_batch"]
        model.recalibrate_bn()
        probs = predict_batched(model, bag.lazy_instances, batch)
        key = model.key_class
        scores = probs[:, key].float().cpu()
        labels = self._labels(model, bag)
        loss = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)).cpu(), labels)) if len(labels) else None
        bag_prob = (float(scores.max()) if config["bag_score"] == "max" else float(scores.mean())) if len(scores) else 0.0
        pred = Prediction(bag_prob=bag_prob, instance_scores=scores, loss=loss,
                          extra={"instance_classes": probs.argmax(1).cpu()})
        if bag.mask is not None:
            classes, key_prob = dense_class_map(model, bag.image(), _stride(model, config), batch, key)
            pred.pixel_classes = classes.cpu()
            pred.pixel_scores = key_prob.float().cpu()
        return pred

    # ------------------------------------------------------------------ artifacts
    def artifacts(self, model: "PatchClassifier", splits: Splits, config: Mapping[str, Any],
                  ctx: RunContext) -> dict[str, Any]:
        """Predict the test area, draw it, score it; report the class weighting used."""
        import os

        import torch

        from milbench.api import dense_class_metrics, metric_key

        from .classifier import balanced_weights
        from .dense_map import dense_class_map
        from .figure import draw_area_figure

        names = list(splits.spec.instance_classes)
        out: dict[str, Any] = {}
        counts = model.class_counts.detach().cpu()
        weights = balanced_weights(counts) if model.class_weights == "balanced" else torch.ones_like(counts)
        for k, name in enumerate(names):
            out[f"class_weight_{metric_key(name)}"] = round(float(weights[k]), 6)
        area = getattr(splits.test, "area", None)
        if area is None or ctx.artifact_dir is None:
            return out
        stride = _stride(model, config)
        # this step can take longer than training on a smoke run: say what it is doing (child log/stderr)
        import sys
        import time

        t0 = time.perf_counter()
        h, w = area.image.shape[-2:]
        print(f"[milbench] transcriptome-cnn: predicting the {w}x{h} px test area (sliding window, stride "
              f"{stride}) and drawing its figure ...", file=sys.stderr, flush=True)
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model.recalibrate_bn()
            image = torch.from_numpy(area.image.copy())[None].to(device)
            pred, _ = dense_class_map(model, image, stride, config["eval_batch"], model.key_class)
        model.train(was)
        pred = pred.cpu().numpy()
        scores = dense_class_metrics([pred], [area.classes], len(names), names)
        for k, v in scores.items():
            if k != "confusion":
                out[f"area_{k}"] = v
        os.makedirs(ctx.artifact_dir, exist_ok=True)
        path = os.path.join(ctx.artifact_dir, "transcriptome_cnn_test_area.png")
        genes = (splits.info or {}).get("genes", {})
        draw_area_figure(path, area.image, area.classes, pred, names, genes, scores,
                         title=f"{config['backbone']} - test area x {area.x0}..{area.x1} of {area.section}")
        out["area_figure"] = path
        print(f"[milbench] transcriptome-cnn: test-area figure written ({time.perf_counter() - t0:.1f}s): {path}",
              file=sys.stderr, flush=True)
        return out


def _stride(model: "PatchClassifier", config: Mapping[str, Any]) -> int:
    """Sliding-window stride: the config's, or half the classifier's field of view."""
    return int(config["stride"] or max(1, model.field // 2))


@hookimpl
def milbench_register_methods(register: Callable[[Method], None]) -> None:
    register(TranscriptomeCNN())
