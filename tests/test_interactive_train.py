"""Click model config, losses, training, ClickPredictor round trip on a tiny run, evaluation
json, the typer commands and GrabCut from clicks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from exits.data.crops import CropWindow
from exits.data.instances_table import build_instances_table, write_instances_table
from exits.data.reader import load_point_dataset
from exits.interactive.commands import eval_clicks_command, train_clicks_command
from exits.interactive.config import ClickModelConfig
from exits.interactive.data import ClickTrainingSet
from exits.interactive.evaluate import run_eval_clicks
from exits.interactive.grabcut import grabcut_from_clicks
from exits.interactive.inference import decode_logits
from exits.interactive.losses import bce_dice_loss, normalized_focal_loss
from exits.interactive.metrics import mask_iou
from exits.interactive.model_io import load_click_model
from exits.interactive.predictor import ClickPredictor
from exits.interactive.train import corrupt_mask, train_click_decoder, train_click_model
from exits.models.factory import save_mask_model
from exits.models.factory import build_mask_model
from tests.conftest import make_coco

SMALL = dict(dim=16, heads=2, pool_sizes=(1, 2), batch_size=2, max_sim_rounds=1, train_source="pseudo")


def test_config_from_dict_validation_and_round_trip():
    cfg = ClickModelConfig.from_dict({"dim": 32, "heads": 4, "pool_sizes": [1, 3], "use_spm": False})
    assert cfg.pool_sizes == (1, 3) and cfg.use_spm is False
    assert ClickModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ClickModelConfig keys: \\['bogus'\\]"):
        ClickModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="loss"):
        ClickModelConfig(loss="l2")
    with pytest.raises(ValueError, match="divisible"):
        ClickModelConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="train_json"):
        ClickModelConfig(train_source="coco")


def test_losses_known_values():
    y = torch.zeros(1, 8, 8)
    y[0, 2:6, 2:6] = 1
    zero = torch.zeros(1, 1, 8, 8)
    # p = 0.5 everywhere: every focal weight equal, normalised to 1/N: NFL = 0.5 * log 2
    assert float(normalized_focal_loss(zero, y)) == pytest.approx(0.5 * np.log(2), rel=1e-5)
    good = (y * 20 - 10)[:, None]
    assert float(normalized_focal_loss(good, y)) < 1e-3
    dice = 1 - (2 * 0.5 * 16 + 1) / (0.5 * 64 + 16 + 1)
    assert float(bce_dice_loss(zero, y)) == pytest.approx(np.log(2) + dice, rel=1e-5)
    assert float(bce_dice_loss(good, y)) < 0.01


def test_corrupt_mask_is_imperfect_but_close():
    rng = np.random.default_rng(0)
    target = np.zeros((48, 48), bool)
    target[10:35, 12:30] = True
    ious = [mask_iou(corrupt_mask(target, rng), target) for _ in range(20)]
    assert all(0.3 < v < 1.0 for v in ious)


def _synthetic_set(k: int = 24, s: int = 32) -> tuple[ClickTrainingSet, torch.Tensor]:
    """Bright disks on dark noise; tokens = 8x8-pooled colours through a fixed projection."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:s, :s]
    targets, crops = [], []
    for _ in range(k):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = rng.uniform(0, 0.3, (3, s, s))
        img[:, m] = rng.uniform(0.7, 1.0, (3, 1))
        targets.append(m)
        crops.append(img)
    crops_t = torch.tensor(np.stack(crops), dtype=torch.float32)
    pooled = torch.nn.functional.avg_pool2d(crops_t, 8).flatten(2).transpose(1, 2)  # (K, 16, 3)
    tokens = pooled @ torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    ts = ClickTrainingSet(list(range(k)), (crops_t * 255).round().to(torch.uint8), torch.from_numpy(np.stack(targets)))
    return ts, tokens


def test_training_reduces_loss_on_fixed_batch():
    torch.set_num_threads(1)
    ts, tokens = _synthetic_set()
    cfg = ClickModelConfig(**{**SMALL, "batch_size": 8}, lr=5e-3)
    clicks = [[(float(np.argwhere(t)[len(np.argwhere(t)) // 2][1]), float(np.argwhere(t)[len(np.argwhere(t)) // 2][0]), True)]
              for t in ts.targets.numpy()[:8]]
    crops = ts.crops[:8].float() / 255

    def fixed_loss(decoder):
        with torch.no_grad():
            logits = decode_logits(decoder, tokens[:8], (4, 4), crops, clicks, [None] * 8)
        return float(bce_dice_loss(logits, ts.targets[:8]))  # NFL renormalises: a poor progress gauge

    before, _ = train_click_decoder(tokens, (4, 4), ts, cfg, iterations=0)
    after, history = train_click_decoder(tokens, (4, 4), ts, cfg, iterations=40)
    assert len(history) == 40
    assert fixed_loss(after) < 0.6 * fixed_loss(before)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """A stage-1-like run folder: instances.parquet, generator/model.pt (a tiny ViT, crop 32),
    pseudo_labels.json (GT masks dilated, with scores), run.json, config.yaml."""
    coco = make_coco(tmp_path / "data")
    run = tmp_path / "run"
    ds = load_point_dataset(coco, tmp_path / "data" / "images")
    write_instances_table(build_instances_table(ds, margin=0.15, min_margin_px=4, crop_size=32), run / "instances.parquet")
    model = build_mask_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                             decoder_dim=16)
    save_mask_model(run / "generator" / "model.pt", model)
    data = json.loads(coco.read_text())
    from pycocotools import mask as mask_utils
    from scipy import ndimage
    for i, ann in enumerate(data["annotations"]):
        m = ndimage.binary_dilation(mask_utils.decode(ann["segmentation"]).astype(bool), iterations=1)
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        ann["score"] = 0.9 - 0.1 * i
    (run / "pseudo_labels.json").write_text(json.dumps(data))
    (run / "run.json").write_text(json.dumps({"images": str(tmp_path / "data" / "images"),
                                              "annotations": str(coco), "gt": None}))
    (run / "config.yaml").write_text("data:\n  crop_margin: 0.15\n  crop_min_margin_px: 4\n")
    return run


def test_predictor_round_trip_on_tiny_run(tiny_run: Path):
    torch.set_num_threads(1)
    cfg = ClickModelConfig(**SMALL, iterations=3, train_top_fraction=1.0, progressive=False)
    path, summary = train_click_model(tiny_run, cfg, progress=False)
    assert path == tiny_run / "click_model" / "model.pt" and path.is_file()
    assert summary["objects"] == 3 and summary["iterations"] == 3
    decoder, payload = load_click_model(path)
    assert payload["crop_size"] == 32 and payload["encoder_path"] == "generator/model.pt"
    assert sorted(payload["extra"]["train_ann_ids"]) == [1, 2, 3] and decoder.config == cfg

    pred = ClickPredictor.from_workdir(tiny_run)
    pred.prepare(1)
    assert 1 in pred.cache and pred.features(1).tokens.shape == (16, 32) and pred.features(1).grid == (4, 4)
    h, w = 48, 64
    prev = np.zeros((h, w), bool)
    prev[0:3, 60:64] = True  # far outside object 1's window: must survive
    prev[15:25, 15:25] = True
    out = pred.predict(1, [(20.0, 20.0, True)], prev)
    assert out.shape == (h, w) and out.dtype == bool
    assert out[20, 20]  # enforce_clicks: the clicked spot takes the click's label
    win = pred.objects[1].window
    outside = np.ones((h, w), bool)
    outside[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width] = False
    assert np.array_equal(out[outside], prev[outside])
    assert np.array_equal(pred.predict(1, [(20.0, 20.0, True)], prev), out)  # deterministic
    assert np.array_equal(pred.predict(1, [], prev), prev)
    assert not pred.predict(2, [(45.0, 30.0, True)], None)[outside_of(pred.objects[2].window, h, w)].any()

    pred.progressive = True
    prog = pred.predict(1, [(20.0, 20.0, True), (18.0, 18.0, False)], out)
    assert prog.shape == (h, w) and not prog[18, 18] and prog[20, 20]
    assert np.array_equal(prog[outside], prev[outside])
    pred.cache.capacity = 2
    for a in (1, 2, 3):
        pred.prepare(a)
    assert len(pred.cache) == 2 and 1 not in pred.cache
    with pytest.raises(KeyError):
        pred.prepare(999)


def outside_of(win: CropWindow, h: int, w: int) -> np.ndarray:
    m = np.ones((h, w), bool)
    m[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width] = False
    return m


def test_eval_json_and_commands(tiny_run: Path, tmp_path: Path):
    torch.set_num_threads(1)
    app = typer.Typer()
    app.command("train-clicks")(train_clicks_command)
    app.command("eval-clicks")(eval_clicks_command)
    runner = CliRunner()
    res = runner.invoke(app, ["train-clicks", "--workdir", str(tiny_run), "--iterations", "2",
                              "--set", "dim=16", "--set", "heads=2", "--set", "batch_size=2",
                              "--set", "pool_sizes=[1, 2]", "--set", "train_top_fraction=0.5",
                              "--set", "train_source=pseudo"])
    assert res.exit_code == 0, res.output
    assert (tiny_run / "click_model" / "model.pt").is_file()
    from exits.spotfix.editors import DEFAULT_EDITOR, editor_from_eval, resolve_editor

    kind, why = resolve_editor("auto", tiny_run)  # a click model, but nothing measured it yet
    assert kind == DEFAULT_EDITOR == "clicks" and "eval-clicks" in why  # the measured default: GrabCut from click 8
    bad = runner.invoke(app, ["train-clicks", "--workdir", str(tiny_run), "--set", "nope=1"])
    assert bad.exit_code != 0 and "nope" in bad.output

    gt = json.loads((tiny_run / "run.json").read_text())["annotations"]
    out = tmp_path / "eval.json"
    result = run_eval_clicks(tiny_run, gt, out_path=out, max_clicks=3, exclude_trained=False)
    saved = json.loads(out.read_text())
    assert saved["ann_ids"] == result["ann_ids"] and len(saved["ann_ids"]) == 3
    for protocol in ("scratch", "pseudo"):
        for method in ("click_model", "grabcut"):
            m = saved["protocols"][protocol][method]
            assert m["objects"] == 3 and 0 <= m["NoC@90"] <= 3 and 0 <= m["NoF@90"] <= 3
    assert saved["protocols"]["scratch"]["grabcut"]["mIoU@0"] == 0.0
    assert saved["protocols"]["pseudo"]["click_model"]["mIoU@0"] > 0.5  # dilated GT as the start
    # The run's own measurement, where eval-clicks writes it by default, now decides `auto`.
    (tiny_run / "click_model" / "eval_clicks.json").write_text(json.dumps(saved))
    kind, why = resolve_editor("auto", tiny_run)
    assert (kind, why) == editor_from_eval(saved) and "this run's eval-clicks" in why
    res = runner.invoke(app, ["eval-clicks", "--workdir", str(tiny_run), "--gt", gt, "--out", str(out),
                              "--max-clicks", "2", "--protocol", "pseudo", "--no-grabcut"])
    assert res.exit_code == 0, res.output
    assert list(json.loads(out.read_text())["protocols"]["pseudo"]) == ["click_model"]


def test_grabcut_from_clicks_segments_a_colour_disk():
    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 30) ** 2 + (xx - 40) ** 2 <= 12 ** 2
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 2] = 160 + rng.integers(0, 40, (h, w))
    img[disk] = [200, 40, 40]
    win = CropWindow(20, 10, 40, 40, size=32)
    prev = np.zeros((h, w), bool)
    prev[0:3, 0:3] = True  # outside the window: kept
    out = grabcut_from_clicks(img, [(40.0, 30.0, True), (22.0, 12.0, False)], win, None, box=np.array([28, 18, 52, 42]))
    assert mask_iou(out, disk) > 0.9
    out2 = grabcut_from_clicks(img, [(40.0, 30.0, True)], win, prev)
    assert out2[0:3, 0:3].all() and not out2[outside_of(win, h, w) & ~prev].any()


def test_spotfix_page_answers_clicks_with_the_click_model(tiny_run: Path):
    """The web app end to end with the real click model (not GrabCut): no model -> a clear
    error naming `exits train-clicks`; trained -> a click returns a full-image mask, and an
    accepted decision lands in the fixes store."""
    from fastapi.testclient import TestClient
    from pycocotools import mask as mask_utils

    from exits.spotfix.app import create_app
    from exits.spotfix.catalog import RunCatalog
    from exits.spotfix.editors import EditorUnavailable, load_editor
    from exits.spotfix.store import FixesStore

    torch.set_num_threads(1)
    catalog = RunCatalog.load(tiny_run, None)
    with pytest.raises(EditorUnavailable, match="exits train-clicks"):
        load_editor("clicks", tiny_run, catalog, device="cpu")
    train_click_model(tiny_run, ClickModelConfig(**SMALL, iterations=2, train_top_fraction=1.0), progress=False)
    editor = load_editor("clicks", tiny_run, catalog, device="cpu")
    client = TestClient(create_app(tiny_run, editor, catalog=catalog, editor_name="clicks"), base_url="http://127.0.0.1")
    worst = client.get("/api/queue").json()["items"][0]
    assert worst["score"] == pytest.approx(0.7)  # lowest score first (0.9, 0.8, 0.7)
    obj = client.get(f"/api/objects/{worst['ann_id']}").json()
    clicks = [{"x": 30.0, "y": 24.0, "positive": True}]
    res = client.post(f"/api/objects/{worst['ann_id']}/predict", json={"clicks": clicks})
    assert res.status_code == 200, res.text
    rle = res.json()["mask"]["rle"]
    mask = mask_utils.decode(rle)
    assert mask.shape == (obj["height"], obj["width"]) == (48, 64)
    assert mask[24, 30] == 1  # enforce_clicks: a positive click's pixel is foreground
    res = client.post(f"/api/objects/{worst['ann_id']}/decision",
                      json={"decision": "accept", "clicks": clicks, "rle": rle, "base": "pseudo"})
    assert res.status_code == 200, res.text
    latest = FixesStore(tiny_run).latest()
    assert latest[worst["ann_id"]].decision == "accept" and latest[worst["ann_id"]].rle["counts"] == rle["counts"]
