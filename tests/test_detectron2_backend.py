"""Detectron2 backend: lazy import, dataset registration, config, train / resume / predict / eval.

Everything but the first test needs Detectron2 importable (its source on PYTHONPATH is
enough: plain Mask R-CNN runs without the compiled extension) and is skipped otherwise.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from detectors import DetectorConfig, get_backend
from detectors import registry
from detectors.torchvision_backend.engine import lr_factor
from tests.conftest import make_coco, mask_forms


def test_choosing_detectron2_without_it_fails_at_once_with_install_command(monkeypatch) -> None:
    for name in list(sys.modules):
        if name == "detectron2" or name.startswith(("detectron2.", "detectors.detectron2_backend")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "detectron2", None)  # makes `import detectron2` raise
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != "detectron2"})
    assert "detectron2" in registry.available_backends()
    with pytest.raises(ImportError) as info:
        get_backend("detectron2")
    msg = str(info.value)
    assert "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'" in msg
    assert "pip install 'exits[detectron2]'" in msg
    # The torchvision backend is unaffected.
    assert get_backend("torchvision").name == "torchvision"


# --- everything below runs Detectron2 ---------------------------------------------------------

@pytest.fixture(scope="module")
def d2():
    return pytest.importorskip("detectron2")


TINY = dict(backend="detectron2", min_size=48, max_size=64, batch_size=2, warmup_iters=2, lr=0.01,
            roi_batch_size_per_image=32, detections_per_image=10, device="cpu", seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, d2) -> Path:
    """make_coco's two images + a third image without objects."""
    root = tmp_path_factory.mktemp("d2tiny")
    path = make_coco(root)
    data = json.loads(path.read_text())
    shutil.copy(root / "images" / "im1.png", root / "images" / "im3.png")
    data["images"].append({"id": 3, "file_name": "im3.png", "width": 64, "height": 48})
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def trained(tiny: Path, tmp_path_factory) -> tuple[Path, DetectorConfig]:
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("d2run")
    cfg = DetectorConfig(**TINY, iterations=3, checkpoint_every=2, eval_json=str(tiny))
    ckpt = get_backend("detectron2").train(tiny, tiny.parent / "images", cfg, out)
    return ckpt, cfg


def _as_lvis(data: dict) -> dict:
    lv = copy.deepcopy(data)
    for c in lv["categories"]:
        c["frequency"] = "rcf"[c["id"] % 3]
    for im in lv["images"]:
        im["coco_url"] = "http://images.example/" + im.pop("file_name")
        im["neg_category_ids"], im["not_exhaustive_category_ids"] = [], []
    for a in lv["annotations"]:
        a.pop("iscrowd", None)
    return lv


# --- dataset registration ---------------------------------------------------------------------

def _registration_json(tmp_path: Path) -> tuple[Path, dict]:
    h, w = 40, 50
    poly, rle_json, empty_json = mask_forms(tmp_path, h, w)
    data = {
        "images": [{"id": 2, "file_name": "a.png", "height": h, "width": w},
                   {"id": 1, "file_name": "a.png", "height": h, "width": w}],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 7, "segmentation": [poly], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 3, "segmentation": rle_json, "bbox": [8, 4, 24, 23], "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [1, 1, 2, 2], "segmentation": empty_json},
            {"id": 14, "image_id": 1, "category_id": 3, "segmentation": rle_json, "iscrowd": 1},
            {"id": 15, "image_id": 1, "category_id": 99, "segmentation": rle_json, "iscrowd": 0},
            {"id": 16, "image_id": 5, "category_id": 3, "segmentation": rle_json, "iscrowd": 0},
        ],
    }
    path = tmp_path / "reg.json"
    path.write_text(json.dumps(data))
    return path, data


def test_registered_dicts_have_exact_boxes_masks_and_labels(d2, tmp_path: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    from detectors.detectron2_backend.datasets import register_coco_json

    path, data = _registration_json(tmp_path)
    reg = register_coco_json(data, path, tmp_path, "train", box_source="annotation")
    assert reg.category_ids == [3, 7] and reg.num_images == 2 and reg.num_objects == 2
    assert reg.dropped == {"empty_mask": 1, "crowd": 1, "unknown_image": 1, "unknown_category": 1}
    dicts = DatasetCatalog.get(reg.name)
    assert [d["image_id"] for d in dicts] == [1, 2]  # sorted by id; image 2 kept without objects
    assert dicts[1]["annotations"] == [] and dicts[0]["file_name"] == str((tmp_path / "a.png").resolve())
    assert (dicts[0]["height"], dicts[0]["width"]) == (40, 50)
    poly_ann, rle_ann = dicts[0]["annotations"]
    # Sorted ids -> contiguous labels: 3 -> 0, 7 -> 1 (torchvision's labels minus one).
    assert (poly_ann["id"], poly_ann["category_id"], rle_ann["id"], rle_ann["category_id"]) == (11, 1, 12, 0)
    assert poly_ann["bbox_mode"] == BoxMode.XYWH_ABS
    # No json bbox -> the mask's tight box; json bbox given -> kept (box_source="annotation").
    assert poly_ann["bbox"] == [10.0, 5.0, 20.0, 20.0] and rle_ann["bbox"] == [8.0, 4.0, 24.0, 23.0]
    # Polygon and RLE of the same shape decode to the same mask; counts are str.
    assert isinstance(poly_ann["segmentation"]["counts"], str)
    m_poly, m_rle = (mask_utils.decode(a["segmentation"]) for a in (poly_ann, rle_ann))
    assert m_poly.shape == (40, 50) and np.array_equal(m_poly, m_rle) and int(m_poly.sum()) == 400
    meta = MetadataCatalog.get(reg.name)
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1} and meta.thing_classes == ["three", "seven"]
    assert meta.evaluator_type == "coco" and meta.json_file == str(path.resolve())

    # Mask boxes; registering the same file again reuses its name; another file gets its own.
    by_mask = register_coco_json(data, path, tmp_path, "train", box_source="mask")
    assert by_mask.name != reg.name
    assert DatasetCatalog.get(by_mask.name)[0]["annotations"][1]["bbox"] == [10.0, 5.0, 20.0, 20.0]
    assert register_coco_json(data, path, tmp_path, "train", box_source="annotation").name == reg.name
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert register_coco_json(data, other, tmp_path, "train", box_source="annotation").name != reg.name


# --- config ------------------------------------------------------------------------------------

def _model_zoo_yaml(d2) -> Path | None:
    rel = Path("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    for base in (Path(d2.__file__).resolve().parents[1] / "configs", Path(d2.__file__).resolve().parent / "model_zoo" / "configs"):
        if (base / rel).is_file():
            return base / rel
    return None


def test_builtin_config_is_model_zoo_mask_rcnn_r50_fpn(d2) -> None:
    from detectron2.config import get_cfg

    from detectors.detectron2_backend.settings import mask_rcnn_r50_fpn_cfg

    yaml_path = _model_zoo_yaml(d2)
    if yaml_path is None:
        pytest.skip("Detectron2's configs/ folder is not at hand")
    zoo = get_cfg()
    zoo.merge_from_file(str(yaml_path))
    built = mask_rcnn_r50_fpn_cfg()
    zoo.MODEL.WEIGHTS = built.MODEL.WEIGHTS
    assert built.MODEL == zoo.MODEL


def test_config_maps_run_settings_and_never_downloads(d2, tmp_path: Path) -> None:
    from detectors.detectron2_backend.settings import build_detectron2_cfg

    cfg = DetectorConfig(**{**TINY, "device": "cpu"}, iterations=30, lr_steps=(20, 25), scale_jitter=(0.5, 1.5),
                         optimizer="adamw", grad_clip_norm=None, amp=True)
    d = build_detectron2_cfg(cfg, 4, "tr", "te", tmp_path)
    assert (d.MODEL.WEIGHTS, d.MODEL.RESNETS.NORM, d.MODEL.BACKBONE.FREEZE_AT) == ("", "BN", 0)
    assert d.MODEL.ROI_HEADS.NUM_CLASSES == 4 and d.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 32
    assert tuple(d.INPUT.MIN_SIZE_TRAIN) == (24, 72) and d.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    assert (d.INPUT.MAX_SIZE_TRAIN, d.INPUT.MIN_SIZE_TEST, d.INPUT.MAX_SIZE_TEST) == (96, 48, 64)
    assert d.SOLVER.AMP.ENABLED is False  # AMP only on CUDA
    assert (d.SOLVER.MAX_ITER, tuple(d.SOLVER.STEPS), d.SOLVER.IMS_PER_BATCH) == (30, (20, 25), 2)
    assert (d.EXITS.OPTIMIZER, d.EXITS.GRAD_CLIP_NORM, d.DATASETS.TEST) == ("adamw", 0.0, ("te",))
    assert d.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False and d.MODEL.DEVICE == "cpu"

    yaml_path = _model_zoo_yaml(d2)
    if yaml_path is not None:  # a model-zoo yaml names a download URL; it must not survive
        z = build_detectron2_cfg(cfg.replace(detectron2_config=str(yaml_path), scale_jitter=None), 2, "tr", None, tmp_path)
        assert z.MODEL.WEIGHTS == "" and z.MODEL.RESNETS.NORM == "BN" and z.DATASETS.TEST == ()
        assert tuple(z.INPUT.MIN_SIZE_TRAIN) == (48,) and z.SOLVER.STEPS == (20, 25)
    with pytest.raises(FileNotFoundError, match="detectron2_config"):
        build_detectron2_cfg(cfg.replace(detectron2_config=str(tmp_path / "missing.yaml")), 2, "tr", None, tmp_path)
    with pytest.raises(ValueError, match="detectron2_config"):
        DetectorConfig(detectron2_config="model.py")


# --- train / checkpoint / predict / resume / eval ----------------------------------------------

def test_training_writes_torchvision_layout_and_schedule(trained, tiny: Path) -> None:
    ckpt, cfg = trained
    out = ckpt.parent
    assert ckpt.name == "model_final.pth" and (out / "last_checkpoint.pth").is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = state["meta"]
    assert set(state) == {"model", "meta"}
    assert meta["backend"] == "detectron2" and meta["category_ids"] == [1, 2] and meta["iteration"] == 3
    assert meta["config"] == cfg.to_dict() and meta["train_json"] == str(tiny)
    assert "roi_heads.mask_head.predictor.weight" in state["model"]
    assert state["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3  # 2 classes + background
    last = torch.load(out / "last_checkpoint.pth", map_location="cpu", weights_only=True)
    assert last["iteration"] == 3 and {"model", "trainer", "history", "meta"} <= set(last)
    log = json.loads((out / "train_log.json").read_text())
    assert log["iterations"] == 3 and [r["iteration"] for r in log["history"]] == [0, 1, 2]
    for r in log["history"]:
        assert r["lr"] == pytest.approx(cfg.lr * lr_factor(r["iteration"], 2, cfg.warmup_factor, (), 0.1))
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")), rel=1e-4)
        assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(r)
    ev = json.loads((out / "eval_metrics.json").read_text())
    assert ev["evaluator"] == "COCOEvaluator" and ev["gt_json"] == str(tiny)
    final = ev["history"][-1]
    assert final["iteration"] == 3 and final["format"] == "coco"
    for t in ("bbox", "segm"):
        vals = final["coco"][t]
        assert set(vals) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in vals.values())


def test_predictions_are_coco_results_and_evaluate(trained, tiny: Path) -> None:
    from detectors.evaluation import evaluate

    ckpt, cfg = trained
    pcfg = cfg.replace(score_threshold=0.0, detections_per_image=7, mask_threshold=0.5)
    backend = get_backend("detectron2")
    preds = backend.predict(ckpt, tiny.parent / "images", tiny, pcfg, image_ids=[1, 3])
    assert preds and {p["image_id"] for p in preds} <= {1, 3}
    for img in (1, 3):
        assert len([p for p in preds if p["image_id"] == img]) <= 7
    for p in preds:
        assert p["category_id"] in (1, 2) and 0.0 <= p["score"] <= 1.0
        assert isinstance(p["segmentation"]["counts"], str) and p["segmentation"]["size"] == [48, 64]
        x, y, w, h = p["bbox"]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0 and x + w <= 64 + 1e-3 and y + h <= 48 + 1e-3
        assert mask_utils.decode(p["segmentation"]).shape == (48, 64)
    json.dumps(preds)  # serialisable as is
    # A lower mask threshold can only grow each (same) detection's mask.
    loose = backend.predict(ckpt, tiny.parent / "images", tiny, pcfg.replace(mask_threshold=0.0), image_ids=[1])
    tight = [p for p in preds if p["image_id"] == 1]
    # (batched with image 3 before, alone now: scores agree up to float rounding)
    assert [p["score"] for p in loose] == pytest.approx([p["score"] for p in tight], rel=1e-4, abs=1e-7)
    assert all(mask_utils.area(a["segmentation"]) >= mask_utils.area(b["segmentation"]) for a, b in zip(loose, tight))
    metrics = evaluate(preds, tiny)
    assert metrics["format"] == "coco" and metrics["num_predictions"] == len(preds)
    assert 0.0 <= metrics["coco"]["segm"]["AP"] <= 1.0


def test_resume_continues_from_saved_iteration(trained, tiny: Path, tmp_path: Path) -> None:
    ckpt, cfg = trained
    out = tmp_path / "resumed"
    shutil.copytree(ckpt.parent, out)
    first = torch.load(out / "last_checkpoint.pth", map_location="cpu", weights_only=True)
    backend = get_backend("detectron2")
    # Same settings, already finished: returns the final checkpoint without training.
    before = (out / "model_final.pth").stat().st_mtime_ns
    assert backend.train(tiny, tiny.parent / "images", cfg, out) == out / "model_final.pth"
    assert (out / "model_final.pth").stat().st_mtime_ns == before
    longer = cfg.replace(iterations=5, eval_json=None, lr_steps=(4,))
    final = backend.train(tiny, tiny.parent / "images", longer, out)
    log = json.loads((out / "train_log.json").read_text())
    assert log["iterations"] == 5 and [r["iteration"] for r in log["history"]] == [0, 1, 2, 3, 4]
    assert log["history"][:3] == first["history"]  # the first run's records are kept as they were
    # The scheduler resumed at step 3: iteration 4 is at the decay step; a restarted one would
    # be back in warm-up (lr * (wf + (1 - wf) / 2) at its second step).
    assert log["history"][4]["lr"] == pytest.approx(cfg.lr * 0.1)
    state = torch.load(final, map_location="cpu", weights_only=True)
    assert state["meta"]["iteration"] == 5
    changed = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.equal(v, first["model"][k])]
    assert changed  # it trained on from the saved weights
    other = json.loads(tiny.read_text())
    other["categories"].append({"id": 9, "name": "nine"})
    moved = tmp_path / "other.json"
    moved.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="other categories"):
        backend.train(moved, tiny.parent / "images", longer.replace(iterations=6), out)


def test_evaluator_is_lvis_for_lvis_gt_and_runs(trained, tiny: Path, tmp_path: Path) -> None:
    from detectron2.evaluation import COCOEvaluator, LVISEvaluator

    from detectors.detectron2_backend.datasets import register_coco_json
    from detectors.detectron2_backend.predict import load_trained_model
    from detectors.detectron2_backend.trainer import ExitsTrainer

    ckpt, cfg = trained
    data = json.loads(tiny.read_text())
    # One image keeps the inference short.
    data["images"] = [im for im in data["images"] if im["id"] == 1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    lvis_path = tmp_path / "lvis_val.json"
    lvis_path.write_text(json.dumps(_as_lvis(data)))
    lv = register_coco_json(_as_lvis(data), lvis_path, tiny.parent / "images", "eval", category_ids=[1, 2])
    co = register_coco_json(json.loads(tiny.read_text()), tiny, tiny.parent / "images", "eval", category_ids=[1, 2])
    assert lv.evaluator_type == "lvis" and co.evaluator_type == "coco"
    model, d2cfg, _ = load_trained_model(ckpt, cfg.replace(score_threshold=0.0))
    d2cfg.DATASETS.TEST = (lv.name,)
    evaluator = ExitsTrainer.build_evaluator(d2cfg, lv.name)
    assert isinstance(evaluator, LVISEvaluator)
    assert isinstance(ExitsTrainer.build_evaluator(d2cfg, co.name), COCOEvaluator)
    results = ExitsTrainer.test(d2cfg, model)
    assert set(results) == {"bbox", "segm"} and "APr" in results["segm"] and "APf" in results["segm"]
