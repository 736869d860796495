"""The spot-fix web app: ``create_app(workdir, editor)`` -> FastAPI.

Endpoints (JSON unless noted; errors are ``{"detail": message}`` and change nothing):
  GET  /                                the page (static/index.html)
  GET  /static/{file}                   page JS/CSS
  GET  /api/meta                        categories, user, editor, counts, limits
  GET  /api/queue                       objects worst score first; filters category_id,
                                        separated, min_score, max_score, status; offset/limit
  GET  /api/objects/{ann_id}            one object + its current mask (latest fix or pseudo);
                                        starts the editor's prepare in the background
  POST /api/objects/{ann_id}/prefetch   prepare an object ahead of time (202)
  POST /api/objects/{ann_id}/predict    {clicks, prev_rle?} -> new mask (RLE + PNG overlay)
  POST /api/objects/{ann_id}/decision   {decision, clicks, rle?, base, revision?} -> stored record
  GET  /api/objects/{ann_id}/history    every stored decision of the object
  GET  /api/objects/{ann_id}/thumb      JPEG thumbnail (crop + current mask)
  GET  /api/images/{image_id}           the image file (by id; never by path)
  POST /api/review/done                 {reviewer?, note?}: "review done" -> resumes the run
                                        folder's suspended ``exits loop`` run (Prefect's API);
                                        409 with a JSON detail when no loop run waits

With ``review`` (:class:`exits.spotfix.review.LoopReview`) the queue shows only the loop's
triage budget (``loop/review.json``) unless asked for ``scope=all``.

Errors: 4xx for bad requests. An image the run lists but the page cannot serve: 403
(``reason: outside_image_dir``, its file_name leads outside the image folder,
exits.data.images.image_file), 404 (file missing), 422 (file corrupt / unreadable), the
detail naming the image id. A file system error (disk full, read-only run folder, I/O
error) answers ``{"detail", "error", "errno", "path"}`` with the path and the errno's
meaning: 507 for ENOSPC/EDQUOT, 503 for EROFS/EACCES/EPERM, else 500; a decision that could
not be written also carries ``"saved": false`` (nothing of it is in the fixes file).
"""
from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from exits.data.images import ImagePathError, ImageReadError
from exits.spotfix.catalog import QueueFilter, ReviewObject, RunCatalog
from exits.spotfix.editors import EditorRunner, MaskEditor
from exits.spotfix.masks import decode_rle, encode_rle, overlay_data_url, rle_area_bbox
from exits.spotfix.review import LoopReview, ReviewDoneIn, ReviewUnavailable
from exits.spotfix.schemas import MAX_CLICKS, ClickIn, DecisionIn, PredictIn, RleIn
from exits.spotfix.security import SECURITY_HEADERS, TOKEN_COOKIE, TOKEN_QUERY, make_guard, token_matches
from exits.io import format_os_error
from exits.spotfix.store import APP_VERSION, FixesStore, FixRecord, RevisionConflict

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
BROWSER_IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                       ".gif": "image/gif", ".bmp": "image/bmp"}
THUMB_SIZE = 96
Status = Literal["todo", "accepted", "rejected", "decided", "all"]
Scope = Literal["budget", "all"]
AnnId = int
# HTTP status of a file system error: the disk is full / the run folder cannot be written
OS_ERROR_STATUS = {errno.ENOSPC: 507, errno.EDQUOT: 507, errno.EROFS: 503, errno.EACCES: 503, errno.EPERM: 503}

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer with extra JSON fields beside ``detail``."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def os_error_response(exc: OSError, action: str | None = None, **extra: Any) -> JSONResponse:
    """JSON answer to a file system error: the path and the errno's meaning, never a bare 500."""
    message = format_os_error(exc)
    if action:
        message = f"{action}: {message}"
    body = {"detail": message, "error": message, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            "path": None if exc.filename is None else os.fsdecode(exc.filename), **extra}
    return JSONResponse(body, status_code=OS_ERROR_STATUS.get(exc.errno or 0, 500), headers=SECURITY_HEADERS)


def image_error(image_id: int, exc: Exception) -> ApiError:
    """The answer for an image the page cannot serve (the detail names the image id)."""
    if isinstance(exc, ImagePathError):
        return ApiError(403, f"image {image_id} is outside the image folder: {exc}", reason=ImagePathError.reason,
                        image_id=image_id)
    if isinstance(exc, FileNotFoundError):
        where = f": {os.fsdecode(exc.filename)}" if exc.filename is not None else ""
        return ApiError(404, f"image {image_id}: the file is missing{where}", image_id=image_id)
    if isinstance(exc, ImageReadError):
        return ApiError(422, f"image {image_id}: {exc}", image_id=image_id)
    return ApiError(500, f"image {image_id}: {exc}", image_id=image_id)


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "anonymous")


def create_app(workdir: str | Path, editor: MaskEditor, token: str | None = None, *, user: str | None = None,
               catalog: RunCatalog | None = None, image_root: str | Path | None = None,
               allowed_hosts: list[str] | None = None, editor_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, review: LoopReview | None = None) -> FastAPI:
    """The app for one run folder. ``token`` (if given) must come with every request;
    ``allowed_hosts`` (e.g. loopback names) guards a 127.0.0.1 server against DNS rebinding;
    ``review``: the ``exits loop`` review (budget-limited queue, "review done"; default: the
    run folder's, limited to its budget when one exists)."""
    workdir = Path(workdir)
    review = review if review is not None else LoopReview(workdir)
    catalog = catalog if catalog is not None else RunCatalog.load(workdir, image_root)
    store = FixesStore(workdir)
    runner = EditorRunner(editor)
    user = user or default_user()
    editor_label = editor_name or type(editor).__name__
    thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
    thumbs_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        runner.close()

    app = FastAPI(title="exits spot-fix", version=APP_VERSION, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.middleware("http")(make_guard(token, max_body_bytes, allowed_hosts or None))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status, headers=SECURITY_HEADERS)

    @app.exception_handler(ReviewUnavailable)
    async def _review_unavailable(_: Request, exc: ReviewUnavailable) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "resumed": False, **exc.extra}, status_code=exc.status,
                            headers=SECURITY_HEADERS)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, format_os_error(exc))
        return os_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["/".join(str(p) for p in e.get("loc", ()) if p != "body") + ": " + str(e.get("msg", "")) for e in exc.errors()]
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422, headers=SECURITY_HEADERS)

    def get_object(ann_id: int) -> ReviewObject:
        obj = catalog.objects.get(ann_id)
        if obj is None:
            raise HTTPException(404, f"unknown object id {ann_id}")
        return obj

    def image_size(obj: ReviewObject) -> tuple[int, int]:
        info = catalog.images[obj.image_id]
        return info.height, info.width

    def current_mask(obj: ReviewObject) -> tuple[np.ndarray, Literal["pseudo", "fix"], FixRecord | None, int]:
        """The mask editing starts from: the latest accepted fix, else the pseudo mask (also
        when the stored fix does not fit the image: a hand-edited record)."""
        rec, revision = store.latest_for(obj.ann_id)
        if rec is not None and rec.decision == "accept" and rec.rle is not None:
            try:
                return decode_rle(rec.rle, *image_size(obj)), "fix", rec, revision
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("%s: the fix of object %d (record %s) does not fit its image (%s); showing the pseudo mask",
                            store.path, obj.ann_id, rec.record_id, exc)
        return catalog.pseudo_mask(obj.ann_id), "pseudo", rec, revision

    def load_image(image_id: int) -> np.ndarray:
        try:
            return catalog.load_image(image_id)
        except (ImagePathError, ImageReadError, FileNotFoundError) as exc:
            raise image_error(image_id, exc) from exc

    def checked_clicks(obj: ReviewObject, clicks: list[ClickIn]) -> list[tuple[float, float, bool]]:
        h, w = image_size(obj)
        for k, c in enumerate(clicks):
            if not (0 <= c.x < w and 0 <= c.y < h):
                raise HTTPException(422, f"click {k} at ({c.x}, {c.y}) is outside the {w}x{h} image")
        return [(float(c.x), float(c.y), bool(c.positive)) for c in clicks]

    def checked_mask(obj: ReviewObject, rle: RleIn) -> np.ndarray:
        try:
            return decode_rle({"size": list(rle.size), "counts": rle.counts}, *image_size(obj))
        except ValueError as exc:
            raise HTTPException(422, f"bad mask: {exc}") from exc

    def mask_payload(mask: np.ndarray) -> dict[str, Any]:
        rle = encode_rle(mask)
        area, bbox = rle_area_bbox(rle)
        return {"rle": rle, "png": overlay_data_url(mask), "area": area, "bbox": bbox}

    def status_of(rec: FixRecord | None) -> str:
        return "todo" if rec is None else ("accepted" if rec.decision == "accept" else "rejected")

    def summary(obj: ReviewObject, rec: FixRecord | None) -> dict[str, Any]:
        return {"ann_id": obj.ann_id, "image_id": obj.image_id, "category_id": obj.category_id,
                "category": catalog.categories.get(obj.category_id, str(obj.category_id)), "score": obj.score,
                "parts": obj.parts, "separated": obj.separated, "status": status_of(rec),
                "thumb_url": f"/api/objects/{obj.ann_id}/thumb"}

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        response = FileResponse(STATIC_DIR / "index.html", media_type="text/html")
        given = request.query_params.get(TOKEN_QUERY)
        if token is not None and token_matches(given, token):
            # Lets <img> and <script> loads carry the token; POSTs still need the header.
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.get("/api/meta")
    def meta() -> dict[str, Any]:
        latest = store.latest()
        decided = [r for a, r in latest.items() if a in catalog.objects]
        return {"app_version": APP_VERSION, "user": user, "editor": editor_label, "max_clicks": MAX_CLICKS,
                "categories": [{"id": k, "name": v} for k, v in sorted(catalog.categories.items())],
                "counts": {"objects": len(catalog.objects), "accepted": sum(r.decision == "accept" for r in decided),
                           "rejected": sum(r.decision == "reject" for r in decided)},
                "review": review.info()}

    @app.get("/api/queue")
    def queue(category_id: int | None = Query(None, ge=0), separated: bool | None = None,
              min_score: float | None = Query(None, allow_inf_nan=False),
              max_score: float | None = Query(None, allow_inf_nan=False), status: Status = "todo",
              offset: int = Query(0, ge=0), limit: int = Query(500, ge=1, le=5000),
              scope: Scope = "budget") -> dict[str, Any]:
        if min_score is not None and max_score is not None and min_score > max_score:
            raise HTTPException(422, f"min_score {min_score} is above max_score {max_score}")
        if category_id is not None and category_id not in catalog.categories:
            raise HTTPException(422, f"unknown category id {category_id}")
        latest = store.latest()
        flt = QueueFilter(category_id, separated, min_score, max_score)
        # One scan of the catalog's score-sorted columns keeps only the page; the status filter
        # is the decided ids (few: human decisions), excluded for "todo", the only ones otherwise.
        budget = review.budget() if scope == "budget" else None
        if budget is not None:  # the loop's triage budget: few ids, one `only` list
            keep = {"all": lambda a: True, "todo": lambda a: a not in latest,
                    "decided": lambda a: a in latest}.get(status, lambda a: a in latest and status_of(latest[a]) == status)
            page = catalog.page(flt, offset, limit, only=[a for a in budget if keep(a)])
        elif status == "all":
            page = catalog.page(flt, offset, limit)
        elif status == "todo":
            page = catalog.page(flt, offset, limit, exclude=latest.keys())
        else:
            page = catalog.page(flt, offset, limit, only=[a for a, r in latest.items()
                                                          if status in ("decided", status_of(r))])
        return {"total": page.total, "offset": offset, "scope": "budget" if budget is not None else "all",
                "items": [summary(o, latest.get(o.ann_id)) for o in page.items]}

    @app.get("/api/objects/{ann_id}")
    def object_detail(ann_id: AnnId) -> dict[str, Any]:
        obj = get_object(ann_id)
        mask, base, rec, revision = current_mask(obj)
        runner.prepare_async(ann_id)
        h, w = image_size(obj)
        return {**summary(obj, rec), "width": w, "height": h, "image_url": f"/api/images/{obj.image_id}",
                "extreme_points": [list(p) for p in obj.extreme_points], "crop_box": list(obj.crop_box),
                "base": base, "revision": revision, "mask": mask_payload(mask)}

    @app.post("/api/objects/{ann_id}/prefetch", status_code=202)
    def prefetch(ann_id: AnnId) -> dict[str, Any]:
        get_object(ann_id)
        runner.prepare_async(ann_id)
        return {"ann_id": ann_id, "queued": True}

    @app.post("/api/objects/{ann_id}/predict")
    def predict(ann_id: AnnId, body: PredictIn) -> dict[str, Any]:
        obj = get_object(ann_id)
        clicks = checked_clicks(obj, body.clicks)
        prev = checked_mask(obj, body.prev_rle) if body.prev_rle is not None else current_mask(obj)[0]
        try:
            mask = np.asarray(runner.predict(ann_id, clicks, prev), dtype=bool)
        except (ImagePathError, ImageReadError, FileNotFoundError) as exc:  # the editor reads the image
            raise image_error(obj.image_id, exc) from exc
        if mask.shape != prev.shape:
            raise HTTPException(500, f"editor returned a {mask.shape} mask for a {prev.shape} image")
        return {"ann_id": ann_id, "clicks": len(clicks), "mask": mask_payload(mask)}

    @app.post("/api/objects/{ann_id}/decision")
    def decision(ann_id: AnnId, body: DecisionIn) -> dict[str, Any]:
        obj = get_object(ann_id)
        clicks = checked_clicks(obj, body.clicks)
        rle = None
        if body.decision == "accept":
            if body.rle is None:
                raise HTTPException(422, "an accept needs the mask (rle)")
            mask = checked_mask(obj, body.rle)
            if not mask.any():
                raise HTTPException(422, "the accepted mask is empty; reject the object instead")
            rle = encode_rle(mask)
        elif body.rle is not None:
            raise HTTPException(422, "a rejection carries no mask (rle)")
        record = FixRecord(ann_id=ann_id, decision=body.decision, user=body.user or user,
                           clicks=[[x, y, p] for x, y, p in clicks], rle=rle, base=body.base, editor=editor_label)
        try:
            revision = store.append(record, expect_revision=body.revision)
        except RevisionConflict as exc:
            raise HTTPException(409, str(exc)) from exc
        except OSError as exc:  # disk full, read-only run folder: the page keeps the fix and can retry
            log.warning("the fix of object %d was not saved: %s", ann_id, format_os_error(exc))
            return os_error_response(exc, f"could not save the fix of object {ann_id}", saved=False, ann_id=ann_id)
        return {"ann_id": ann_id, "revision": revision, "status": status_of(record), "record_id": record.record_id,
                "time": record.time, "user": record.user}

    @app.get("/api/objects/{ann_id}/history")
    def history(ann_id: AnnId) -> dict[str, Any]:
        get_object(ann_id)
        recs = [r for r in store.records() if r.ann_id == ann_id]
        return {"ann_id": ann_id, "records": [{k: getattr(r, k) for k in ("decision", "user", "time", "clicks", "base",
                                                                        "editor", "record_id")} for r in recs]}

    @app.get("/api/objects/{ann_id}/thumb")
    def thumb(ann_id: AnnId) -> Response:
        obj = get_object(ann_id)
        mask, _, _, revision = current_mask(obj)
        key = (ann_id, revision)
        with thumbs_lock:
            data = thumbs.get(key)
        if data is None:
            data = _thumbnail(load_image(obj.image_id), mask, obj.crop_box)
            with thumbs_lock:
                thumbs[key] = data
                while len(thumbs) > 1024:
                    thumbs.popitem(last=False)
        return Response(data, media_type="image/jpeg")

    @app.post("/api/review/done")
    def review_done(body: ReviewDoneIn) -> dict[str, Any]:
        """The "review done" button: resume the suspended loop run (409 when none waits)."""
        return review.done(body.reviewer or user, body.note)

    @app.get("/api/images/{image_id}")
    def image(image_id: int) -> Response:
        if image_id not in catalog.images:
            raise HTTPException(404, f"unknown image id {image_id}")
        try:
            path = catalog.image_path(image_id)
        except (ImagePathError, FileNotFoundError) as exc:
            raise image_error(image_id, exc) from exc
        media = BROWSER_IMAGE_TYPES.get(path.suffix.lower())
        if media is not None:
            # read here, not streamed: an unreadable file is a JSON error, not a response cut off mid-way
            return Response(path.read_bytes(), media_type=media)
        ok, buf = cv2.imencode(".png", load_image(image_id)[:, :, ::-1])  # formats browsers cannot show
        return Response(buf.tobytes(), media_type="image/png")

    return app


def _thumbnail(image: np.ndarray, mask: np.ndarray, crop_box: tuple[int, int, int, int]) -> bytes:
    """JPEG of the object's crop with the mask tinted, longer side THUMB_SIZE px."""
    x0, y0, w, h = crop_box
    crop = image[y0:y0 + h, x0:x0 + w].astype(np.float32)
    m = mask[y0:y0 + h, x0:x0 + w, None]
    tint = np.array([0, 170, 255], np.float32)
    crop = np.where(m, 0.55 * crop + 0.45 * tint, crop).astype(np.uint8)
    scale = THUMB_SIZE / max(w, h)
    small = cv2.resize(crop, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes()
