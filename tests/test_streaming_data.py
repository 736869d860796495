"""Streaming training data (issue 26, item 1): crops cut per item, point labels read per
batch in sparse form, point dropout drawn per batch, against the cached / dense versions
they replace: same items bitwise, same batches, same trained weights, nothing held per
object but numpy arrays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from exits.config.schema import BackboneConfig
from exits.data import load_point_dataset
from exits.data.extreme_points import derive_extreme_points
from exits.data.instances_table import build_instances_table, read_instances_table, write_instances_table
from exits.engine import TrainSettings, train
from exits.losses import crf_loss, point_loss
from exits.stages import generator as generator_mod
from exits.stages.common import model_from_config
from exits.stages.generator import (GeneratorLoss, GeneratorTask, PointDropout, PointLabelSource, SparseLabels,
                                    point_label_masks)
from exits.stages.object_crops import ObjectCropDataset, StreamingCropDataset
from exits.stages.point_retrieval import POINTS_SCHEMA
from exits.stages.similarity import MilTask

from tests.conftest import disk, rle_of
from tests.test_interactive_train import SMALL, tiny_run  # noqa: F401  (fixture)

CROP, GRID = 32, 4


# ---------------------------------------------------------------- data


def many_objects(root: Path, n_images: int = 6, seed: int = 0) -> Path:
    """``n_images`` random-texture images (64 x 48), 2-3 disk objects each; the json path."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    h, w = 48, 64
    images, anns = [], []
    for image_id in range(1, n_images + 1):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        name = f"im{image_id}.jpg" if image_id % 2 else f"im{image_id}.png"
        Image.fromarray(arr).save(img_dir / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for _ in range(int(rng.integers(2, 4))):
            m = disk(h, w, rng.uniform(10, 54), rng.uniform(10, 38), rng.uniform(4, 12))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "area": int(m.sum()), "bbox": [0.0, 0.0, 1.0, 1.0], "segmentation": rle_of(m),
                         "extreme_points": derive_extreme_points(m).astype(int).tolist()})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return path


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    ann = many_objects(tmp_path)
    ds = load_point_dataset(ann, tmp_path / "images")
    table = build_instances_table(ds, margin=0.15, min_margin_px=4, crop_size=CROP)
    return write_instances_table(table, tmp_path / "instances.parquet")


def random_points_table(dataset: ObjectCropDataset, seed: int = 0) -> pa.Table:
    """A points table (POINTS_SCHEMA columns that 1c reads) with random retrieved sets."""
    rng = np.random.default_rng(seed)
    n = GRID * GRID
    rows = {"pseudo_fg": [], "pseudo_bg": [], "seed_bg_extra": []}
    for _ in range(len(dataset)):
        perm = rng.permutation(n)
        k_fg, k_bg, k_extra = rng.integers(0, 6), rng.integers(0, 4), rng.integers(0, 3)
        rows["pseudo_fg"].append(sorted(perm[:k_fg].tolist()))
        rows["pseudo_bg"].append(sorted(perm[k_fg:k_fg + k_bg].tolist()))
        rows["seed_bg_extra"].append(sorted(perm[k_fg + k_bg:k_fg + k_bg + k_extra].tolist()))
    schema = pa.schema([POINTS_SCHEMA.field(c) for c in rows])
    return pa.table(rows, schema=schema)


def write_points(table: pa.Table, path: Path, row_group_size: int = 5) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------- crops


def test_streaming_items_are_bitwise_the_cached_items(table_path: Path) -> None:
    images = table_path.parent / "images"
    cached = ObjectCropDataset(read_instances_table(table_path), images, CROP, cache=True)
    streams = [StreamingCropDataset(table_path, images, CROP),                       # from the file
               StreamingCropDataset(read_instances_table(table_path), images, CROP),  # from a table
               StreamingCropDataset(table_path, images, CROP, image_cache_mb=0)]      # one image held
    assert len(cached) >= 12
    for stream in streams:
        assert len(stream) == len(cached)
        for i in list(range(len(cached))) + [3, 0, len(cached) - 1]:  # revisits hit / miss the LRU
            a, b = cached[i], stream[i]
            assert a.keys() == b.keys() and a["index"] == b["index"] == i
            for key in ("image", "points", "box", "box_mask"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (i, key)
        pa_, ba_ = cached.geometry(np.arange(len(cached)))
        pb, bb = stream.geometry(np.arange(len(cached)))
        assert np.array_equal(pa_, pb) and np.array_equal(ba_, bb)
        assert stream.file_name(4) == cached.file_names[4] and stream.window(4) == cached.windows[4]
    assert len(streams[2]._images) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_loader_gives_the_cached_batches(table_path: Path, workers: int) -> None:
    """The engine's loader (DistributedSampler, same seed and epoch) over either dataset."""
    images = table_path.parent / "images"
    cached = ObjectCropDataset(read_instances_table(table_path), images, CROP)
    stream = StreamingCropDataset(table_path, images, CROP)

    def batches(ds, num_workers):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += list(DataLoader(ds, batch_size=5, sampler=sampler, num_workers=num_workers,
                                   multiprocessing_context="forkserver" if num_workers else None))
        return out

    for a, b in zip(batches(cached, 0), batches(stream, workers), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- labels and dropout


def test_sparse_labels_per_batch_equal_the_dense_masks(table_path: Path, tmp_path: Path, monkeypatch) -> None:
    images = table_path.parent / "images"
    cached = ObjectCropDataset(read_instances_table(table_path), images, CROP)
    stream = StreamingCropDataset(table_path, images, CROP)
    points = random_points_table(cached)
    dense = point_label_masks(points, cached.points_crop, cached.boxes, CROP, GRID, 3.0)
    monkeypatch.setattr(generator_mod, "ROW_GROUP_ROWS", 4)  # several record batches in the mapped file
    mapped = SparseLabels.open(write_points(points, tmp_path / "points.parquet"), tmp_path / "cache")
    for sparse, geometry in ((SparseLabels.from_table(points), cached.geometry), (mapped, stream.geometry)):
        source = PointLabelSource(geometry, len(cached), sparse, crop_size=CROP, grid=GRID, delta_px=3.0)
        rng = np.random.default_rng(0)
        for index in (np.arange(len(cached)), rng.permutation(len(cached))[:5], np.array([len(cached) - 1, 0])):
            got = source.masks(index)
            assert got.keys() == dense.keys()
            for key in dense:
                assert torch.equal(got[key], dense[key][index]), key
    assert len(mapped._starts) - 1 == -(-len(cached) // 4)
    # no retrieval: seeds only, empty retrieved sets
    none = PointLabelSource(cached.geometry, len(cached), None, crop_size=CROP, grid=GRID, delta_px=3.0).masks([1, 2])
    no_points = point_label_masks(None, cached.points_crop, cached.boxes, CROP, GRID, 3.0)
    for key in no_points:
        assert torch.equal(none[key], no_points[key][[1, 2]])
    with pytest.raises(ValueError, match="rows"):
        PointLabelSource(cached.geometry, len(cached) + 1, SparseLabels.from_table(points), crop_size=CROP, grid=GRID,
                         delta_px=3.0)


def test_label_cache_is_written_once_per_points_file(table_path: Path, tmp_path: Path) -> None:
    cached = ObjectCropDataset(read_instances_table(table_path), table_path.parent / "images", CROP)
    cache = tmp_path / "cache"
    first = write_points(random_points_table(cached, 0), tmp_path / "points.parquet")
    SparseLabels.open(first, cache)
    (made,) = cache.glob("point-labels-*.arrow")
    stamp = made.stat().st_mtime_ns
    labels = SparseLabels.open(first, cache)
    assert made.stat().st_mtime_ns == stamp  # reused, not rewritten
    # the label arrays are views of the mapped file, not copies
    offsets, values = labels._chunks["pseudo_fg"][0]
    assert not offsets.flags.owndata and not values.flags.owndata
    other = write_points(random_points_table(cached, 1), tmp_path / "points.parquet")
    SparseLabels.open(other, cache)
    (remade,) = cache.glob("point-labels-*.arrow")
    assert remade != made and not made.exists()


def test_point_dropout_per_batch_equals_the_dense_epoch_draw() -> None:
    k, n, p = 37, 16, 0.3
    dropout = PointDropout(p, k, n)
    assert bool(dropout.keep(0, np.arange(k)).all())  # before an epoch starts: keep everything
    for seed, epoch in ((0, 0), (0, 5), (7, 2)):
        rng = np.random.default_rng([seed, epoch])
        dense_fg = rng.random((k, n)) >= p   # what GeneratorTask.on_epoch_start drew before
        dense_bg = rng.random((k, n)) >= p
        dropout.start_epoch(np.random.default_rng([seed, epoch]))
        index = np.random.default_rng(epoch).permutation(k)[:9]
        assert np.array_equal(dropout.keep(0, index).numpy(), dense_fg[index])
        assert np.array_equal(dropout.keep(1, index).numpy(), dense_bg[index])
        assert np.array_equal(dropout.keep(0, np.arange(k)).numpy(), dense_fg)
    with pytest.raises(TypeError, match="advance"):
        dropout.start_epoch(np.random.Generator(np.random.MT19937(0)))
    assert bool(PointDropout(0.0, k, n).keep(1, [3]).all())


# ---------------------------------------------------------------- training: identical weights


class DenseGeneratorTask:
    """Stage 1c's task as it was before streaming (dense labels of every object, dense
    per-epoch dropout draw): the reference the per-batch task must reproduce exactly."""

    def __init__(self, labels: dict[str, torch.Tensor], grid: int, loss: GeneratorLoss):
        self.labels, self.grid, self.cfg = labels, grid, loss
        self.keep_fg, self.keep_bg = labels["pseudo_fg"], labels["pseudo_bg"]

    def on_epoch_start(self, epoch: int, rng: np.random.Generator) -> None:
        p = self.cfg.point_dropout
        if p <= 0:
            return
        shape = tuple(self.labels["pseudo_fg"].shape)
        self.keep_fg = self.labels["pseudo_fg"] & torch.from_numpy(rng.random(shape) >= p)
        self.keep_bg = self.labels["pseudo_bg"] & torch.from_numpy(rng.random(shape) >= p)

    def loss(self, model, batch, teacher, epoch):
        c, idx = self.cfg, batch["index"].cpu()
        images = batch["image"]
        prob = torch.sigmoid(model(images).float())
        fg = self.labels["seed_fg"][idx] | self.keep_fg[idx]
        retrieved = (self.keep_fg[idx] | self.keep_bg[idx]).any(dim=1)
        labelled = fg | self.labels["seed_bg"][idx] | self.keep_bg[idx]
        shape = (len(idx), self.grid, self.grid)
        total = c.lambda_point * point_loss(prob, fg.reshape(shape), labelled.reshape(shape), retrieved,
                                            box_mask=batch["box_mask"], lambda_mil=c.lambda_mil)
        if c.lambda_crf > 0 and teacher is not None and epoch >= c.crf_warmup_epochs:
            with torch.no_grad():
                teacher_prob = torch.sigmoid(teacher(images).float())
            total = total + c.lambda_crf * crf_loss(prob, teacher_prob, images, impl=c.crf_impl, **c.crf_params)
        return total, {}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return model_from_config(BackboneConfig(img_size=CROP, patch_size=CROP // GRID, depth=1, embed_dim=32,
                                            num_heads=2, decoder_dim=16))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_generator_training_on_streams_gives_the_cached_weights(table_path: Path, tmp_path: Path) -> None:
    images = table_path.parent / "images"
    cached = ObjectCropDataset(read_instances_table(table_path), images, CROP)
    stream = StreamingCropDataset(table_path, images, CROP)
    points = random_points_table(cached)
    loss = GeneratorLoss(lambda_point=1.0, lambda_crf=0.5, lambda_mil=1.0, point_dropout=0.3, crf_warmup_epochs=1,
                         crf_impl="meanfield", crf_params={"iters": 2})
    settings = TrainSettings(epochs=3, batch_size=4, lr=1e-3, warmup_epochs=1, device="cpu", seed=5, ema_decay=0.9,
                             ema_warmup=True)
    old = train(tiny_model(), cached, DenseGeneratorTask(
        point_label_masks(points, cached.points_crop, cached.boxes, CROP, GRID, 3.0), GRID, loss), settings,
        progress=False)
    labels = SparseLabels.open(write_points(points, tmp_path / "points.parquet"), tmp_path / "cache")
    task = GeneratorTask(PointLabelSource(stream.geometry, len(stream), labels, crop_size=CROP, grid=GRID,
                                          delta_px=3.0), GRID, loss)
    new = train(tiny_model(), stream, task, settings, progress=False)
    assert_same_state(old.model, new.model)
    assert_same_state(old.teacher, new.teacher)


def test_similarity_training_on_streams_in_workers_gives_the_cached_weights(table_path: Path) -> None:
    images = table_path.parent / "images"
    cached = ObjectCropDataset(read_instances_table(table_path), images, CROP)
    stream = StreamingCropDataset(table_path, images, CROP)
    base = dict(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=1, device="cpu", seed=2)
    old = train(tiny_model(), cached, MilTask(), TrainSettings(**base), progress=False)
    new = train(tiny_model(), stream, MilTask(), TrainSettings(**base, num_workers=2), progress=False)
    assert_same_state(old.model, new.model)


# ---------------------------------------------------------------- memory: nothing per object but arrays


def _synthetic_table(k: int, images: int = 4) -> pa.Table:
    rng = np.random.default_rng(k)
    return pa.table({
        "file_name": [f"im{i % images}.png" for i in range(k)],
        "extreme_points": [rng.uniform(0, 40, 8).tolist() for _ in range(k)],
        "crop_box": [[1, 2, 30, 20]] * k,
    }, schema=pa.schema([("file_name", pa.string()), ("extreme_points", pa.list_(pa.float64(), 8)),
                         ("crop_box", pa.list_(pa.int32(), 4))]))


def _held(obj: object) -> dict[str, object]:
    return {name: value for name, value in vars(obj).items() if not callable(value)}


def test_streaming_dataset_and_task_hold_no_per_object_python_objects(tmp_path: Path) -> None:
    """Between a 100- and a 2000-object table the Python containers held stay the same size,
    and the arrays grow by at most 104 bytes per object (windows + extreme points)."""
    small = StreamingCropDataset(_synthetic_table(100), tmp_path, CROP)
    large = StreamingCropDataset(_synthetic_table(2000), tmp_path, CROP)
    assert len(large) == 2000 and len(large.image_names) == 4
    array_bytes = {}
    for name, value in _held(large).items():
        other = _held(small)[name]
        if isinstance(value, (list, tuple, dict, set)):
            assert len(value) == len(other), name
        elif isinstance(value, np.ndarray):
            array_bytes[name] = value.nbytes - other.nbytes
        elif isinstance(value, pa.Array):
            assert len(value) == len(other) == 4, name
        else:
            assert isinstance(value, (int, float, str, Path)), (name, type(value))
    assert set(array_bytes) == {"windows", "extreme_points"}
    assert sum(array_bytes.values()) <= 104 * 1900

    # stage 1c's labels: per record batch, not per object; the task holds no per-object array
    rows = {"pseudo_fg": [[1, 2]] * 2000, "pseudo_bg": [[3]] * 2000, "seed_bg_extra": [[]] * 2000}
    points = pa.table(rows, schema=pa.schema([POINTS_SCHEMA.field(c) for c in rows]))
    labels = SparseLabels.open(write_points(points, tmp_path / "points.parquet", 8192), tmp_path / "cache")
    assert len(labels._starts) == 2 and all(len(chunks) == 1 for chunks in labels._chunks.values())
    task = GeneratorTask(PointLabelSource(large.geometry, len(large), labels, crop_size=CROP, grid=GRID,
                                          delta_px=3.0),
                         GRID, GeneratorLoss(1.0, 0.0, 1.0, 0.3, 0, "meanfield", {}))
    task.on_epoch_start(0, np.random.default_rng([0, 0]))
    for obj in (task, task.labels, task.dropout):
        for name, value in _held(obj).items():
            assert not isinstance(value, (torch.Tensor, np.ndarray, list)) or len(value) < 100, (type(obj), name)
    target, labelled, has = task.targets(torch.tensor([5, 1999]), torch.device("cpu"))
    assert target.shape == labelled.shape == (2, GRID, GRID) and has.shape == (2,)


def test_flows_train_on_the_streaming_dataset(table_path: Path) -> None:
    from flows.runtime import crop_dataset

    ds = crop_dataset(str(table_path), str(table_path.parent / "images"), CROP)
    assert isinstance(ds, StreamingCropDataset) and len(ds) == read_instances_table(table_path).num_rows


# ---------------------------------------------------------------- the click model's training set


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """True when ``tensor``'s data lies in a memory mapping of the file ``path`` (/proc/self/maps)."""
    ptr, target = tensor.data_ptr(), str(path.resolve())
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def test_click_training_set_on_disk_is_the_in_memory_set(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from exits.interactive import data as click_data
    from exits.interactive.config import ClickModelConfig
    from exits.interactive.train import encode_to_storage, train_click_decoder
    from exits.models.factory import load_mask_model

    kw = dict(source="pseudo+synthetic", top_fraction=1.0, synthetic_objects=12, synthetic_seed=5,
              synthetic_dir=tmp_path / "syn")
    whole = click_data.build_training_set(tiny_run, 32, **kw)  # every object in one chunk: the old way
    monkeypatch.setattr(click_data, "CHUNK_OBJECTS", 4)
    mapped = click_data.build_training_set(tiny_run, 32, storage=tmp_path / "store", **kw)
    assert len(mapped) == len(whole) >= 10
    assert np.array_equal(np.asarray(mapped.ann_ids), np.asarray(whole.ann_ids))
    for name in ("crops", "targets", "at_edge", "boxes"):
        a, b = getattr(whole, name), getattr(mapped, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # the on-disk set is memory-mapped from its files, not copied into the process
    assert mapped_from(mapped.crops, tmp_path / "store" / "crops.u8")
    assert mapped_from(mapped.targets, tmp_path / "store" / "targets.bool")
    assert not mapped_from(whole.crops, tmp_path / "store" / "crops.u8")
    assert (tmp_path / "store" / "crops.u8").stat().st_size == mapped.crops.numel()

    encoder = load_mask_model(tiny_run / "generator" / "model.pt")
    tok_mem, grid = encode_to_storage(encoder, whole.crops, None)
    tok_map, grid2 = encode_to_storage(encoder, mapped.crops, tmp_path / "store" / "tokens.f32", batch_size=64)
    assert grid == grid2 and torch.equal(tok_mem, tok_map) and mapped_from(tok_map, tmp_path / "store" / "tokens.f32")
    cfg = ClickModelConfig(**SMALL, iterations=3)
    a, _ = train_click_decoder(tok_mem, grid, whole, cfg)
    b, _ = train_click_decoder(tok_map, grid, mapped, cfg)
    assert_same_state(a, b)


def test_train_clicks_leaves_no_cache_behind(tiny_run: Path) -> None:  # noqa: F811
    from exits.interactive.config import ClickModelConfig
    from exits.interactive.train import train_click_model
    from exits.run_folder import RunFolder

    path, summary = train_click_model(tiny_run, ClickModelConfig(**SMALL, iterations=2, train_top_fraction=1.0),
                                      progress=False)
    assert path.is_file() and summary["objects"] == 3
    assert list(RunFolder(tiny_run).cache_dir.iterdir()) == []
