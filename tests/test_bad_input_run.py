"""A demo dataset with bad images and records mixed in runs `exits run` to the end, the way a
user runs it (installed command, subprocess, a brand-new PREFECT_HOME): ``rejections.json``
lists exactly the bad records, and the good objects get the same pseudo masks as a run on
the dataset without the bad ones."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_cli_first_run import fresh_user_env, run_args
from tests.test_cli_first_run import tiny_demo as clean_demo  # noqa: F401 - the same demo fixture (read only)


def _with_bad_records(clean: Path, out: Path) -> tuple[Path, set[tuple[str, str, str]]]:
    """A copy of ``clean`` with bad images and records interleaved among the good ones.

    Returns the json path and the expected rejections as {(kind, id, reason)} with kind
    "ann" (annotation id) or "image" (image id), ids as their json text.
    """
    shutil.copytree(clean / "images", out / "images")
    data = json.loads((clean / "instances.json").read_text())
    good = data["annotations"][0]
    img0 = next(im for im in data["images"] if im["id"] == good["image_id"])
    w, h = img0["width"], img0["height"]
    top = max(a["id"] for a in data["annotations"]) + 1000
    expected: set[tuple[str, str, str]] = set()

    # A truncated JPEG (passes PIL's verify(), fails to decode).
    arr = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(out / "images" / "truncated.jpg", quality=90)
    raw = (out / "images" / "truncated.jpg").read_bytes()
    (out / "images" / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    # A real image file outside the image folder, reached by "..".
    Image.fromarray(arr).save(out / "outside.png")
    shutil.copy(out / "images" / img0["file_name"], out / "images" / "fractional_width.png")

    bad_images = [
        ({"id": 9001, "file_name": "truncated.jpg", "width": w, "height": h}, "corrupt_image"),
        ({"id": 9002, "file_name": "../outside.png", "width": w, "height": h}, "outside_image_dir"),
        ({"id": 9003, "file_name": "missing.png", "width": w, "height": h}, "missing_image"),
        ({"id": 9004, "file_name": "fractional_width.png", "width": w + 0.9, "height": h}, "bad_image_record"),
    ]
    for k, (img, reason) in enumerate(bad_images):
        data["images"].insert(k + 1, img)
        ann = dict(good, id=top + k, image_id=img["id"])
        data["annotations"].append(ann)
        expected.add(("image", str(img["id"]), reason))
    # Annotations of a rejected image are rejected with the image's reason, except where the
    # image record itself is malformed (then its id is not an image id the annotations can name).
    for k, (img, reason) in enumerate(bad_images):
        expected.add(("ann", str(top + k), "unknown_image" if reason == "bad_image_record" else reason))

    bad_anns = [
        (dict(good, id=str(good["id"])), "bad_id"),          # "1" beside 1: must not replace object 1
        (dict(good, id=top + 100.5), "bad_id"),
        (dict(good, id=True), "bad_id"),
        (dict(good, id=2 ** 70), "bad_id"),
        (dict(good, id=top + 101, category_id=77), "unknown_category"),   # 77 is listed twice
        (dict(good, id=top + 102, extreme_points=[[5, 5], [1, 1], [5, 9], [9, 5]]), "not_extreme"),
    ]
    for k, (ann, reason) in enumerate(bad_anns):
        data["annotations"].insert(2 * k + 1, ann)
        expected.add(("ann", json.dumps(ann["id"]), reason))
    data["annotations"].insert(3, "not an annotation")
    data["categories"] += [{"id": 77, "name": "twin a"}, {"id": 77, "name": "twin b"}]
    path = out / "instances.json"
    path.write_text(json.dumps(data))
    return path, expected


def _run(demo_images: Path, annotations: Path, workdir: Path, home: Path) -> subprocess.CompletedProcess:
    args = run_args(demo_images.parent, workdir)
    args[args.index("-i") + 1] = str(demo_images)
    args[args.index("-a") + 1] = str(annotations)
    return subprocess.run(args, env=fresh_user_env(home), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_bad_records_are_listed_and_the_good_ones_get_the_clean_runs_masks(clean_demo, tmp_path):
    bad_dir = tmp_path / "bad_demo"
    bad_dir.mkdir()
    bad_json, expected = _with_bad_records(clean_demo, bad_dir)
    home = tmp_path / "prefect-home"

    clean = _run(clean_demo / "images", clean_demo / "instances.json", tmp_path / "clean_run", home)
    assert clean.returncode == 0, clean.stderr[-3000:]
    bad = _run(bad_dir / "images", bad_json, tmp_path / "bad_run", home)
    assert bad.returncode == 0, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr

    listed = json.loads((tmp_path / "bad_run" / "rejections.json").read_text())["rejections"]
    got = set()
    for r in listed:
        if r["ann_id"] is not None:
            got.add(("ann", json.dumps(r["ann_id"]), r["reason"]))
        elif r["image_id"] is not None:
            got.add(("image", str(r["image_id"]), r["reason"]))
    # Every bad record is listed under its reason, nothing else is (the string annotation has
    # no id: it is listed as bad_annotation without one).
    assert expected <= got, sorted(expected - got)
    assert got - expected == set(), sorted(got - expected)
    assert any(r["reason"] == "bad_annotation" and r["ann_id"] is None for r in listed)
    assert any(r["reason"] == "duplicate_id" and "77" in r["message"] for r in listed)

    clean_out = json.loads((tmp_path / "clean_run" / "pseudo_labels.json").read_text())
    bad_out = json.loads((tmp_path / "bad_run" / "pseudo_labels.json").read_text())
    by_id = {a["id"]: a for a in bad_out["annotations"]}
    assert sorted(by_id) == sorted(a["id"] for a in clean_out["annotations"])
    assert all(type(a["id"]) is int for a in bad_out["annotations"])
    for ann in clean_out["annotations"]:
        other = by_id[ann["id"]]
        assert other["segmentation"] == ann["segmentation"], ann["id"]
        assert other["score"] == ann["score"] and other["image_id"] == ann["image_id"]
    # Rejected images do not travel to stage 2's training json.
    assert sorted(im["id"] for im in bad_out["images"]) == sorted(im["id"] for im in clean_out["images"])
