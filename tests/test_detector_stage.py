"""Stage 2 over a run folder: which json it trains on, extreme-point boxes, config section,
CLI commands and the Prefect flow (cached re-run, retrain after exported fixes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detectors import DetectorConfig
from detectors.torchvision_backend.dataset import CocoInstanceDataset
from detectors.torchvision_backend.transforms import boxes_from_masks, hflip, scale_jitter
from exits.cli import app
from exits.config import ConfigError, load_config
from exits.demo import generate_demo_dataset
from exits.io import file_digest
from exits.stages.detector import (FIXED_PSEUDO_JSON, detector_train_json, evaluate_detector_stage, final_checkpoint,
                                   train_detector_stage)

TINY = ["detector.arch=maskrcnn_mobilenet_v3_fpn", "detector.min_size=128", "detector.max_size=171",
        "detector.iterations=2", "detector.batch_size=2", "detector.warmup_iters=1",
        "detector.roi_batch_size_per_image=32", "detector.device=cpu"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_stage2")
    generate_demo_dataset(out, n_train=4, n_val=3, seed=5)
    return out


def make_run(root: Path, demo: Path) -> Path:
    """A run folder as stage 1 leaves it: pseudo_labels.json (here: the box masks of the
    extreme points, with the extreme-point bbox) and run.json."""
    from exits.baselines import box_mask_full
    from exits.stages.pseudo_labels import encode_rle

    run = root / "run"
    run.mkdir(parents=True)
    data = json.loads((demo / "instances.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for ann in data["annotations"]:
        ann["segmentation"] = encode_rle(box_mask_full(np.asarray(ann["extreme_points"]), *sizes[ann["image_id"]]))
        ann["score"] = 0.5
    (run / "pseudo_labels.json").write_text(json.dumps(data))
    (run / "run.json").write_text(json.dumps({"images": str(demo / "images"), "annotations": str(demo / "instances.json"),
                                              "gt": None}))
    return run


def write_fixed(run: Path, data: dict) -> None:
    """``pseudo_labels_fixed.json`` as `exits export` marks it: made from the current pseudo labels."""
    digest = file_digest(run / "pseudo_labels.json")
    data = dict(data, info={**data.get("info", {}), "spotfix": {"source_blake2b": digest}})
    (run / FIXED_PSEUDO_JSON).write_text(json.dumps(data))


def test_train_json_prefers_current_exported_fixes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no pseudo_labels.json"):
        detector_train_json(tmp_path)
    (tmp_path / "pseudo_labels.json").write_text('{"annotations": []}')
    assert detector_train_json(tmp_path).name == "pseudo_labels.json"
    write_fixed(tmp_path, {"annotations": []})
    assert detector_train_json(tmp_path).name == FIXED_PSEUDO_JSON
    # Pseudo labels regenerated after the export: the stale merge is not used.
    (tmp_path / "pseudo_labels.json").write_text('{"annotations": [], "info": {"rerun": 1}}')
    assert detector_train_json(tmp_path).name == "pseudo_labels.json"


def test_detector_config_section_is_validated_once() -> None:
    cfg = load_config("demo", ["detector.iterations=7", "detector.lr_steps=[3,5]"])
    assert isinstance(cfg.detector, DetectorConfig)
    assert cfg.detector.iterations == 7 and cfg.detector.lr_steps == (3, 5) and cfg.detector.box_source == "annotation"
    with pytest.raises(ConfigError, match="detector"):
        load_config("demo", ["detector.optimizer=lbfgs"])
    with pytest.raises(ConfigError, match="bogus"):
        load_config("demo", ["detector.bogus=1"])


def test_annotation_boxes_survive_flip_and_jitter(tmp_path: Path) -> None:
    from PIL import Image

    h, w = 40, 60
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "a.png")
    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 10:20] = 1  # the pseudo mask misses the right part of the object ...
    from exits.stages.pseudo_labels import encode_rle

    data = {"images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
            "categories": [{"id": 1, "name": "x"}],
            # ... whose extreme-point box is x in [10, 40), y in [10, 20)
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 30, 10],
                             "segmentation": encode_rle(mask)}]}
    by_ann = CocoInstanceDataset(data, tmp_path, box_source="annotation")
    by_mask = CocoInstanceDataset(data, tmp_path, box_source="mask")
    image, target = by_ann[0]
    assert target["boxes"].tolist() == [[10.0, 10.0, 40.0, 20.0]]
    assert by_mask[0][1]["boxes"].tolist() == [[10.0, 10.0, 20.0, 20.0]]
    _, flipped = hflip(image, target)
    assert flipped["boxes"].tolist() == [[20.0, 10.0, 50.0, 20.0]]
    # Shrink by 0.5 (no crop offset): box scales exactly, mask box follows the mask.
    _, small = scale_jitter(image, target, 0.5, torch.Generator().manual_seed(0))
    assert small["boxes"].tolist() == [[5.0, 5.0, 20.0, 10.0]]
    assert not torch.equal(small["boxes"], boxes_from_masks(small["masks"]))
    # Mask-derived boxes keep following the mask.
    _, small_m = scale_jitter(*by_mask[0], 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(small_m["boxes"], boxes_from_masks(small_m["masks"]))
    # Enlarged 2x with a random crop: the box is scaled, shifted and clipped to the canvas.
    for seed in range(5):
        _, big = scale_jitter(image, target, 2.0, torch.Generator().manual_seed(seed))
        if len(big["boxes"]):
            b = big["boxes"][0]
            assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h
            m = boxes_from_masks(big["masks"])[0]
            assert b[0] <= m[0] and b[1] <= m[1] and m[3] <= b[3]  # the mask lies inside its box


def test_train_and_evaluate_stage_on_a_run_folder(tmp_path: Path, demo: Path) -> None:
    run = make_run(tmp_path, demo)
    cfg = load_config("demo", TINY).detector
    record = train_detector_stage(run, cfg)
    ckpt = Path(record["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == run / "detector"
    assert record["train_json"].endswith("pseudo_labels.json") and record["fixed"] is False
    assert final_checkpoint(run) == ckpt
    meta = torch.load(ckpt, weights_only=False)["meta"]
    assert meta["train_json"] == str(run / "pseudo_labels.json")

    metrics = evaluate_detector_stage(run, demo / "val.json", demo / "images", cfg.replace(score_threshold=0.0))
    saved = json.loads((run / "detector" / "metrics-val.json").read_text())
    preds = json.loads((run / "detector" / "predictions-val.json").read_text())
    assert saved["coco"]["segm"]["AP"] == metrics["coco"]["segm"]["AP"] and 0.0 <= saved["coco"]["segm"]["AP"] <= 1.0
    val_ids = {im["id"] for im in json.loads((demo / "val.json").read_text())["images"]}
    assert preds and {p["image_id"] for p in preds} <= val_ids
    assert saved["num_predictions"] == len(preds)


def test_cli_train_and_evaluate_detector(tmp_path: Path, demo: Path) -> None:
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["train-detector", "--workdir", str(empty)])
    assert res.exit_code == 2 and "no pseudo_labels.json" in res.output
    run = make_run(tmp_path, demo)
    res = runner.invoke(app, ["train-detector", "--workdir", str(run), "--backend", "nope"])
    assert res.exit_code == 2 and "unknown detector backend 'nope'" in res.output
    sets = [a for s in TINY for a in ("--set", s)]
    res = runner.invoke(app, ["train-detector", "--workdir", str(run), "--config", "demo", *sets])
    assert res.exit_code == 0, res.output
    assert (run / "detector" / "model_final.pth").is_file() or final_checkpoint(run).is_file()
    res = runner.invoke(app, ["evaluate-detector", "--workdir", str(run), "--gt", str(demo / "val.json"),
                              "--config", "demo", *sets])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[: res.output.rindex("}") + 1])
    assert set(summary) >= {"mask_AP", "box_AP", "separated_mask_AP"}
    res = runner.invoke(app, ["evaluate-detector", "--workdir", str(run), "--gt", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "not found" in res.output


@pytest.mark.prefect
def test_flow_caches_and_retrains_after_exported_fixes(tmp_path: Path, demo: Path) -> None:
    from flows.detector import train_detector_flow

    run = make_run(tmp_path, demo)
    config = load_config("demo", TINY).model_dump(mode="json")
    first = train_detector_flow(images=str(demo / "images"), workdir=str(run), config=config,
                                val_gt=str(demo / "val.json"))
    assert first["tasks"] == {"train-detector": "Completed", "evaluate-detector": "Completed"}
    assert set(first["metrics"]) >= {"mask_AP", "box_AP"}
    again = train_detector_flow(images=str(demo / "images"), workdir=str(run), config=config,
                                val_gt=str(demo / "val.json"))
    assert again["tasks"] == {"train-detector": "Cached", "evaluate-detector": "Cached"}
    assert again["checkpoint"] == first["checkpoint"]
    # Exported human fixes: stage 2 trains on them, and only then recomputes.
    data = json.loads((run / "pseudo_labels.json").read_text())
    data["annotations"] = data["annotations"][1:]
    write_fixed(run, data)
    fixed = train_detector_flow(images=str(demo / "images"), workdir=str(run), config=config)
    assert fixed["tasks"] == {"train-detector": "Completed"}
    source = json.loads((run / "detector" / "train_source.json").read_text())
    assert source["fixed"] is True and source["train_json"].endswith(FIXED_PSEUDO_JSON)
