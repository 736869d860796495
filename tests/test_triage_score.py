"""Stage 1d's triage score is computed on the final mask; ``pseudo.refine_at: none`` gives the
generator's own mask (project issue 28, items 1 and 3)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils

from exits.stages.mask_quality import box_fit, extreme_point_reach
from exits.stages.pseudo_labels import triage_score

from tests.tiny_run import build_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Demo data, its instances table and an untrained tiny generator (fixed seed): the
    masks are arbitrary but fixed, which is all the score's bookkeeping needs."""
    return build_tiny_run(tmp_path_factory.mktemp("triage"), ["pseudo.crf_workers=0", "generator.use_retrieval=false"],
                          n_train=3)


def _shard(cfg, run, images, out, **pseudo):
    from exits.pipeline import stage_pseudo_shard

    cfg = cfg.model_copy(update={"pseudo": cfg.pseudo.model_copy(update=pseudo)})
    path = stage_pseudo_shard(cfg, images, run, 0, run.num_instances(), out, torch.device("cpu"))
    return pq.read_table(path).to_pydict()


def test_refine_at_none_is_the_generators_pasted_mask(tiny_run, tmp_path):
    cfg, run, images = tiny_run
    none = _shard(cfg, run, images, tmp_path / "none.parquet", refine_at="none")
    no_crf = _shard(cfg, run, images, tmp_path / "off.parquet", crf_refine=False)
    crop = _shard(cfg, run, images, tmp_path / "crop.parquet", refine_at="crop")
    assert none["rle_counts"] == no_crf["rle_counts"]
    assert none["rle_counts"] != crop["rle_counts"]  # the crop CRF moved some mask
    assert all(math.isnan(v) for v in none["refine_agreement"])
    # With no refinement, the generator's own confidence stands in for the agreement.
    for s, g, b, r in zip(none["score"], none["generator_score"], none["box_fit"], none["point_reach"]):
        assert s == pytest.approx((g + b + r) / 3, abs=1e-6)


@pytest.mark.parametrize("refine_at", ["crop", "image"])
def test_the_score_is_computed_on_the_final_mask(tiny_run, tmp_path, refine_at):
    cfg, run, images = tiny_run
    t = _shard(cfg, run, images, tmp_path / f"{refine_at}.parquet", refine_at=refine_at)
    pts = pq.read_table(run.instances, columns=["ann_id", "extreme_points"]).to_pydict()
    points = {a: np.asarray(p).reshape(4, 2) for a, p in zip(pts["ann_id"], pts["extreme_points"])}
    agreements = np.asarray(t["refine_agreement"])
    assert np.isfinite(agreements).all() and ((agreements >= 0) & (agreements <= 1)).all()
    assert (agreements < 1).any(), "the CRF changed no mask: the signal would be constant"
    for i, a in enumerate(t["ann_id"]):
        m = mask_utils.decode({"size": [t["height"][i], t["width"][i]], "counts": t["rle_counts"][i].encode()}).astype(bool)
        assert t["box_fit"][i] == pytest.approx(box_fit(m, points[a]), abs=1e-6)
        assert t["point_reach"][i] == pytest.approx(extreme_point_reach(m, points[a]), abs=1e-6)
        expected = triage_score(t["generator_score"][i], t["box_fit"][i], t["point_reach"][i], t["refine_agreement"][i])
        assert t["score"][i] == pytest.approx(expected, abs=1e-6)


def test_triage_score_formula():
    assert triage_score(0.2, 0.9, 0.6, 0.3) == pytest.approx(0.6)
    assert triage_score(0.2, 0.9, 0.6, float("nan")) == pytest.approx(1.7 / 3)
