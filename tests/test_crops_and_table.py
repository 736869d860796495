import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from exits.data import crop_images, crop_window, load_point_dataset, paste_mask
from exits.data.crops import CropWindow, crop_mask
from exits.data.instances_table import (
    build_instances_table, read_instances_table, table_objects, table_windows, write_instances_table,
)
from tests.conftest import disk


def test_window_grows_box_by_margin_and_clips_to_image():
    pts = np.array([[30, 10], [20, 25], [33, 40], [50, 22]], float)  # box x 20..50, y 10..40
    win = crop_window(pts, 100, 60, margin=0.1, min_margin_px=2, size=32)
    # box edges [20, 51) x [10, 41): margins 3.1 / 3.1 -> floor/ceil outwards
    assert win.as_list() == [16, 6, 39, 39]
    edge = crop_window(np.array([[5, 0], [0, 3], [5, 9], [9, 4]], float), 10, 10, margin=0.5, min_margin_px=2, size=16)
    assert edge.as_list() == [0, 0, 10, 10]


def test_point_round_trip_is_exact():
    win = CropWindow(x0=13, y0=7, width=57, height=31, size=96)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, size=(100, 2))
    np.testing.assert_allclose(win.crop_to_image(win.image_to_crop(xy)), xy, atol=1e-9)
    # window corners map to crop corners (pixel-edge convention)
    np.testing.assert_allclose(win.image_to_crop(np.array([13 - 0.5, 7 - 0.5])), [-0.5, -0.5])
    np.testing.assert_allclose(win.image_to_crop(np.array([13 + 57 - 0.5, 7 + 31 - 0.5])), [95.5, 95.5])


def test_crop_then_paste_is_identity_at_unit_scale():
    h, w = 40, 50
    mask = torch.from_numpy(disk(h, w, 25, 20, 9)).float()
    win = CropWindow(x0=10, y0=5, width=30, height=30, size=30)
    crop = crop_mask(mask, win)
    np.testing.assert_array_equal(crop.numpy(), mask[5:35, 10:40].numpy())
    back = paste_mask(crop, win, h, w)
    assert torch.equal(back, mask)  # every object pixel lies inside the window


@pytest.mark.parametrize("size", [24, 64, 96])
def test_crop_paste_round_trip_at_other_scales_lands_on_the_same_pixels(size):
    h, w = 60, 80
    mask = torch.from_numpy(disk(h, w, 40, 30, 14)).float()
    win = crop_window(np.array([[40, 16], [26, 30], [40, 44], [54, 30]], float), w, h, margin=0.2, min_margin_px=2, size=size)
    back = paste_mask(crop_mask(mask, win), win, h, w) >= 0.5
    m = mask.bool()
    iou = (back & m).sum() / (back | m).sum()
    assert iou > (0.97 if size >= 64 else 0.9)
    # the centroid does not move by more than a fraction of a pixel: no off-by-half shift
    ys, xs = torch.nonzero(back, as_tuple=True)
    assert abs(xs.float().mean() - 40) < 0.25 and abs(ys.float().mean() - 30) < 0.25


def test_crop_images_matches_manual_slice_and_batches():
    img = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    wins = [CropWindow(2, 3, 8, 8, 8), CropWindow(10, 5, 16, 8, 8)]
    crops = crop_images(img, wins)
    assert crops.shape == (2, 3, 8, 8)
    torch.testing.assert_close(crops[0], img[:, 3:11, 2:10])
    # 2x horizontal downscale averages pairs of columns
    torch.testing.assert_close(crops[1], img[:, 5:13, 10:26].reshape(3, 8, 8, 2).mean(-1))


def test_instances_table_parquet_round_trip(tiny_coco, tmp_path):
    ds = load_point_dataset(tiny_coco, tiny_coco.parent / "images")
    table = build_instances_table(ds, margin=0.15, min_margin_px=4, crop_size=64)
    path = write_instances_table(table, tmp_path / "run" / "instances.parquet")
    assert not list(path.parent.glob(".*.tmp"))  # no temp file left behind
    back = read_instances_table(path)
    assert back.equals(table)
    assert pq.read_metadata(path).num_rows == 3
    objs = table_objects(back)
    for a, b in zip(ds.objects, objs):
        assert (a.ann_id, a.image_id, a.category_id, a.bbox, a.split) == (b.ann_id, b.image_id, b.category_id, b.bbox, b.split)
        np.testing.assert_array_equal(a.extreme_points, b.extreme_points)
    wins = table_windows(back, 64)
    assert all(w.size == 64 for w in wins)
    assert back.column("file_name").to_pylist() == ["im1.png", "im1.png", "im2.png"]


def test_crop_mask_reads_only_the_window_and_matches_the_whole_image_crop():
    from exits.data.crops import crop_images

    rng = np.random.default_rng(4)
    mask = torch.from_numpy(rng.random((70, 90)) < 0.4)
    for win in (CropWindow(0, 0, 90, 70, 32), CropWindow(5, 7, 40, 33, 48), CropWindow(50, 30, 40, 40, 16),
                CropWindow(1, 1, 88, 68, 96)):
        whole = crop_images(mask[None].float(), [win])[0, 0]
        assert torch.allclose(crop_mask(mask, win), whole, atol=1e-5)  # float rounding of the shifted box


def test_crop_mask_equals_roi_align_on_random_windows_and_soft_masks():
    """The separable crop is roi_align's: up- and down-scaling, windows touching every image
    edge, soft values, and the 0.5 threshold the click model takes of it."""
    from exits.data.crops import crop_images, roi_align_axis_weights

    rng = np.random.default_rng(11)
    for trial in range(40):
        h, w = map(int, rng.integers(20, 160, 2))
        mask = torch.from_numpy(rng.random((h, w)).astype(np.float32) if trial % 2 else rng.random((h, w)) < 0.5)
        x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
        if trial % 5 == 0:
            x0 = y0 = 0
        width, height = int(rng.integers(1, w - x0 + 1)), int(rng.integers(1, h - y0 + 1))
        if trial % 7 == 0:
            width, height = w - x0, h - y0  # touches the right and bottom edges
        win = CropWindow(x0, y0, width, height, int(rng.choice([7, 16, 48, 96, 200])))
        ours = crop_mask(mask, win)
        # in float64 roi_align's own sample coordinates do not round (in float32 they drift ~1e-5)
        ref = crop_images(mask[None].double(), [win])[0, 0].float()
        assert ours.shape == (win.size, win.size) and ours.is_contiguous()
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
        # thresholded at 0.5 they differ only on ties (a half-covered pixel), either side rounding
        flips = (ours >= 0.5) != (ref >= 0.5)
        assert torch.all((ref[flips] - 0.5).abs() < 1e-5)
    index, weights = roi_align_axis_weights(0.0, 50.0, 20, 50)
    assert index.shape == (20, 6) and torch.allclose(weights.sum(1), torch.ones(20))  # 3 samples, 2 taps each
