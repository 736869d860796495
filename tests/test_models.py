"""Tests for exits.models: ViT backbone, attention capture, mask decoder, checkpoints."""
from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from exits.models import (
    AttentionRecorder,
    ConvStemPatchEmbed,
    MaskDecoder,
    MaskModel,
    build_mask_model,
    build_vit,
    extract_state_dict,
    grid_size,
    is_conv_stem,
    load_mask_model,
    load_vit_state_dict,
    patch_tokens,
    save_mask_model,
    similarity_matrix,
)

TINY = dict(depth=2, embed_dim=64, num_heads=4)
NAME = "vit_tiny_patch16_224"


def tiny_vit(img_size: int = 32, patch_size: int = 8, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return build_vit(NAME, img_size, patch_size, **{**TINY, **kw}).eval()


def tiny_model(img_size: int = 32, patch_size: int = 8, seed: int = 0, **kw) -> MaskModel:
    torch.manual_seed(seed)
    return build_mask_model(NAME, img_size, patch_size, **{**TINY, **kw}).eval()


def images(b: int, s: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def manual_attention(vit: VisionTransformer, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Attention from timm's own non-fused path: the input of attn_drop in each block."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, blk in enumerate(vit.blocks):
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].detach())))
    try:
        vit.forward_features(x)
    finally:
        for h in handles:
            h.remove()
        for blk in vit.blocks:
            blk.attn.fused_attn = True
    return seen


# ---------------------------------------------------------------- backbone and shapes


@pytest.mark.parametrize("conv_stem", [False, True])
@pytest.mark.parametrize("img_size,patch_size", [(32, 8), (64, 16), (48, 8), (56, 14)])
def test_mask_model_output_shapes(img_size, patch_size, conv_stem):
    model = tiny_model(img_size, patch_size, conv_stem=conv_stem)
    n = img_size // patch_size
    x = images(2, img_size)
    tokens, grid = model.encode(x)
    assert grid == (n, n)
    assert tokens.shape == (2, n * n, 64)
    logits = model(x)
    assert logits.shape == (2, 1, img_size, img_size)
    assert torch.isfinite(logits).all()
    assert is_conv_stem(model.backbone) == conv_stem


def test_conv_stem_structure_and_stride():
    vit = tiny_vit(32, 8, conv_stem=True)
    assert isinstance(vit.patch_embed, ConvStemPatchEmbed)
    strides = [m.stride[0] for m in vit.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1]  # three stride-2 3x3 convs + 1x1 projection
    vit14 = tiny_vit(56, 14, conv_stem=True)
    strides14 = [m.stride[0] for m in vit14.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides14 == [2, 7, 1]
    out = vit14.patch_embed(torch.rand(1, 3, 56, 56))
    assert out.shape == (1, 16, 64)
    plain = tiny_vit(32, 8, conv_stem=False)
    assert isinstance(plain.patch_embed.proj, torch.nn.Conv2d) and plain.patch_embed.proj.kernel_size == (8, 8)


def test_build_vit_overrides_and_no_head():
    vit = build_vit(NAME, 48, 8, depth=3, embed_dim=96, num_heads=6)
    assert isinstance(vit, VisionTransformer)
    assert len(vit.blocks) == 3 and vit.embed_dim == 96 and vit.blocks[0].attn.num_heads == 6
    assert vit.num_classes == 0 and isinstance(vit.head, torch.nn.Identity)
    assert grid_size(vit) == (6, 6)
    assert vit.pos_embed.shape == (1, 1 + 36, 96)


def test_build_vit_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiple"):
        build_vit(NAME, 30, 8)
    with pytest.raises(ValueError, match="unknown"):
        build_vit("no_such_vit_xyz", 32, 8)
    with pytest.raises(ValueError, match="VisionTransformer"):
        build_vit("resnet18", 32, 8)


@pytest.mark.parametrize("overrides,prefix", [({}, 1), ({"reg_tokens": 2}, 3), ({"class_token": False}, 0)])
def test_patch_tokens_drop_prefix(overrides, prefix):
    vit = tiny_vit(32, 8, **overrides)
    assert vit.num_prefix_tokens == prefix
    x = torch.randn(2, 3, 32, 32)
    full = vit.forward_features(x)
    assert full.shape == (2, prefix + 16, 64)
    tokens = patch_tokens(vit, x)
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(tokens, full[:, prefix:])


def test_dynamic_img_size_runs_other_sizes():
    model = tiny_model(32, 8, vit_kwargs={"dynamic_img_size": True})
    out = model(images(1, 48))
    assert out.shape == (1, 1, 48, 48)
    assert model.similarity(images(1, 48)).shape == (1, 36, 36)


# ---------------------------------------------------------------- attention capture


@pytest.mark.parametrize("qk_norm", [False, True])
def test_recorder_matches_unfused_attention(qk_norm):
    vit = tiny_vit(32, 8, qk_norm=qk_norm, reg_tokens=1)
    with torch.no_grad():
        # qk-norm weights start at 1/0; perturb them so the test sees whether they apply.
        for blk in vit.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                for p in norm.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    reference = manual_attention(vit, x)
    with AttentionRecorder(vit, layers=None) as rec:
        out_hooked = vit.forward_features(x)
    torch.testing.assert_close(out_hooked, vit.forward_features(x))  # hooks do not alter the forward
    assert sorted(rec.attentions) == [0, 1]
    for i in (0, 1):
        attn = rec.attentions[i]
        assert attn.shape == (2, 4, 18, 18)  # 2 prefix + 16 patches
        torch.testing.assert_close(attn, reference[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 18))


def test_recorder_head_mean_layers_and_hook_removal():
    vit = tiny_vit(32, 8)
    x = torch.randn(1, 3, 32, 32)
    with AttentionRecorder(vit, layers=[-1], head_mean=True) as rec:
        vit.forward_features(x)
    assert list(rec.attentions) == [1]
    assert rec.attentions[1].shape == (1, 17, 17)
    torch.testing.assert_close(rec.attentions[1], manual_attention(vit, x)[1].mean(1), rtol=1e-5, atol=1e-6)
    for blk in vit.blocks:
        assert not blk.attn.q_norm._forward_hooks and not blk.attn.k_norm._forward_hooks
    with pytest.raises(IndexError):
        AttentionRecorder(vit, layers=[5])


def test_recorder_rejects_other_attention_modules():
    vit = tiny_vit(32, 8)
    vit.blocks[0].attn = torch.nn.MultiheadAttention(64, 4)
    with pytest.raises(TypeError):
        AttentionRecorder(vit, layers=[0])


def test_similarity_matrix_properties_and_formula():
    model = tiny_model(32, 8, vit_kwargs={"reg_tokens": 2})
    x = images(3, 32)
    with torch.no_grad():
        s = similarity_matrix(model, x, layers=[0, -1])
        reference = manual_attention(model.backbone, model.normalize(x))
    assert s.shape == (3, 16, 16)
    assert (s >= 0).all()
    torch.testing.assert_close(s.sum(-1), torch.ones(3, 16))
    mean = torch.stack([reference[0].mean(1), reference[1].mean(1)]).mean(0)[:, 3:, 3:]
    torch.testing.assert_close(s, mean / mean.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    # a bare ViT takes already-normalised input and gives the same S
    torch.testing.assert_close(similarity_matrix(model.backbone, model.normalize(x), layers=[0, 1]), s)
    torch.testing.assert_close(model.similarity(x, layers=[0, -1]), s)


def test_similarity_stops_after_last_selected_block():
    model = tiny_model(32, 8)
    calls = []
    handle = model.backbone.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    s0 = model.similarity(images(1, 32), layers=[0])
    handle.remove()
    assert calls == [] and s0.shape == (1, 16, 16)


def test_similarity_is_differentiable_when_grad_enabled():
    model = tiny_model(32, 8)
    s = model.similarity(images(1, 32))
    assert s.requires_grad
    s[0, 0, 1].backward()
    assert model.backbone.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- decoder and model


def test_mask_model_forward_composition_and_normalisation():
    model = tiny_model(32, 8)
    x = images(2, 32)
    norm = model.normalize(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, (x - mean) / std)
    expected = model.decoder(patch_tokens(model.backbone, norm), (4, 4), image=norm)
    torch.testing.assert_close(model(x), expected)
    assert "pixel_mean" not in model.state_dict()


def test_decoder_without_skip_and_errors():
    dec = MaskDecoder(64, decoder_dim=32, num_upsamples=2, image_skip=False)
    out = dec(torch.randn(2, 16, 64), (4, 4))
    assert out.shape == (2, 1, 16, 16)
    assert dec(torch.randn(2, 16, 64), (4, 4), out_size=(20, 20)).shape == (2, 1, 20, 20)
    with pytest.raises(ValueError):
        dec(torch.randn(2, 15, 64), (4, 4))
    skip = MaskDecoder(64, decoder_dim=32, num_upsamples=2, image_skip=True)
    with pytest.raises(ValueError, match="image"):
        skip(torch.randn(2, 16, 64), (4, 4))
    # the image branch makes the output depend on pixels within one patch
    img = torch.randn(1, 3, 16, 16)
    img2 = img.clone()
    img2[:, :, 0, 0] += 5.0
    tok = torch.randn(1, 16, 64)
    assert not torch.allclose(skip(tok, (4, 4), image=img), skip(tok, (4, 4), image=img2))


@pytest.mark.parametrize("conv_stem,image_skip", [(True, True), (False, False)])
def test_gradients_reach_every_parameter(conv_stem, image_skip):
    model = tiny_model(32, 8, conv_stem=conv_stem, image_skip=image_skip).train()
    logits = model(images(2, 32))
    target = (torch.rand_like(logits) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_seeded_builds_are_deterministic():
    x = images(2, 32)
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(a(x), c(x))


# ---------------------------------------------------------------- checkpoints


def test_vit_checkpoint_round_trip_nested_and_prefixed(tmp_path):
    src = tiny_vit(32, 8, seed=1)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["head.weight"] = torch.randn(10, 64)  # classifier of a pretrained file
    path = tmp_path / "deit_style.pth"
    torch.save({"model": state, "epoch": 3}, path)
    dst = build_vit(NAME, 32, 8, pretrained_path=str(path), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst.forward_features(x), src.forward_features(x))
    report = load_vit_state_dict(tiny_vit(32, 8, seed=2), {"state_dict": state})
    assert report.missing == [] and report.mismatched == [] and report.resized == []
    assert report.unexpected == ["head.weight"]
    assert len(report.loaded) == len(src.state_dict())


def test_checkpoint_from_other_img_size_resizes_pos_embed():
    src = tiny_vit(48, 8, seed=1)  # grid 6
    dst = tiny_vit(32, 8, seed=2)  # grid 4
    report = load_vit_state_dict(dst, src.state_dict())
    assert report.resized == ["pos_embed"] and report.missing == [] and report.unexpected == []
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[4, 4], old_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), expected)
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.isfinite(dst.forward_features(torch.randn(1, 3, 32, 32))).all()


def test_checkpoint_with_other_patch_size_and_mae_extras():
    src = tiny_vit(64, 16, seed=1)  # grid 4, 16x16 kernel
    state = dict(src.state_dict())
    state["mask_token"] = torch.zeros(1, 1, 64)
    state["decoder_embed.weight"] = torch.zeros(32, 64)
    dst = tiny_vit(32, 8, seed=2)  # grid 4, 8x8 kernel
    report = load_vit_state_dict(dst, state)
    assert report.resized == ["patch_embed.proj.weight"]
    assert report.unexpected == ["decoder_embed.weight", "mask_token"] and report.missing == []
    assert dst.patch_embed.proj.weight.shape == (64, 3, 8, 8)
    torch.testing.assert_close(dst.pos_embed, src.pos_embed)
    # resample_patch_embed (pseudo-inverse resize, FlexiViT) keeps the response to a smooth
    # image resized with the patch: cosine ~0.995 (a plain bilinear kernel resize gives ~0.98)
    interp = torch.nn.functional.interpolate
    img = interp(torch.rand(1, 3, 8, 8), size=(64, 64), mode="bilinear", align_corners=False)
    small = interp(img, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    a, b = src.patch_embed(img), dst.patch_embed(small)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_linear_checkpoint_into_conv_stem_reports_stem_keys():
    src = tiny_vit(32, 8, seed=1, conv_stem=False)
    dst = tiny_vit(32, 8, seed=2, conv_stem=True)
    report = load_vit_state_dict(dst, src.state_dict())
    assert set(report.unexpected) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert report.missing and all(k.startswith("patch_embed.proj.") for k in report.missing)
    torch.testing.assert_close(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_extract_state_dict_from_mask_model_and_errors():
    model = tiny_model(32, 8)
    vit_keys = set(model.backbone.state_dict())
    state = extract_state_dict({"model": model.state_dict()}, vit_keys)
    assert vit_keys <= set(state)
    with pytest.raises(ValueError):
        extract_state_dict({"epoch": 3})


def test_mask_model_save_load_round_trip(tmp_path):
    model = tiny_model(32, 8, seed=5, vit_kwargs={"reg_tokens": 1})
    path = tmp_path / "runs" / "gen.pt"
    save_mask_model(path, model, extra={"epoch": 2})
    assert [p.name for p in path.parent.iterdir()] == ["gen.pt"]  # no temp file left behind
    loaded = load_mask_model(path).eval()
    assert loaded.checkpoint_extra == {"epoch": 2}
    assert loaded.backbone.num_prefix_tokens == 2
    x = images(2, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
