"""Decoder parts of the click model: shapes and invariants (I-MSA, SPM, SGC/GPA, IAM zoom,
progressive mode) and the full decoder with each part switched off."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from exits.interactive.attention import InteractiveAttentionBlock, PyramidPool
from exits.interactive.clicks import encode_click_maps
from exits.interactive.config import ClickModelConfig
from exits.interactive.decoder import ClickDecoder
from exits.interactive.inference import build_inputs
from exits.interactive.progressive import progressive_update
from exits.interactive.prototypes import gpa, maskslic_seeds, prototype_count, sgc_prototypes
from exits.interactive.spm import (SimilarityPropagation, cosine_similarity_map, max_min_click_vectors,
                                   sample_click_vectors)
from exits.interactive.zoom import paste_roi_logits, roi_points, roi_resample, zoom_box

torch.manual_seed(0)


def test_pyramid_pool_and_imsa_shapes_and_query_equivariance():
    pool = PyramidPool(16, (1, 2, 3))
    feat = torch.randn(2, 16, 6, 6)
    assert pool(feat).shape == (2, 1 + 4 + 9, 16)
    block = InteractiveAttentionBlock(16, 4, (1, 2, 3)).eval()
    x = torch.randn(2, 36, 16)
    out = block(x, feat)
    assert out.shape == (2, 36, 16)
    perm = torch.randperm(36)
    # queries attend independently to the same pooled keys: permuting queries permutes rows
    assert torch.allclose(block(x[:, perm], feat), out[:, perm], atol=1e-5)


def test_spm_similarity_and_selection_equal_brute_force():
    tokens = torch.randn(2, 10, 8)
    clicks = torch.randn(2, 3, 8)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    sim = cosine_similarity_map(tokens, clicks)
    for b in range(2):
        for n in range(10):
            for m in range(3):
                ref = torch.dot(tokens[b, n], clicks[b, m]) / (tokens[b, n].norm() * clicks[b, m].norm())
                assert sim[b, n, m] == pytest.approx(float(ref), abs=1e-5)
    f_max, f_min = max_min_click_vectors(sim, clicks, valid)
    for b in range(2):
        ok = [m for m in range(3) if valid[b, m]]
        for n in range(10):
            best = max(ok, key=lambda m: float(sim[b, n, m]))
            worst = min(ok, key=lambda m: float(sim[b, n, m]))
            assert torch.equal(f_max[b, n], clicks[b, best]) and torch.equal(f_min[b, n], clicks[b, worst])
    spm = SimilarityPropagation(8)
    assert spm(tokens, clicks, valid).shape == (2, 10, 8)
    assert torch.equal(spm(tokens, clicks, torch.zeros_like(valid)), tokens)  # no click: identity


def test_sample_click_vectors_hits_cell_centres():
    feat = torch.arange(16.0).reshape(1, 1, 4, 4)
    # a 4x4 grid over a 16x16 image: cell (r, c) centre is pixel (4c + 1.5, 4r + 1.5)
    pts = torch.tensor([[[1.5, 1.5], [13.5, 9.5]]])
    out = sample_click_vectors(feat, pts, (16, 16))
    assert out.shape == (1, 2, 1) and out[0, :, 0].tolist() == [0.0, 11.0]


def test_sgc_seeds_prototypes_and_gpa():
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    seeds = maskslic_seeds(mask, 3)
    assert len(seeds) == 3 and len({tuple(s) for s in seeds}) == 3 and all(mask[r, c] for r, c in seeds)
    assert prototype_count(16, 12, 4) == 2 and prototype_count(1000, 12, 4) == 4 and prototype_count(0, 12, 4) == 1
    v = torch.tensor([3.0, 4.0, 0.0])
    tokens = torch.randn(2, 36, 3)
    tokens[0, torch.from_numpy(mask.reshape(-1))] = v  # identical features in the mask
    masks = np.stack([mask, np.zeros_like(mask)])
    protos, valid = sgc_prototypes(tokens, (6, 6), masks, 12, 4, iters=5)
    assert protos.shape == (2, 2, 3) and valid.tolist() == [[True, True], [False, False]]
    assert torch.allclose(protos[0], (v / v.norm()).expand(2, 3), atol=1e-5)
    # batch independence: sample 0 alone gives the same prototypes
    alone, _ = sgc_prototypes(tokens[:1], (6, 6), masks[:1], 12, 4, iters=5)
    assert torch.allclose(alone[0], protos[0], atol=1e-6)
    guide, prob = gpa(tokens, protos, valid)
    assert guide.shape == (2, 36, 3) and prob.shape == (2, 36, 1)
    assert torch.equal(guide[1], torch.zeros(36, 3)) and torch.equal(prob[1], torch.zeros(36, 1))
    cos = torch.nn.functional.cosine_similarity(tokens[0][:, None], protos[0][None], dim=-1)
    assert torch.allclose(prob[0, :, 0], cos.mean(1), atol=1e-5)


def test_zoom_box_keeps_every_click_inside():
    rng = np.random.default_rng(1)
    for _ in range(50):
        prev = np.zeros((48, 48), bool)
        y0, x0 = rng.integers(0, 40, 2)
        prev[y0:y0 + rng.integers(1, 8), x0:x0 + rng.integers(1, 8)] = True
        clicks = rng.uniform(0, 47, (int(rng.integers(1, 5)), 2))
        bx0, by0, bx1, by1 = zoom_box(prev, clicks, 48, 1.4, 0.4)
        assert 0 <= bx0 < bx1 <= 48 and 0 <= by0 < by1 <= 48
        assert min(bx1 - bx0, by1 - by0) >= 0.4 * 48 - 1e-9
        assert (clicks[:, 0] >= bx0).all() and (clicks[:, 0] + 1 <= bx1 + 1e-9).all()
        assert (clicks[:, 1] >= by0).all() and (clicks[:, 1] + 1 <= by1 + 1e-9).all()
        rows, cols = np.nonzero(prev)
        assert cols.min() >= bx0 and cols.max() + 1 <= bx1 + 1e-9 and rows.min() >= by0
        uv = roi_points(torch.tensor(clicks[None], dtype=torch.float32), torch.tensor([[bx0, by0, bx1, by1]]), 32)
        assert (uv >= -0.5 - 1e-4).all() and (uv <= 31.5 + 1e-4).all()  # inside the zoomed image
    assert zoom_box(None, np.zeros((0, 2)), 48, 1.4, 0.4).tolist() == [0, 0, 48, 48]


def test_roi_resample_and_paste_identity_and_outside():
    maps = torch.randn(2, 3, 16, 16)
    full = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    assert torch.allclose(roi_resample(maps, full, 16, (16, 16)), maps, atol=1e-5)
    logits = torch.randn(2, 1, 16, 16)
    outside = torch.full((2, 1, 16, 16), -8.0)
    assert torch.allclose(paste_roi_logits(logits, full, 16, outside), logits, atol=1e-5)
    half = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    pasted = paste_roi_logits(torch.zeros(2, 1, 4, 4), half, 16, outside)
    assert (pasted[:, :, :8, :8] == 0).all() and (pasted[:, :, 8:, :] == -8).all() and (pasted[:, :, :, 8:] == -8).all()


def test_progressive_changes_only_the_touched_region():
    prev = np.zeros((20, 20), bool)
    prev[2:8, 2:8] = True
    pred = prev.copy()
    pred[2:8, 8:11] = True  # grows next to the click
    pred[15:18, 15:18] = True  # unrelated new blob far away
    pred[2:4, 2:4] = False  # unrelated removal
    out = progressive_update(prev, pred, (9.0, 4.0, True), radius=1.0)
    touched = np.zeros_like(prev)
    touched[2:8, 8:11] = True
    assert np.array_equal(out[~touched], prev[~touched])
    assert np.array_equal(out[touched], pred[touched])
    assert np.array_equal(progressive_update(None, pred, (9.0, 4.0, True)), pred)
    assert np.array_equal(progressive_update(prev, prev, (9.0, 4.0, True)), prev)


@pytest.mark.parametrize("off", ["none", "use_imsa", "use_spm", "use_prototypes", "use_zoom", "use_fdm", "use_pdm"])
def test_decoder_shapes_with_each_part_off(off):
    cfg = ClickModelConfig(dim=32, heads=4, pool_sizes=(1, 2), **({} if off == "none" else {off: False}))
    dec = ClickDecoder(cfg, embed_dim=24).eval()
    tokens, crops = torch.randn(2, 16, 24), torch.rand(2, 3, 32, 32)
    prev = np.zeros((32, 32), bool)
    prev[8:20, 8:16] = True
    maps, pts, valid = build_inputs([[(10.0, 12.0, True)], [(12.0, 12.0, True), (25.0, 25.0, False)]],
                                    [None, prev], 32, 2.0, "cpu")
    with torch.no_grad():
        out = dec.forward_all(tokens, (4, 4), crops, maps, pts, valid)
    logits = out.logits
    assert logits.shape == (2, 1, 32, 32) and torch.isfinite(logits).all()
    if cfg.use_zoom:
        assert out.refine is not None
        for i in range(2):
            box = out.refine.boxes[i].tolist()
            cols = (np.arange(32) + 0.5 >= box[0]) & (np.arange(32) + 0.5 <= box[2])
            rows = (np.arange(32) + 0.5 >= box[1]) & (np.arange(32) + 0.5 <= box[3])
            outside = ~(rows[:, None] & cols[None, :])
            # IAM: outside the RoI the coarse whole-crop pass stays
            assert np.allclose(logits[i, 0].numpy()[outside], out.coarse.logits[i, 0].numpy()[outside])
    else:
        assert out.refine is None and torch.equal(logits, out.coarse.logits)
    names = {n.split(".")[0] for n, _ in dec.named_parameters()}
    part = {"use_imsa": "imsa", "use_spm": "spm", "use_prototypes": "prototypes", "use_fdm": "fdm",
            "use_pdm": "pdm"}.get(off)
    if part:
        assert part not in names


def test_decoder_large_crop_is_capped():
    cfg = ClickModelConfig(dim=32, heads=4, pool_sizes=(1, 2), decode_size=64, max_grid=8)
    dec = ClickDecoder(cfg, embed_dim=16).eval()
    maps = encode_click_maps([(60.0, 70.0, True)], None, (128, 128), 3.0)[None]
    pts = torch.tensor([[[60.0, 70.0, 1.0]]])
    with torch.no_grad():
        out = dec(torch.randn(1, 256, 16), (16, 16), torch.rand(1, 3, 128, 128), maps, pts, torch.ones(1, 1, dtype=torch.bool))
    assert out.shape == (1, 1, 128, 128) and torch.isfinite(out).all()


def test_maskslic_seeds_match_recomputed_distance_transforms():
    """One distance transform updated with min(D, |x - p|) picks the same seeds as
    recomputing the transform after each seed (the paper's MaskSLIC loop)."""
    from scipy import ndimage

    def brute(mask, k):
        remaining, seeds = mask.copy(), []
        for _ in range(min(k, int(remaining.sum()))):
            dist = ndimage.distance_transform_edt(np.pad(remaining, 1))[1:-1, 1:-1]
            r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
            seeds.append((r, c))
            remaining[r, c] = False
        return seeds

    rng = np.random.default_rng(3)
    for _ in range(30):
        mask = ndimage.binary_dilation(rng.random((12, 12)) < 0.15, iterations=int(rng.integers(0, 3)))
        assert [tuple(s) for s in maskslic_seeds(mask, 4)] == brute(mask, 4)


def test_head_logits_equal_the_concatenated_head():
    """1x1 conv before up-sampling == the head on [up(feats), low] (linearity)."""
    dec = ClickDecoder(ClickModelConfig(dim=32, heads=4, pool_sizes=(1, 2)), embed_dim=16)
    feats, low = torch.randn(2, dec.head_channels, 10, 10), torch.randn(2, 8, 20, 20)
    up = torch.nn.functional.interpolate(feats, size=(20, 20), mode="bilinear", align_corners=False)
    expect = dec.fuse(torch.cat([up, low], dim=1))
    assert torch.allclose(ClickDecoder._head_logits(dec.fuse, feats, low, 20), expect, atol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_map_frame_maps_are_block_means_of_the_crop_maps(k):
    from exits.interactive.inference import map_frame

    s = 64
    yy, xx = np.mgrid[:s, :s]
    prev = (yy - 30) ** 2 + (xx - 25) ** 2 <= 15 ** 2
    clicks = [(25.0, 30.0, True), (50.3, 12.7, False), (26.0, 31.0, False)]
    full, _, _ = build_inputs([clicks], [prev], s, 3.0, "cpu")
    small, pts, _ = build_inputs([clicks], [prev], s, 3.0, "cpu", map_size=s // k)
    assert map_frame(s, s // k) == k and small.shape == (1, 8, s // k, s // k)
    assert torch.allclose(small, torch.nn.functional.avg_pool2d(full, k), atol=1e-6)
    assert torch.allclose(small[0, 2:7].sum(0), torch.ones(s // k, s // k))  # state shares sum to 1
    assert torch.allclose(
        pts[0, :, :2], torch.tensor([[25.0, 30.0], [50.3, 12.7], [26.0, 31.0]]))  # clicks stay in crop coords
    assert map_frame(96, 256) == 1 and map_frame(512, 256) == 2 and map_frame(100, 48) == 4


def test_decoder_in_the_map_frame_follows_the_crop_frame():
    """Maps at S / 2: logits at S / 2 that agree with the S-frame decoder's, down-sampled."""
    torch.manual_seed(5)
    cfg = ClickModelConfig(dim=32, heads=4, pool_sizes=(1, 2), coarse_size=32, decode_size=32)
    dec = ClickDecoder(cfg, embed_dim=16).eval()
    s = 64
    yy, xx = np.mgrid[:s, :s]
    prev = (yy - 30) ** 2 + (xx - 25) ** 2 <= 15 ** 2
    clicks = [[(25.0, 30.0, True), (50.0, 12.0, False)]]
    tokens, crop = torch.randn(1, 64, 16), torch.rand(1, 3, s, s)
    with torch.no_grad():
        maps_s, pts, valid = build_inputs(clicks, [prev], s, 3.0, "cpu")
        maps_m, _, _ = build_inputs(clicks, [prev], s, 3.0, "cpu", map_size=32)
        out_s = dec(tokens, (8, 8), crop, maps_s, pts, valid)
        out_m = dec(tokens, (8, 8), crop, maps_m, pts, valid)
        with pytest.raises(ValueError, match="integer k"):
            dec(tokens, (8, 8), crop, maps_s[..., :48, :48], pts, valid)
    assert out_s.shape == (1, 1, s, s) and out_m.shape == (1, 1, 32, 32)
    down = torch.nn.functional.avg_pool2d(torch.sigmoid(out_s), 2)
    p_m = torch.sigmoid(out_m)
    corr = torch.corrcoef(torch.stack([down.flatten(), p_m.flatten()]))[0, 1]
    assert (down - p_m).abs().mean() < 0.01 and corr > 0.9


def test_integral_zoom_box_and_sliced_resample():
    rng = np.random.default_rng(2)
    for _ in range(30):
        prev = np.zeros((64, 64), bool)
        y0, x0 = rng.integers(0, 50, 2)
        prev[y0:y0 + 10, x0:x0 + 12] = True
        clicks = rng.uniform(0, 63, (3, 2))
        box = zoom_box(prev, clicks, 64, 1.4, 0.4)
        whole = zoom_box(prev, clicks, 64, 1.4, 0.4, integral=True)
        assert np.array_equal(whole, np.round(whole)) and (whole[:2] <= box[:2]).all() and (whole[2:] >= box[2:]).all()
        assert (whole[2:] - box[2:] < 1).all() and (box[:2] - whole[:2] < 1).all() and whole[2:].max() <= 64
    # A whole-pixel RoI larger than the output is sliced and resized: the same bin centres as
    # roi_align, so on a linear ramp (any symmetric filter returns the value at its centre)
    # both agree away from the RoI border, where the resize's filter is cut by the slice.
    from torchvision.ops import roi_align
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    img = torch.stack([0.01 * xx, 0.02 * yy, 0.01 * xx + 0.005 * yy])[None]
    box = torch.tensor([[8.0, 4.0, 56.0, 60.0]])
    sliced = roi_resample(img, box, 64, (16, 16))
    ref = roi_align(img, torch.tensor([[0.0, 8.0, 4.0, 56.0, 60.0]]), (16, 16), 1.0, -1, True)
    assert sliced.shape == (1, 3, 16, 16)
    assert (sliced - ref)[..., 1:-1, 1:-1].abs().max() < 1e-3  # values up to 1.6


def test_kept_static_inputs_give_the_same_logits():
    """The predictor keeps the click-independent part per object; passing it changes nothing."""
    torch.manual_seed(1)
    dec = ClickDecoder(ClickModelConfig(dim=32, heads=4, pool_sizes=(1, 2), coarse_size=32), embed_dim=16).eval()
    tokens, crop = torch.randn(1, 64, 16), torch.rand(1, 3, 64, 64)
    maps, pts, valid = build_inputs([[(20.0, 30.0, True)]], [None], 64, 3.0, "cpu", map_size=32)
    with torch.no_grad():
        static = dec.static_inputs(tokens, (8, 8), crop)
        assert static.image_coarse.shape == (1, 3, 32, 32) and static.feat.shape == (1, 32, 8, 8)
        assert torch.equal(dec(tokens, (8, 8), crop, maps, pts, valid, static), dec(tokens, (8, 8), crop, maps, pts, valid))
        with pytest.raises(ValueError, match="static inputs"):
            dec(tokens, (8, 8), crop[..., :24, :24], maps[..., :24, :24], pts, valid, static)  # Z_c 24, kept 32
