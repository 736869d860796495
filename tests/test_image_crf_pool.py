"""Stage 1d's image-level CRF in worker processes: same masks as in-process, queued per batch."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from exits.crf.image_refine import image_crf_refine
from exits.data.crops import crop_mask, crop_window
from exits.data.extreme_points import derive_extreme_points
from exits.stages.image_crf_pool import ImageCRFRefiner, available_cpus, resolve_crf_workers
from exits.stages.pseudo_labels import predict_crop_probs


def _objects(root: Path, n: int = 6) -> tuple[SimpleNamespace, torch.Tensor, list[np.ndarray]]:
    """Two 96x128 images with ellipses of different sizes; coarse crop probabilities from
    blurred, shifted GT crops (the shape the generator's output has)."""
    rng = np.random.default_rng(1)
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    names, windows, points, probs, images = [], [], [], [], []
    for k in range(n):
        name = f"img{k // 3}.png"
        if k % 3 == 0:
            img = np.clip(rng.normal(120, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        cx, cy, ax, ay = 30 + 30 * (k % 3), 48, 12 + 2 * k, 10 + k
        obj = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
        img[obj] = (210, 40, 40)
        if k % 3 == 2:
            Image.fromarray(img).save(root / name)
            images.append(img.copy())
        pts = derive_extreme_points(obj).astype(float)
        win = crop_window(pts, w, h, margin=0.15, min_margin_px=4, size=32)
        gt = crop_mask(torch.from_numpy(obj.astype(np.float32)), win)
        probs.append(torch.roll(torch.nn.functional.avg_pool2d(gt[None, None], 5, 1, 2)[0, 0], 2, dims=1))
        names.append(name)
        windows.append(win)
        points.append(pts)
    ds = SimpleNamespace(image_dir=root, file_names=names, windows=windows, points_image=points)
    return ds, torch.stack(probs).half(), images


def test_pooled_masks_equal_in_process_masks_and_the_reference(tmp_path: Path) -> None:
    ds, probs, images = _objects(tmp_path)
    params = {"iters": 5.0, "prior_weight": 0.9}
    inline = ImageCRFRefiner(ds, params, workers=0)
    pooled = ImageCRFRefiner(ds, params, workers=2)
    pooled.submit(0, probs[:4])  # two batches, as predict_crop_probs hands them over
    pooled.submit(4, probs[4:])
    assert sorted(pooled._pending) == list(range(len(probs)))
    for i in range(len(probs)):
        a, b = inline(i, probs[i]), pooled(i, probs[i])
        win = ds.windows[i]
        assert a.shape == b.shape == (win.height, win.width) and a.dtype == bool
        assert (a == b).all() and a.any()
        full = image_crf_refine(images[i // 3], probs[i], win, ds.points_image[i], **params)
        assert (full[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width] == a).all()
        assert not full.sum() - a.sum()  # nothing outside the window
    assert not pooled._pending


def test_an_object_never_submitted_is_refined_in_process(tmp_path: Path) -> None:
    ds, probs, _ = _objects(tmp_path, n=3)
    pooled = ImageCRFRefiner(ds, {}, workers=1)
    pooled.submit(0, probs[:1])
    pooled.close()  # cancelled or finished: either way the call below must give the mask
    assert (pooled(2, probs[2]) == ImageCRFRefiner(ds, {}, workers=0)(2, probs[2])).all()


def test_resolve_crf_workers() -> None:
    assert resolve_crf_workers(0) == 0
    assert resolve_crf_workers(3) == 3
    assert resolve_crf_workers(-1) == available_cpus() >= 1


def _daemon_child(q) -> None:
    q.put(resolve_crf_workers(-1))


def test_a_daemonic_process_gets_no_workers() -> None:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_daemon_child, args=(q,), daemon=True)
    p.start()
    p.join(30)
    assert q.get(timeout=5) == 0


class _Const(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 4 - 2  # logits from the first channel


@pytest.mark.parametrize("batch_size", [2, 3])
def test_predict_crop_probs_hands_every_batch_to_on_batch(batch_size: int) -> None:
    images = torch.rand(7, 3, 8, 8)
    box = (torch.rand(7, 8, 8) > 0.3).float()
    ds = [{"image": images[i], "box_mask": box[i]} for i in range(7)]
    seen: list[tuple[int, torch.Tensor]] = []
    out = predict_crop_probs(_Const(), ds, batch_size=batch_size, device=torch.device("cpu"), progress=False,
                             on_batch=lambda s, p: seen.append((s, p)))
    assert [s for s, _ in seen] == list(range(0, 7, batch_size))
    assert torch.equal(torch.cat([p for _, p in seen]), out)
    assert out.dtype == torch.float16 and out.shape == (7, 8, 8)
    expected = (torch.sigmoid(images[:, 0] * 4 - 2) * box).half()
    assert torch.equal(out, expected)


def test_stage_1d_forward_precision() -> None:
    from exits.pipeline import pseudo_autocast_dtype

    cpu = torch.device("cpu")
    assert pseudo_autocast_dtype(cpu, True, False) is None  # amp is CUDA's switch
    assert pseudo_autocast_dtype(cpu, False, True) is torch.bfloat16
    images = torch.rand(4, 3, 8, 8)
    ds = [{"image": images[i], "box_mask": torch.ones(8, 8)} for i in range(4)]
    lin = torch.nn.Conv2d(3, 1, 1)
    fp32 = predict_crop_probs(lin, ds, batch_size=4, device=cpu, progress=False)
    bf16 = predict_crop_probs(lin, ds, batch_size=4, device=cpu, progress=False, autocast_dtype=torch.bfloat16)
    diff = (fp32.float() - bf16.float()).abs().max()
    assert 0 < diff < 0.02  # bf16 ran (results differ) and stayed close
