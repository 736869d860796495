"""Stage 1c: the pseudo-label generator (ViT + mask decoder) trained on retrieved points.

L = λ_point · L_point + λ_crf · L_crf (EXITS eq. 12), with
L_point = Dice(M~ ⊙ K, Y^) + 1[nothing retrieved] · λ_mil · L_mil and
L_crf = Dice(M, CRF((M + M_teacher) / 2)), teacher = EMA of the student.
Point dropout: each epoch a random subset of the retrieved points (never the extreme-point
seeds or the outside-box background) is left out.

Labels are built per batch: the retrieved patch lists stay sparse (memory-mapped from the
run's points table), the seeds are recomputed from the batch's geometry, and the dropout is
drawn for the batch's objects only, with the same values the earlier dense per-epoch draw
gave (:class:`PointDropout`).

With ``use_retrieval=False`` this is the box-supervised baseline: λ_mil · L_mil + λ_crf · L_crf.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from exits.engine import TrainSettings, train
from exits.engine.distributed import is_main_process
from exits.io import atomic_path, file_digest
from exits.io.parquet_rows import ROW_GROUP_ROWS
from exits.losses import crf_loss, mil_loss, point_loss
from exits.models import save_mask_model
from exits.propagation import seed_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratorLoss:
    lambda_point: float
    lambda_crf: float
    lambda_mil: float
    point_dropout: float
    crf_warmup_epochs: int
    crf_impl: str
    crf_params: dict[str, Any]
    use_retrieval: bool = True


def point_label_masks(points: pa.Table, crop_points: np.ndarray, crop_boxes: np.ndarray, crop_size: int,
                      grid: int, delta_px: float) -> dict[str, torch.Tensor]:
    """Per-object patch sets as dense (num_objects, N*N) bool tensors: seed_fg, seed_bg, pseudo_fg, pseudo_bg.

    The reference for :class:`PointLabelSource`, which builds the same rows per batch (tests
    compare the two); training never calls this (dense: 4 N^2 bytes per object).
    Seeds are recomputed from the extreme points (cheap, exact), plus the BG seeds the
    retrieval took from the image's other objects (``seed_bg_extra``); retrieved sets come
    from the points table, whose rows are in dataset order.
    """
    n = grid * grid
    seeds = seed_masks(torch.from_numpy(crop_points).float(), torch.from_numpy(crop_boxes).float(),
                       crop_size, grid, delta_px)
    seed_bg = seeds.bg.clone()
    if points is not None and "seed_bg_extra" in points.column_names:
        for i, idx in enumerate(points.column("seed_bg_extra").to_pylist()):
            seed_bg[i, idx] = True
        seed_bg &= ~seeds.fg
    out = {"seed_fg": seeds.fg, "seed_bg": seed_bg,
           "pseudo_fg": torch.zeros((len(crop_points), n), dtype=torch.bool),
           "pseudo_bg": torch.zeros((len(crop_points), n), dtype=torch.bool)}
    if points is not None:
        for key in ("pseudo_fg", "pseudo_bg"):
            for i, idx in enumerate(points.column(key).to_pylist()):
                out[key][i, idx] = True
    return out


LABEL_COLUMNS = ("pseudo_fg", "pseudo_bg", "seed_bg_extra")
LABEL_CACHE_PREFIX = "point-labels-"


class SparseLabels:
    """The retrieved patch lists of every object (``LABEL_COLUMNS`` of points.parquet), read
    per batch in sparse form.

    Each list column is held as its Arrow buffers seen through numpy (int offsets, int
    values; no Python objects): of a shard's in-memory table (:meth:`from_table`), or of an
    uncompressed Arrow file memory-mapped from disk (:meth:`open`), so a training process
    pages in only the batch's rows. :meth:`dense` turns rows into (B, N*N) bool masks.
    """

    def __init__(self, batches: Iterable[pa.RecordBatch], num_rows: int, *, keep_alive: Any = None):
        self.num_rows = int(num_rows)
        self._keep_alive = keep_alive  # the memory map the buffers point into
        self._chunks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        starts = [0]
        for batch in batches:
            for name in LABEL_COLUMNS:
                if name not in batch.schema.names:
                    continue
                col = batch.column(name)
                if col.null_count:
                    raise ValueError(f"points table: column {name} has null lists (expected [] for none)")
                offsets = col.offsets.to_numpy(zero_copy_only=False)
                values = col.values.to_numpy(zero_copy_only=False)
                self._chunks.setdefault(name, []).append((offsets, values))
            starts.append(starts[-1] + batch.num_rows)
        if starts[-1] != self.num_rows:
            raise ValueError(f"points table has {starts[-1]} rows, expected {self.num_rows}")
        self._starts = np.asarray(starts, np.int64)  # one entry per record batch, not per object

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._chunks)

    def __len__(self) -> int:
        return self.num_rows

    @classmethod
    def from_table(cls, table: pa.Table) -> "SparseLabels":
        cols = [c for c in LABEL_COLUMNS if c in table.column_names]
        return cls(table.select(cols).combine_chunks().to_batches(), table.num_rows)

    @classmethod
    def open(cls, points: str | Path, cache_dir: str | Path) -> "SparseLabels":
        """The labels of ``points`` (points.parquet), memory-mapped from an Arrow copy of its label
        columns in ``cache_dir`` (``point-labels-<digest of points>.arrow``, written once,
        atomically, one row group at a time; copies of other points files are removed)."""
        points, cache_dir = Path(points), Path(cache_dir)
        path = cache_dir / f"{LABEL_CACHE_PREFIX}{file_digest(points)[:16]}.arrow"
        if not path.exists():
            write_label_cache(points, path)
            for other in cache_dir.glob(f"{LABEL_CACHE_PREFIX}*.arrow"):
                if other != path:
                    other.unlink(missing_ok=True)
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        rows = pq.ParquetFile(points).metadata.num_rows
        return cls(batches, rows, keep_alive=(source, reader))

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"object {i} is outside the {self.num_rows} rows of the points table")
        chunk = int(np.searchsorted(self._starts, i, side="right")) - 1
        return chunk, i - int(self._starts[chunk])

    def row(self, column: str, i: int) -> np.ndarray:
        """The patch indices of object ``i`` in ``column`` (empty when the column is absent)."""
        chunks = self._chunks.get(column)
        if chunks is None:
            return np.zeros(0, np.int64)
        chunk, j = self._locate(int(i))
        offsets, values = chunks[chunk]
        return values[offsets[j]:offsets[j + 1]]

    def dense(self, column: str, index: np.ndarray, n: int) -> torch.Tensor:
        """(B, n) bool: row b marks the patches of object ``index[b]`` in ``column``."""
        index = np.asarray(index, np.int64).reshape(-1)
        out = np.zeros((len(index), n), dtype=bool)
        for b, i in enumerate(index):
            out[b, self.row(column, int(i))] = True
        return torch.from_numpy(out)


def write_label_cache(points: Path, out: Path) -> Path:
    """Copy the label columns of ``points`` into an uncompressed Arrow file (memory-mappable),
    one record batch per ``ROW_GROUP_ROWS`` rows, written atomically."""
    pf = pq.ParquetFile(points)
    cols = [c for c in LABEL_COLUMNS if c in pf.schema_arrow.names]
    schema = pa.schema([(c, pa.list_(pa.int32())) for c in cols])
    with atomic_path(out) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in pf.iter_batches(batch_size=ROW_GROUP_ROWS, columns=cols):
                writer.write_batch(pa.record_batch([batch.column(c).cast(pa.list_(pa.int32())) for c in cols],
                                                   schema=schema))
    return out


class PointLabelSource:
    """The stage-1c patch sets of any batch of objects, built when the batch is trained on.

    :meth:`masks` gives rows ``index`` of :func:`point_label_masks` (equal, tested): seeds
    recomputed from the objects' crop geometry (``geometry(index) -> (points, boxes)``, e.g.
    a crop dataset's :meth:`geometry`) and the retrieved sets from ``sparse`` (None: none).
    Nothing of size N^2 per object is held.
    """

    def __init__(self, geometry: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], num_objects: int,
                 sparse: SparseLabels | None, *, crop_size: int, grid: int, delta_px: float):
        if sparse is not None and len(sparse) != num_objects:
            raise ValueError(f"points table has {len(sparse)} rows for {num_objects} objects")
        self.geometry = geometry
        self.num_objects = int(num_objects)
        self.sparse = sparse
        self.crop_size, self.grid, self.delta_px = crop_size, grid, delta_px

    @property
    def n(self) -> int:
        return self.grid * self.grid

    def masks(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """seed_fg, seed_bg, pseudo_fg, pseudo_bg of objects ``index``, each (B, N*N) bool on the CPU."""
        index = np.asarray(index, np.int64).reshape(-1)
        points, boxes = self.geometry(index)
        seeds = seed_masks(torch.from_numpy(np.asarray(points, np.float32)).float(),
                           torch.from_numpy(np.asarray(boxes, np.float32)).float(), self.crop_size, self.grid,
                           self.delta_px)
        seed_bg = seeds.bg.clone()
        out = {"seed_fg": seeds.fg, "seed_bg": seed_bg}
        if self.sparse is not None and "seed_bg_extra" in self.sparse.columns:
            seed_bg |= self.sparse.dense("seed_bg_extra", index, self.n)
            seed_bg &= ~seeds.fg
        for key in ("pseudo_fg", "pseudo_bg"):
            out[key] = self.sparse.dense(key, index, self.n) if self.sparse is not None \
                else torch.zeros((len(index), self.n), dtype=torch.bool)
        return out


class PointDropout:
    """Point dropout of one epoch, drawn per batch for the batch's objects only.

    Object i keeps a retrieved FG patch j where row i, column j of ``rng.random((K, n))``
    is >= p, and a BG patch where the same of a second ``rng.random((K, n))`` is, ``rng``
    being the epoch's generator (seeded by (seed, epoch) in the engine): the dense draw of
    earlier versions, so the weights of a run do not change. Instead of drawing 2 K n
    doubles per epoch, a copy of the generator is advanced to the object's row
    (``advance``: one 64-bit draw per double) and draws that row: O(n) per object, O(1)
    memory, the same on every DDP rank and after a resume.
    """

    def __init__(self, p: float, num_objects: int, n: int):
        self.p, self.num_objects, self.n = float(p), int(num_objects), int(n)
        self._state: dict | None = None
        self._bit_generator: type | None = None

    def start_epoch(self, rng: np.random.Generator) -> None:
        if self.p <= 0:
            return
        bit_generator = rng.bit_generator
        if not hasattr(bit_generator, "advance"):
            raise TypeError(f"point dropout needs a bit generator that can advance (PCG64, Philox), got "
                            f"{type(bit_generator).__name__}")
        self._state, self._bit_generator = bit_generator.state, type(bit_generator)

    def keep(self, part: int, index: np.ndarray) -> torch.Tensor:
        """(B, n) bool: which patches objects ``index`` keep; ``part`` 0 = FG draw, 1 = BG draw.
        All True before :meth:`start_epoch` or with p = 0."""
        index = np.asarray(index, np.int64).reshape(-1)
        out = np.ones((len(index), self.n), dtype=bool)
        if self.p <= 0 or self._state is None:
            return torch.from_numpy(out)
        bit_generator = self._bit_generator()
        draw = np.random.Generator(bit_generator)
        for b, i in enumerate(index):
            bit_generator.state = self._state
            bit_generator.advance((part * self.num_objects + int(i)) * self.n)
            out[b] = draw.random(self.n) >= self.p
        return torch.from_numpy(out)


class GeneratorTask:
    """Turns a batch of crops into the EXITS stage-1c loss (see module docstring).

    The batch's point labels are built when it is trained on (:class:`PointLabelSource`),
    with its objects' point dropout (:class:`PointDropout`)."""

    def __init__(self, labels: PointLabelSource, grid: int, loss: GeneratorLoss):
        self.labels = labels
        self.grid = grid
        self.cfg = loss
        self.dropout = PointDropout(loss.point_dropout, labels.num_objects, grid * grid)

    def on_epoch_start(self, epoch: int, rng: np.random.Generator) -> None:
        self.dropout.start_epoch(rng)

    def batch_labels(self, index: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """The label sets of objects ``index`` (CPU, (B, N*N) bool): seed_fg, seed_bg, pseudo_fg,
        pseudo_bg and keep_fg / keep_bg, the retrieved sets after this epoch's dropout."""
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, np.int64).reshape(-1)
        out = self.labels.masks(idx)
        out["keep_fg"] = out["pseudo_fg"] & self.dropout.keep(0, idx)
        out["keep_bg"] = out["pseudo_bg"] & self.dropout.keep(1, idx)
        return out

    def targets(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Y^ (B, N, N), K (B, N, N) and has_retrieved (B,) for the batch's objects."""
        lab = self.batch_labels(index)
        fg = lab["seed_fg"] | lab["keep_fg"]
        retrieved = lab["keep_fg"] | lab["keep_bg"]
        labelled = fg | lab["seed_bg"] | lab["keep_bg"]
        shape = (len(fg), self.grid, self.grid)
        return (fg.reshape(shape).to(device), labelled.reshape(shape).to(device), retrieved.any(dim=1).to(device))

    def loss(self, model: nn.Module, batch: dict, teacher: nn.Module | None, epoch: int) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        images = batch["image"]
        prob = torch.sigmoid(model(images).float())
        parts: dict[str, float] = {}
        if c.use_retrieval:
            target, labelled, has_retrieved = self.targets(batch["index"], images.device)
            l_point = point_loss(prob, target, labelled, has_retrieved, box_mask=batch["box_mask"], lambda_mil=c.lambda_mil)
            parts["retrieved_frac"] = float(has_retrieved.float().mean())
        else:
            l_point = c.lambda_mil * mil_loss(prob[:, 0], batch["box_mask"])
        total = c.lambda_point * l_point
        parts["point"] = float(l_point.detach())
        if c.lambda_crf > 0 and teacher is not None and epoch >= c.crf_warmup_epochs:
            with torch.no_grad():
                teacher_prob = torch.sigmoid(teacher(images).float())
            l_crf = crf_loss(prob, teacher_prob, images, impl=c.crf_impl, **c.crf_params)
            total = total + c.lambda_crf * l_crf
            parts["crf"] = float(l_crf.detach())
        return total, parts


def train_generator(model: nn.Module, dataset: torch.utils.data.Dataset, task: GeneratorTask,
                    settings: TrainSettings, out_path: Path, progress: bool = True) -> Path:
    """Train the generator; save the EMA teacher (the smoother of the two) to ``out_path``.

    Under DDP every rank trains (identical weights); rank 0 alone writes ``out_path``."""
    result = train(model, dataset, task, settings, progress=progress)
    if is_main_process():
        final = result.teacher if result.teacher is not None else result.model
        save_mask_model(out_path, final, extra={"stage": "generator", "history": result.history})
        log.info("generator: final loss %.4f", result.history[-1]["loss"])
    return out_path
