"""The click model's paper parts: IAM coarse -> zoom -> paste, the click constraint (dense
CRF with hard clicks), PEM / diversified heads (training only), PDM / FDM, the decaying
click-round distribution, the carried state in the predictor and the synthetic source."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exits.interactive.clicks import click_label_map
from exits.interactive.config import ClickModelConfig
from exits.interactive.constrain import constrain_clicks, crf_with_clicks
from exits.interactive.decoder import ClickDecoder, PassOutput
from exits.interactive.diffusion import FeatureDiffusion, PixelDiffusion
from exits.interactive.inference import build_inputs
from exits.interactive.losses import click_loss
from exits.interactive.pem import PrototypeLoss, masked_average
from exits.interactive.predictor import ClickPredictor
from exits.interactive.session import ClickSessions
from exits.interactive.train import sample_rounds, training_loss
from exits.interactive.zoom import paste_roi_logits, roi_resample, zoom_box
from tests.test_interactive_train import tiny_run  # noqa: F401  (fixture)

S = 32
SMALL = dict(dim=16, heads=2, pool_sizes=(1, 2), train_source="pseudo")


def _two_parts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-part target: part A (top left) and a separated part B (bottom right)."""
    a = np.zeros((S, S), bool)
    a[3:10, 3:10] = True
    b = np.zeros((S, S), bool)
    b[24:30, 24:30] = True
    return a | b, a, b


def test_iam_adds_a_part_outside_the_roi():
    """Previous mask = part A, a positive click on A: the RoI of the previous mask and the
    clicks misses part B. A coarse pass that finds B (toy: it returns the target) puts B in
    the output; the old scheme (outside the RoI = previous mask) could not."""
    target, part_a, part_b = _two_parts()
    click = (6.0, 6.0, True)
    old_roi = zoom_box(part_a, np.array([[6.0, 6.0]]), S, 1.4, 0.25)
    cols, rows = np.arange(S) + 0.5, np.arange(S) + 0.5
    in_old = (rows[:, None] >= old_roi[1]) & (rows[:, None] <= old_roi[3]) & (cols >= old_roi[0]) & (cols <= old_roi[2])
    assert not (in_old & part_b).any()  # precondition: B lies outside the old RoI

    cfg = ClickModelConfig(**SMALL, zoom_min_fraction=0.25, use_pdm=False)
    dec = ClickDecoder(cfg, embed_dim=8).eval()
    target_logits = torch.from_numpy(np.where(target, 6.0, -6.0).astype(np.float32))[None, None]
    seen_boxes = []

    def toy_pass(feat, image, maps, clicks, valid, boxes, z, image_z=None, pdm_weights=None, **_edge):  # the target, whatever the region
        full = boxes is None
        if full:
            boxes = torch.tensor([[0.0, 0.0, float(S), float(S)]])
        seen_boxes.append(boxes.clone())
        logits = target_logits if full else roi_resample(target_logits, boxes, S, (z, z))
        return PassOutput(logits=logits, boxes=boxes, features=torch.zeros(1, 4, z // 2, z // 2), latent=None,
                          disks=torch.zeros(1, 2, z, z))

    dec.decode_pass = toy_pass
    maps, pts, valid = build_inputs([[click]], [part_a], S, 2.0, "cpu")
    out = dec.forward_all(torch.randn(1, 16, 8), (4, 4), torch.rand(1, 3, S, S), maps, pts, valid)
    final = out.logits[0, 0].numpy() > 0
    assert final[part_b].all() and final[part_a].all()
    assert len(seen_boxes) == 2 and seen_boxes[1][0, 2] > 28  # the RoI now comes from the coarse pass
    # The previous design: refinement inside the old RoI, the previous mask outside -> B lost.
    old = paste_roi_logits(roi_resample(target_logits, torch.tensor([old_roi], dtype=torch.float32), S, (S, S)),
                           torch.tensor([old_roi], dtype=torch.float32), S,
                           torch.from_numpy(np.where(part_a, 8.0, -8.0).astype(np.float32))[None, None])
    assert not (old[0, 0].numpy() > 0)[part_b].any()


def test_refinement_loss_is_restricted_to_the_roi():
    cfg = ClickModelConfig(**SMALL, use_pem=False, latent_heads=0)
    dec = ClickDecoder(cfg, embed_dim=8).train()
    target, part_a, _ = _two_parts()
    maps, pts, valid = build_inputs([[(6.0, 6.0, True)]], [part_a], S, 2.0, "cpu")
    out = dec.forward_all(torch.randn(1, 16, 8), (4, 4), torch.rand(1, 3, S, S), maps, pts, valid)
    tgt = torch.from_numpy(target)[None]
    loss, terms = training_loss(out, tgt, cfg)
    t_roi = roi_resample(tgt[:, None].float(), out.refine.boxes, S, (S, S))[:, 0] >= 0.5
    expect_refine = click_loss(cfg.loss, out.refine.logits, t_roi, cfg.focal_gamma)
    expect_coarse = click_loss(cfg.loss, out.coarse.logits, tgt, cfg.focal_gamma)
    assert terms["refine"] == pytest.approx(float(expect_refine), rel=1e-5)
    assert float(loss) == pytest.approx(float(expect_coarse + expect_refine), rel=1e-5)


def test_crf_spreads_click_labels_along_colour():
    """Decoder unsure everywhere (p = 0.45); a positive click in a red square and a
    negative one in the blue background: the CRF labels the square fg and the rest bg."""
    img = np.zeros((40, 40, 3), np.uint8)
    img[..., 2] = 200
    img[8:30, 8:30] = (220, 30, 30)
    prob = np.full((40, 40), 0.45, np.float32)
    labels = click_label_map([(18.0, 18.0, True), (35.0, 35.0, False)], (40, 40), 2.0)
    q = crf_with_clicks(prob, img, labels, iters=5, sxy=20.0, srgb=13.0, weight=10.0, colour=1.0)
    square = np.zeros((40, 40), bool)
    square[8:30, 8:30] = True
    assert (q[square] > 0.5).mean() > 0.95 and (q[~square] < 0.5).mean() > 0.95
    # without the colour term the clamped disk alone does not flip the unsure square
    q0 = crf_with_clicks(prob, img, labels, iters=5, sxy=20.0, srgb=13.0, weight=10.0, colour=0.0)
    assert (q0[square] > 0.5).mean() < 0.5


def test_grabcut_constraint_grows_the_decoder_mask_along_colour():
    """The decoder found only the left half of a red square; one positive click in the
    missed half: GrabCut from the decoder's mask takes the whole square and nothing else."""
    from exits.interactive.constrain import grabcut_with_clicks

    rng = np.random.default_rng(1)
    img = np.zeros((48, 48, 3), np.float32)
    img[..., 2] = 190
    img[10:38, 10:38] = (215, 35, 30)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    prob = np.full((48, 48), 0.1, np.float32)
    prob[10:38, 10:24] = 0.9
    square = np.zeros((48, 48), bool)
    square[10:38, 10:38] = True
    labels = click_label_map([(31.0, 24.0, True)], (48, 48), 2.0)
    q = grabcut_with_clicks(prob, img, labels, iters=3) > 0.5
    assert (q == square).mean() > 0.97 and (prob >= 0.5)[square].mean() < 0.55
    assert not grabcut_with_clicks(np.zeros((48, 48), np.float32), img, np.zeros((48, 48), np.int8)).any()


@pytest.mark.parametrize("method", ["crf", "grabcut", "disk"])
def test_constrain_clicks_keeps_every_disk(method):
    rng = np.random.default_rng(0)
    prob = rng.random((48, 48)).astype(np.float32)
    clicks = [(float(rng.integers(48)), float(rng.integers(48)), bool(rng.random() < 0.5)) for _ in range(8)]
    out = constrain_clicks(prob, torch.rand(3, 48, 48), clicks, 2.0, method=method)
    labels = click_label_map(clicks, (48, 48), 2.0)
    assert out[labels > 0].all() and not out[labels < 0].any()
    assert np.array_equal(constrain_clicks(prob, torch.rand(3, 48, 48), clicks, 2.0, method="none"), prob >= 0.5)


def test_constrain_clicks_on_a_rectangle_keeps_disks_and_shape():
    """The window at the image's own pixels is not square: same contract as the crop."""
    rng = np.random.default_rng(3)
    prob = rng.random((30, 52)).astype(np.float32)
    clicks = [(float(rng.integers(52)), float(rng.integers(30)), bool(rng.random() < 0.5)) for _ in range(6)]
    for max_size in (256, 20):  # at its size, and refined at 20 px on the long side then upsampled
        out = constrain_clicks(prob, torch.rand(3, 30, 52), clicks, 2.0, method="crf", max_size=max_size)
        labels = click_label_map(clicks, (30, 52), 2.0)
        assert out.shape == (30, 52) and out[labels > 0].all() and not out[labels < 0].any()


class _IgnoresClicks(ClickDecoder):
    """A toy decoder that ignores the clicks: the same confident logit everywhere."""

    logit = -6.0

    def forward(self, tokens, grid, image, maps, clicks, valid, static=None):  # noqa: D102
        return torch.full((image.shape[0], 1, image.shape[-1], image.shape[-1]), self.logit)


@pytest.mark.parametrize("constraint,resolution", [("crf", "crop"), ("crf", "window"), ("grabcut", "crop"),
                                                   ("grabcut", "window"), ("disk", "crop"), ("none", "crop")])
def test_clicked_disk_keeps_its_label_with_a_decoder_that_ignores_clicks(tiny_run: Path, constraint,  # noqa: F811
                                                                         resolution):
    from exits.interactive.predictor import read_objects
    from exits.models.factory import load_mask_model

    cfg = ClickModelConfig(**SMALL, constraint=constraint, progressive=False, crf_resolution=resolution)
    encoder = load_mask_model(tiny_run / "generator" / "model.pt")
    dec = _IgnoresClicks(cfg, embed_dim=32)
    pred = ClickPredictor(dec, encoder, read_objects(tiny_run, 32), tiny_run.parent / "data" / "images")
    win = pred.objects[1].window
    x, y = win.x0 + win.width / 2, win.y0 + win.height / 2
    out = pred.predict(1, [(x, y, True)], None)
    radius = cfg.disk_radius * max(win.width, win.height) / win.size
    yy, xx = np.mgrid[:out.shape[0], :out.shape[1]]
    disk = (xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2
    if constraint == "none":
        assert not out.any()  # the plain decoder loses the click
    else:
        assert out[disk].all()
    dec.logit = 6.0  # now it says foreground everywhere, and the user clicks background
    out_neg = pred.predict(1, [(x, y, False)], None)
    assert out_neg[disk].all() if constraint == "none" else not out_neg[disk].any()


class _FixedProb(ClickDecoder):
    """A toy decoder whose answer is a fixed crop probability map, whatever the clicks."""

    prob: torch.Tensor

    def forward(self, tokens, grid, image, maps, clicks, valid, static=None):  # noqa: D102
        return torch.logit(self.prob.clamp(1e-4, 1 - 1e-4))[None, None].expand(image.shape[0], 1, -1, -1)


def test_window_resolution_constraint_recovers_detail_the_crop_cannot_hold():
    """A comb of 5-px red stripes on blue, seen through a 32-px crop of a 140-px window (4.4
    image px per crop px): the crop is near purple where the comb is, the decoder says ~0.5 there.
    The constraint at the window's own pixels separates stripes from gaps by colour; at the
    crop's resolution it cannot (crf_resolution window vs crop)."""
    from types import SimpleNamespace

    from exits.data.crops import CropWindow, crop_images
    from exits.interactive.features import FeatureCache, ObjectFeatures
    from exits.interactive.predictor import ObjectInfo

    rng = np.random.default_rng(0)
    h = w = 160
    gt = np.zeros((h, w), bool)
    cols = np.arange(40, 121)
    gt[40:121, cols[((cols - 40) // 5) % 2 == 0]] = True
    img = np.zeros((h, w, 3), np.float32)
    img[..., 2] = 0.75
    img[gt] = (0.85, 0.15, 0.1)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)
    image = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    win = CropWindow(x0=10, y0=10, width=140, height=140, size=32)
    crop = crop_images(image, [win])[0].clamp(0, 1)
    prob = crop_images(torch.from_numpy(gt.astype(np.float32))[None], [win])[0, 0]
    feats = ObjectFeatures(ann_id=1, window=win, image_size=(h, w), tokens=torch.zeros(16, 8), grid=(4, 4), crop=crop,
                           window_image=image[:, 10:150, 10:150].contiguous())
    clicks = [(42.0, 80.0, True), (47.0, 80.0, False)]  # one stripe, the gap next to it (disks of ~1 px)
    iou = {}
    for resolution in ("crop", "window"):
        cfg = ClickModelConfig(**SMALL, constraint="crf", progressive=False, crf_resolution=resolution, crf_max_size=256,
                               disk_radius=0.25)
        dec = _FixedProb(cfg, embed_dim=8)
        dec.prob = prob
        encoder = SimpleNamespace(img_size=32, to=lambda *_: encoder, eval=lambda: encoder)
        pred = ClickPredictor(dec, encoder, {1: ObjectInfo("x.png", win, (h, w), np.zeros((4, 2)))}, Path("."))
        pred.cache = FeatureCache(4)
        pred.cache.get(1, lambda: feats)
        out = pred.predict(1, clicks, None)
        iou[resolution] = (out & gt).sum() / (out | gt).sum()
    assert iou["window"] > 0.85 and iou["window"] > iou["crop"] + 0.2, iou


def test_pem_and_latent_heads_change_nothing_at_inference():
    on = ClickModelConfig(**SMALL, use_pem=True, latent_heads=3)
    off = on.replace(use_pem=False, latent_heads=0)
    dec_on = ClickDecoder(on, embed_dim=8).eval()
    dec_off = ClickDecoder(off, embed_dim=8).eval()
    missing, unexpected = dec_off.load_state_dict(dec_on.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("latent_heads.") for k in unexpected)
    maps, pts, valid = build_inputs([[(10.0, 12.0, True), (25.0, 20.0, False)]], [None], S, 2.0, "cpu")
    tokens, image = torch.randn(1, 16, 8), torch.rand(1, 3, S, S)
    with torch.no_grad():
        a = dec_on.forward_all(tokens, (4, 4), image, maps, pts, valid)
        b = dec_off.forward_all(tokens, (4, 4), image, maps, pts, valid)
    assert torch.equal(a.logits, b.logits) and a.refine.latent is None
    dec_on.train()
    assert dec_on.forward_all(tokens, (4, 4), image, maps, pts, valid).refine.latent.shape == (1, 3, S, S)
    assert not any("prototype" in k for k in PrototypeLoss(4).state_dict())  # PEM never enters a model file


def test_pem_loss_prototype_ema_and_value():
    torch.manual_seed(0)
    pem = PrototypeLoss(4, beta=0.01, tau=0.1)
    feat = torch.randn(2, 4, 8, 8)
    tgt = torch.zeros(2, 8, 8, dtype=torch.bool)
    tgt[:, 2:6, 2:6] = True
    pem(feat, tgt)
    first = masked_average(feat, tgt[:, None].float()).mean(0)
    assert torch.allclose(pem.prototype, first, atol=1e-6)  # first batch: the batch prototype itself
    feat2 = torch.randn(2, 4, 8, 8)
    pem(feat2, tgt)
    expect = 0.01 * masked_average(feat2, tgt[:, None].float()).mean(0) + 0.99 * first
    assert torch.allclose(pem.prototype, expect, atol=1e-6)
    # features equal to +-prototype directions give a near-zero loss, scrambled ones do not
    proto = torch.tensor([1.0, 0, 0, 0])
    clean = torch.where(tgt[:, None], proto[None, :, None, None], -proto[None, :, None, None])
    assert float(PrototypeLoss(4)(clean, tgt)) < 1e-3
    assert float(PrototypeLoss(4)(torch.randn(2, 4, 8, 8), tgt)) > 0.1


def test_latent_min_term_picks_the_best_head_per_image():
    cfg = ClickModelConfig(**SMALL, latent_heads=3, use_pem=False, use_zoom=False)
    dec = ClickDecoder(cfg, embed_dim=8).train()
    maps, pts, valid = build_inputs([[(6.0, 6.0, True)], [(26.0, 26.0, True)]], [None, None], S, 2.0, "cpu")
    out = dec.forward_all(torch.randn(2, 16, 8), (4, 4), torch.rand(2, 3, S, S), maps, pts, valid)
    tgt = torch.from_numpy(_two_parts()[0])[None].expand(2, -1, -1)
    # Head 0 is right on image 0 only, head 1 on image 1 only, head 2 on neither: the per-image
    # minimum is small while every head's batch mean is large (a min over heads of the batch
    # mean, the wrong reduction, would be large too).
    right = torch.where(tgt, 8.0, -8.0).float()
    latent = torch.stack([torch.stack([right[0], -right[0], -right[0]]), torch.stack([-right[1], right[1], -right[1]])])
    with torch.no_grad():
        out.coarse.latent.copy_(latent)
    _, terms = training_loss(out, tgt, cfg)
    per = torch.stack([click_loss(cfg.loss, out.coarse.latent[:, h:h + 1], tgt, reduction="none") for h in range(3)], 1)
    assert terms["latent_min"] == pytest.approx(float(per.detach().min(1).values.mean()), rel=1e-5)
    assert terms["latent_min"] < 0.25 * float(per.mean(0).min())


def test_pdm_keeps_sources_and_stops_at_colour_edges():
    pdm = PixelDiffusion(10)
    img = torch.zeros(1, 3, 16, 16)
    img[:, 0, :, 8:] = 1.0  # red right half
    logits = torch.zeros(1, 1, 16, 16)
    disks = torch.zeros(1, 2, 16, 16)
    disks[0, 0, 7:9, 2:4] = 1  # positive click on the left half
    disks[0, 1, 7:9, 12:14] = 1  # negative click on the right half
    with torch.no_grad():
        out = pdm(logits, img, disks)[0, 0]
    assert (out[:, :8] > 0).float().mean() > 0.9 and (out[:, 8:] < 0).float().mean() > 0.9
    gain = float(torch.nn.functional.softplus(pdm.source_gain))
    assert torch.allclose(out[7:9, 2:4], torch.full((2, 2), gain))  # sources keep l0


def test_pdm_affinity_has_no_denormals_and_matches_the_plain_softmax():
    """The logit floor keeps every weight a normal float32 (denormals slowed PDM ~3x) and
    changes the weights by far less than float32 resolves next to 1."""
    from exits.interactive.diffusion import _shift_views, neighbour_affinity

    img = torch.zeros(1, 3, 12, 12)
    img[:, :, :, 6:] = 1.0  # a hard edge: logits down to -300 at sigma 0.1
    sigma = torch.tensor(0.1)
    w = neighbour_affinity(img, 1, sigma)
    tiny = torch.finfo(torch.float32).tiny
    assert bool((w >= tiny).all())  # no denormal (nor zero) weight
    plain = torch.softmax(torch.cat([-((v - img) ** 2).sum(1, keepdim=True) / sigma ** 2
                                     for v in _shift_views(img, 1)], 1), dim=1)
    assert float((w - plain).abs().max()) < 1e-20 and torch.allclose(w.sum(1), torch.ones(1, 12, 12))


def test_fdm_is_identity_without_clicks_and_spreads_with_them():
    torch.manual_seed(0)
    fdm = FeatureDiffusion(8)
    torch.nn.init.normal_(fdm.out.weight)
    x = torch.randn(1, 16, 8)
    assert torch.allclose(fdm(x, torch.zeros(1, 2, 16)), x + fdm.out.bias, atol=1e-6)
    src = torch.zeros(1, 2, 16)
    src[0, 0, 3] = 1
    assert not torch.allclose(fdm(x, src), x + fdm.out.bias)


def test_click_rounds_decay_exponentially_up_to_20():
    rng = np.random.default_rng(0)
    draws = np.array([sample_rounds(rng, 20, 0.8) for _ in range(20000)])
    assert draws.min() == 0 and draws.max() <= 20
    freq = np.bincount(draws, minlength=21) / len(draws)
    expect = 0.8 ** np.arange(21) / (0.8 ** np.arange(21)).sum()
    assert np.allclose(freq[:6], expect[:6], atol=0.01)
    assert (draws >= 10).any()  # long sequences do occur
    assert set(np.unique([sample_rounds(rng, 3, 1.0) for _ in range(400)])) == {0, 1, 2, 3}  # decay 1: uniform


def test_sessions_carry_state_only_for_the_answered_sequence():
    sessions = ClickSessions(objects=2, per_object=4)
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    state = np.full((3, 3), 3, np.uint8)
    sessions.store(7, [(1.0, 1.0, True)], state, mask)
    assert sessions.lookup(7, [(1.0, 1.0, True), (2.0, 2.0, False)], mask) is state
    crop = np.ones((3, 3), bool)
    sessions.store(7, [(1.0, 1.0, True)], state, mask, crop)
    assert sessions.lookup_entry(7, [(1.0, 1.0, True), (2.0, 2.0, False)], mask) == (state, crop)
    assert sessions.lookup_entry(7, [(1.0, 1.0, True), (2.0, 2.0, False)], ~mask) == (None, None)
    assert sessions.lookup(7, [(1.0, 1.0, True), (2.0, 2.0, False)], ~mask) is None  # another mask
    assert sessions.lookup(7, [(0.0, 1.0, True), (2.0, 2.0, False)], mask) is None  # other clicks
    sessions.store(8, [], state, mask)
    sessions.store(9, [], state, mask)
    assert sessions.lookup(7, [(1.0, 1.0, True), (2.0, 2.0, False)], mask) is None  # evicted (LRU)


def test_synthetic_source_is_generated_and_never_the_runs(tiny_run: Path, tmp_path: Path):  # noqa: F811
    from exits.interactive.data import build_training_set

    ts = build_training_set(tiny_run, 32, source="synthetic", synthetic_objects=12, synthetic_seed=5,
                            synthetic_dir=tmp_path / "syn")
    assert 8 <= len(ts) <= 12 and all(a < 0 for a in ts.ann_ids)
    assert ts.crops.shape[1:] == (3, 32, 32) and ts.targets.flatten(1).any(1).all()
    again = build_training_set(tiny_run, 32, source="synthetic", synthetic_objects=12, synthetic_seed=5,
                               synthetic_dir=tmp_path / "syn")
    assert torch.equal(again.targets, ts.targets)  # cached, deterministic
    both = build_training_set(tiny_run, 32, source="pseudo+synthetic", top_fraction=1.0, synthetic_objects=12,
                              synthetic_seed=5, synthetic_dir=tmp_path / "syn")
    assert sorted(a for a in both.ann_ids if a > 0) == [1, 2, 3] and len(both) == len(ts) + 3


def test_cached_crf_kernels_give_the_fresh_crf_marginals_click_after_click():
    """The image-only lattice is built once per object; each click sets a new unary on it."""
    from exits.interactive.clicks import click_label_map
    from exits.interactive.constrain import CrfKernels

    rng = np.random.default_rng(0)
    img = torch.rand(3, 60, 80)
    kernels = CrfKernels(img, max_size=256, sxy=20.0, srgb=13.0, weight=10.0).prepare()
    for i in range(3):
        prob = rng.random((60, 80)).astype(np.float32)
        labels = click_label_map([(10.0 + 5 * i, 20.0, True), (50.0, 40.0, False)], (60, 80), 3.0)
        fresh = crf_with_clicks(prob, kernels.rgb, labels, iters=5, sxy=20.0 * 80 / 96, srgb=13.0, weight=10.0)
        assert np.array_equal(kernels.marginals(prob, labels, iters=5, colour=1.0), fresh)
        clicks = [(10.0 + 5 * i, 20.0, True)]
        assert np.array_equal(constrain_clicks(prob, img, clicks, 3.0, max_size=256, kernels=kernels),
                              constrain_clicks(prob, img, clicks, 3.0, max_size=256))
    with pytest.raises(ValueError, match="cached CRF kernels"):
        constrain_clicks(prob, img, clicks, 3.0, max_size=128, kernels=kernels)
