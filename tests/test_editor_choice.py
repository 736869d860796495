"""`exits spotfix --editor auto` follows a measurement that exists: the run's own eval-clicks
result for its current click model, else the measured default (the click model that hands
late clicks to GrabCut) or GrabCut, with the reason."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from exits.spotfix.editors import DEFAULT_EDITOR, editor_from_eval, resolve_editor


def _result(model: dict, grab: dict, protocol: str = "pseudo") -> dict:
    base = {"objects": 40}
    return {"protocols": {protocol: {"click_model": {**base, **model}, "grabcut": {**base, **grab}}}}


WIN = {"NoC@85": 3.0, "NoC@90": 4.0, "NoF@85": 1, "NoF@90": 2}
LOSE_85 = {"NoC@85": 3.5, "NoC@90": 3.0, "NoF@85": 1, "NoF@90": 2}


@pytest.mark.parametrize("model, grab, expected", [
    (WIN, {"NoC@85": 3.5, "NoC@90": 4.5, "NoF@85": 1, "NoF@90": 2}, "clicks"),      # fewer clicks, no more failures
    (LOSE_85, {"NoC@85": 3.5, "NoC@90": 4.5, "NoF@85": 1, "NoF@90": 2}, "grabcut"),  # a tie at 85 %: the model-free editor
    (WIN, {"NoC@85": 3.5, "NoC@90": 4.5, "NoF@85": 0, "NoF@90": 2}, "grabcut"),      # fails more often at 85 %
    (WIN, {"NoC@85": 3.5, "NoC@90": 4.5, "NoF@85": 1, "NoF@90": 1}, "grabcut"),      # fails more often at 90 %
    (WIN, {"NoC@85": 2.0, "NoC@90": 3.0, "NoF@85": 1, "NoF@90": 2}, "grabcut"),      # GrabCut fewer clicks
])
def test_editor_from_eval_needs_fewer_clicks_at_both_thresholds_and_no_more_failures(model, grab, expected):
    kind, why = editor_from_eval(_result(model, grab))
    assert kind == expected
    assert f"NoC@85 {model['NoC@85']:.2f} vs {grab['NoC@85']:.2f}" in why and "40 objects" in why


def test_editor_from_eval_prefers_the_pseudo_protocol_and_needs_a_comparison():
    both = _result(WIN, {"NoC@85": 9.0, "NoC@90": 9.0, "NoF@85": 5, "NoF@90": 5}, "standard")
    both["protocols"]["pseudo"] = _result(WIN, {"NoC@85": 1.0, "NoC@90": 1.0, "NoF@85": 0, "NoF@90": 0})["protocols"]["pseudo"]
    assert editor_from_eval(both)[0] == "grabcut" and "pseudo protocol" in editor_from_eval(both)[1]
    no_grabcut = {"protocols": {"pseudo": {"click_model": {"objects": 3, **WIN}}}}  # eval-clicks --no-grabcut
    assert editor_from_eval(no_grabcut) is None
    assert editor_from_eval({}) is None


def _run_with_model(tmp_path: Path, config: dict | None = None) -> Path:
    """A run folder whose click model file holds ``config`` (None: bytes that are no model)."""
    (tmp_path / "click_model").mkdir(parents=True)
    model = tmp_path / "click_model" / "model.pt"
    if config is None:
        model.write_bytes(b"weights")
    else:
        torch.save({"config": config}, model)
    return tmp_path


def test_auto_without_a_measurement_follows_the_models_hand_over(tmp_path):
    run = _run_with_model(tmp_path / "a", {})  # default settings: GrabCut from the 8th click
    kind, why = resolve_editor("auto", run)
    assert kind == DEFAULT_EDITOR == "clicks" and "8th click" in why and "eval-clicks" in why and str(run) in why
    run = _run_with_model(tmp_path / "b", {"grabcut_after": 0})  # the click model alone failed more often
    kind, why = resolve_editor("auto", run)
    assert kind == "grabcut" and "grabcut_after: 0" in why
    run = _run_with_model(tmp_path / "c", None)
    kind, why = resolve_editor("auto", run)
    assert kind == "grabcut" and "cannot be read" in why


def test_auto_reads_the_runs_eval_and_ignores_one_older_than_the_model(tmp_path):
    run = _run_with_model(tmp_path, {})
    kind, why = resolve_editor("auto", run)
    assert kind == DEFAULT_EDITOR and "eval-clicks" in why and str(run) in why

    evaluated = run / "click_model" / "eval_clicks.json"
    evaluated.write_text(json.dumps(_result(WIN, {"NoC@85": 5.0, "NoC@90": 6.0, "NoF@85": 3, "NoF@90": 4})))
    assert resolve_editor("auto", run)[0] == "clicks"
    evaluated.write_text(json.dumps(_result(WIN, {"NoC@85": 2.0, "NoC@90": 3.0, "NoF@85": 1, "NoF@90": 2})))
    kind, why = resolve_editor("auto", run)
    assert kind == "grabcut" and "this run's eval-clicks" in why  # the run's own measurement beats the default

    model = run / "click_model" / "model.pt"
    stat = evaluated.stat()
    os.utime(model, (stat.st_atime, stat.st_mtime + 60))  # retrained after the evaluation
    kind, why = resolve_editor("auto", run)
    assert kind == DEFAULT_EDITOR and "older click model" in why  # the stale result is ignored

    evaluated.write_text("{not json")
    os.utime(evaluated, (stat.st_atime, stat.st_mtime + 120))
    kind, why = resolve_editor("auto", run)
    assert kind == DEFAULT_EDITOR and "older" not in why  # unreadable: the default, with a warning
    assert resolve_editor("clicks", run) == ("clicks", "chosen with --editor")
