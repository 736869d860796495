"""SimMIM warm start of the similarity extractor (issue 13 item 5): masks, patchify, loss,
no leak of masked pixels, and the warm start training the backbone only, from crops only."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from exits.config import load_config
from exits.engine import TrainSettings
from exits.models import build_mask_model
from exits.models.masked_image_modeling import SimMIM, block_mask, masked_l1_loss, patchify
from exits.stages.similarity import warm_start_backbone

TINY = dict(depth=2, embed_dim=32, num_heads=2, decoder_dim=16)


def tiny_model(conv_stem: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return build_mask_model("vit_tiny_patch16_224", 32, 8, conv_stem=conv_stem, **TINY)


def test_block_mask_counts_and_blocks():
    g = torch.Generator().manual_seed(0)
    mask = block_mask(64, (12, 12), 0.6, 2, generator=g)
    assert mask.shape == (64, 144) and mask.dtype == torch.bool
    # 6 x 6 = 36 blocks, round(0.6 * 36) = 22 masked blocks of 4 patches per image
    assert torch.all(mask.sum(1) == 22 * 4)
    grid = mask.view(64, 6, 2, 6, 2)  # every 2 x 2 block is all masked or all visible
    assert torch.all(grid.all(dim=(2, 4)) == grid.any(dim=(2, 4)))
    assert not torch.equal(mask[0], mask[1])  # a fresh draw per image


def test_block_mask_ragged_grid_and_bounds():
    mask = block_mask(8, (5, 5), 0.5, 2, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (8, 25)
    assert torch.all(mask.sum(1) > 0) and torch.all(mask.sum(1) < 25)
    with pytest.raises(ValueError, match="ratio"):
        block_mask(1, (4, 4), 1.0, 1)
    with pytest.raises(ValueError, match="nothing to mask"):
        block_mask(1, (2, 2), 0.5, 2)


def test_patchify_matches_loop():
    x = torch.randn(2, 3, 8, 12)
    out = patchify(x, 4)
    assert out.shape == (2, 6, 48)
    for t in range(6):
        r, c = divmod(t, 3)
        ref = x[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(out[:, t], ref)


def test_masked_l1_counts_masked_values_only():
    pred, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    ref = (pred - target).abs()[mask].mean()
    assert torch.allclose(masked_l1_loss(pred, target, mask), ref)
    pred2 = pred.clone()
    pred2[~mask] += 100.0  # visible patches carry no loss
    assert torch.allclose(masked_l1_loss(pred2, target, mask), ref)


@pytest.mark.parametrize("conv_stem", [True, False])
def test_masked_pixels_do_not_reach_the_encoder(conv_stem):
    model = tiny_model(conv_stem).eval()
    mim = SimMIM(model.backbone, model.pixel_mean, model.pixel_std).eval()
    torch.manual_seed(3)
    x = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [0, 5, 6]] = True  # patches (0,0), (1,1), (1,2)
    y = x.clone()
    y[:, :, 8:16, 8:24] = torch.rand(1, 3, 8, 16)  # change only masked patches' pixels
    with torch.no_grad():
        px, tx = mim.predict(x, mask)
        py, ty = mim.predict(y, mask)
        assert torch.allclose(px, py, atol=1e-6)  # the prediction cannot copy them ...
        assert not torch.allclose(tx[0, 5], ty[0, 5])  # ... but they are the target
        z = x.clone()
        z[:, :, 0:8, 16:24] = 1.0 - z[:, :, 0:8, 16:24]  # a visible patch (0, 2)
        pz, _ = mim.predict(z, mask)
        assert not torch.allclose(px, pz, atol=1e-4)


class CropsOnly(Dataset):
    """Items with the crop alone: the warm start must not need a box, points or mask."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        self.images = []
        for _ in range(n):
            cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([16, 16, 6]) + torch.tensor([8, 8, 4])).tolist()
            disk = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).float()
            colour = torch.rand(3, 1, 1, generator=g)
            self.images.append(0.2 + disk * colour * 0.7)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


def test_warm_start_trains_backbone_only_and_lowers_the_loss(tmp_path):
    model = tiny_model()
    backbone0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    decoder0 = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    settings = TrainSettings(epochs=6, batch_size=8, lr=2e-3, warmup_epochs=0, device="cpu",
                             checkpoint_dir=str(tmp_path / "ckpt"))
    history = warm_start_backbone(model, CropsOnly(), settings, mask_ratio=0.5, block=1, progress=False)
    assert len(history) == 6
    assert history[-1]["mim"] < 0.8 * history[0]["mim"]
    assert (tmp_path / "ckpt" / "warm_start" / "last.pt").exists()  # MIL keeps ckpt/last.pt for itself
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, backbone0[k])]
    assert "blocks.0.attn.qkv.weight" in changed
    assert all(torch.equal(v, decoder0[k]) for k, v in model.decoder.state_dict().items())


def test_warm_start_config_defaults_off():
    cfg = load_config("demo")
    assert cfg.similarity.warm_start.method == "none"
    cfg = load_config("demo", ["similarity.warm_start.method=simmim", "similarity.warm_start.mask_ratio=0.4"])
    assert cfg.similarity.warm_start.mask_ratio == 0.4
    with pytest.raises(Exception, match="mask_ratio"):
        load_config("demo", ["similarity.warm_start.mask_ratio=1.5"])
