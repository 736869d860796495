"""Issue 28 item 5: click training out of domain and built like inference.

- the generated training objects can come from the other demo variant's photographs;
- simulated rounds pass the decoder's probabilities through the inference click constraint;
- ``grabcut_mix`` mixes GrabCut's answer to the same clicks into the probabilities.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exits.data.crops import CropWindow
from exits.demo.sources import DEMO_SOURCES, HOLDOUT_SOURCES
from exits.interactive.clicks import click_label_map
from exits.interactive.config import ClickModelConfig
from exits.interactive.constrain import constrain_clicks
from exits.interactive.grabcut import grabcut_from_clicks
from exits.interactive.metrics import mask_iou
from exits.interactive.predictor import ClickPredictor
from exits.interactive.synthetic import synthetic_training_json
from exits.interactive.train import simulated_answer, train_click_model
from tests.test_interactive_train import SMALL, tiny_run  # noqa: F401  (fixture)


def test_synthetic_objects_from_the_other_variants_photographs(tmp_path: Path):
    names = {}
    for variant in ("demo", "holdout"):
        json_path, images = synthetic_training_json(tmp_path, n_objects=2, seed=5, variant=variant)
        data = json.loads(json_path.read_text())
        assert images.is_dir() and len(data["annotations"]) >= 2
        names[variant] = {c["name"] for c in data["categories"]}
        assert data["info"].get("variant", variant) == variant
    assert names["demo"] == set(DEMO_SOURCES.categories)
    assert names["holdout"] == set(HOLDOUT_SOURCES.categories)
    assert not names["demo"] & names["holdout"]
    # cached per variant: asking again returns the same folder, not the other variant's
    again, _ = synthetic_training_json(tmp_path, n_objects=2, seed=5, variant="holdout")
    assert again.parent.name.startswith("holdout_") and again.parent != json_path.parent.with_name("seed5_img9")
    with pytest.raises(ValueError, match="synthetic_variant"):
        ClickModelConfig(synthetic_variant="other")


def _disk_scene(s: int = 48):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:s, :s]
    target = (yy - 24) ** 2 + (xx - 22) ** 2 <= 12 ** 2
    img = rng.uniform(0.0, 0.25, (3, s, s))
    img[:, target] = np.array([0.9, 0.8, 0.2])[:, None]
    # a decoder that found only the left half of the object, unsure elsewhere
    prob = np.full((s, s), 0.3, np.float32)
    prob[target & (xx < 22)] = 0.9
    return torch.tensor(img, dtype=torch.float32), target, prob


def test_simulated_rounds_build_the_previous_mask_like_inference():
    crop, target, prob = _disk_scene()
    clicks = [(30.0, 24.0, True)]
    cfg = ClickModelConfig(constraint="crf")
    kernels: dict = {}
    got = simulated_answer(prob, crop, clicks, cfg, kernels, 0)
    want = constrain_clicks(prob, crop, clicks, cfg.disk_radius, method="crf", iters=cfg.crf_iters, sxy=cfg.crf_sxy,
                            srgb=cfg.crf_srgb, weight=cfg.crf_w, colour=cfg.crf_colour, max_size=cfg.crf_max_size)
    assert np.array_equal(got, want) and 0 in kernels  # the predictor's answer, kernels kept per crop
    assert np.array_equal(simulated_answer(prob, crop, clicks, cfg, kernels, 0), got)  # cached kernels: same answer
    old = simulated_answer(prob, crop, clicks, cfg.replace(sim_constraint=False), {}, 0)
    labels = click_label_map(clicks, prob.shape, cfg.disk_radius)
    assert np.array_equal(old, np.where(labels != 0, labels > 0, prob > 0.5))  # the rule before issue 28
    # what the decoder is then fed differs: the constrained answer fills the clicked half
    assert mask_iou(got, target) > mask_iou(old, target) + 0.2
    assert got[24, 30] and old[24, 30]


def test_grabcut_mix_adds_grabcuts_answer_to_the_probabilities(tiny_run: Path):  # noqa: F811
    torch.set_num_threads(1)
    cfg = ClickModelConfig(**SMALL, iterations=2, train_top_fraction=1.0)
    train_click_model(tiny_run, cfg, progress=False)
    pred = ClickPredictor.from_workdir(tiny_run)
    f = pred.features(1)
    info = pred.objects[1]
    win = info.window
    image = f.window_image
    h, w = image.shape[-2:]
    clicks = [(20.0 - win.x0, 20.0 - win.y0, True)]
    prob = np.full((h, w), 0.2, np.float32)
    rgb = np.ascontiguousarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pts = info.extreme_points - np.array([win.x0, win.y0])
    box = np.array([pts[1, 0], pts[0, 1], pts[3, 0], pts[2, 1]])
    grab = grabcut_from_clicks(rgb, clicks, CropWindow(0, 0, w, h, size=win.size), None, box=box, radius=2.0)
    for mix in (1.0, 0.5):
        pred.decoder.config = pred.decoder.config.replace(grabcut_mix=mix)
        got = pred._mix_grabcut(f, prob, clicks, None, 2.0, image)
        assert got.shape == (h, w)
        np.testing.assert_allclose(got, (1 - mix) * prob + mix * grab.astype(np.float32), atol=1e-6)
    # end to end: clicks kept, outside the window the previous mask unchanged
    prev = np.zeros(info.image_size, bool)
    prev[0:3, 60:64] = True
    out = pred.predict(1, [(20.0, 20.0, True), (win.x0 + 1.0, win.y0 + 1.0, False)], prev)
    assert out[20, 20] and not out[win.y0 + 1, win.x0 + 1] and out[0:3, 60:64].all()
    pred.decoder.config = pred.decoder.config.replace(grabcut_mix=0.0)
    base = pred.predict(1, [(20.0, 20.0, True)], None)
    pred.sessions = type(pred.sessions)(objects=4)
    assert np.array_equal(pred.predict(1, [(20.0, 20.0, True)], None), base)


def test_grabcut_after_hands_later_clicks_to_grabcut(tiny_run: Path):  # noqa: F811
    torch.set_num_threads(1)
    train_click_model(tiny_run, ClickModelConfig(**SMALL, iterations=2, train_top_fraction=1.0), progress=False)
    pred = ClickPredictor.from_workdir(tiny_run)
    info = pred.objects[1]
    win = info.window
    first = [(20.0, 20.0, True)]
    both = first + [(float(win.x0 + 2), float(win.y0 + 2), False)]
    plain_first = pred.predict(1, first, None)
    pred.decoder.config = pred.decoder.config.replace(grabcut_after=2)
    pred.sessions = type(pred.sessions)(objects=4)
    after_first = pred.predict(1, first, None)
    assert np.array_equal(after_first, plain_first)  # below N clicks: the click model's answer
    second = pred.predict(1, both, after_first)
    # from the N-th click: GrabCut on the window, started from the previous answer, clicks kept
    f = pred.features(1)
    rgb = np.ascontiguousarray((f.window_image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    radius = pred.decoder.config.disk_radius * max(win.width, win.height) / win.size
    uv = [(x - win.x0, y - win.y0, p) for x, y, p in both]
    prev_local = after_first[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width]
    pts = info.extreme_points - np.array([win.x0, win.y0])
    box = np.array([pts[1, 0], pts[0, 1], pts[3, 0], pts[2, 1]])
    grab = grabcut_from_clicks(rgb, uv, CropWindow(0, 0, win.width, win.height, size=win.size), prev_local, box=box,
                               radius=radius)
    inside = second[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width]
    labels = click_label_map(uv, grab.shape, radius)
    assert np.array_equal(inside[labels == 0], grab[labels == 0])
    assert second[20, 20] and not second[win.y0 + 2, win.x0 + 2]
