"""Report: per-object metrics vs brute-force numpy, summary counts, calibration, files,
self-contained HTML, Prefect artifacts, CLI, and the inspection notebook executed."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from typer.testing import CliRunner

from exits.cli import app
from exits.demo import generate_demo_dataset
from exits.io import write_json
from exits.report import publish_report_artifacts, score_calibration, spearman_rank_correlation
from exits.report.gallery import PANEL_HEIGHT, GAP_PX
from exits.stages.prepare import prepare_instances
from exits.stages.pseudo_labels import encode_rle, write_pseudo_labels
from exits.stages.report import evaluate_masks, write_report

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_report.ipynb"


def perturb(mask: np.ndarray, ann_id: int) -> np.ndarray:
    """Known perturbations of a GT mask, by ann id: identical, shifted 3 px right,
    eroded by a 3x3 square, or only its left half kept."""
    kind = ann_id % 4
    if kind == 0:
        return mask.copy()
    if kind == 1:
        out = np.zeros_like(mask)
        out[:, 3:] = mask[:, :-3]
        return out
    if kind == 2:
        return cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    xs = np.flatnonzero(mask.any(0))
    out = mask.copy()
    if xs.size:
        out[:, (xs.min() + xs.max() + 1) // 2:] = False
    return out


def brute_parts(mask: np.ndarray) -> int:
    """8-connected parts with area >= max(16, 0.05 * area), by scipy (independent of cv2)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel())[1:]
    return int(np.count_nonzero(areas >= max(16.0, 0.05 * mask.sum())))


def prepared_demo_run(root: Path, n_train: int, **demo: Any) -> tuple[Path, Path, Path]:
    """Demo data under ``root/data`` and its run folder ``root/run`` up to the instances table
    (and run.json): (data folder, instances json, run folder)."""
    data = root / "data"
    generate_demo_dataset(data, n_train=n_train, n_val=2, **demo)
    ann_json = data / "instances.json"
    work = root / "run"
    prepare_instances(ann_json, data / "images", work, crop_margin=0.15, crop_min_margin_px=4, crop_size=64,
                      derive_missing_points=True, point_tolerance_px=1.0, check_images=True, progress=False)
    write_json(work / "run.json", {"images": str(data / "images"), "annotations": str(ann_json), "gt": None})
    return data, ann_json, work


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run: demo data, instances table, pseudo masks = perturbed GT, score = true IoU."""
    data, ann_json, work = prepared_demo_run(tmp_path_factory.mktemp("report"), n_train=6)
    coco = json.loads(ann_json.read_text())
    expected = {}
    rows, scores = [], {}
    for ann in coco["annotations"]:
        gt = mask_utils.decode(ann["segmentation"]).astype(bool)
        pred = perturb(gt, ann["id"])
        iou = float((gt & pred).sum() / (gt | pred).sum())
        parts = brute_parts(gt)
        expected[ann["id"]] = {"iou": iou, "parts": parts, "category_id": ann["category_id"]}
        rows.append({"ann_id": ann["id"], "rle": encode_rle(pred), "area": int(pred.sum())})
        scores[ann["id"]] = {"score": iou, "certainty": iou, "agreement": iou}
    write_pseudo_labels(ann_json, rows, scores, work)
    summary = write_report(work)  # the pipeline's call: GT from run.json
    return {"work": work, "data": data, "coco": coco, "expected": expected, "summary": summary}


def test_per_object_iou_parts_and_scores_match_brute_force(run):
    table = pq.read_table(run["work"] / "report" / "metrics.parquet").to_pylist()
    expected = run["expected"]
    assert [r["ann_id"] for r in table] == sorted(expected)
    names = {c["id"]: c["name"] for c in run["coco"]["categories"]}
    for r in table:
        e = expected[r["ann_id"]]
        assert r["iou"] == pytest.approx(e["iou"], abs=1e-12)
        assert r["score"] == pytest.approx(e["iou"], abs=1e-5)  # json keeps 5 decimals
        assert r["parts"] == e["parts"] and r["separated"] == (e["parts"] >= 2)
        assert r["category"] == names[e["category_id"]] and r["points_source"] == "annotated"
    # the perturbations really are what they claim: identical masks score exactly 1
    assert all(r["iou"] == 1.0 for r in table if r["ann_id"] % 4 == 0)
    assert all(r["iou"] < 0.9 for r in table if r["ann_id"] % 4 == 3)


def test_summary_counts_share_and_category_miou(run):
    s = run["summary"]
    exp = run["expected"]
    n = len(exp)
    n_sep = sum(e["parts"] >= 2 for e in exp.values())
    assert 0 < n_sep < n
    assert s["all"]["count"] == n and s["objects"] == {"predicted": n, "evaluated": n, "without_gt_mask": 0, "crowd": 0}
    assert s["all"]["miou"] == pytest.approx(np.mean([e["iou"] for e in exp.values()]))
    assert s["separated"]["miou"] == pytest.approx(np.mean([e["iou"] for e in exp.values() if e["parts"] >= 2]))
    assert s["separated_objects"] == {"count": n_sep, "share": pytest.approx(n_sep / n)}
    assert s["separated_source"] == "derived_from_gt_masks" and s["separated_rule"]["min_part_pixels"] == 16
    # the demo generator counted parts with the same rule
    assert n_sep == sum(a["num_parts"] >= 2 for a in run["coco"]["annotations"])
    for cat in s["per_category"]:
        ious = [e["iou"] for e in exp.values() if e["category_id"] == cat["category_id"]]
        assert cat["count"] == len(ious) and cat["miou"] == pytest.approx(np.mean(ious))
    assert s["inputs"]["gt"] == str(run["data"] / "instances.json")
    on_disk = json.loads((run["work"] / "report" / "summary.json").read_text())
    assert on_disk["separated_objects"]["count"] == n_sep


def test_calibration_of_score_equal_to_iou_is_perfect(run):
    cal = run["summary"]["calibration"]
    assert cal["count"] == len(run["expected"])
    assert cal["spearman"] > 0.999 and cal["pearson"] > 0.999
    mious = [b["miou"] for b in cal["bins"]]
    assert mious == sorted(mious) and sum(b["count"] for b in cal["bins"]) == cal["count"]
    assert cal["worst_decile_overlap"] == 1.0


def test_score_calibration_known_orderings():
    rng = np.random.default_rng(0)
    iou = rng.random(40)
    rev = score_calibration(1.0 - iou, iou, n_bins=4)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["worst_decile_overlap"] == 0.0
    assert [b["count"] for b in rev["bins"]] == [10, 10, 10, 10]
    mious = [b["miou"] for b in rev["bins"]]
    assert mious == sorted(mious, reverse=True)
    order = np.argsort(1.0 - iou)
    assert mious[0] == pytest.approx(iou[order[:10]].mean())
    # NaN scores are left out; a constant score has no rank correlation
    scores = np.where(np.arange(40) < 5, np.nan, iou)
    assert score_calibration(scores, iou)["count"] == 35
    assert spearman_rank_correlation(np.ones(10), iou[:10]) is None
    assert score_calibration(np.ones(10), iou[:10])["spearman"] is None


def test_files_gallery_and_self_contained_html(run):
    out = run["work"] / "report"
    for name in ("metrics.parquet", "summary.json", "report.md", "report.html"):
        assert (out / name).is_file()
    assert not list(run["work"].rglob(".*.tmp"))
    s = run["summary"]
    exp = run["expected"]
    worst = sorted(exp, key=lambda i: (exp[i]["iou"], i))[:12]
    assert s["worst_ann_ids"] == worst
    assert sorted(p.name for p in (out / "gallery").glob("*.png")) == sorted(f"ann_{i}.png" for i in worst)

    md = (out / "report.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link
    assert "Separated" in md and f"ann {worst[0]}" in md

    page = (out / "report.html").read_text()
    assert "http" not in page and "<link" not in page and "href" not in page and "url(" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 3 + len(worst)
    assert all(src.startswith("data:image/png;base64,") for src in srcs)
    img = Image.open(io.BytesIO(base64.b64decode(srcs[-1].split(",", 1)[1])))
    assert img.format == "PNG" and img.height <= PANEL_HEIGHT
    assert (img.width - 2 * GAP_PX) % 3 == 0  # three equal panels


def test_evaluate_masks_still_importable_and_consistent(run):
    coco = run["coco"]
    pred = json.loads((run["work"] / "pseudo_labels.json").read_text())
    rles = {a["id"]: a["segmentation"] for a in pred["annotations"]}
    summary, rows = evaluate_masks(rles, run["data"] / "instances.json")
    assert summary["all"] == run["summary"]["all"] and len(rows) == len(coco["annotations"])


def test_cli_report_with_separated_id_list(run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run["work"], work)
    ids = sorted(run["expected"])[:2]
    id_file = tmp_path / "separated.json"
    id_file.write_text(json.dumps(ids + [10**9]))
    result = CliRunner().invoke(app, ["report", "-w", str(work), "--separated-ids", str(id_file), "--worst", "3"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    s = json.loads((work / "report" / "summary.json").read_text())
    assert s["separated_objects"]["count"] == 2 and s["separated_source"] == str(id_file)
    assert s["separated_rule"] is None
    assert s["separated"]["miou"] == pytest.approx(np.mean([run["expected"][i]["iou"] for i in ids]))
    assert len(list((work / "report" / "gallery").glob("*.png"))) == 3  # stale gallery files removed


def test_publish_outside_a_prefect_run_does_nothing(run):
    assert publish_report_artifacts(run["summary"]) == []


def test_publish_inside_a_flow_creates_artifacts(run):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    worst = [r for r in pq.read_table(run["work"] / "report" / "metrics.parquet").to_pylist()
             if r["ann_id"] in run["summary"]["worst_ann_ids"][:3]]

    @flow
    def publish():
        return publish_report_artifacts(run["summary"], worst_rows=worst, key_prefix="Exits Test")

    with prefect_test_harness(server_startup_timeout=60):
        ids = publish()
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="exits-test-")))
    assert len(ids) == 6
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"exits-test-summary", "exits-test-subsets", "exits-test-categories",
                           "exits-test-calibration", "exits-test-parts", "exits-test-worst"}
    parts = json.loads(by_key["exits-test-parts"].data)  # the report's parts table (exits/report/parts.py)
    assert [r["part"] for r in parts] == [r["part"] for r in run["summary"]["parts"]["rows"]]
    assert parts[0]["miou_all"] == pytest.approx(run["summary"]["parts"]["rows"][0]["all"]["miou"])
    assert by_key["exits-test-summary"].type == "markdown" and "mIoU" in by_key["exits-test-summary"].data
    table = json.loads(by_key["exits-test-subsets"].data)
    assert table[0] == {"subset": "all", "count": len(run["expected"]),
                        "miou": pytest.approx(run["summary"]["all"]["miou"])}
    assert len(json.loads(by_key["exits-test-worst"].data)) == 3


def _load_generator():
    spec = importlib.util.spec_from_file_location("build_inspect_report", ROOT / "notebooks" / "build_inspect_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_matches_its_generator_and_runs(run, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    generated = _load_generator().build_notebook()
    assert [c.source for c in nb.cells] == [c.source for c in generated.cells]

    monkeypatch.setenv("EXITS_RUN_DIR", str(run["work"]))  # the kernel inherits it
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    n = len(run["expected"])
    assert f"{n} objects in" in text and f"{n} of {n} objects selected" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3 + min(6, n)  # three plots + the gallery of the selection
    assert sum("text/markdown" in o.get("data", {}) for o in outputs) >= 5  # facts + tables


def test_report_md_shows_html_in_category_names_as_text(run, tmp_path):
    """A category name is data: report.md must not carry it as raw HTML (report.html escapes it
    already), and a ``|`` in it must not add a table column."""
    work = tmp_path / "run"
    shutil.copytree(run["work"], work)
    coco = json.loads((run["data"] / "instances.json").read_text())
    evil = "<img src=x onerror=alert(1)> | [x](javascript:alert(2))"
    evil_id = run["coco"]["annotations"][0]["category_id"]
    for cat in coco["categories"]:
        if cat["id"] == evil_id:
            cat["name"] = evil
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(coco))
    write_report(work, gt=gt, n_worst=len(run["expected"]), publish=False)  # every object in the gallery

    md = (work / "report" / "report.md").read_text()
    assert "<img" not in md and "onerror=alert(1)>" not in md
    assert not re.search(r"(?<!\\)\[x(?<!\\)\]\(javascript", md)  # no live link either
    shown = r"&lt;img src=x onerror=alert(1)&gt; \| \[x\](javascript:alert(2))"
    rows = [line for line in md.splitlines() if line.startswith("| " + shown)]
    assert len(rows) == 1  # the category table's row, still 6 columns (7 unescaped pipes)
    assert len(re.findall(r"(?<!\\)\|", rows[0])) == 7
    n_evil = sum(a["category_id"] == evil_id for a in coco["annotations"])
    assert md.count(f"· {shown} ·") == n_evil  # gallery captions
    assert md.count(f"| {shown} |") == n_evil + 1  # worst-objects table + category table
    page = (work / "report" / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
