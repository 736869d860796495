"""Settings of the spot-fix click model: a frozen dataclass of plain values.

The run config's ``click_model:`` YAML section maps onto :class:`ClickModelConfig`
one-to-one (``from_dict`` rejects unknown keys); the decoder, the trainer and the
evaluation read only this object.
"""
from __future__ import annotations

from dataclasses import dataclass

from exits.settings import FrozenSettings

LOSSES = ("nfl", "bce_dice")
TRAIN_SOURCES = ("pseudo", "coco", "synthetic", "pseudo+synthetic")
CONSTRAINTS = ("none", "disk", "crf", "grabcut")
CRF_RESOLUTIONS = ("crop", "window")
# Settings that act only after the decoder: an evaluation may change them on a trained model.
INFERENCE_ONLY = ("progressive", "constraint", "crf_iters", "crf_sxy", "crf_srgb", "crf_w", "crf_colour",
                  "crf_max_size", "crf_resolution", "grabcut_mix", "grabcut_after")
SYNTHETIC_VARIANTS = ("demo", "holdout")  # exits.demo.sources.VARIANTS


@dataclass(frozen=True)
class ClickModelConfig(FrozenSettings):
    """Decoder architecture, click encoding, training and inference settings.

    Decoder parts (each switchable for ablations): ``use_imsa`` interactive attention
    (InterFormer I-MSA), ``use_spm`` max/min cosine-similarity propagation (SPM),
    ``use_prototypes`` SGC prototypes + GPA allocation (ASGNet), ``use_zoom`` coarse pass +
    zoomed refinement pasted into it (IAM), ``use_fdm`` / ``use_pdm`` CDNet's feature /
    pixel diffusion (``pdm_iterations``), ``progressive`` CDNet progressive mode (inference
    only; off by default: with the CRF click constraint, keeping only the changed region
    that touches the last click cost ~2 clicks of NoC@85/90 from the pseudo mask in
    bench/bench_clicks.py (seed 0, 100-iteration model), probably because the CRF and the
    decoder also fix errors away from the click, which progressive mode throws
    away). Training-only parts (nothing of them runs at inference): ``use_pem`` the
    prototype loss (PEM, weight ``pem_weight``), ``latent_heads`` CDNet's diversified
    training (N extra heads, the gradient from the one with the lowest loss; 0 = off).

    Click constraint after the decoder (``constraint``): "crf" a dense CRF with the decoder's
    probabilities and a click-conditioned colour model (weight ``crf_colour``) as unary and
    the click disks as hard labels (``crf_iters``, kernels ``crf_sxy`` / ``crf_srgb`` /
    ``crf_w`` on the crop, at most ``crf_max_size`` px a side), then the disks are set to their
    labels; "grabcut" GrabCut started from the decoder's mask with the disks as definite labels
    (``crf_iters`` rounds; worse than "crf" in bench/bench_clicks.py: NoC@90 8.56 vs 7.60);
    "disk" only the last step; "none" the plain decoder (:mod:`exits.interactive.constrain`).
    ``crf_resolution``: "window" (default) runs the constraint on the object's window at the
    image's own pixels (decoder probabilities resampled to it, long side capped at
    ``crf_max_size``), as GrabCut works, so boundaries are not limited to the crop's
    resolution; "crop" on the encoder's S x S crop. On the demo's tuning split (queue ranks
    41-80, seed 0) "window" took NoC@90 from 5.90 to 4.10 and NoF@90 from 8 to 4 (cap 128),
    and the cap 192 (no demo window is larger) to 3.73 and 3 (bench/bench_clicks.py).

    Click encoding: ``disk_radius`` in crop pixels (the crop is the encoder's input size,
    e.g. 96 for the demo generator). Zoom: the RoI is the box of the coarse foreground and
    all clicks, grown by ``zoom_expand`` (1.4 as in RITM / InterFormer) and at least
    ``zoom_min_fraction`` of the crop side. Sizes: the coarse pass decodes the whole crop at
    Z_c = min(S, ``coarse_size``) px, the refinement the RoI at Z = min(S, ``decode_size``)
    px, each on a token grid of min(``max_grid``, Z / 8) cells a side (one cell per 8 decoded
    pixels, as the demo ViT's patches); the click maps and the decoder's output are at
    M = S / k <= ``map_size`` (k an integer, :func:`exits.interactive.inference.map_frame`).
    The demo's 96-px crops are untouched by all four (96 / 96 px, 12 x 12 cells, M = 96). A
    512 crop is decoded at 96 px (coarse) and 128 px (refinement): the mask at 1/4 of the
    input, the ratio of SAM's decoder (256 px masks for 1024 px inputs); boundary detail
    beyond that comes from the click constraint at the window's own pixels. These were 128 /
    256 px: 2.2x the per-click cost at 512 px for pixels the CRF (at most ``crf_max_size``)
    then threw away (docs/benchmarks.md, spot-fix speed).

    Training: ``train_source`` "pseudo+synthetic" (default: the benchmarked model; trained on
    the pseudo masks alone the decoder needs ~1.5 more clicks to 85 %, bench/bench_clicks.py
    ablation) or "pseudo", which uses the run's pseudo masks with the highest
    ``score`` (``train_top_fraction`` of them, at most ``max_train_objects``); "coco" the
    masks of the explicitly given ``train_json``; "synthetic" ``synthetic_objects`` objects
    generated by the demo-data generator with seed ``synthetic_seed`` from the photographs of
    ``synthetic_variant`` ("demo" or "holdout", :mod:`exits.demo.sources`; never the run's
    data nor its GT; a benchmark that evaluates on one variant trains on the other's
    photographs to measure the editor out of domain); "pseudo+synthetic" both. Iterative
    click simulation (InterFormer Sec. 3.4): r rounds without
    gradient, P(r) proportional to ``sim_round_decay``^r for r = 0..``max_sim_rounds`` (20);
    with probability ``p_start_from_mask`` starting from a corrupted copy of the target
    (editing a mask) instead of from scratch. ``sim_constraint`` (default on): each
    simulated round's answer is built as inference builds it, the decoder's probabilities
    through the configured click ``constraint`` on the crop, so the previous masks the
    decoder learns from are the kind it is later given (off: only the click disks forced,
    the rule before issue 28).

    ``grabcut_mix`` (inference only, 0 = off): weight w of GrabCut's answer to the same clicks
    and previous mask (:func:`exits.interactive.grabcut.grabcut_from_clicks` on the window) in
    the probability the click constraint refines, p = (1 - w) p_decoder + w 1[GrabCut fg]:
    where the decoder and GrabCut agree the label is sure, where they disagree the CRF's
    colour model and kernels decide. ``grabcut_after`` (inference only, default 8, 0 = off): from the
    N-th click of an object on, GrabCut answers (the same clicks, started from the previous
    answer, which the click model made for the first clicks). Out of domain the click model
    alone needs fewer clicks than GrabCut but fails on more objects (its answers stop
    improving on hard objects, where GrabCut's colour models keep going); handing over at
    the 8th click (chosen on queue ranks 41-80 of both variants: 3, 5, 8, 12 tried; GrabCut
    mixing w 0.25 / 0.5 / 1 tried and worse) met the bar on ranks 1-40 of both variants over
    3 seeds (docs/benchmarks.md, "Editor choice"). ``grabcut_mix`` stays 0: it cost clicks
    on the tuning split. ``loss``: "nfl" (normalized focal loss, gamma
    ``focal_gamma``) or "bce_dice".
    """

    dim: int = 64
    heads: int = 4
    imsa_depth: int = 1
    pool_sizes: tuple[int, ...] = (1, 2, 4, 6)
    use_imsa: bool = True
    use_spm: bool = True
    use_prototypes: bool = True
    use_zoom: bool = True
    use_fdm: bool = True
    use_pdm: bool = True
    pdm_iterations: int = 10
    use_pem: bool = True
    pem_weight: float = 0.2
    latent_heads: int = 4
    progressive: bool = False
    constraint: str = "crf"
    crf_iters: int = 5
    crf_sxy: float = 20.0
    crf_srgb: float = 13.0
    crf_w: float = 10.0
    crf_colour: float = 1.0
    crf_max_size: int = 192
    crf_resolution: str = "window"
    max_prototypes: int = 4
    cells_per_prototype: int = 12
    sgc_iters: int = 8
    disk_radius: float = 3.0
    zoom_expand: float = 1.4
    zoom_min_fraction: float = 0.4
    coarse_size: int = 96
    decode_size: int = 128
    max_grid: int = 32
    map_size: int = 256
    train_source: str = "pseudo+synthetic"
    train_json: str | None = None
    train_top_fraction: float = 0.6
    max_train_objects: int = 2000
    synthetic_objects: int = 2000
    synthetic_seed: int = 1000
    synthetic_variant: str = "demo"
    sim_constraint: bool = True
    grabcut_mix: float = 0.0
    grabcut_after: int = 8
    iterations: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_sim_rounds: int = 20
    sim_round_decay: float = 0.8
    p_start_from_mask: float = 0.5
    loss: str = "nfl"
    focal_gamma: float = 2.0
    max_clicks: int = 20
    device: str = "cpu"
    seed: int = 0
    feature_cache_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool_sizes", tuple(int(s) for s in self.pool_sizes))
        errors = []
        if self.loss not in LOSSES:
            errors.append(f"loss: {self.loss!r} is not one of {list(LOSSES)}")
        if self.train_source not in TRAIN_SOURCES:
            errors.append(f"train_source: {self.train_source!r} is not one of {list(TRAIN_SOURCES)}")
        if self.constraint not in CONSTRAINTS:
            errors.append(f"constraint: {self.constraint!r} is not one of {list(CONSTRAINTS)}")
        if self.synthetic_variant not in SYNTHETIC_VARIANTS:
            errors.append(f"synthetic_variant: {self.synthetic_variant!r} is not one of {list(SYNTHETIC_VARIANTS)}")
        if not 0.0 <= self.grabcut_mix <= 1.0:
            errors.append(f"grabcut_mix: must be in [0, 1], got {self.grabcut_mix}")
        if self.crf_resolution not in CRF_RESOLUTIONS:
            errors.append(f"crf_resolution: {self.crf_resolution!r} is not one of {list(CRF_RESOLUTIONS)}")
        if self.train_source == "coco" and not self.train_json:
            errors.append("train_source 'coco' needs train_json (a COCO json with masks for click training)")
        for name in ("dim", "heads", "iterations", "batch_size", "max_prototypes",
                     "cells_per_prototype", "max_clicks", "max_train_objects", "feature_cache_size", "decode_size", "max_grid",
                     "coarse_size", "synthetic_objects", "crf_max_size", "map_size"):
            if int(getattr(self, name)) < 1:
                errors.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("imsa_depth", "sgc_iters", "max_sim_rounds", "seed", "latent_heads", "pdm_iterations",
                     "crf_iters", "synthetic_seed", "grabcut_after"):
            if int(getattr(self, name)) < 0:
                errors.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.dim % self.heads:
            errors.append(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not self.pool_sizes or any(s < 1 for s in self.pool_sizes):
            errors.append(f"pool_sizes: need positive sizes, got {list(self.pool_sizes)}")
        if not self.disk_radius > 0:
            errors.append(f"disk_radius: must be > 0, got {self.disk_radius}")
        if not self.zoom_expand >= 1:
            errors.append(f"zoom_expand: must be >= 1, got {self.zoom_expand}")
        if not 0 < self.zoom_min_fraction <= 1:
            errors.append(f"zoom_min_fraction: must be in (0, 1], got {self.zoom_min_fraction}")
        for name in ("train_top_fraction",):
            if not 0 < getattr(self, name) <= 1:
                errors.append(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.p_start_from_mask <= 1:
            errors.append(f"p_start_from_mask: must be in [0, 1], got {self.p_start_from_mask}")
        if not 0 < self.sim_round_decay <= 1:
            errors.append(f"sim_round_decay: must be in (0, 1], got {self.sim_round_decay}")
        if self.pem_weight < 0 or self.crf_colour < 0 or not (self.crf_sxy > 0 and self.crf_srgb > 0 and self.crf_w >= 0):
            errors.append("pem_weight and crf_w must be >= 0; crf_sxy and crf_srgb > 0")
        if not self.lr > 0 or self.weight_decay < 0 or self.focal_gamma < 0:
            errors.append("lr must be > 0; weight_decay and focal_gamma >= 0")
        if errors:
            raise ValueError("invalid ClickModelConfig: " + "; ".join(errors))
