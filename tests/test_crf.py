"""CRF refinement: both implementations pull a corrupted mask onto a two-colour object."""
from __future__ import annotations

import pytest
import torch

from exits.crf import DEFAULT_CRF_PARAMS, crf_refine
import math

from exits.crf.meanfield import gaussian_filter_excluding_centre, gaussian_taps, meanfield_crf
from exits.crf.synthetic import make_disk_scene, mask_iou

IMPLS = ("meanfield", "dense")


@pytest.fixture(scope="module")
def scene():
    return make_disk_scene(64, seed=0)


def iou(prob: torch.Tensor, mask: torch.Tensor) -> float:
    return mask_iou(prob > 0.5, mask)


@pytest.mark.parametrize("impl", IMPLS)
def test_crf_moves_mask_toward_truth(scene, impl):
    before = iou(scene.prob[0], scene.mask)
    assert 0.6 < before < 0.75  # the corruption is real
    refined = crf_refine(scene.image[None], scene.prob[None], impl=impl)
    after = iou(refined[0, 0], scene.mask)
    assert after > before + 0.2, (before, after)
    assert after > 0.95


@pytest.mark.parametrize("impl", IMPLS)
def test_crf_keeps_a_correct_mask(scene, impl):
    good = (0.2 + 0.6 * scene.mask.float())[None, None]
    refined = crf_refine(scene.image[None], good, impl=impl)
    assert iou(refined[0, 0], scene.mask) > 0.98


@pytest.mark.parametrize("impl", IMPLS)
def test_crf_shapes_range_dtype_and_uint8_image(scene, impl):
    image = scene.image[None].repeat(2, 1, 1, 1)
    prob = scene.prob[None].repeat(2, 1, 1, 1).double()
    out = crf_refine(image, prob, impl=impl, iters=3)
    assert out.shape == (2, 1, 64, 64)
    assert out.dtype == torch.float64 and out.device == prob.device
    assert out.min() >= 0 and out.max() <= 1
    # A float image is read in x255 units, so srgb means the same for uint8 and float.
    as_uint8 = (image * 255).round().to(torch.uint8)
    out8 = crf_refine(as_uint8, prob, impl=impl, iters=3)
    out_f = crf_refine(as_uint8.float() / 255, prob, impl=impl, iters=3)
    assert (out8 - out_f).abs().max() < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_crf_without_iterations_returns_clipped_input(scene, impl):
    out = crf_refine(scene.image[None], scene.prob[None], impl=impl, iters=0)
    assert torch.allclose(out, scene.prob[None], atol=1e-5)


def test_meanfield_and_dense_agree(scene):
    a = crf_refine(scene.image[None], scene.prob[None], impl="meanfield")[0, 0] > 0.5
    b = crf_refine(scene.image[None], scene.prob[None], impl="dense")[0, 0] > 0.5
    assert mask_iou(a, b) > 0.95


def test_meanfield_batch_equals_one_by_one_and_chunking_is_exact():
    s1, s2 = make_disk_scene(48, seed=1), make_disk_scene(48, seed=2, shift=(-3.0, 2.0))
    image = torch.stack([s1.image, s2.image])
    prob = torch.stack([s1.prob, s2.prob])
    batched = meanfield_crf(image, prob)
    single = torch.cat([meanfield_crf(image[i : i + 1], prob[i : i + 1]) for i in range(2)])
    assert torch.allclose(batched, single, atol=1e-6)
    chunked = meanfield_crf(image, prob, max_kernel_mib=1e-6)  # one image per chunk
    assert torch.allclose(batched, chunked, atol=1e-6)


def test_meanfield_follows_colour_edges_not_just_smoothing():
    # Without the bilateral term the CRF only smooths; the colour term is what fixes it.
    s = make_disk_scene(64, seed=3)
    smooth_only = meanfield_crf(s.image[None], s.prob[None], compat_bilateral=0.0)
    full = meanfield_crf(s.image[None], s.prob[None])
    assert iou(full[0, 0], s.mask) > iou(smooth_only[0, 0], s.mask) + 0.15


def test_meanfield_half_precision_is_computed_in_float32(scene):
    out = meanfield_crf(scene.image[None], scene.prob[None].bfloat16(), iters=3)
    ref = meanfield_crf(scene.image[None], scene.prob[None].bfloat16().float(), iters=3)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 1e-2


def test_gaussian_filter_excludes_centre_and_is_the_2d_kernel():
    taps = gaussian_taps(1.5, torch.float64, torch.device("cpu"))
    assert taps.numel() == 7
    delta = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    delta[0, 0, 7, 7] = 1.0
    out = gaussian_filter_excluding_centre(delta, taps)[0, 0]
    assert out[7, 7] == 0
    assert out[7 + 2, 7 - 1].item() == pytest.approx(math.exp(-(4 + 1) / (2 * 1.5**2)))
    assert out[7 + 4, 7].item() == 0  # outside the radius ceil(2 sxy) = 3


def naive_meanfield(image255, prob, iters, sxy_g, w_g, sxy_b, srgb, w_b, window, dilation, clip=1e-5):
    """Per-pixel loops over the documented update: softmax over {bg, fg} with Potts."""
    h, w = prob.shape
    r_g = math.ceil(2 * sxy_g)
    r_b = window // 2
    pos = [(y, x) for y in range(h) for x in range(w)]

    def neighbours(y, x):
        g = [((y + dy, x + dx), math.exp(-(dy * dy + dx * dx) / (2 * sxy_g**2)))
             for dy in range(-r_g, r_g + 1) for dx in range(-r_g, r_g + 1)
             if (dy, dx) != (0, 0) and 0 <= y + dy < h and 0 <= x + dx < w]
        b = []
        for dy in range(-r_b, r_b + 1):
            for dx in range(-r_b, r_b + 1):
                yy, xx = y + dy * dilation, x + dx * dilation
                if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w):
                    continue
                c2 = float(((image255[:, y, x] - image255[:, yy, xx]) ** 2).sum())
                k = math.exp(-((dy * dilation) ** 2 + (dx * dilation) ** 2) / (2 * sxy_b**2) - c2 / (2 * srgb**2))
                b.append(((yy, xx), k))
        return g, b

    nb = {p: neighbours(*p) for p in pos}
    unary = {p: (-math.log(max(1 - prob[p].item(), clip)), -math.log(max(prob[p].item(), clip))) for p in pos}
    q = {p: tuple(math.exp(-u) / (math.exp(-unary[p][0]) + math.exp(-unary[p][1])) for u in unary[p]) for p in pos}
    for _ in range(iters):
        new = {}
        for p in pos:
            energy = list(unary[p])
            for kernel, wm in ((nb[p][0], w_g), (nb[p][1], w_b)):
                z = 1 + sum(k for _, k in kernel)
                for lab in (0, 1):
                    # Potts: pay w k for every neighbour mass on the other label.
                    energy[lab] += wm * sum(k / z * q[j][1 - lab] for j, k in kernel)
            e0, e1 = energy
            new[p] = (1 / (1 + math.exp(e0 - e1)), 1 / (1 + math.exp(e1 - e0)))
        q = new
    return torch.tensor([[q[(y, x)][1] for x in range(w)] for y in range(h)], dtype=torch.float64)


def test_meanfield_matches_naive_per_pixel_update():
    s = make_disk_scene(12, seed=4, shift=(1.0, -1.0), grow=1.0, blur_sigma=1.0)
    params = dict(iters=3, sxy_gauss=1.0, compat_gauss=3.0, sxy_bilateral=4.0, srgb=20.0, compat_bilateral=5.0)
    fast = meanfield_crf(s.image[None].double(), s.prob[None].double(), window=5, dilation=2, **params)[0, 0]
    slow = naive_meanfield(s.image.double() * 255, s.prob[0].double(), params["iters"], params["sxy_gauss"],
                           params["compat_gauss"], params["sxy_bilateral"], params["srgb"],
                           params["compat_bilateral"], window=5, dilation=2)
    assert torch.allclose(fast, slow, atol=1e-9)


def test_invalid_arguments(scene):
    with pytest.raises(ValueError):
        crf_refine(scene.image[None], scene.prob[None], impl="grabcut")
    with pytest.raises(ValueError):
        crf_refine(scene.image[None], scene.prob)  # missing batch dim
    with pytest.raises(ValueError):
        meanfield_crf(scene.image[None], scene.prob[None], window=4)
    with pytest.raises(ValueError):
        meanfield_crf(scene.image[None], scene.prob[None], window=7.5)
    # Integral floats (configs typed dict[str, float]) are accepted.
    as_float = meanfield_crf(scene.image[None], scene.prob[None], window=7.0, dilation=2.0, iters=3.0)
    assert torch.equal(as_float, meanfield_crf(scene.image[None], scene.prob[None], window=7, dilation=2, iters=3))
    assert set(DEFAULT_CRF_PARAMS) >= {"iters", "sxy_gauss", "compat_gauss", "sxy_bilateral", "srgb", "compat_bilateral"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_meanfield_runs_on_cuda(scene):
    prob = scene.prob[None].cuda()
    out = crf_refine(scene.image[None].cuda(), prob)
    assert out.device == prob.device
    cpu = crf_refine(scene.image[None], scene.prob[None])
    assert (out.cpu() - cpu).abs().max() < 1e-3
    dense = crf_refine(scene.image[None].cuda(), prob, impl="dense")
    assert dense.device == prob.device
