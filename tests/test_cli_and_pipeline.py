"""The command line and a tiny end-to-end stage-1 run on generated demo data."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from exits.cli import app

runner = CliRunner()

TINY = [
    "device=cpu", "data.crop_size=32", "backbone.img_size=32", "backbone.patch_size=8", "backbone.depth=1",
    "backbone.embed_dim=32", "backbone.num_heads=2", "backbone.decoder_dim=16",
    "similarity.optim.epochs=1", "similarity.optim.batch_size=8",
    "generator.optim.epochs=2", "generator.optim.batch_size=8", "generator.crf_warmup_epochs=1",
    "retrieval.delta_px=2", "pseudo.batch_size=16",
]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("demo-data", "validate", "run", "serve", "report"):
        assert cmd in result.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    result = runner.invoke(app, ["demo-data", str(out), "--n-train", "6", "--n-val", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


def test_demo_data_command(demo):
    data = json.loads((demo / "instances.json").read_text())
    assert len(data["images"]) == 6 and data["annotations"]
    assert all(len(a["extreme_points"]) == 4 for a in data["annotations"])
    assert (demo / "val.json").exists()


def test_validate_reports_bad_records(demo, tmp_path):
    data = json.loads((demo / "instances.json").read_text())
    data["annotations"][0]["category_id"] = 999
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = runner.invoke(app, ["validate", "-a", str(bad), "-i", str(demo / "images")])
    assert result.exit_code == 0
    assert f"annotation {data['annotations'][0]['id']}" in result.output and "unknown_category" in result.output


def test_run_rejects_bad_config_with_a_message(demo, tmp_path):
    result = runner.invoke(app, ["run", "-i", str(demo / "images"), "-a", str(demo / "instances.json"),
                                 "-w", str(tmp_path / "w"), "--set", "generator.optim.epochs=0"])
    assert result.exit_code == 2
    assert "generator.optim.epochs" in result.output


@pytest.mark.slow
@pytest.mark.prefect  # `exits run` goes through the Prefect flow: use the session's test server
def test_tiny_end_to_end_run_writes_pseudo_labels_and_report(demo, tmp_path):
    work = tmp_path / "run"
    args = ["run", "-i", str(demo / "images"), "-a", str(demo / "instances.json"), "-w", str(work), "-c", "demo"]
    for o in TINY:
        args += ["--set", o]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    src = json.loads((demo / "instances.json").read_text())
    out = json.loads((work / "pseudo_labels.json").read_text())
    assert [a["id"] for a in out["annotations"]] == [a["id"] for a in src["annotations"]]
    sizes = {im["id"]: (im["height"], im["width"]) for im in src["images"]}
    for ann in out["annotations"]:
        m = mask_utils.decode(ann["segmentation"])
        assert m.shape == sizes[ann["image_id"]]
        assert 0.0 <= ann["score"] <= 1.0
        x, y, w, h = ann["bbox"]
        outside = m.copy()
        outside[int(y):int(y + h), int(x):int(x + w)] = 0
        assert outside.sum() == 0, "pseudo mask leaks outside the extreme-point box"
    table = pq.read_table(work / "pseudo_labels.parquet")
    assert table.num_rows == len(out["annotations"])
    points = pq.read_table(work / "points.parquet")
    assert points.num_rows == len(out["annotations"])
    summary = json.loads((work / "report" / "summary.json").read_text())
    assert 0.0 < summary["all"]["miou"] <= 1.0
    assert summary["all"]["count"] == len(out["annotations"])
    assert (work / "report" / "report.md").read_text().count("|") > 10
    assert not list(work.rglob(".*.tmp")), "temporary files left behind"

    rep = runner.invoke(app, ["report", "-w", str(work)])
    assert rep.exit_code == 0 and "Separated" in rep.output
