"""The interface the spot-fix web page calls: one object, its clicks, its current mask.

    predictor = ClickPredictor.from_workdir(WORKDIR)      # click model + generator ViT
    predictor.prepare(ann_id)                             # encode once (LRU cache)
    mask = predictor.predict(ann_id, [(x, y, True), ...], current_mask)

Clicks are ``(x, y, positive)`` in image pixel coordinates (pixel index = centre), in
click order; masks are full-image (H, W) bool. The decoder works in the object's crop
window (the instances table's ``crop_box``: extreme-point box plus margin); pixels
outside the window keep ``prev_mask`` (False without one). Per click:

  1. the 5-state map carried from the previous answer (:mod:`exits.interactive.session`)
     plus the clicks -> decoder probabilities in the crop;
  2. the click constraint (config ``constraint``, :mod:`exits.interactive.constrain`):
     dense CRF with the clicks as hard labels, then every disk set to its label;
  3. progressive mode (config ``progressive``): only the changed region touching the last
     click is taken over (:mod:`exits.interactive.progressive`);
  4. with a constraint, every click's disk (radius ``disk_radius`` crop pixels, in image
     pixels) finally holds the click's label, so no click is ever lost;
  5. the state map is advanced with the returned mask (InterFormer's transitions).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from exits.data.images import image_file
from exits.data.crops import CropWindow, crop_mask, crop_to_window
from exits.interactive.clicks import Click, disk_index, state_map, update_with_prediction
from exits.interactive.constrain import CrfKernels, constrain_clicks
from exits.interactive.decoder import ClickDecoder, StaticInputs
from exits.interactive.grabcut import grabcut_from_clicks
from exits.interactive.features import FeatureCache, ObjectFeatures, object_features
from exits.interactive.inference import decode_probs
from exits.interactive.model_io import CLICK_MODEL_PATH, load_click_model
from exits.run_folder import RunFolder
from exits.interactive.progressive import progressive_update
from exits.interactive.prototypes import image_edge_sides
from exits.interactive.session import ClickSessions
from exits.models.factory import load_mask_model
from exits.stages.object_crops import box_in_crop, load_image_tensor

__all__ = ["ClickPredictor", "ObjectInfo", "read_objects"]


@dataclass(frozen=True)
class ObjectInfo:
    file_name: str
    window: CropWindow
    image_size: tuple[int, int]  # (H, W)
    extreme_points: np.ndarray  # (4, 2) [x, y] top, left, bottom, right


def read_objects(workdir: Path, crop_size: int) -> dict[int, ObjectInfo]:
    """ann_id -> :class:`ObjectInfo` from the run's ``instances.parquet``."""
    table = pq.read_table(RunFolder(workdir).instances,
                          columns=["ann_id", "file_name", "crop_box", "width", "height", "extreme_points"])
    return {
        int(r["ann_id"]): ObjectInfo(str(r["file_name"]), CropWindow(*map(int, r["crop_box"]), size=crop_size),
                                     (int(r["height"]), int(r["width"])),
                                     np.asarray(r["extreme_points"], np.float64).reshape(4, 2))
        for r in table.to_pylist()
    }


class ClickPredictor:
    """Click model of one run: cached encoder features per object + the light decoder."""

    def __init__(self, decoder: ClickDecoder, encoder: torch.nn.Module, objects: dict[int, ObjectInfo],
                 images_dir: Path, device: str = "cpu", cache_size: int | None = None) -> None:
        self.device = torch.device(device)
        self.decoder = decoder.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.objects = objects
        self.images_dir = Path(images_dir)
        self.crop_size = int(encoder.img_size)
        self.progressive = bool(decoder.config.progressive)
        self.constraint = str(decoder.config.constraint)
        self.cache = FeatureCache(cache_size or decoder.config.feature_cache_size)
        self.sessions = ClickSessions(objects=cache_size or decoder.config.feature_cache_size)

    @classmethod
    def from_workdir(cls, workdir: Path, device: str = "cpu", model_path: Path | None = None) -> "ClickPredictor":
        """Load WORKDIR/click_model/model.pt, the generator ViT it was trained with, the
        instances table and the image folder named in WORKDIR/run.json."""
        workdir = Path(workdir)
        decoder, payload = load_click_model(model_path or workdir / CLICK_MODEL_PATH, device)
        encoder = load_mask_model(workdir / payload["encoder_path"], map_location=device)
        if int(encoder.img_size) != int(payload["crop_size"]):
            raise ValueError(f"encoder crop size {encoder.img_size} != click model's {payload['crop_size']}")
        objects = read_objects(workdir, int(encoder.img_size))
        return cls(decoder, encoder, objects, RunFolder(workdir).images_dir(), device)

    def _info(self, ann_id: int) -> ObjectInfo:
        try:
            return self.objects[int(ann_id)]
        except KeyError:
            raise KeyError(f"ann_id {ann_id} is not in this run's instances table") from None

    def features(self, ann_id: int) -> ObjectFeatures:
        """Cached encoder features of an object (computed on first use)."""
        info = self._info(ann_id)

        def make() -> ObjectFeatures:
            image = load_image_tensor(image_file(self.images_dir, info.file_name)).to(self.device)
            return object_features(self.encoder, int(ann_id), image, info.window)

        return self.cache.get(int(ann_id), make)

    def prepare(self, ann_id: int) -> None:
        """Encode and cache one object's features and its click-constraint kernels (the heavy
        steps, once per object)."""
        f = self.features(ann_id)
        self._static(f)
        if self.constraint in ("crf", "grabcut"):
            self._kernels(f).prepare()

    @torch.no_grad()
    def _static(self, f: ObjectFeatures) -> StaticInputs:
        """The decoder's click-independent inputs of the object, kept with its features (with
        the crop sides on the image edge and the extreme-point box in the crop, for the
        prototypes' background)."""
        key = ("static", id(self.decoder), self.decoder.config.coarse_size)
        static = f.derived.get(key)
        if static is None:
            win, (h, w) = f.window, f.image_size
            info = self.objects.get(int(f.ann_id))
            static = self.decoder.static_inputs(
                f.tokens[None].to(self.device), f.grid, f.crop[None].to(self.device),
                at_edge=[image_edge_sides(*win.as_list(), image_width=w, image_height=h)],
                object_box=None if info is None else box_in_crop(info.extreme_points, win)[None])
            static = f.derived.setdefault(key, static)
        return static

    def _kernels(self, f: ObjectFeatures) -> CrfKernels:
        """The object's cached CRF kernels for the current constraint settings (the image at
        the constraint's grid: the window's own pixels or the crop)."""
        cfg = self.decoder.config
        on_window = cfg.crf_resolution == "window" and f.window_image is not None
        key = ("window" if on_window else "crop", cfg.crf_max_size, cfg.crf_sxy, cfg.crf_srgb, cfg.crf_w)
        kernels = f.derived.get(key)
        if kernels is None:
            image = (f.window_image if on_window else f.crop).cpu()
            kernels = CrfKernels(image, max_size=cfg.crf_max_size, sxy=cfg.crf_sxy, srgb=cfg.crf_srgb, weight=cfg.crf_w)
            kernels = f.derived.setdefault(key, kernels)
        return kernels

    def _crop_clicks(self, window: CropWindow, clicks: Sequence[Click]) -> list[Click]:
        return [(*window.image_to_crop(np.array([x, y], np.float64)).tolist(), bool(p)) for x, y, p in clicks]

    def _crop_prev(self, window: CropWindow, prev_mask: np.ndarray | None) -> np.ndarray | None:
        if prev_mask is None:
            return None
        return (crop_mask(torch.from_numpy(np.asarray(prev_mask, bool)), window) >= 0.5).numpy()

    def predict_crop(self, ann_id: int, clicks: Sequence[Click], prev_mask: np.ndarray | None,
                     state: np.ndarray | None = None) -> np.ndarray:
        """(M, M) decoder foreground probability over the object's crop, M = S for small
        crops, S / k for large ones (the decoder's map frame; clicks in image coords;
        ``state`` the carried crop state map, None = start from ``prev_mask``)."""
        f = self.features(ann_id)
        return self._decode(f, self._crop_clicks(f.window, clicks), self._crop_prev(f.window, prev_mask), state)

    def _decode(self, f: ObjectFeatures, uv: list[Click], prev_crop: np.ndarray | None,
                state: np.ndarray | None) -> np.ndarray:
        return decode_probs(self.decoder, f.tokens[None].to(self.device), f.grid, f.crop[None].to(self.device),
                            [uv], [prev_crop], [state], at_crop_size=False, static=self._static(f))[0]

    def _constrained_window(self, f: ObjectFeatures, prob: np.ndarray, clicks: Sequence[Click],
                            prev: np.ndarray | None = None) -> np.ndarray:
        """(win.height, win.width) bool: the click constraint on the crop's probabilities,
        at the crop's resolution then resampled to the window (``crf_resolution: crop``),
        or at the window's own pixels (``window``; :mod:`exits.interactive.constrain`).
        With ``grabcut_mix`` > 0 GrabCut's answer to the same clicks and previous mask
        (``prev``, full image) is mixed into the probabilities first; from the
        ``grabcut_after``-th click GrabCut's answer is returned instead."""
        cfg, win = self.decoder.config, f.window
        # clicks and disk radius in the window's own pixels
        uv_win = [(float(x) - win.x0, float(y) - win.y0, bool(p)) for x, y, p in clicks]
        radius_win = cfg.disk_radius * max(win.width, win.height) / win.size
        if cfg.grabcut_after and len(clicks) >= cfg.grabcut_after and f.window_image is not None:
            return self._grabcut_answer(f, uv_win, prev, radius_win, f.window_image)
        kwargs = dict(method=self.constraint, iters=cfg.crf_iters, sxy=cfg.crf_sxy, srgb=cfg.crf_srgb, weight=cfg.crf_w,
                      colour=cfg.crf_colour, max_size=cfg.crf_max_size,
                      kernels=self._kernels(f) if self.constraint in ("crf", "grabcut") else None)
        if cfg.crf_resolution == "window" and self.constraint in ("crf", "grabcut") and f.window_image is not None:
            uv, radius = uv_win, radius_win
            if cfg.grabcut_mix > 0:
                prob = self._mix_grabcut(f, prob, uv, prev, radius, f.window_image)
            # the crop covers the window exactly: its probabilities go straight to the CRF's grid
            return constrain_clicks(prob, f.window_image.cpu(), uv, radius, **kwargs)
        uv = self._crop_clicks(win, clicks)
        if cfg.grabcut_mix > 0:
            prob = self._mix_grabcut(f, prob, uv, prev, cfg.disk_radius, f.crop)
        crop_out = constrain_clicks(prob, f.crop.cpu(), uv, cfg.disk_radius, **kwargs)
        return (crop_to_window(torch.from_numpy(crop_out.astype(np.float32)), win) >= 0.5).numpy()

    def _mix_grabcut(self, f: ObjectFeatures, prob: np.ndarray, uv: Sequence[Click], prev: np.ndarray | None,
                     radius: float, image: torch.Tensor) -> np.ndarray:
        """p = (1 - w) p_decoder + w 1[GrabCut fg] on ``image``'s grid (the window's pixels or
        the crop; ``uv`` clicks in that grid), w = ``grabcut_mix``."""
        h, w = image.shape[-2:]
        answer = self._grabcut_answer(f, uv, prev, radius, image)
        p = torch.from_numpy(np.ascontiguousarray(prob, np.float32))[None, None]
        if p.shape[-2:] != (h, w):
            p = torch.nn.functional.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        mix = float(self.decoder.config.grabcut_mix)
        return (1 - mix) * p[0, 0].numpy() + mix * answer.astype(np.float32)

    def _grabcut_answer(self, f: ObjectFeatures, uv: Sequence[Click], prev: np.ndarray | None, radius: float,
                        image: torch.Tensor) -> np.ndarray:
        """(h, w) bool GrabCut answer on ``image``'s grid (the window's pixels or the crop; ``uv``
        clicks in that grid), started from the previous mask cut to that grid (else the
        extreme-point box), as :func:`exits.interactive.grabcut.grabcut_from_clicks`."""
        win = f.window
        h, w = image.shape[-2:]
        on_window = (h, w) == (win.height, win.width)
        info = self.objects.get(int(f.ann_id))
        prev_local = None
        if prev is not None:
            prev_local = prev[win.y0:win.y0 + win.height, win.x0:win.x0 + win.width] if on_window else \
                self._crop_prev(win, prev)
        box = None
        if info is not None:
            pts = info.extreme_points if on_window else win.image_to_crop(info.extreme_points)
            origin = np.array([win.x0, win.y0]) if on_window else np.zeros(2)
            pts = np.asarray(pts, np.float64) - origin
            box = np.array([pts[1, 0], pts[0, 1], pts[3, 0], pts[2, 1]])
        rgb = np.ascontiguousarray((image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
        return grabcut_from_clicks(rgb, uv, CropWindow(0, 0, w, h, size=win.size), prev_local, box=box, radius=radius)

    def predict(self, ann_id: int, clicks: list[tuple[float, float, bool]], prev_mask: np.ndarray | None) -> np.ndarray:
        """The new (H, W) bool full-image mask after ``clicks`` on top of ``prev_mask``."""
        info = self._info(ann_id)
        h, w = info.image_size
        if prev_mask is not None and np.asarray(prev_mask).shape != (h, w):
            raise ValueError(f"prev_mask has shape {np.asarray(prev_mask).shape}, image is {(h, w)}")
        prev = None if prev_mask is None else np.asarray(prev_mask, bool)
        if not clicks:
            return prev.copy() if prev is not None else np.zeros((h, w), bool)
        f = self.features(ann_id)
        win = info.window
        cfg = self.decoder.config
        # the carried state and the previous mask's crop, kept by the session when it goes on
        carried, prev_crop = self.sessions.lookup_entry(ann_id, clicks, prev)
        if prev_crop is None:
            prev_crop = self._crop_prev(win, prev)
        uv = self._crop_clicks(win, clicks)
        z = state_map(uv, prev_crop, (win.size, win.size), cfg.disk_radius, carried)
        prob = self._decode(f, uv, prev_crop, z)
        out = prev.copy() if prev is not None else np.zeros((h, w), bool)
        rows, cols = slice(win.y0, win.y0 + win.height), slice(win.x0, win.x0 + win.width)
        out[rows, cols] = self._constrained_window(f, prob, clicks, prev)
        radius = cfg.disk_radius * max(win.width, win.height) / win.size
        if self.progressive and prev is not None:
            out = progressive_update(prev, out, clicks[-1], radius)
        if self.constraint != "none":
            for x, y, positive in clicks:
                rows_d, cols_d, disk = disk_index(float(x), float(y), radius, h, w)
                out[rows_d, cols_d][disk] = bool(positive)
        out_crop = self._crop_prev(win, out)
        self.sessions.store(ann_id, clicks, update_with_prediction(z, out_crop), out, out_crop)
        return out
