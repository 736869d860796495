"""Stage-1 building blocks: crop dataset, appearance term, generator targets, mask scores."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from exits.baselines import box_mask_full, grabcut_mask
from exits.data import load_point_dataset
from exits.data.crops import CropWindow
from exits.data.instances_table import build_instances_table
from exits.propagation.appearance import appearance_similarity, mix_similarity, patch_colour_features
from exits.stages.generator import GeneratorLoss, GeneratorTask, PointLabelSource, SparseLabels
from exits.stages.object_crops import ObjectCropDataset, box_in_crop, box_mask
from exits.stages.pseudo_labels import mask_scores


def test_crop_dataset_cached_equals_lazy_and_boxes_map_exactly(tiny_coco):
    ds = load_point_dataset(tiny_coco, tiny_coco.parent / "images")
    table = build_instances_table(ds, margin=0.15, min_margin_px=4, crop_size=32)
    cached = ObjectCropDataset(table, tiny_coco.parent / "images", 32, cache=True)
    lazy = ObjectCropDataset(table, tiny_coco.parent / "images", 32, cache=False)
    assert len(cached) == 3
    for i in range(3):
        a, b = cached[i], lazy[i]
        assert a["image"].shape == (3, 32, 32)
        assert (a["image"] - b["image"]).abs().max() <= 1 / 255 + 1e-6  # uint8 cache rounding only
        torch.testing.assert_close(a["box"], b["box"])
        # extreme pixels lie just inside the box edges: centre at edge + half an image pixel,
        # in crop index coordinates (continuous - 0.5)
        p, box, (sx, sy) = a["points"], a["box"], cached.windows[i].scale
        assert abs(float(p[0, 1]) - (float(box[1]) + 0.5 * sy - 0.5)) < 1e-4
        assert abs(float(p[3, 0]) - (float(box[2]) - 0.5 * sx - 0.5)) < 1e-4


def test_box_in_crop_and_box_mask():
    win = CropWindow(x0=10, y0=20, width=40, height=20, size=80)
    pts = np.array([[30, 22], [12, 30], [30, 37], [47, 30]], float)  # box x 12..47, y 22..37
    np.testing.assert_allclose(box_in_crop(pts, win), [4.0, 8.0, 76.0, 72.0])
    m = box_mask(np.array([4.0, 8.0, 76.0, 72.0]), 80)
    assert m.sum() == 72 * 64 and m[8, 4] == 1 and m[7, 4] == 0 and m[8, 76] == 0


def test_appearance_similarity_links_same_colour_patches():
    img = torch.zeros(1, 3, 16, 16)
    img[..., :8, :8] = 1.0   # patch (0,0) white
    img[..., 8:, 8:] = 1.0   # patch (1,1) white, far away
    S = appearance_similarity(img, grid=2, sigma=0.1)
    assert S.shape == (1, 4, 4)
    torch.testing.assert_close(S.sum(-1), torch.ones(1, 4))
    assert S[0, 0, 3] > 0.49 and S[0, 0, 1] < 1e-6  # white links to white, not to black
    f = patch_colour_features(img, 2)
    assert f.shape == (1, 4, 6) and float(f[0, 0, 0]) == 1.0 and float(f[0, 0, 3]) == 0.0
    s_attn = torch.full((1, 4, 4), 0.25)
    assert mix_similarity(s_attn, img, 2, 0.0, 0.1) is s_attn
    torch.testing.assert_close(mix_similarity(s_attn, img, 2, 0.5, 0.1), 0.5 * s_attn + 0.5 * S)
    with pytest.raises(ValueError):
        mix_similarity(s_attn, img, 2, 1.5, 0.1)


def _task(dropout: float, points: pa.Table | None = None) -> GeneratorTask:
    crop_points = np.array([[[12.0, 2.0], [2.0, 12.0], [12.0, 21.0], [21.0, 12.0]]], np.float32)
    boxes = np.array([[2.0, 2.0, 22.0, 22.0]], np.float32)
    table = pa.table({"pseudo_fg": [[9, 10, 13, 14]], "pseudo_bg": [[5]]}) if points is None else points
    geometry = lambda index: (crop_points[index], boxes[index])  # noqa: E731
    labels = PointLabelSource(geometry, 1, SparseLabels.from_table(table), crop_size=24, grid=4, delta_px=3.0)
    cfg = GeneratorLoss(lambda_point=1.0, lambda_crf=0.0, lambda_mil=1.0, point_dropout=dropout,
                        crf_warmup_epochs=0, crf_impl="meanfield", crf_params={})
    return GeneratorTask(labels, grid=4, loss=cfg)


def test_generator_targets_union_of_seeds_and_retrieved_points():
    task = _task(0.0)
    target, labelled, has = task.targets(torch.tensor([0]), torch.device("cpu"))
    lab0 = task.batch_labels(torch.tensor([0]))
    fg = set(torch.nonzero(target[0].flatten()).flatten().tolist())
    seeds = set(torch.nonzero(lab0["seed_fg"][0]).flatten().tolist())
    assert fg == seeds | {9, 10, 13, 14}
    lab = set(torch.nonzero(labelled[0].flatten()).flatten().tolist())
    assert lab == fg | {5} | set(torch.nonzero(lab0["seed_bg"][0]).flatten().tolist())
    assert bool(has[0])


def test_point_dropout_drops_only_retrieved_points_and_is_seeded():
    task = _task(0.5)
    task.on_epoch_start(0, np.random.default_rng([0, 0]))
    a = task.batch_labels([0])["keep_fg"]
    task.on_epoch_start(0, np.random.default_rng([0, 0]))
    lab = task.batch_labels([0])
    assert torch.equal(a, lab["keep_fg"])
    assert not (lab["keep_fg"] & ~lab["pseudo_fg"]).any()
    kept = []
    for epoch in range(50):
        task.on_epoch_start(epoch, np.random.default_rng([0, epoch]))
        target, _, _ = task.targets(torch.tensor([0]), torch.device("cpu"))
        lab = task.batch_labels([0])
        assert target[0].flatten()[lab["seed_fg"][0]].all()  # seeds never dropped
        kept.append(int(lab["keep_fg"].sum()))
    assert 1.0 < np.mean(kept) < 3.0  # about half of the 4 retrieved FG points


def test_generator_loss_falls_back_to_mil_without_points():
    task = _task(0.0)
    model = torch.nn.Conv2d(3, 1, 1)
    batch = {"image": torch.rand(1, 3, 24, 24), "index": torch.tensor([0]), "box_mask": torch.ones(1, 24, 24)}
    loss, parts = task.loss(model, batch, None, 0)
    assert loss.ndim == 0 and parts["retrieved_frac"] == 1.0 and "crf" not in parts
    nothing = _task(0.0, pa.table({"pseudo_fg": pa.array([[]], pa.list_(pa.int32())),
                                   "pseudo_bg": pa.array([[]], pa.list_(pa.int32()))}))
    loss2, parts2 = nothing.loss(model, batch, None, 0)
    assert parts2["retrieved_frac"] == 0.0 and float(loss2.detach()) > float(loss.detach()) - 1e-6


def test_mask_scores_certainty_and_agreement():
    probs = torch.zeros(2, 8, 8)
    probs[0, :4] = 1.0           # decided mask, top half
    probs[1] = 0.5               # undecided
    boxes = torch.ones(2, 8, 8)
    target = torch.zeros(2, 2, 2, dtype=torch.bool)
    target[:, 0] = True          # top patches labelled FG
    labelled = torch.ones(2, 2, 2, dtype=torch.bool)
    cert, agree, score = mask_scores(probs, boxes, labelled, target, 0.5)
    np.testing.assert_allclose(cert, [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(agree, [1.0, 0.5], atol=1e-6)  # 0.5 thresholds to FG everywhere
    np.testing.assert_allclose(score, [1.0, 0.25], atol=1e-6)


def test_box_and_grabcut_baselines():
    h, w = 40, 60
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (30, 120, 30)
    yy, xx = np.mgrid[:h, :w]
    disk = (xx - 30) ** 2 + (yy - 20) ** 2 <= 100
    img[disk] = (220, 40, 40)
    pts = np.array([[30, 10], [20, 20], [30, 30], [40, 20]], float)
    box = box_mask_full(pts, h, w)
    assert box.sum() == 21 * 21
    gc = grabcut_mask(img, pts, CropWindow(15, 5, 30, 30, 32)).astype(bool)
    iou = (gc & disk).sum() / (gc | disk).sum()
    assert iou > 0.9 > (box.astype(bool) & disk).sum() / (box.astype(bool) | disk).sum()
