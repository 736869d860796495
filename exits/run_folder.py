"""The run folder: the name of every file a run writes, and the readers of its run files.

Every stage reads its inputs from and writes its outputs to one folder (``--workdir``);
this module is the only place that spells out the names, so a stage, the report, the
spot-fix page, stage 2 and the benchmarks all ask it instead of building paths::

    WORKDIR/
      config.yaml              the validated config of the last `exits run`
      run.json                 its inputs: {"images": dir, "annotations": json, "gt": json | null}
      run_summary.json         counts, seconds per stage, mIoU, task states
      instances.parquet        stage 0: one row per object (points, boxes, crop windows)
      rejections.json          stage 0: every rejected record and why
      similarity/model.pt      stage 1a: the MIL-trained similarity extractor
      points.parquet           stage 1b: retrieved pseudo FG/BG points (merged shards)
      generator/model.pt       stage 1c: the pseudo-label generator (EMA teacher)
      pseudo_labels.json       stage 1d: the input json with pseudo masks (+ .parquet)
      shards/{points,pseudo}-NNNNN.parquet   per-shard outputs of 1b / 1d
      report/                  mIoU report (metrics.parquet, summary.json, report.md/.html)
      click_model/model.pt     the spot-fix click model (`exits train-clicks`)
      click_model/eval_clicks.json  its robot-user evaluation (`exits eval-clicks`; picks `--editor auto`)
      fixes/fixes.jsonl        spot-fix decisions, append-only
      pseudo_labels_fixed.json fixes merged over the pseudo labels (`exits export`)
      detector/                stage 2 checkpoints, logs, predictions, metrics
      loop/loop.json           `exits loop`: its Prefect flow run id, deployment, state, page address
      loop/review.json         `exits loop`: the triage budget (ann ids the reviewer is asked to look at)
      loop/summary.json, .md   `exits loop`: the final summary (fixes, fixed-set mIoU, mask AP before/after)
      loop/detector_history.json  mask AP per training json digest (before / after fixes)
      cache/                   derived copies the training stages memory-map (stage 1c's point
                               labels, the click model's training set); safe to delete
      .prefect-results/        Prefect task results and cache records

The rule for which json stage 2 trains on (:meth:`RunFolder.training_labels`) lives here
too: it is a property of the run folder, not of the web page that writes the fixes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from exits.io import atomic_open, file_digest, write_json

if TYPE_CHECKING:  # the config package is only needed by the readers that validate
    from exits.config import ExitsConfig

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
RUN_META = "run.json"
RUN_SUMMARY = "run_summary.json"
INSTANCES = "instances.parquet"
REJECTIONS = "rejections.json"
SIMILARITY_DIR = "similarity"
GENERATOR_DIR = "generator"
MODEL_FILE = "model.pt"
CHECKPOINTS_DIR = "checkpoints"
POINTS = "points.parquet"
SHARDS_DIR = "shards"
PSEUDO_JSON = "pseudo_labels.json"
PSEUDO_PARQUET = "pseudo_labels.parquet"
REPORT_DIR = "report"
CLICK_MODEL_DIR = "click_model"
FIXES_DIR = "fixes"
FIXES_FILE = "fixes.jsonl"
FIXED_JSON = "pseudo_labels_fixed.json"
DETECTOR_DIR = "detector"
PREFECT_RESULTS_DIR = ".prefect-results"
CACHE_DIR = "cache"
LOOP_DIR = "loop"

# Key under info.spotfix of pseudo_labels_fixed.json: the digest of the pseudo_labels.json it
# was merged from (a merge made from older pseudo labels is stale).
FIXED_SOURCE_DIGEST = "source_blake2b"

__all__ = ["RunFolder", "RunMeta", "CONFIG", "RUN_META", "INSTANCES", "POINTS", "PSEUDO_JSON", "PSEUDO_PARQUET",
           "FIXED_JSON", "FIXED_SOURCE_DIGEST", "REPORT_DIR", "DETECTOR_DIR", "SHARDS_DIR"]


@dataclass(frozen=True)
class RunMeta:
    """``run.json``: where the run's inputs are (absolute paths as the run saw them)."""

    images: Path | None = None
    annotations: Path | None = None
    gt: Path | None = None


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder; nothing is created or read until a method is called."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # --- stage outputs -----------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def run_meta(self) -> Path:
        return self.root / RUN_META

    @property
    def run_summary(self) -> Path:
        return self.root / RUN_SUMMARY

    @property
    def instances(self) -> Path:
        return self.root / INSTANCES

    @property
    def rejections(self) -> Path:
        return self.root / REJECTIONS

    @property
    def similarity(self) -> Path:
        return self.root / SIMILARITY_DIR / MODEL_FILE

    @property
    def points(self) -> Path:
        return self.root / POINTS

    @property
    def generator(self) -> Path:
        return self.root / GENERATOR_DIR / MODEL_FILE

    @property
    def pseudo_json(self) -> Path:
        return self.root / PSEUDO_JSON

    @property
    def pseudo_parquet(self) -> Path:
        return self.root / PSEUDO_PARQUET

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    def shard(self, stage: str, index: int) -> Path:
        """``shards/points-00003.parquet`` / ``shards/pseudo-00003.parquet``."""
        return self.shards_dir / f"{stage}-{index:05d}.parquet"

    def num_instances(self) -> int:
        """Rows of ``instances.parquet`` (from its footer; no data is read)."""
        import pyarrow.parquet as pq

        return pq.read_metadata(self.instances).num_rows

    def checkpoints(self, model: Path) -> Path:
        """Training checkpoints beside a stage's model: ``similarity/checkpoints``."""
        return Path(model).parent / CHECKPOINTS_DIR

    @property
    def cache_dir(self) -> Path:
        """``cache/``: files derived from the run's own files for training to memory-map (named
        by the digest of their source, rebuilt when missing); deleting it loses nothing."""
        return self.root / CACHE_DIR

    @property
    def report_dir(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def click_model_dir(self) -> Path:
        return self.root / CLICK_MODEL_DIR

    @property
    def click_model(self) -> Path:
        return self.click_model_dir / MODEL_FILE

    @property
    def click_eval(self) -> Path:
        """``exits eval-clicks``' result for the run's click model (``--editor auto`` reads it)."""
        return self.click_model_dir / "eval_clicks.json"

    @property
    def fixes_dir(self) -> Path:
        return self.root / FIXES_DIR

    @property
    def fixes_file(self) -> Path:
        return self.fixes_dir / FIXES_FILE

    @property
    def fixed_json(self) -> Path:
        return self.root / FIXED_JSON

    @property
    def detector_dir(self) -> Path:
        return self.root / DETECTOR_DIR

    @property
    def prefect_results(self) -> Path:
        return self.root / PREFECT_RESULTS_DIR

    # --- `exits loop` ------------------------------------------------------------------
    @property
    def loop_dir(self) -> Path:
        return self.root / LOOP_DIR

    @property
    def loop_state(self) -> Path:
        """``loop/loop.json``: the loop's flow run id (``--resume`` and the page find it here)."""
        return self.loop_dir / "loop.json"

    @property
    def review_queue(self) -> Path:
        """``loop/review.json``: the triage budget the spot-fix page limits its queue to."""
        return self.loop_dir / "review.json"

    @property
    def loop_summary(self) -> Path:
        return self.loop_dir / "summary.json"

    @property
    def loop_summary_md(self) -> Path:
        return self.loop_dir / "summary.md"

    @property
    def detector_history(self) -> Path:
        return self.loop_dir / "detector_history.json"

    @property
    def loop_continue_log(self) -> Path:
        """``loop/continue.log``: output of a loop run continued in the background by the page."""
        return self.loop_dir / "continue.log"

    # --- run files ---------------------------------------------------------------------
    def write_run_files(self, config_yaml: str, images: Path, annotations: Path, gt: Path | None) -> None:
        """``config.yaml`` (the validated config, dumped) and ``run.json`` (the inputs), atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.config) as fh:
            fh.write(config_yaml)
        write_json(self.run_meta, {"images": str(Path(images).resolve()),
                                   "annotations": str(Path(annotations).resolve()),
                                   "gt": str(Path(gt).resolve()) if gt else None})

    def read_meta(self) -> RunMeta:
        """``run.json`` (all fields None when the file is absent: a folder made by hand)."""
        if not self.run_meta.is_file():
            return RunMeta()
        try:
            raw: dict[str, Any] = json.loads(self.run_meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.run_meta}: not valid JSON ({exc})") from exc
        return RunMeta(**{k: Path(raw[k]) if raw.get(k) else None for k in ("images", "annotations", "gt")})

    def images_dir(self) -> Path:
        """The image folder the run was made from.

        Raises:
            FileNotFoundError: ``run.json`` is missing or names no image folder.
        """
        images = self.read_meta().images
        if images is None:
            raise FileNotFoundError(f"{self.run_meta} not found or names no image folder; pass --images")
        return images

    def gt_json(self, gt: str | Path | None = None) -> Path:
        """The GT json to evaluate against: ``gt`` if given, else the run's ``gt``, else its
        input annotations (which carry masks for the demo and COCO-style data).

        Raises:
            FileNotFoundError: no ``gt`` given and ``run.json`` names none.
        """
        if gt is not None:
            return Path(gt)
        meta = self.read_meta()
        named = meta.gt or meta.annotations
        if named is None:
            raise FileNotFoundError(f"{self.run_meta} names no GT json: pass --gt FILE")
        return named

    def config_source(self, config: str | Path | None = None) -> str | Path | None:
        """Which config a command on this folder uses: ``config`` when given, else the run's
        ``config.yaml``, else None (= defaults, for a run folder made by hand)."""
        if config is not None:
            return config
        return self.config if self.config.is_file() else None

    def load_config(self, config: str | Path | None = None, overrides: Sequence[str] = ()) -> "ExitsConfig":
        """The validated config for a command on this folder (see :meth:`config_source`).

        Raises:
            exits.config.ConfigError: the file is missing or a value is invalid (names the key).
        """
        from exits.config import load_config

        source = self.config_source(config)
        return load_config(str(source) if source is not None else None, list(overrides))

    # --- stage 2's training labels -----------------------------------------------------
    def training_labels(self) -> Path:
        """The json stage 2 trains on: ``pseudo_labels_fixed.json`` when ``exits export`` made
        it from the current ``pseudo_labels.json``, else ``pseudo_labels.json`` (a stale merge
        is logged and not used). Never a GT json.

        Raises:
            FileNotFoundError: the run has no pseudo labels yet (names the folder).
        """
        if not self.pseudo_json.is_file():
            raise FileNotFoundError(f"{self.root}: no {PSEUDO_JSON} (run stage 1 first: `exits run`)")
        if not self.fixed_json.is_file():
            return self.pseudo_json
        with open(self.fixed_json, encoding="utf-8") as fh:
            recorded = json.load(fh).get("info", {}).get("spotfix", {}).get(FIXED_SOURCE_DIGEST)
        if recorded != file_digest(self.pseudo_json, memo=False):
            log.warning("%s was merged from an older %s; run `exits export` again. Using the pseudo labels.",
                        self.fixed_json, PSEUDO_JSON)
            return self.pseudo_json
        return self.fixed_json
