"""Detectron2 backend: lazy import, dataset registration, config, train / resume / predict / eval.

Everything but the first test needs Detectron2 importable (its source on PYTHONPATH is
enough: plain Mask R-CNN runs without the compiled extension) and is skipped otherwise.
"""
from __future__ import annotations

import copy
import json
import re
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
from exits.io import file_digest
from exits.run_folder import FIXED_SOURCE_DIGEST
from tests.conftest import make_coco, mask_forms, rle_of

ROOT = Path(__file__).resolve().parents[1]


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


# --- register_run: a run folder for users' own Detectron2 configs -----------------------------

def _box_pseudo_labels(gt: dict) -> dict:
    """GT json -> pseudo_labels.json as stage 1 writes it: here each mask is its box, the
    categories listed in reverse (thing_classes must follow the ids, not the list)."""
    data = copy.deepcopy(gt)
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for ann in data["annotations"]:
        m = np.zeros(sizes[ann["image_id"]], np.uint8)
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        m[y:y + h, x:x + w] = 1
        ann["segmentation"], ann["score"] = rle_of(m), 0.5
    data["categories"] = data["categories"][::-1]
    return data


@pytest.fixture(scope="module")
def run_dir(tiny: Path, tmp_path_factory) -> Path:
    """A run folder as stage 1 leaves it (pseudo_labels.json, run.json naming a GT json)."""
    run = tmp_path_factory.mktemp("d2reg") / "run"
    run.mkdir()
    (run / "pseudo_labels.json").write_text(json.dumps(_box_pseudo_labels(json.loads(tiny.read_text()))))
    (run / "run.json").write_text(json.dumps({"images": str(tiny.parent / "images"), "annotations": str(tiny),
                                              "gt": str(tiny)}))
    return run


def _objects(dicts: list[dict]) -> int:
    return sum(len(d["annotations"]) for d in dicts)


def test_register_run_registers_pseudo_labels_as_load_coco_json_would(d2, run_dir: Path, tiny: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json
    from detectron2.structures import BoxMode

    from detectors.detectron2_backend import register_run

    images = tiny.parent / "images"
    reg = register_run(run_dir, "exits_reg1")
    # The run's `gt` is the training images' GT (mIoU report): never registered as val.
    assert (reg.train, reg.val, reg.val_json) == ("exits_reg1_train", None, None)
    assert "exits_reg1_val" not in DatasetCatalog.list()
    assert reg.train_json == run_dir / "pseudo_labels.json" and reg.image_dir == images
    assert (reg.thing_classes, reg.category_ids, reg.num_classes, reg.evaluator_type) == (["one", "two"], [1, 2], 2, "coco")
    pseudo = json.loads(reg.train_json.read_text())
    by_id = {a["id"]: a for a in pseudo["annotations"]}

    dicts = DatasetCatalog.get(reg.train)  # built now, from the file
    assert [d["image_id"] for d in dicts] == [1, 2, 3] and dicts[2]["annotations"] == []
    assert _objects(dicts) == len(pseudo["annotations"]) == 3
    for d in dicts:
        assert Path(d["file_name"]) == (images / f"im{d['image_id']}.png").resolve() and (d["height"], d["width"]) == (48, 64)
        for a in d["annotations"]:
            src = by_id[a["id"]]
            assert a["bbox"] == [float(v) for v in src["bbox"]] and a["bbox_mode"] == BoxMode.XYWH_ABS
            assert a["category_id"] == src["category_id"] - 1 and a["iscrowd"] == 0
            assert np.array_equal(mask_utils.decode(a["segmentation"]), mask_utils.decode(src["segmentation"]))
    meta = MetadataCatalog.get(reg.train)
    assert meta.thing_classes == ["one", "two"] and meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    assert meta.evaluator_type == "coco" and meta.json_file == str(reg.train_json.resolve())
    assert meta.image_root == str(images.resolve())

    # Detectron2's own loader on the same file: same metadata, same records.
    ref = load_coco_json(str(reg.train_json), str(images), dataset_name="exits_reg1_ref", extra_annotation_keys=["id"])
    ref_meta = MetadataCatalog.get("exits_reg1_ref")
    assert ref_meta.thing_classes == meta.thing_classes
    assert ref_meta.thing_dataset_id_to_contiguous_id == meta.thing_dataset_id_to_contiguous_id
    assert len(ref) == len(dicts)
    for mine, theirs in zip(dicts, sorted(ref, key=lambda r: r["image_id"])):
        assert Path(mine["file_name"]) == Path(theirs["file_name"]).resolve()
        assert all(mine[k] == theirs[k] for k in ("height", "width", "image_id"))
        ours = {a["id"]: a for a in mine["annotations"]}
        assert sorted(ours) == sorted(a["id"] for a in theirs["annotations"])
        for a in theirs["annotations"]:
            assert {k: ours[a["id"]][k] for k in a} == a


def test_register_run_fixed_or_plain_labels_and_reregistration(d2, run_dir: Path, tmp_path: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detectors.detectron2_backend import register_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    pseudo = json.loads((run / "pseudo_labels.json").read_text())
    fixed = dict(copy.deepcopy(pseudo), info={"spotfix": {FIXED_SOURCE_DIGEST: file_digest(run / "pseudo_labels.json", memo=False)}})
    fixed["annotations"] = fixed["annotations"][:2]  # a fix deleted one object
    (run / "pseudo_labels_fixed.json").write_text(json.dumps(fixed))

    reg = register_run(run, "exits_reg2")  # fixed=True: stage 2's rule, the current fixes
    assert reg.train_json == run / "pseudo_labels_fixed.json" and _objects(DatasetCatalog.get(reg.train)) == 2
    # Same name again (a notebook cell re-run): replaced, no "already registered" error.
    plain = register_run(run, "exits_reg2", fixed=False)
    assert plain.train == reg.train and plain.train_json == run / "pseudo_labels.json"
    assert _objects(DatasetCatalog.get(plain.train)) == 3
    assert MetadataCatalog.get(plain.train).json_file == str((run / "pseudo_labels.json").resolve())
    # Metadata is replaced too (Detectron2 refuses to change a set attribute in place).
    renamed = copy.deepcopy(pseudo)
    renamed["categories"] = [{"id": 1, "name": "uno"}, {"id": 2, "name": "dos"}]
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "pseudo_labels.json").write_text(json.dumps(renamed))
    assert register_run(other, "exits_reg2").thing_classes == ["uno", "dos"]
    assert MetadataCatalog.get("exits_reg2_train").thing_classes == ["uno", "dos"]
    # Pseudo labels regenerated after the export: the stale merge is not used.
    (run / "pseudo_labels.json").write_text(json.dumps(dict(pseudo, info={"rerun": 1})))
    assert register_run(run, "exits_reg2").train_json == run / "pseudo_labels.json"


def test_register_run_val_set_lvis_and_one_line_errors(d2, run_dir: Path, tiny: Path, tmp_path: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detectors.detectron2_backend import register_run

    gt = json.loads(tiny.read_text())
    reg = register_run(run_dir, "exits_reg3", val_json=tiny)
    assert reg.val == "exits_reg3_val" and reg.val_json == tiny
    val = DatasetCatalog.get(reg.val)
    assert len(val) == 3 and _objects(val) == len(gt["annotations"])
    gt_masks = {a["id"]: mask_utils.decode(a["segmentation"]) for a in gt["annotations"]}
    for a in (a for d in val for a in d["annotations"]):
        assert np.array_equal(mask_utils.decode(a["segmentation"]), gt_masks[a["id"]])
    vmeta = MetadataCatalog.get(reg.val)
    assert vmeta.evaluator_type == "coco" and vmeta.json_file == str(tiny.resolve())
    assert vmeta.thing_classes == reg.thing_classes and vmeta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}

    lvis_val = tmp_path / "lvis_val.json"
    lvis_val.write_text(json.dumps(_as_lvis(gt)))
    lv = register_run(run_dir, "exits_reg3", val_json=lvis_val)
    assert MetadataCatalog.get(lv.val).evaluator_type == "lvis" and lv.evaluator_type == "coco"
    assert Path(DatasetCatalog.get(lv.val)[0]["file_name"]).is_file()  # named by coco_url
    register_run(run_dir, "exits_reg3")  # no val this time: the earlier one is not left behind
    assert "exits_reg3_val" not in DatasetCatalog.list() and "exits_reg3_val" not in MetadataCatalog.list()

    # An LVIS-format run (pseudo labels keep the input's format), without run.json.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pseudo_labels.json").write_text(json.dumps(_as_lvis(json.loads((run_dir / "pseudo_labels.json").read_text()))))
    with pytest.raises(FileNotFoundError, match=r"run\.json not found .*pass image_dir="):
        register_run(bare, "exits_reg3b")
    lvr = register_run(bare, "exits_reg3b", image_dir=tiny.parent / "images")
    assert lvr.evaluator_type == "lvis" and MetadataCatalog.get(lvr.train).evaluator_type == "lvis"
    assert _objects(DatasetCatalog.get(lvr.train)) == 3

    empty = tmp_path / "empty"
    empty.mkdir()
    for fixed in (True, False):
        with pytest.raises(FileNotFoundError, match=r"no pseudo_labels\.json \(run stage 1 first: `exits run`\)"):
            register_run(empty, "exits_reg3c", fixed=fixed)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        register_run(bare, "exits_reg3c", image_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="val json not found"):
        register_run(run_dir, "exits_reg3c", val_json=tmp_path / "missing.json")
    (empty / "pseudo_labels.json").write_text("{not json")
    with pytest.raises(ValueError, match="pseudo_labels.json"):
        register_run(empty, "exits_reg3c", image_dir=tiny.parent / "images")
    assert "exits_reg3c_train" not in DatasetCatalog.list()  # nothing registered on failure


# --- what Detectron2 users expect in the trainer's output folder -------------------------------

def test_training_writes_metrics_json_last_checkpoint_and_events(trained) -> None:
    from detectron2.checkpoint import DetectionCheckpointer

    from detectors.detectron2_backend.predict import load_trained_model
    from detectors.detectron2_backend.trainer import tensorboard_missing

    ckpt, cfg = trained
    out = ckpt.parent
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    steps = [r for r in lines if "total_loss" in r]
    assert steps[-1]["iteration"] == 2 and {"loss_mask", "lr"} <= set(steps[-1])  # 0-based, as Detectron2 counts
    # The final evaluation, as Detectron2's EvalHook logs it (after training: iteration = max_iter).
    assert lines[-1]["iteration"] == 3 and "segm/AP" in lines[-1] and "bbox/AP" in lines[-1]
    assert (out / "last_checkpoint").read_text() == "last_checkpoint.pth"
    # Detectron2's checkpointer finds the latest checkpoint through the tag and loads it.
    model, _, _ = load_trained_model(ckpt, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    checkpointer = DetectionCheckpointer(model, save_dir=str(out))
    assert checkpointer.has_checkpoint() and checkpointer.get_checkpoint_file() == str(out / "last_checkpoint.pth")
    rest = checkpointer.resume_or_load("", resume=True)
    assert rest["iteration"] == 3
    final = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    events = list(out.glob("events.out.tfevents.*"))
    assert bool(events) == (tensorboard_missing() is None)


def test_without_tensorboard_the_other_files_are_written(d2, tmp_path: Path, monkeypatch, caplog) -> None:
    from detectors.detectron2_backend import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "tensorboard_missing", lambda: "ImportError: no module named 'tensorboard'")
    with caplog.at_level("WARNING"):
        writers = trainer_mod.event_writers(tmp_path, 5)
    try:
        assert [type(w).__name__ for w in writers] == ["CommonMetricPrinter", "JSONWriter"]
        assert "pip install tensorboard" in caplog.text
    finally:
        for w in writers:
            w.close()


# --- docs/detectron2.md: the LazyConfig example, run as written ---------------------------------

def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "detectron2.md").read_text(), re.S)


@pytest.mark.slow
def test_docs_lazyconfig_example_trains_and_evaluates(d2, run_dir: Path, tiny: Path, tmp_path: Path) -> None:
    blocks = _doc_blocks()
    settings = next(b for b in blocks if b.startswith("WORKDIR"))
    train = next(b for b in blocks if "LazyConfig.load(" in b)
    evaluate = next(b for b in blocks if b.startswith("model = instantiate("))
    zoo = Path(d2.__file__).parent / "model_zoo" / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.py"
    if not zoo.is_file():
        pytest.skip("Detectron2's config files are not installed (a source checkout on PYTHONPATH)")
    torch.set_num_threads(2)
    ns: dict = {}
    exec(compile(settings, "docs/detectron2.md", "exec"), ns)  # the doc's own settings run
    out = tmp_path / "lazy"
    ns.update(WORKDIR=str(run_dir), VAL_JSON=str(tiny), OUTPUT_DIR=str(out), MAX_ITER=2, IMS_PER_BATCH=2,
              BASE_LR=0.01, MIN_SIZE=48, MAX_SIZE=64, DEVICE="cpu", NUM_WORKERS=0)
    exec(compile(train, "docs/detectron2.md", "exec"), ns)
    assert ns["reg"].train == "demo_train" and ns["cfg"].model.roi_heads.num_classes == 2
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").read_text() == "model_final.pth"
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    # The final evaluation is logged (two iterations from random init detect nothing yet: bbox only, NaN).
    assert [r["iteration"] for r in lines if "total_loss" in r][-1] == 1 and "bbox/AP" in lines[-1]
    # Two iterations from random init leave background scores near 1.0 (fg probability 0.0 in float32):
    # keep every candidate so that the evaluation has detections to score.
    ns["cfg"].model.roi_heads.box_predictor.test_score_thresh = -1.0
    exec(compile(evaluate, "docs/detectron2.md", "exec"), ns)
    assert {"bbox", "segm"} <= set(ns["results"])
