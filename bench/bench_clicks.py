"""Spot-fix click model: NoC/NoF/mIoU vs GrabCut over 3 seeds, the click-constraint
comparison, the part ablation, and seconds per click.

Usage: python bench/bench_clicks.py [--workdir runs/clicks_base] [--gt data/demo/instances.json]
       [--iterations 300] [--objects 40] [--seeds 0 1 2] [--ablation-seeds 0] [--no-ablation]
       [--out bench/results/clicks.json] [--speed-only]

Training: the default config (``ClickModelConfig`` with ``--source``: by default
"pseudo+synthetic" = the run's top-60 % pseudo masks by score plus ``--synthetic-objects``
objects of the demo-data generator run with seed 1000 + seed; the run's GT is never read for
training) for ``--iterations``, one model per seed (seed = config.seed: decoder init, batches,
click simulation, synthetic set). Evaluation on the ``--objects`` lowest-scoring objects of
the run (the spot-fix queue; none trained on) against the GT json with the RITM robot user:
protocols "pseudo" (edit the pseudo mask) and "scratch", both stopping at IoU 0.95, and
"standard" (from scratch, always 20 clicks, the papers' protocol). GrabCut gets the same
robot, objects and window. Rows per seed, then mean and sd over seeds.

Constraint rows: the same models evaluated with ``constraint`` none (plain decoder), disk
(only the clicked disks forced) and crf (the default). ``--variants 'label:key=value,...'``
adds rows with other post-decoder settings (``INFERENCE_ONLY``, e.g.
``crop:crf_resolution=crop``); ``--object-offset 40`` evaluates the next 40 objects of the
queue instead, the split the post-decoder settings were tuned on. Every row uses the current
post-decoder defaults unless a variant changes them, also for models saved before they changed. Ablation: each part switched off in
turn and retrained with the same budget (``--ablation-seeds``); inference-only switches
(progressive mode) reuse the full model. Training and evaluation run on 1 thread.

Speed: decoder + click constraint with cached features (what one click costs in the web
page minus the mask transfer), one object, 5 clicks on top of a previous mask;
``torch.set_num_threads(t)`` for t in (2, 1); one warm-up, then median / min over
``--repeats`` calls. At the demo crop (96) the trained model and a real object's features;
at 512 the same architecture on a 64 x 64 grid with random weights and tokens (the cost
does not depend on their values).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exits.interactive.config import INFERENCE_ONLY, ClickModelConfig  # noqa: E402
from exits.interactive.constrain import CrfKernels, constrain_clicks  # noqa: E402
from exits.interactive.decoder import ClickDecoder  # noqa: E402
from exits.interactive.evaluate import run_eval_clicks  # noqa: E402
from exits.interactive.inference import decode_probs  # noqa: E402
from exits.interactive.model_io import load_click_model  # noqa: E402
from exits.interactive.predictor import ClickPredictor  # noqa: E402
from exits.interactive.train import train_click_model  # noqa: E402
from exits.io import write_json  # noqa: E402

# name -> config changes (retrained); progressive is inference-only (same model).
ABLATIONS = {
    "no_imsa": {"use_imsa": False}, "no_spm": {"use_spm": False}, "no_prototypes": {"use_prototypes": False},
    "no_zoom": {"use_zoom": False}, "no_fdm": {"use_fdm": False}, "no_pdm": {"use_pdm": False},
    "no_pem": {"use_pem": False}, "no_latent_heads": {"latent_heads": 0},
    "old_click_rounds": {"max_sim_rounds": 3, "sim_round_decay": 1.0},
    "pseudo_masks_only": {"train_source": "pseudo"},
    "synthetic_only": {"train_source": "synthetic"},
}
PROTOCOLS = ("pseudo", "scratch", "standard")
KEYS = ("NoC@85", "NoC@90", "NoF@85", "NoF@90", "mIoU@0", "mIoU@1", "mIoU@2", "mIoU@3", "mIoU@5", "mIoU@10", "mIoU@20")


def time_calls(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def click_sequence(size: int) -> tuple[list, np.ndarray]:
    s = float(size)
    clicks = [(0.5 * s, 0.5 * s, True), (0.3 * s, 0.6 * s, False), (0.6 * s, 0.35 * s, True),
              (0.7 * s, 0.7 * s, False), (0.45 * s, 0.25 * s, True)]
    yy, xx = np.mgrid[:size, :size]
    prev = (yy - 0.5 * s) ** 2 + (xx - 0.5 * s) ** 2 <= (0.3 * s) ** 2
    return clicks, prev


def speed(workdir: Path, model_path: Path, repeats: int) -> list[dict]:
    """ms per click, the 5th of a session (state and previous crop carried): the whole
    ``ClickPredictor.predict`` (decoder, click constraint at the window's own pixels, state
    map, paste) at the demo crop on a real object, and at 512 px on random weights
    (:func:`predictor_at_512`); also at 512 the decoder + constraint alone, the window taken
    as the crop, with the CRF capped at ``crf_max_size`` and at 128. Per-object work
    (encoding, CRF kernels, the decoder's static inputs) is done once first (``prepare``)."""
    import dataclasses

    predictor = ClickPredictor.from_workdir(workdir, model_path=model_path)
    # the current post-decoder defaults, whatever the model was saved with
    cfg = dataclasses.replace(predictor.decoder.config, **{k: getattr(ClickModelConfig(), k) for k in INFERENCE_ONLY})
    predictor.decoder.config = cfg
    predictor.constraint, predictor.progressive = cfg.constraint, cfg.progressive
    ann_id = next(iter(predictor.objects))
    feats = predictor.features(ann_id)
    win, s_demo = feats.window, feats.crop.shape[-1]
    rows = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        clicks, prev = click_sequence(s_demo)
        img_clicks = [(*win.crop_to_image(np.array([u, v])).tolist(), pos) for u, v, pos in clicks]
        prev_full = np.zeros(feats.image_size, bool)
        prev_full[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width] = \
            F.interpolate(torch.from_numpy(prev.astype(np.float32))[None, None], size=(win.height, win.width),
                          mode="bilinear", align_corners=False)[0, 0].numpy() >= 0.5
        for constraint in ("none", "crf"):
            predictor.constraint = constraint
            # the 5th click of a session: its previous mask is the answer to the first 4, so
            # the state and that mask's crop are carried, as in the web page
            prev4 = predictor.predict(ann_id, img_clicks[:4], prev_full)
            times = time_calls(lambda: predictor.predict(ann_id, img_clicks, prev4), repeats)
            rows.append({"threads": threads, "crop": s_demo, "window": [win.width, win.height], "clicks": 5,
                         "grid": list(feats.grid), "constraint": constraint, "what": "ClickPredictor.predict",
                         "median_ms": round(1e3 * statistics.median(times), 2), "min_ms": round(1e3 * min(times), 2)})
            print(rows[-1], flush=True)
        size, g = 512, 64
        # sizes for crops above the demo's 96 px: today's defaults (a model saved before they
        # changed carries the old ones, which only act above 96 px)
        sizes = {k: getattr(ClickModelConfig(), k) for k in ("coarse_size", "decode_size", "map_size", "max_grid")}
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            big, inputs = predictor_at_512(dataclasses.replace(cfg, **sizes), predictor.decoder.embed_dim, Path(tmp))
            t0 = time.perf_counter()
            big.prepare(1)
            prepare_ms = 1e3 * (time.perf_counter() - t0)
            for constraint in ("none", "crf"):
                big.constraint = constraint
                prev4 = big.predict(1, inputs["clicks"][:4], inputs["prev"])  # a session's 5th click
                times = time_calls(lambda: big.predict(1, inputs["clicks"], prev4), repeats)
                rows.append({"threads": threads, "crop": size, "window": [540, 500], "clicks": 5, "grid": [g, g],
                             "constraint": constraint, "crf_max_size": cfg.crf_max_size,
                             "what": "ClickPredictor.predict (random weights)",
                             "coarse_decode_map_px": [sizes["coarse_size"], sizes["decode_size"], sizes["map_size"]],
                             "prepare_ms": round(prepare_ms, 2),
                             "median_ms": round(1e3 * statistics.median(times), 2),
                             "min_ms": round(1e3 * min(times), 2)})
                print(rows[-1], flush=True)
        dec = ClickDecoder(dataclasses.replace(cfg, **sizes), predictor.decoder.embed_dim).eval()
        tokens, grid, crop = torch.randn(1, g * g, predictor.decoder.embed_dim), (g, g), torch.rand(1, 3, size, size)
        clicks, prev = click_sequence(size)
        radius = cfg.disk_radius * size / s_demo
        for constraint, cap in (("none", cfg.crf_max_size), ("crf", cfg.crf_max_size), ("crf", 128)):
            # as the predictor: the CRF's image-only kernels and the decoder's click-independent
            # inputs are built once per object (prepare)
            t0 = time.perf_counter()
            kernels = CrfKernels(crop[0], max_size=cap, sxy=cfg.crf_sxy, srgb=cfg.crf_srgb, weight=cfg.crf_w).prepare()
            with torch.no_grad():
                static = dec.static_inputs(tokens, grid, crop)
            prepare_ms = 1e3 * (time.perf_counter() - t0)

            def one_click(k: int = 5) -> None:
                # the decoder's map frame (S / 2 here), straight to the CRF's grid as in the predictor
                prob = decode_probs(dec, tokens, grid, crop, [clicks[:k]], [prev], at_crop_size=False,
                                    static=static)[0]
                constrain_clicks(prob, crop[0], clicks[:k], radius, method=constraint, iters=cfg.crf_iters,
                                 sxy=cfg.crf_sxy, srgb=cfg.crf_srgb, weight=cfg.crf_w, colour=cfg.crf_colour,
                                 max_size=cap, kernels=kernels)

            times = time_calls(one_click, repeats)
            rows.append({"threads": threads, "crop": size, "clicks": 5, "grid": list(grid), "constraint": constraint,
                         "crf_max_size": cap, "what": "decoder + constraint",
                         "coarse_decode_map_px": [sizes["coarse_size"], sizes["decode_size"], sizes["map_size"]],
                         "prepare_ms": round(prepare_ms, 2),
                         "median_ms": round(1e3 * statistics.median(times), 2), "min_ms": round(1e3 * min(times), 2)})
            print(rows[-1], flush=True)
    torch.set_num_threads(1)
    return rows


def predictor_at_512(decoder_config: ClickModelConfig, embed_dim: int, tmp: Path) -> tuple[ClickPredictor, dict]:
    """A :class:`ClickPredictor` on a 512 px crop: the demo ViT's architecture at 512 px
    (64 x 64 patches) and a decoder, both with random weights (the cost does not depend on
    their values), one object whose window is 540 x 500 px of a generated 640 x 600 image."""
    from PIL import Image

    from exits.data.crops import CropWindow
    from exits.interactive.predictor import ObjectInfo
    from exits.models.factory import build_mask_model

    torch.manual_seed(0)
    encoder = build_mask_model("vit_tiny_patch16_224", img_size=512, patch_size=8, depth=6, embed_dim=embed_dim,
                               num_heads=3, decoder_dim=96)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:600, :640]
    image = np.clip(60 + 120 * (((yy - 280) / 200.0) ** 2 + ((xx - 300) / 230.0) ** 2 < 1)[..., None]
                    + rng.normal(0, 12, (600, 640, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(tmp / "scene.png")
    window = CropWindow(x0=40, y0=50, width=540, height=500, size=512)
    objects = {1: ObjectInfo("scene.png", window, (600, 640), np.array([[300, 80], [70, 280], [300, 480], [530, 280]],
                                                                       np.float64))}
    predictor = ClickPredictor(ClickDecoder(decoder_config, embed_dim), encoder, objects, tmp)
    s = float(window.size)
    clicks, prev = click_sequence(window.size)
    img_clicks = [(*window.crop_to_image(np.array([u, v])).tolist(), pos) for u, v, pos in clicks]
    prev_full = np.zeros((600, 640), bool)
    prev_full[50:550, 40:580] = F.interpolate(torch.from_numpy(prev.astype(np.float32))[None, None], size=(500, 540),
                                              mode="bilinear", align_corners=False)[0, 0].numpy() >= 0.5
    return predictor, {"clicks": img_clicks, "prev": prev_full, "crop_side": s}


def parse_variant(text: str) -> tuple[str, dict]:
    """'label:key=value,key=value' -> (label, {key: value}) of inference-only settings."""
    label, _, body = text.partition(":")
    out: dict = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        kind = type(getattr(ClickModelConfig(), key))
        out[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return label, out


def evaluate_objects(workdir: Path, gt: Path, model_path: Path, out_json: Path, objects: int, *, grabcut: bool,
             progressive: bool | None = None, constraint: str | None = None,
             protocols: tuple[str, ...] = PROTOCOLS, inference: dict | None = None, object_offset: int = 0) -> dict:
    t = time.perf_counter()
    result = run_eval_clicks(workdir, gt, out_path=out_json, model_path=model_path, num_objects=objects,
                             progressive=progressive, with_grabcut=grabcut, protocols=protocols, constraint=constraint,
                             inference=inference, object_offset=object_offset)
    return {"protocols": result["protocols"], "ann_ids": result["ann_ids"], "eval_s": round(time.perf_counter() - t, 1),
            "seconds_per_click": result["seconds_per_click"]}


def train(workdir: Path, cfg: ClickModelConfig, path: Path) -> dict:
    t = time.perf_counter()
    if path.exists():  # resumable: a model trained by an earlier, interrupted call
        _, payload = load_click_model(path)
        # Settings that act only after the decoder do not change the trained weights.
        same = lambda c: {k: v for k, v in c.items() if k not in INFERENCE_ONLY}  # noqa: E731
        if same(payload["config"]) == same(cfg.to_dict()):
            return {"train": payload["extra"].get("train_summary"), "train_s": None, "reused": True}
    _, summary = train_click_model(workdir, cfg, out_path=path, progress=True,
                                   synthetic_dir=ROOT / "runs" / "click_synthetic")
    return {"train": summary, "train_s": round(time.perf_counter() - t, 1)}


def aggregate(rows: list[dict]) -> dict:
    """mean and sd over seeds of every metric of every protocol/method."""
    out: dict = {}
    for protocol in PROTOCOLS:
        for method in ("click_model", "grabcut"):
            vals = [r["protocols"].get(protocol, {}).get(method) for r in rows]
            vals = [v for v in vals if v]
            if not vals:
                continue
            out.setdefault(protocol, {})[method] = {
                k: {"mean": float(np.mean([v[k] for v in vals])), "sd": float(np.std([v[k] for v in vals], ddof=1))
                    if len(vals) > 1 else 0.0, "n": len(vals)} for k in KEYS if k in vals[0]}
    return out


def _fmt(stat: dict, key: str) -> str:
    m, sd = stat[key]["mean"], stat[key]["sd"]
    scale = 100 if key.startswith("mIoU") else 1
    digits = 1 if key.startswith("mIoU") or key.startswith("NoF") else 2
    if stat[key]["n"] == 1:
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def tables(result: dict) -> str:
    """Markdown tables of a result json (docs/benchmarks.md)."""
    lines = []
    cols = ("NoC@85", "NoC@90", "NoF@90", "mIoU@1", "mIoU@3", "mIoU@5", "mIoU@10", "mIoU@20")
    lines.append("| protocol / method | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    summ = result.get("full_summary", {})
    csum = result.get("constraint_summary", {})
    cfg = result.get("config", {})
    prog = "progressive on" if cfg.get("progressive", True) else "progressive off"
    names = {"none": "plain decoder", "disk": "disk constraint", "crf": "CRF constraint", "grabcut": "GrabCut constraint"}
    for protocol in PROTOCOLS:
        rows = [("click model, progressive off", result.get("noprog_summary", {}).get(protocol, {}).get("click_model")),
                (f"click model, {prog}, {names.get(cfg.get('constraint', 'crf'), '')} (model default)",
                 summ.get(protocol, {}).get("click_model"))]
        rows += [(f"click model, {prog}, {names.get(c, c)}", csum[c].get(protocol, {}).get("click_model")) for c in csum]
        rows += [("GrabCut, same clicks", summ.get(protocol, {}).get("grabcut"))]
        for name, stat in rows:
            if stat:
                n = stat[cols[0]]["n"]
                label = f"{name} ({n} seed{'s' if n > 1 else ''})"
                lines.append(f"| {protocol}: {label} | " + " | ".join(_fmt(stat, k) for k in cols) + " |")
    abl = result.get("ablation", {})
    if abl:
        lines.append("")
        protos = result.get("ablation_settings", {}).get("protocols", ["pseudo"])
        acols = ("NoC@85", "NoC@90", "NoF@90", "mIoU@1", "mIoU@5", "mIoU@20")
        lines.append("| row | " + " | ".join(f"{p} {c}" for p in protos for c in acols) + " |")
        lines.append("|---|" + "---:|" * (len(acols) * len(protos)))
        for key, row in abl.items():
            vals = []
            for p in protos:
                m = row["protocols"].get(p, {}).get("click_model", {})
                vals += [f"{m[c] * 100:.1f}" if c.startswith("mIoU") else (f"{m[c]}" if c.startswith("NoF") else f"{m[c]:.2f}")
                         for c in acols]
            lines.append(f"| {key} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "clicks_base")
    ap.add_argument("--gt", type=Path, default=ROOT / "data" / "demo" / "instances.json")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--objects", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--source", default="pseudo+synthetic")
    ap.add_argument("--synthetic-objects", type=int, default=2000)
    ap.add_argument("--synthetic-variant", default="demo", choices=["demo", "holdout"],
                    help="photographs of the generated training objects: the other variant than --workdir's "
                         "data measures the editor out of domain")
    ap.add_argument("--old-sim-rule", action="store_true",
                    help="simulated clicks' previous masks with the disks only (sim_constraint false)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--no-full", action="store_true", help="skip the per-seed full rows (ablation only)")
    ap.add_argument("--ablation-iterations", type=int, default=None,
                    help="training budget of the ablation rows (default --iterations); a 'full' row with the "
                         "same budget is added as their reference")
    ap.add_argument("--ablation-protocols", nargs="+", default=list(PROTOCOLS))
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="result files of other (parallel) calls whose full/constraint/ablation rows to merge in")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--constraints", nargs="*", default=["none", "disk"],
                    help="extra constraint rows per seed (the model's own constraint is the full row)")
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), help="protocols of the full and constraint rows")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra rows per seed with inference-only settings changed, 'label:key=value,key=value' "
                         "(e.g. 'window:crf_resolution=window'); evaluated like the constraint rows")
    ap.add_argument("--object-offset", type=int, default=0,
                    help="evaluate the queue's objects from this rank on (40: the tuning split next to the "
                         "40 reported ones)")
    ap.add_argument("--progressive-off-rows", action="store_true",
                    help="evaluate the per-seed full models with progressive mode off (click model only) into "
                         "'full_noprog' (progressive is inference-only: same models)")
    ap.add_argument("--only", nargs="*", default=None, help="ablation rows to run (default all)")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "runs" / "bench_clicks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clicks.json")
    ap.add_argument("--speed-only", action="store_true",
                    help="only re-time clicks with MODELS_DIR/full_seed0.pt and update the speed rows of --out")
    ap.add_argument("--tables", action="store_true", help="print the markdown tables of --out and exit")
    args = ap.parse_args()
    # every evaluation of this call reads the same slice of the spot-fix queue
    evaluate = functools.partial(evaluate_objects, object_offset=args.object_offset)
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    load_before = os.getloadavg()[0]
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    if result.get("benchmark") != "clicks_v2":
        result = {"benchmark": "clicks_v2"}
    if args.speed_only:
        result["speed"] = speed(args.workdir, args.models_dir / "full_seed0.pt", args.repeats)
        result["speed_load_avg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        write_json(args.out, result, indent=2)
        print(f"wrote {args.out}")
        return
    torch.set_num_threads(1)
    base = ClickModelConfig(iterations=args.iterations, train_source=args.source,
                            synthetic_objects=args.synthetic_objects, synthetic_variant=args.synthetic_variant,
                            sim_constraint=not args.old_sim_rule)
    result.update({"device": "cpu", "torch": torch.__version__, "machine": platform.machine(),
                   "cpu_count": os.cpu_count(), "config": base.to_dict(), "workdir": str(args.workdir),
                   "gt": str(args.gt), "objects": args.objects, "object_offset": args.object_offset,
                   "seeds": args.seeds})
    args.models_dir.mkdir(parents=True, exist_ok=True)
    # Every row is evaluated with this config's post-decoder settings, also on a model that
    # was trained (and saved) before they changed: they do not touch the weights.
    base_inference = {k: getattr(base, k) for k in INFERENCE_ONLY}

    def save() -> None:
        result["load_avg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        write_json(args.out, result, indent=2)

    full = result.setdefault("full", {})
    constraint_rows = result.setdefault("constraint", {})
    for other in args.merge:
        data = json.loads(other.read_text())
        for key in ("full", "constraint", "ablation", "full_noprog"):
            result.setdefault(key, {}).update(data.get(key, {}))
        if "ablation_settings" in data:
            result["ablation_settings"] = data["ablation_settings"]
    if args.progressive_off_rows:
        noprog = result.setdefault("full_noprog", {})
        for seed in args.seeds:
            if str(seed) not in noprog:
                path = args.models_dir / f"full_seed{seed}.pt"
                noprog[str(seed)] = evaluate(args.workdir, args.gt, path, args.models_dir / f"noprog_seed{seed}_eval.json",
                                             args.objects, grabcut=False, progressive=False)
                save()
        return
    for seed in ([] if args.no_full else args.seeds):
        cfg = base.replace(seed=seed, synthetic_seed=1000 + seed)
        path = args.models_dir / f"full_seed{seed}.pt"
        if str(seed) not in full:
            row = train(args.workdir, cfg, path)
            row.update(evaluate(args.workdir, args.gt, path, args.models_dir / f"full_seed{seed}_eval.json",
                                args.objects, grabcut=True, protocols=tuple(args.protocols), inference=base_inference))
            full[str(seed)] = row
            print("full", seed, json.dumps({p: {m: {k: round(v, 3) for k, v in x.items()} for m, x in r.items()}
                                           for p, r in row["protocols"].items()}), flush=True)
            save()
        for constraint in args.constraints:
            key = f"{constraint}_seed{seed}"
            if key not in constraint_rows:
                constraint_rows[key] = evaluate(args.workdir, args.gt, path, args.models_dir / f"{key}_eval.json",
                                                args.objects, grabcut=False, constraint=constraint,
                                                protocols=tuple(args.protocols), inference=base_inference)
                save()
        for text in args.variants:
            label, settings = parse_variant(text)
            key = f"{label}_seed{seed}"
            if key not in constraint_rows:
                constraint_rows[key] = evaluate(args.workdir, args.gt, path, args.models_dir / f"{key}_eval.json",
                                                args.objects, grabcut=False, protocols=tuple(args.protocols),
                                                inference={**base_inference, **settings})
                constraint_rows[key]["inference"] = settings
                save()
    full, constraint_rows = result["full"], result["constraint"]
    result["full_summary"] = aggregate([full[str(s)] for s in args.seeds if str(s) in full])
    if result.get("full_noprog"):
        result["noprog_summary"] = aggregate([result["full_noprog"][str(s)] for s in args.seeds
                                              if str(s) in result["full_noprog"]])
    result["constraint_summary"] = {c: aggregate([constraint_rows[f"{c}_seed{s}"] for s in args.seeds
                                                  if f"{c}_seed{s}" in constraint_rows])
                                   for c in sorted({k.rsplit("_seed", 1)[0] for k in constraint_rows})}
    save()
    if not args.no_ablation:
        abl = result.setdefault("ablation", {})
        names = ["full", "no_progressive"] + list(ABLATIONS) if args.only is None else args.only
        its = args.ablation_iterations or args.iterations
        protocols = tuple(args.ablation_protocols)
        result["ablation_settings"] = {"iterations": its, "protocols": list(protocols), "seeds": args.ablation_seeds}
        for name in names:
            for seed in args.ablation_seeds:
                key = f"{name}_seed{seed}"
                if key in abl:
                    continue
                ref = args.models_dir / (f"full_seed{seed}.pt" if its == args.iterations else f"full_it{its}_seed{seed}.pt")
                if name == "no_progressive":
                    row = evaluate(args.workdir, args.gt, ref, args.models_dir / f"{key}_it{its}_eval.json",
                                   args.objects, grabcut=False, progressive=False, protocols=protocols)
                else:
                    cfg = base.replace(seed=seed, synthetic_seed=1000 + seed, iterations=its,
                                       **ABLATIONS.get(name, {}))
                    path = ref if name == "full" else args.models_dir / f"{key}_it{its}.pt"
                    row = train(args.workdir, cfg, path)
                    row.update(evaluate(args.workdir, args.gt, path, args.models_dir / f"{key}_it{its}_eval.json",
                                        args.objects, grabcut=False, protocols=protocols))
                abl[key] = row
                print(key, json.dumps({p: {k: round(v, 3) for k, v in r["click_model"].items()}
                                       for p, r in row["protocols"].items()}), flush=True)
                save()
    if not args.no_speed:
        result["speed"] = speed(args.workdir, args.models_dir / f"full_seed{args.seeds[0]}.pt", args.repeats)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
