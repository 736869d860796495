"""Project issue 28, item 6: three method bugs, each pinned by values.

(a) BG prototypes of the click model from crop sides at the image edge;
(b) the image-level CRF prior biased at the box edges by zeros mixed in by the resampling;
(c) neighbour BG seeds depending on the retrieval shard size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.tiny_run import build_tiny_run


# ---------------------------------------------------------------- (c) neighbour seeds across shards

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Demo data (image 4 has 3 objects, rows 5-7 of the table, so shards of 2 split it; image
    3 rows 3-4 straddle [2, 4) / [4, 6)), the instances table, and untrained tiny extractor and
    generator models (fixed seeds: the retrieval only needs *some* fixed attention)."""
    return build_tiny_run(tmp_path_factory.mktemp("shards"), ["pseudo.crf_refine=false", "retrieval.neighbour_bg=always"])


def _points(cfg, run, images, shard_size: int, out: Path):
    from exits.pipeline import stage_retrieval_shard
    from exits.stages.point_retrieval import merge_points, read_points
    from exits.stages.shards import shard_ranges

    ranges = shard_ranges(run.num_instances(), shard_size)
    shards = [stage_retrieval_shard(cfg, images, run, a, b, out / f"points-{i}.parquet", torch.device("cpu"))
              for i, (a, b) in enumerate(ranges)]
    return read_points(merge_points(shards, out / "points.parquet")), len(ranges)


def test_neighbour_bg_seeds_do_not_depend_on_the_shard_size(tiny_run, tmp_path):
    cfg, run, images = tiny_run
    image_ids = pq.read_table(run.instances, columns=["image_id"]).column("image_id").to_pylist()
    assert image_ids == [1, 1, 2, 3, 3, 4, 4, 4]  # the layout the shards of 2 cut through
    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    small, n_small = _points(cfg, run, images, 2, tmp_path / "small")
    big, n_big = _points(cfg, run, images, 2048, tmp_path / "big")
    assert (n_small, n_big) == (4, 1)
    extra = big.column("seed_bg_extra").to_pylist()
    # neighbour seeds inside the object's own box (seed_bg_extra) exist for 3 objects of images 3, 4
    assert [i for i, e in enumerate(extra) if e] == [3, 5, 7]
    assert small.column("seed_bg_extra").to_pylist() == extra
    assert small.equals(big)


def test_pseudo_shards_read_the_neighbour_seeds_from_points(tiny_run, tmp_path):
    """Stage 1d recomputes no neighbour seeds: it reads ``seed_bg_extra`` of its rows of
    points.parquet (the scores' point agreement), so its shards agree for any shard size."""
    from exits.pipeline import stage_pseudo_shard
    from exits.stages.point_retrieval import write_points
    from exits.stages.shards import read_shards, shard_ranges
    from exits.stages.pseudo_labels import PSEUDO_SCHEMA

    cfg, run, images = tiny_run
    (tmp_path / "p").mkdir()
    points, _ = _points(cfg, run, images, 2048, tmp_path / "p")
    write_points(points, run.points)
    tables = {}
    for size in (2, 2048):
        ranges = shard_ranges(run.num_instances(), size)
        paths = [stage_pseudo_shard(cfg, images, run, a, b, tmp_path / f"pseudo-{size}-{i}.parquet",
                                    torch.device("cpu")) for i, (a, b) in enumerate(ranges)]
        tables[size] = read_shards(paths, PSEUDO_SCHEMA)
    # refine_agreement is NaN without refinement (crf_refine=false) and NaN != NaN in equals()
    small, big = tables[2], tables[2048]
    assert all(np.isnan(small.column("refine_agreement").to_numpy()))
    assert small.num_rows == 8 and small.drop_columns(["refine_agreement"]).equals(big.drop_columns(["refine_agreement"]))


def test_read_image_rows_finds_an_images_objects_anywhere_in_the_table(tmp_path):
    """Row groups of 3 rows, images out of order: every row of the asked images, in order."""
    import pyarrow as pa

    from exits.data.instances_table import read_image_rows

    image_ids = [5, 1, 1, 2, 9, 5, 3, 3, 3, 1]
    table = pa.table({"ann_id": list(range(10)), "image_id": image_ids,
                      "crop_box": [[i, 0, 4, 4] for i in range(10)]},
                     schema=pa.schema([("ann_id", pa.int64()), ("image_id", pa.int64()),
                                       ("crop_box", pa.list_(pa.int32(), 4))]))
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)
    rows, found = read_image_rows(tmp_path / "t.parquet", [1, 5], ["ann_id", "crop_box"])
    assert rows.tolist() == [0, 1, 2, 5, 9]
    assert found.column("ann_id").to_pylist() == [0, 1, 2, 5, 9]
    assert found.column("crop_box").to_pylist()[3] == [5, 0, 4, 4]
    rows, found = read_image_rows(tmp_path / "t.parquet", [7], ["ann_id"])
    assert rows.tolist() == [] and found.num_rows == 0


# ---------------------------------------------------------------- (b) image CRF prior at the box edges

def test_image_crf_prior_is_unbiased_at_the_box_edges():
    """Stage 1d's crop probabilities are zero outside the box (``predict_crop_probs``). A
    constant p = 0.9 must give the prior of a constant 0.9 at every window pixel inside the
    box: resampling the zeros in would lower the box's edge rows and columns."""
    from exits.crf.image_refine import image_crf_prior
    from exits.data.crops import CropWindow
    from exits.stages.object_crops import box_in_crop, box_mask
    from exits.stages.pseudo_labels import predict_crop_probs

    s = 32
    window = CropWindow(x0=10, y0=7, width=53, height=41, size=s)
    points = np.array([[30, 12], [16, 25], [36, 42], [56, 30]], float)  # top, left, bottom, right
    box = box_in_crop(points, window)

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 1, s, s), float(np.log(0.9 / 0.1)))

    data = [{"image": torch.zeros(3, s, s), "box_mask": box_mask(box, s)}]
    probs = predict_crop_probs(Constant(), data, batch_size=1, device=torch.device("cpu"), progress=False)
    p = float(probs[0].float().max())
    assert abs(p - 0.9) < 1e-3 and float(probs[0].float().min()) == 0.0  # zero outside the crop box
    prior = image_crf_prior(probs[0], window)
    expected = image_crf_prior(torch.full((s, s), p), window)[0, 0]
    q = points.round().astype(int) - [window.x0, window.y0]
    inside = prior[q[0, 1]:q[2, 1] + 1, q[1, 0]:q[3, 0] + 1]
    assert inside.shape == (31, 41)
    assert np.abs(inside - expected).max() < 1e-6, (inside.min(), expected)


def test_crop_refinement_paste_keeps_the_box_edges():
    """``pseudo.refine_at: crop``: the crop probability is pasted, thresholded and cut to the
    box. A constant 0.9 inside the box must give the whole box (pasting the zeros outside it
    as values dropped its edge rows/columns under 0.5)."""
    from exits.baselines import box_mask_full
    from exits.data.crops import CropWindow, paste_mask
    from exits.stages.object_crops import box_in_crop, box_mask
    from exits.stages.pseudo_labels import paste_box_prob

    s = 32
    window = CropWindow(x0=10, y0=7, width=53, height=41, size=s)
    points = np.array([[30, 12], [16, 25], [36, 42], [56, 30]], float)
    prob = 0.9 * box_mask(box_in_crop(points, window), s).float()
    box = box_mask_full(points, 60, 70).astype(bool)
    old = (paste_mask(prob, window, 60, 70) >= 0.5).numpy() & box
    new = (paste_box_prob(prob, window, 60, 70) >= 0.5).numpy() & box
    assert old.sum() < box.sum()  # the bias this fixes
    assert (new == box).all()
    assert np.abs(paste_box_prob(prob, window, 60, 70).numpy()[box] - 0.9).max() < 1e-5


# ---------------------------------------------------------------- (a) BG prototypes at the image edge

S_A, G_A = 48, 6  # crop pixels, token cells a side (8 px cells)


def _left_edge_object():
    """An object touching the left image edge: its crop window starts at x = 0 (clipped, no
    margin there), so the crop's left border column runs through the object. Token features:
    e0 on the object's cells (columns 0-3, rows 1-4), e1 elsewhere."""
    from exits.data.crops import CropWindow

    window = CropWindow(x0=0, y0=20, width=60, height=60, size=S_A)
    image_size = (200, 200)  # (H, W)
    points = np.array([[20.0, 30.0], [0.0, 50.0], [20.0, 69.0], [39.0, 50.0]])  # top, left, bottom, right
    obj = np.zeros((G_A, G_A), bool)
    obj[1:5, 0:4] = True
    tokens = torch.zeros(1, G_A * G_A, 8)
    tokens[0, :, 1] = 1.0
    tokens[0, torch.from_numpy(obj.reshape(-1))] = torch.eye(8)[0]
    return window, image_size, points, obj, tokens


def _captured_bg_cells(dec, tokens, static):
    """The (fg, bg) cells the decoder hands its prototype module, and the features it clusters."""
    from exits.interactive.inference import build_inputs

    seen = []
    hook = dec.prototypes.register_forward_hook(lambda m, args, out: seen.append(args))
    crop = torch.rand(1, 3, S_A, S_A, generator=torch.Generator().manual_seed(0))
    maps, pts, valid = build_inputs([[(16.0, 24.0, True)]], [None], S_A, 3.0, "cpu")  # one positive click, no mask
    with torch.no_grad():
        dec(tokens, (G_A, G_A), crop, maps, pts, valid, static)
    hook.remove()
    _, feat_tokens, grid, fg, bg = seen[0]
    return feat_tokens, grid, np.asarray(fg), np.asarray(bg)


def test_bg_prototypes_leave_out_crop_sides_at_the_image_edge():
    from exits.interactive.config import ClickModelConfig
    from exits.interactive.decoder import ClickDecoder
    from exits.interactive.prototypes import image_edge_sides, sgc_prototypes
    from exits.stages.object_crops import box_in_crop

    window, (h, w), points, obj, tokens = _left_edge_object()
    at_edge = image_edge_sides(*window.as_list(), image_width=w, image_height=h)
    assert at_edge == (True, False, False, False)
    torch.manual_seed(0)
    dec = ClickDecoder(ClickModelConfig(dim=16, heads=2, pool_sizes=(1, 2), use_zoom=False, use_imsa=False), 8).eval()
    static = dec.static_inputs(tokens, (G_A, G_A), torch.zeros(1, 3, S_A, S_A), at_edge=[at_edge],
                               object_box=box_in_crop(points, window)[None])
    feat_tokens, grid, _, bg = _captured_bg_cells(dec, tokens, static)
    border = np.ones((G_A, G_A), bool)
    border[1:-1, 1:-1] = False
    open_sides = border.copy()
    open_sides[1:-1, 0] = False  # the left column (not its corners, which are the top/bottom rows)
    assert np.array_equal(bg[0], open_sides)
    assert not (bg[0] & obj).any()
    # the BG prototypes hold the background's feature only, not the object's
    protos, valid = sgc_prototypes(feat_tokens, grid, bg, 12, 4, 8)
    f_obj, f_bg = torch.nn.functional.normalize(feat_tokens[0, torch.from_numpy(obj.reshape(-1))][0], dim=0), \
        torch.nn.functional.normalize(feat_tokens[0, ~torch.from_numpy(obj.reshape(-1))][0], dim=0)
    assert not torch.allclose(f_obj, f_bg, atol=1e-2)
    for p in protos[0][valid[0]]:
        assert torch.allclose(torch.nn.functional.normalize(p, dim=0), f_bg, atol=1e-5)
    # without the edge information (the former behaviour) the left column, object cells, is BG
    plain = dec.static_inputs(tokens, (G_A, G_A), torch.zeros(1, 3, S_A, S_A))
    _, _, _, bg_old = _captured_bg_cells(dec, tokens, plain)
    assert np.array_equal(bg_old[0], border) and (bg_old[0] & obj).any()
    protos, valid = sgc_prototypes(feat_tokens, grid, bg_old, 12, 4, 8)
    old = torch.nn.functional.normalize(protos[0][valid[0]], dim=1).detach()
    assert (old - f_bg.detach()).abs().max() > 1e-2  # a BG prototype mixed with the object's feature


def test_bg_cells_fall_back_to_outside_the_box_when_every_side_is_at_the_image_edge():
    from exits.interactive.prototypes import border_background

    regions = np.array([[0.0, 0.0, 48.0, 48.0]])
    box = np.array([[12.0, 4.0, 48.0, 40.0]])  # crop pixel edges: 1.5 cells in from the left, 0.5 from the top
    every = np.array([[True, True, True, True]])
    out = border_background((6, 6), regions, 48, every, box)
    expected = np.zeros((6, 6), bool)
    expected[:, 0] = True  # columns entirely left of x = 12
    expected[5, :] = True  # rows entirely below y = 40
    assert np.array_equal(out[0], expected)
    assert not border_background((6, 6), regions, 48, every, None).any()  # no box: no BG cell at all
    # A zoomed region inside the crop keeps its own border on its inner sides; its left side is
    # the crop's left side, on the image edge.
    left = np.array([[True, False, False, False]])
    roi = border_background((4, 4), np.array([[0.0, 8.0, 32.0, 40.0]]), 48, left, None)[0]
    ring = np.ones((4, 4), bool)
    ring[1:-1, 1:-1] = False
    ring[1:-1, 0] = False
    assert np.array_equal(roi, ring)


def test_the_predictor_and_training_set_hand_the_edge_and_box_to_the_decoder(tmp_path):
    from PIL import Image

    from exits.interactive.config import ClickModelConfig
    from exits.interactive.data import _crop_objects
    from exits.interactive.decoder import ClickDecoder
    from exits.interactive.features import ObjectFeatures
    from exits.interactive.predictor import ClickPredictor, ObjectInfo
    from exits.stages.object_crops import box_in_crop

    window, (h, w), points, _, tokens = _left_edge_object()
    dec = ClickDecoder(ClickModelConfig(dim=16, heads=2, pool_sizes=(1, 2)), 8).eval()
    encoder = torch.nn.Linear(1, 1)
    encoder.img_size = S_A
    predictor = ClickPredictor(dec, encoder, {7: ObjectInfo("a.png", window, (h, w), points)}, tmp_path)
    f = ObjectFeatures(ann_id=7, window=window, image_size=(h, w), tokens=tokens[0], grid=(G_A, G_A),
                       crop=torch.zeros(3, S_A, S_A))
    static = predictor._static(f)
    assert static.at_edge.tolist() == [[True, False, False, False]]
    assert np.allclose(static.object_box.numpy(), box_in_crop(points, window)[None])

    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "a.png")
    mask = np.zeros((h, w), bool)
    mask[30:70, 0:40] = True
    ts = _crop_objects([(7, "a.png", window, mask, points)], tmp_path, S_A)
    assert ts.at_edge.tolist() == [[True, False, False, False]]
    assert np.allclose(ts.boxes.numpy(), box_in_crop(points, window)[None])
