"""Typed run configuration, validated once at the edge (CLI / flow entry).

The core library never sees these objects' validation logic: stages receive plain values
(or the small frozen sections below), so a config is checked once when it is loaded.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Stage 2's and the click model's settings are their packages' own frozen dataclasses:
# pydantic validates them field by field (their __post_init__ checks run here, unknown keys
# are rejected), so the YAML sections and the code that reads them share one definition.
from detectors.config import DetectorConfig
from exits.interactive.config import ClickModelConfig


class Section(BaseModel):
    """Base for every config section: unknown keys are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    crop_margin: float = Field(0.15, ge=0.0, le=2.0, description="margin added on each side of the extreme-point box, as a fraction of its size")
    crop_min_margin_px: int = Field(4, ge=0, description="at least this many pixels of margin on each side")
    crop_size: int = Field(96, ge=16, le=2048, description="side of the square object crop fed to the ViT")
    derive_missing_points: bool = Field(True, description="derive extreme points from GT masks when an annotation has none (labelling step)")
    point_tolerance_px: float = Field(1.0, ge=0.0, description="how far an extreme point may lie from its box edge")
    check_images: bool = Field(True, description="open every image once during validation (catches corrupt files)")


class BackboneConfig(Section):
    vit_name: str = "vit_tiny_patch16_224"
    img_size: int = Field(96, ge=16)
    patch_size: int = Field(8, ge=2)
    depth: int | None = Field(None, ge=1)
    embed_dim: int | None = Field(None, ge=8)
    num_heads: int | None = Field(None, ge=1)
    conv_stem: bool = True
    decoder_dim: int = Field(64, ge=8)
    image_skip: bool = True
    pretrained_path: str | None = None
    # Paper-scale configs set this to false: a ViT-B/16 from random init on a cluster spends
    # GPU-days on attention that carries no appearance signal for the retrieval (EXITS starts
    # from ImageNet weights). Small demo models train from random init on purpose.
    allow_random_init: bool = True

    @model_validator(mode="after")
    def _grid_divides(self) -> "BackboneConfig":
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        return self

    def random_init_refusal(self) -> str | None:
        """Why training must not start (no weights and random init not allowed), else None."""
        if self.pretrained_path is not None or self.allow_random_init:
            return None
        return (f"backbone.pretrained_path is not set, and this config does not train {self.vit_name} from random "
                f"init (backbone.allow_random_init: false): give a local checkpoint with "
                f"--set backbone.pretrained_path=/path/to/{self.vit_name}.pth, or train from random init anyway "
                f"with --set backbone.allow_random_init=true")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class OptimConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    num_workers: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps in all (the last epoch may end part-way); null = every epoch in full. For smoke/scale runs (configs/scale-smoke.yaml)")


# Keys that moved to the section of the stage that reads them (so a stage's cache key holds
# only what it uses): old configs fail with the new spelling instead of silently changing.
MOVED_KEYS = {
    "similarity": {"layers": "retrieval.layers", "appearance_weight": "retrieval.appearance_weight",
                   "appearance_sigma": "retrieval.appearance_sigma"},
}


def _reject_moved_keys(section: str, data: object) -> object:
    moved = MOVED_KEYS.get(section, {})
    if isinstance(data, dict):
        old = [k for k in data if k in moved]
        if old:
            hints = "; ".join(f"{section}.{k} -> {moved[k]}" for k in old)
            raise ValueError(f"config key(s) moved to the stage that reads them, rename: {hints}")
    return data


class SimilarityConfig(Section):
    """Stage 1a: the MIL-trained similarity extractor (its training only)."""

    optim: OptimConfig = OptimConfig(epochs=8)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        return _reject_moved_keys("similarity", data)


class RetrievalConfig(Section):
    """Stage 1b: point retrieval from the frozen extractor's attention (S -> Sinkhorn -> random walk)."""

    layers: list[int] = Field(default_factory=lambda: [-1], description="transformer layers whose attention is averaged into S")
    appearance_weight: float = Field(0.0, ge=0.0, le=1.0, description="beta: S = (1-beta) S_attn + beta S_app (patch colour kernel); 0 = paper")
    appearance_sigma: float = Field(0.05, gt=0.0, description="bandwidth of the patch colour kernel")
    delta_px: float = Field(4.0, ge=0, description="extreme points moved this many crop pixels inwards (P_FG)")
    sinkhorn_iters: int = Field(50, ge=1)
    alpha: int = Field(5, ge=1, description="random-walk steps")
    tau_fg: float = 0.5
    tau_bg: float = -0.5
    normalize: bool = Field(True, description="score (pi_f - pi_b) / (pi_f + pi_b); False = the paper's raw difference")
    raw_scale: Literal["uniform", "probability"] = Field("uniform", description="raw rule only: 'uniform' thresholds n (pi_f - pi_b) (tau in multiples of the uniform share 1/n, grid independent); 'probability' the unscaled difference (tau ~ 1/n)")
    min_mass: float = Field(0.0, ge=0.0, description="label only patches the walks reach: n (pi_f + pi_b) / 2 >= min_mass (1 = uniform share; 0 = off)")
    neighbour_bg: Literal["none", "fallback", "always"] = Field("fallback", description="FG seeds of the image's other objects as BG seeds: only for objects with no patch outside their box (fallback), for all, or never (none)")
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "RetrievalConfig":
        if self.tau_bg > self.tau_fg:
            raise ValueError(f"tau_bg ({self.tau_bg}) must be <= tau_fg ({self.tau_fg})")
        return self


class CrfConfig(Section):
    impl: Literal["meanfield", "dense"] = "meanfield"
    iters: int = Field(10, ge=1)
    params: dict[str, float] = Field(default_factory=dict, description="kernel parameters passed to crf_refine")


class GeneratorConfig(Section):
    optim: OptimConfig = OptimConfig(epochs=15)
    use_retrieval: bool = Field(True, description="False = box-supervised baseline (MIL + CRF only)")
    point_dropout: float = Field(0.3, ge=0.0, lt=1.0)
    lambda_point: float = Field(1.0, ge=0)
    lambda_crf: float = Field(0.5, ge=0)
    lambda_mil: float = Field(1.0, ge=0)
    crf_warmup_epochs: int = Field(2, ge=0, description="epochs before the CRF loss switches on (the teacher needs to be sensible first)")
    ema_decay: float = Field(0.99, gt=0, lt=1)
    ema_warmup: bool = Field(True, description="teacher decay min(ema_decay, (1+t)/(10+t)) at step t, so the teacher tracks the trained student early instead of holding the random init (False = constant decay)")
    crf: CrfConfig = CrfConfig()


class PseudoLabelConfig(Section):
    threshold: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(64, ge=1)
    crf_refine: bool = Field(True, description="refine the generator's mask with the CRF before thresholding")
    crf_impl: Literal["meanfield", "dense"] = Field("dense", description="CRF for the final refinement (dense = pydensecrf reference, CPU)")
    refine_at: Literal["crop", "image", "none"] = Field("crop", description="none: the generator's own mask (its probability pasted and thresholded, no CRF: what the learned part alone gives); crop: CRF on the S x S crop, then paste; image: box-constrained dense CRF on the crop window at image resolution with the generator's probability as a softened prior (exits.crf.image_refine; pydensecrf, CPU)")
    cpu_bf16: bool = Field(False, description="on CPU, run the generator's forward under bfloat16 autocast: ~2x faster on CPUs with AMX / AVX512-BF16, slower elsewhere; masks change slightly (docs/benchmarks.md, Pseudo-label throughput). On CUDA the top-level amp setting applies")
    crf_workers: int = Field(-1, ge=-1, description="refine_at=image: processes running the image-level CRF beside the forward pass (-1 = one per available CPU, 0 = in the shard's own process); the masks do not depend on it")
    image_crf: dict[str, float] = Field(default_factory=dict, description="refine_at=image: prior_bias, prior_weight, iters, sxy_gauss, compat_gauss, sxy_frac, srgb, compat_bilateral (defaults exits.crf.image_refine.DEFAULT_IMAGE_CRF)")

    @field_validator("image_crf")
    @classmethod
    def _known_image_crf_keys(cls, v: dict[str, float]) -> dict[str, float]:
        known = {"prior_bias", "prior_weight", "iters", "sxy_gauss", "compat_gauss", "sxy_frac", "srgb", "compat_bilateral"}
        unknown = set(v) - known
        if unknown:
            raise ValueError(f"unknown image_crf keys {sorted(unknown)}; known: {sorted(known)}")
        return v


class EvalConfig(Section):
    separated_min_part_pixels: int = Field(16, ge=1)
    separated_min_part_fraction: float = Field(0.05, ge=0, le=0.5)
    separated_ids_path: str | None = None
    peer_sample: int = Field(300, ge=0, le=1_000_000, description="the report's parts table (box / GrabCut / dense CRF / generator / final mask, exits/report/parts.py): at most this many evaluated objects, evenly strided over their sorted ann ids (all when fewer). The peers cost 20-60 ms per object on the demo and up to 1.4 s on large flat images (GrabCut), so the default keeps a report under ~7 min extra in the worst case measured; 0 = no parts table")


class FlowsConfig(Section):
    """How the Prefect flows execute the stages (shards, task runner, retries): execution, not method."""

    shard_size: int = Field(256, ge=1, description="objects per shard of point retrieval and pseudo-label generation (one task, one Parquet file each)")
    task_runner: Literal["threads", "dask"] = Field("threads", description="threads = ThreadPoolTaskRunner in this process; dask = prefect_dask.DaskTaskRunner")
    dask_address: str | None = Field(None, description="scheduler address of a running Dask cluster (tcp://host:8786); None = start a local cluster")
    max_workers: int = Field(2, ge=1, description="threads of the thread runner, or workers of the local Dask cluster")
    retries: int = Field(2, ge=0, description="retries of the IO tasks (prepare, merges, report) after a transient OSError")
    shard_limit: int | None = Field(None, ge=1, description="benchmarks only: compute at most this many shards of point retrieval and of pseudo labels, every k-th (k = ceil(shards / shard_limit)); the other shard tasks write placeholders (no retrieved points; the extreme-point box with score 0) so every later stage sees every object (flows/shard_limit.py). null = every shard (a real run)")


class TrainLaunchConfig(Section):
    """How the training stages (1a, 1c) run: processes per machine and machines
    (exits.engine.launch). Execution, not method: not part of their cache keys."""

    nproc_per_node: Literal["auto"] | int = Field("auto", description="training processes on this machine: auto = one per CUDA device (1 on CPU); an int = that many (on CPU: gloo processes); more than 1 starts them under torchrun")
    nnodes: int = Field(1, ge=1, description="machines training together; > 1 needs rdzv_endpoint and `python -m exits.engine.launch follow` on the other machines (README, 'Multi-GPU and multi-node training')")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous on the machine running `exits run` (nnodes > 1)")
    rdzv_timeout_s: int = Field(900, ge=10, description="how long a training stage waits for the other machines to join")

    @field_validator("nproc_per_node")
    @classmethod
    def _nproc_ok(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"nproc_per_node must be 'auto' or an integer >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _rendezvous_ok(self) -> "TrainLaunchConfig":
        if self.nnodes > 1 and not (self.rdzv_endpoint and ":" in self.rdzv_endpoint):
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint: host:port of the machine running `exits run`")
        return self


class ReviewConfig(Section):
    """The human step of ``exits loop``: which masks a reviewer is asked to look at (the
    triage budget) and how long the suspended flow run waits for "review done"."""

    budget: int | None = Field(50, ge=1, description="review the K lowest-scoring pseudo masks (null = no count limit)")
    below_score: float | None = Field(None, gt=0.0, le=1.0, description="review only masks scoring below this (null = no score limit); with budget: the K lowest of those")
    timeout_hours: float | None = Field(168.0, gt=0, description="a suspended loop run not resumed within this time fails (null = waits forever); 168 h = a weekly loop")
    page_url: str = Field("http://127.0.0.1:8765/", description="address of the spot-fix page named in the suspension message (`exits spotfix -w WORKDIR` serves it)")

    @model_validator(mode="after")
    def _some_limit(self) -> "ReviewConfig":
        if self.budget is None and self.below_score is None:
            raise ValueError("review: set budget (K lowest-scoring masks) or below_score (or both); "
                             "without either every mask would be queued")
        return self


class ExitsConfig(Section):
    """The whole run: one YAML file, overridable with ``--set key.sub=value``."""

    name: str = "exits"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    generator: GeneratorConfig = GeneratorConfig()
    pseudo: PseudoLabelConfig = PseudoLabelConfig()
    eval: EvalConfig = EvalConfig()
    flows: FlowsConfig = FlowsConfig()
    train: TrainLaunchConfig = Field(default_factory=TrainLaunchConfig, description="processes and machines of the training stages (stage 1a, 1c)")
    click_model: ClickModelConfig = Field(default_factory=ClickModelConfig, description="spot-fix click model (exits train-clicks / eval-clicks / spotfix)")
    train_detector: bool = Field(False, description="run stage 2 (train `detector` on the pseudo labels) at the end of `exits run`")
    detector: DetectorConfig = Field(default_factory=DetectorConfig, description="stage 2: the instance segmenter trained on the pseudo labels")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="`exits loop`: the triage budget of the human review and its timeout")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\"):
            raise ValueError(f"name must be a plain word, got {v!r}")
        return v
