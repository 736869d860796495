"""Stage 2 detectors: registry, dataset, augmentation, training/resume, prediction, evaluation."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from detectors import DetectorConfig, get_backend, register
from detectors.base import Detector
from detectors.evaluation import coco_ap, evaluate, lvis_ap, numpy_float_alias, separated_ap
from detectors.registry import available_backends
from detectors.torchvision_backend.dataset import CategoryMapping, CocoInstanceDataset
from detectors.torchvision_backend.engine import LAST_CHECKPOINT, lr_factor
from detectors.torchvision_backend.transforms import TrainAugmentation, boxes_from_masks, hflip, scale_jitter
from exits.demo import generate_demo_dataset
from exits.eval.rle import segmentation_to_rle
from exits.eval.separated import separated_ann_ids
from exits.eval.ground_truth import gt_instances_from_coco
from tests.conftest import mask_forms


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo6")
    generate_demo_dataset(out, n_train=6, n_val=6, seed=3)
    return out


def _perfect_predictions(data: dict) -> list[dict]:
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    preds = []
    for a in data["annotations"]:
        rle = segmentation_to_rle(a["segmentation"], *sizes[a["image_id"]])
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h],
                      "score": 0.9, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return preds


def _as_lvis(data: dict) -> dict:
    lv = copy.deepcopy(data)
    for c in lv["categories"]:
        c["frequency"] = "rcf"[c["id"] % 3]
    for im in lv["images"]:
        im["coco_url"] = "http://images.example/" + im.pop("file_name")
        im["neg_category_ids"] = []
        im["not_exhaustive_category_ids"] = []
    for a in lv["annotations"]:
        a.pop("iscrowd", None)
    return lv


# --- registry and config -------------------------------------------------------------------

def test_registry_builtin_and_custom() -> None:
    backend = get_backend("torchvision")
    assert isinstance(backend, Detector) and backend.name == "torchvision"
    assert "torchvision" in available_backends()
    with pytest.raises(KeyError, match="unknown detector backend 'nope'"):
        get_backend("nope")

    @register("test-dummy")
    class Dummy(Detector):
        def train(self, train_json, image_dir, cfg, out_dir):
            return Path(out_dir) / "x"

        def predict(self, checkpoint, image_dir, images, cfg, image_ids=None):
            return []

    assert isinstance(get_backend("test-dummy"), Dummy)
    with pytest.raises(ValueError, match="already registered"):
        register("test-dummy")(type("Other", (Dummy,), {}))


def test_config_validation_and_round_trip() -> None:
    cfg = DetectorConfig(lr_steps=[10, 20], scale_jitter=[0.5, 2])
    assert cfg.lr_steps == (10, 20) and cfg.scale_jitter == (0.5, 2.0)
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="arch"):
        DetectorConfig(arch="yolo")
    with pytest.raises(ValueError, match="unknown DetectorConfig keys"):
        DetectorConfig.from_dict({"lerning_rate": 1})
    with pytest.raises(ValueError, match="lr_steps"):
        DetectorConfig(lr_steps=(20, 10))


def test_lr_schedule_warmup_then_steps() -> None:
    f = [lr_factor(t, 10, 0.001, (20, 30), 0.1) for t in range(35)]
    assert f[0] == pytest.approx(0.001) and f[5] == pytest.approx(0.001 + 0.999 * 0.5)
    assert f[10] == 1.0 and f[19] == 1.0 and f[20] == pytest.approx(0.1) and f[30] == pytest.approx(0.01)


# --- dataset and transforms ------------------------------------------------------------------

def test_dataset_rle_and_polygon_give_same_mask(tmp_path: Path) -> None:
    h, w = 40, 50
    poly, rle_json, empty_json = mask_forms(tmp_path, h, w)
    rle = {"size": rle_json["size"], "counts": rle_json["counts"].encode()}
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w},
                   {"id": 2, "file_name": "a.png", "height": h, "width": w}],
        "categories": [{"id": 7, "name": "x"}, {"id": 3, "name": "y"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [poly], "bbox": [0, 0, 50, 40], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": rle_json, "bbox": [0, 0, 50, 40], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [1, 1, 2, 2], "segmentation": empty_json},
        ],
    }
    ds = CocoInstanceDataset(data, tmp_path)
    assert ds.dropped["empty_mask"] == 1 and ds.num_objects == 2
    image, target = ds[0]
    assert image.shape == (3, h, w)
    masks = target["masks"]
    assert masks.shape == (2, h, w) and torch.equal(masks[0], masks[1]) and int(masks[0].sum()) > 0
    # Boxes are the mask's tight box, not the json's (here deliberately wrong) bbox field.
    assert torch.equal(target["boxes"][0], boxes_from_masks(masks)[0])
    assert target["boxes"][0].tolist() == pytest.approx(list(mask_utils.toBbox(rle)[:2]) + [
        float(mask_utils.toBbox(rle)[0] + mask_utils.toBbox(rle)[2]),
        float(mask_utils.toBbox(rle)[1] + mask_utils.toBbox(rle)[3])])
    # Sorted category ids -> labels: 3 -> 1, 7 -> 2.
    assert target["labels"].tolist() == [2, 1]
    # Image without objects: kept, empty targets of the right shapes.
    _, empty_target = ds[1]
    assert empty_target["boxes"].shape == (0, 4) and empty_target["masks"].shape == (0, h, w)


def test_category_mapping_round_trip() -> None:
    m = CategoryMapping([90, 1, 17, 5])
    labels = [m.to_label(c) for c in (1, 5, 17, 90)]
    assert labels == [1, 2, 3, 4] and m.num_classes == 5
    assert [m.to_category(k) for k in labels] == [1, 5, 17, 90]
    with pytest.raises(KeyError):
        m.to_category(0)


def test_boxes_from_masks_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 30, 40), np.uint8)
    masks[0, 3:9, 5:20] = 1
    masks[1, 10:29, 0:40] = 1
    masks[2] = rng.random((30, 40)) > 0.97
    xywh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))))
    expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    np.testing.assert_allclose(boxes_from_masks(torch.from_numpy(masks)).numpy(), expected)


def test_flip_and_jitter_keep_boxes_consistent(demo: Path) -> None:
    ds = CocoInstanceDataset(demo / "instances.json", demo / "images")
    image, target = ds[0]
    assert target["masks"].shape[0] > 0
    fimage, ftarget = hflip(image, target)
    assert torch.equal(fimage.flip(-1), image)
    assert torch.equal(ftarget["boxes"], boxes_from_masks(ftarget["masks"]))
    gen = torch.Generator().manual_seed(0)
    for scale in (0.6, 1.0, 1.7):
        jimage, jt = scale_jitter(image, target, scale, gen)
        assert jimage.shape == image.shape and jt["masks"].shape[1:] == image.shape[1:]
        assert torch.equal(jt["boxes"], boxes_from_masks(jt["masks"]))
        assert len(jt["labels"]) == len(jt["masks"]) == len(jt["ann_ids"])
        if scale < 1:  # shrinking keeps every object, smaller by about scale^2
            assert len(jt["labels"]) == len(target["labels"])
            ratio = jt["masks"].sum().item() / target["masks"].sum().item()
            assert ratio == pytest.approx(scale**2, rel=0.15)
    # Same seed -> same augmentation (what exact resume relies on).
    aug = TrainAugmentation(True, (0.7, 1.4))
    a = aug(image, target, torch.Generator().manual_seed(5))
    b = aug(image, target, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])


def test_local_weight_files_load_without_download(tmp_path: Path) -> None:
    from torchvision.models import mobilenet_v3_large
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detectors.torchvision_backend.model import build_model

    cfg = DetectorConfig(arch="maskrcnn_mobilenet_v3_fpn")
    torch.manual_seed(0)
    source = build_model(cfg, num_classes=6)
    torch.save(source.state_dict(), tmp_path / "full.pth")
    # Another class count: class-specific predictor tensors are skipped, the rest loaded.
    target = build_model(cfg.replace(weights_path=str(tmp_path / "full.pth")), num_classes=3)
    src, dst = source.state_dict(), target.state_dict()
    assert torch.equal(src["backbone.fpn.inner_blocks.0.0.weight"], dst["backbone.fpn.inner_blocks.0.0.weight"])
    assert torch.equal(src["roi_heads.mask_head.0.0.weight"], dst["roi_heads.mask_head.0.0.weight"])
    assert dst["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3

    net = mobilenet_v3_large(weights=None)
    torch.save(net.state_dict(), tmp_path / "backbone.pth")
    model = build_model(cfg.replace(backbone_weights_path=str(tmp_path / "backbone.pth")), num_classes=3)
    assert torch.equal(model.backbone.body["0"][0].weight, net.features[0][0].weight)
    assert isinstance(model.backbone.body["0"][1], FrozenBatchNorm2d)
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="backbone weights lack"):
        build_model(cfg.replace(backbone_weights_path=str(tmp_path / "bad.pth")), num_classes=3)


# --- training, resume, prediction -----------------------------------------------------------

TINY = dict(arch="maskrcnn_mobilenet_v3_fpn", min_size=128, max_size=171, batch_size=2, lr=0.005,
            warmup_iters=2, roi_batch_size_per_image=64, device="cpu", seed=0, scale_jitter=(0.8, 1.2))


def test_train_resume_and_predict(demo: Path, tmp_path: Path) -> None:
    backend = get_backend("torchvision")
    straight = DetectorConfig(iterations=4, **TINY)
    ckpt = backend.train(demo / "instances.json", demo / "images", straight, tmp_path / "straight")
    log = json.loads((tmp_path / "straight" / "train_log.json").read_text())
    losses = [h["loss"] for h in log["history"]]
    assert [h["iteration"] for h in log["history"]] == [0, 1, 2, 3]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]

    # Interrupted run: 2 iterations with a checkpoint, then resumed to 4.
    resumed_dir = tmp_path / "resumed"
    backend.train(demo / "instances.json", demo / "images", straight.replace(iterations=2), resumed_dir)
    state = torch.load(resumed_dir / LAST_CHECKPOINT, weights_only=False)
    assert state["iteration"] == 2
    ckpt2 = backend.train(demo / "instances.json", demo / "images", straight, resumed_dir)
    log2 = json.loads((resumed_dir / "train_log.json").read_text())
    assert [h["iteration"] for h in log2["history"]] == [0, 1, 2, 3]
    # Batches and augmentation are functions of (seed, iteration): same losses, same weights.
    np.testing.assert_allclose([h["loss"] for h in log2["history"]], losses, rtol=1e-3)
    w1, w2 = torch.load(ckpt, weights_only=False)["model"], torch.load(ckpt2, weights_only=False)["model"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-4)

    val = json.loads((demo / "val.json").read_text())
    ids = [im["id"] for im in val["images"][:2]]
    preds = backend.predict(ckpt, demo / "images", demo / "val.json", straight.replace(score_threshold=0.0),
                            image_ids=ids)
    assert preds, "an untrained model with score threshold 0 still returns detections"
    cat_ids = {c["id"] for c in val["categories"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in val["images"]}
    for p in preds[:50]:
        assert p["image_id"] in ids and p["category_id"] in cat_ids and 0 <= p["score"] <= 1
        mask = mask_utils.decode(p["segmentation"])
        assert mask.shape == sizes[p["image_id"]] and set(np.unique(mask)) <= {0, 1}
        x, y, w, h = p["bbox"]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0
    json.dumps(preds)  # serialisable as COCO results
    metrics = evaluate(preds, demo / "val.json")
    assert 0.0 <= metrics["coco"]["segm"]["AP"] <= 1.0


# --- evaluation ------------------------------------------------------------------------------

def test_coco_ap_perfect_predictions(demo: Path) -> None:
    val = json.loads((demo / "val.json").read_text())
    preds = _perfect_predictions(val)
    ap = coco_ap(preds, demo / "val.json")
    assert ap["segm"]["AP"] == pytest.approx(1.0) and ap["bbox"]["AP"] == pytest.approx(1.0)
    # Half the objects missed: AP drops clearly below 1.
    worse = coco_ap(preds[::2], val)
    assert worse["segm"]["AP"] < 0.8
    assert coco_ap([], val)["segm"]["AP"] == 0.0


def test_lvis_ap_perfect_predictions_through_np_float_workaround(demo: Path) -> None:
    lv = _as_lvis(json.loads((demo / "val.json").read_text()))
    preds = _perfect_predictions(json.loads((demo / "val.json").read_text()))
    assert "float" not in np.__dict__
    ap = lvis_ap(preds, lv)
    assert "float" not in np.__dict__, "the numpy.float alias must not outlive the evaluation"
    assert ap["segm"]["AP"] == pytest.approx(1.0) and ap["bbox"]["AP"] == pytest.approx(1.0)
    present = {a["category_id"] for a in lv["annotations"]}
    for name, freq in (("APr", "r"), ("APc", "c"), ("APf", "f")):
        has = any(c["frequency"] == freq and c["id"] in present for c in lv["categories"])
        assert ap["segm"][name] == (pytest.approx(1.0) if has else -1.0)
    full = evaluate(preds, lv, separated=False)
    assert full["format"] == "lvis" and full["lvis"]["segm"]["AP"] == pytest.approx(1.0)
    with numpy_float_alias():
        assert np.float is float  # type: ignore[attr-defined]
    assert "float" not in np.__dict__


def test_separated_ap(demo: Path) -> None:
    val = json.loads((demo / "val.json").read_text())
    sep = separated_ann_ids(gt_instances_from_coco(val))
    assert sep, "the demo val set has separated objects"
    preds = _perfect_predictions(val)
    res = separated_ap(preds, val)
    assert res["count"] == len(sep) and res["source"] == "gt_masks"
    assert res["segm"]["AP"] == pytest.approx(1.0) and res["bbox"]["AP"] == pytest.approx(1.0)
    ann_of = [a["id"] for a in val["annotations"]]
    # Removing the non-separated objects' predictions changes nothing (they are ignored) ...
    only_sep = [p for p, aid in zip(preds, ann_of) if aid in sep]
    assert separated_ap(only_sep, val)["segm"]["AP"] == pytest.approx(1.0)
    # ... removing the separated objects' predictions drops AP to 0.
    no_sep = [p for p, aid in zip(preds, ann_of) if aid not in sep]
    assert separated_ap(no_sep, val)["segm"]["AP"] == pytest.approx(0.0)
    # Explicit ids: one of them only.
    one = sorted(sep)[0]
    assert separated_ap(preds, val, separated_ids=[one])["count"] == 1


# --- sampling ---------------------------------------------------------------------------------

def test_repeat_factors_match_the_lvis_formula() -> None:
    from detectors.torchvision_backend.sampling import repeat_factors

    # 10 images: category 1 in all, category 2 in one, image 9 empty.
    labels = [{1} for _ in range(8)] + [{1, 2}] + [set()]
    r = repeat_factors(labels, threshold=0.5)
    # f_1 = 0.9 -> r_1 = 1; f_2 = 0.1 -> r_2 = sqrt(0.5 / 0.1) = sqrt(5)
    np.testing.assert_allclose(r, [1.0] * 8 + [math.sqrt(5.0), 1.0])


def test_batch_sampler_resumes_exactly_and_repeats_rare_images() -> None:
    from detectors.torchvision_backend.sampling import IterationBatchSampler

    factors = np.array([1.0, 1.0, 1.0, 3.5])
    full = list(IterationBatchSampler(4, 3, seed=7, start=0, total=40, factors=factors))
    resumed = list(IterationBatchSampler(4, 3, seed=7, start=17, total=40, factors=factors))
    assert resumed == full[17:]  # same batches and augmentation seeds after a resume
    counts = np.bincount([pos for batch in full for pos, _ in batch], minlength=4)
    # Image 3 appears 3 or 4 times per epoch (mean 3.5), the others once.
    assert 2.8 < counts[3] / counts[:3].mean() < 4.2
    plain = list(IterationBatchSampler(4, 2, seed=7, start=0, total=6))
    assert sorted(p for b in plain[:2] for p, _ in b) == [0, 1, 2, 3]  # plain epochs are permutations
    with pytest.raises(ValueError, match="one factor >= 1"):
        IterationBatchSampler(4, 2, seed=0, start=0, total=1, factors=np.array([1.0, 0.5, 1.0, 1.0]))


def test_loader_workers_survive_a_prefect_flow_in_the_same_process(demo: Path, tmp_path: Path) -> None:
    """Stage 2 runs inside `exits run`'s flow process; its DataLoader workers used to be forked
    from it and die at once (exit status 1). From a fork server they train like num_workers=0."""
    from prefect import flow

    @flow
    def before() -> int:
        return 1

    assert before() == 1
    backend = get_backend("torchvision")
    cfg = DetectorConfig(iterations=2, **TINY)
    in_process = backend.train(demo / "instances.json", demo / "images", cfg, tmp_path / "w0")
    with_worker = backend.train(demo / "instances.json", demo / "images", cfg.replace(num_workers=1), tmp_path / "w1")
    w0, w1 = torch.load(in_process, weights_only=False)["model"], torch.load(with_worker, weights_only=False)["model"]
    # Same batches and augmentation seeds; only float rounding differs (the worker decodes and
    # resizes with one thread): the tolerance of the resume test above.
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=1e-3, atol=1e-4)
