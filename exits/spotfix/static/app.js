// exits spot-fix page: queue, click editing, decisions. No dependencies, no external requests.
"use strict";

const state = {
  token: null, meta: null, queue: [], index: -1, obj: null, image: null,
  history: [],      // [{clicks: [...], mask: {rle, png, area}, maskImg}] ; history[0] = the base mask
  clicks: [],       // clicks so far, including any still waiting for an answer
  busy: false, pending: false, showMask: true, view: null,
  saving: false,    // a decision is on its way to the server
  unsaved: null,    // {annId, decision, leaveArmed}: the server could not save it; the fix stays on the page
};
const $ = (id) => document.getElementById(id);
const canvas = $("view");
const ctx = canvas.getContext("2d");

function initToken() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem("exits-token", fromUrl);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);  // keep it out of the address bar
  }
  state.token = sessionStorage.getItem("exits-token");
}

async function api(path, body) {
  const headers = {};
  if (state.token) headers["X-Exits-Token"] = state.token;
  const opts = { headers, method: "GET" };
  if (body !== undefined) {
    opts.method = "POST";
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (e) { /* not json */ }
    const err = new Error(`${resp.status}: ${detail}`);
    err.status = resp.status;
    throw err;
  }
  return resp;
}
const apiJson = async (path, body) => (await api(path, body)).json();

async function blobImage(path) {
  const blob = await (await api(path)).blob();
  return loadImage(URL.createObjectURL(blob));
}
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("image failed to load"));
    img.src = src;
  });
}

function setStatus(msg, isError) {
  const el = $("status");
  el.textContent = msg;
  el.className = isError ? "error" : "";
}

// ---- queue -------------------------------------------------------------------------------
function filterQuery() {
  const p = new URLSearchParams();
  const add = (k, v) => { if (v !== "") p.set(k, v); };
  add("category_id", $("f-category").value);
  add("separated", $("f-separated").value);
  add("min_score", $("f-min").value);
  add("max_score", $("f-max").value);
  add("status", $("f-status").value);
  return p.toString();
}

async function loadQueue() {
  const data = await apiJson("/api/queue?" + filterQuery());
  state.queue = data.items;
  $("queue-total").textContent = `${data.total} objects${data.scope === "budget" ? " in the review budget" : ""}, worst score first`;
  const list = $("queue");
  list.replaceChildren();
  data.items.forEach((item, i) => {
    const li = document.createElement("li");
    li.dataset.annId = item.ann_id;
    li.className = item.status;
    const img = document.createElement("img");
    img.alt = `object ${item.ann_id}`;
    const score = item.score === null ? "–" : item.score.toFixed(3);
    const text = document.createElement("span");
    text.append(`#${item.ann_id} ${item.category}`, document.createElement("br"), `score ${score} `);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = item.status + (item.separated ? ` · ${item.parts} parts` : "");
    text.append(badge);
    li.append(img, text);
    li.addEventListener("click", () => openAt(i));
    list.append(li);
    blobImage(item.thumb_url).then((t) => { img.src = t.src; }).catch(() => {});
  });
  highlightQueue();
}

function highlightQueue() {
  const current = state.obj ? String(state.obj.ann_id) : null;
  for (const li of $("queue").children) li.classList.toggle("current", li.dataset.annId === current);
}

async function refreshMeta() {
  state.meta = await apiJson("/api/meta");
  const c = state.meta.counts;
  $("counts").textContent = `${c.objects} objects · ${c.accepted} accepted · ${c.rejected} rejected`;
  $("editor").textContent = `editor: ${state.meta.editor}`;
  const r = state.meta.review || {};
  $("review").textContent = r.limited ? `review budget: ${r.budget} masks` : "";
  $("btn-review-done").hidden = !r.waiting;
}

// ---- exits loop: "review done" resumes the suspended flow run ----------------------------
async function reviewDone() {
  const decided = state.meta.counts.accepted + state.meta.counts.rejected;
  if (!window.confirm(`Finish the review (${decided} decided) and let the loop export the fixes and train?`)) return;
  const btn = $("btn-review-done");
  btn.disabled = true;
  try {
    const user = $("user").value || undefined;
    const out = await apiJson("/api/review/done", { reviewer: user, note: "" });
    setStatus(`review done: loop run ${out.flow_run_id} resumed (${out.state}); continued by ${out.continued_by}`);
    await refreshMeta();
  } catch (e) {
    setStatus(`review done failed: ${e.message}`, true);
  } finally {
    btn.disabled = false;
  }
}

// ---- one object --------------------------------------------------------------------------
async function openAt(i) {
  if (i < 0 || i >= state.queue.length) { setStatus(i < 0 ? "first object" : "end of the queue"); return; }
  const u = state.unsaved;
  if (u && state.obj && u.annId === state.obj.ann_id && !u.leaveArmed) {
    // Moving on would throw the unsaved fix away: the first try only warns.
    u.leaveArmed = true;
    setStatus(`#${u.annId}: your ${u.decision} was NOT saved. Press ${u.decision} again to retry, ` +
      "or move on once more to discard this fix.", true);
    return;
  }
  clearUnsaved();
  const annId = state.queue[i].ann_id;
  state.index = i;
  try {
    await openObject(annId);
  } catch (e) {  // e.g. its image is missing or outside the image folder: say so; n / p move past it
    state.obj = null;
    canvas.dataset.annId = "";
    $("info").textContent = `#${annId} could not be opened`;
    highlightQueue();
    draw();
    setStatus(`#${annId} did not open: ${e.message}`, true);
    return;
  }
  const next = state.queue[i + 1];
  if (next) api(`/api/objects/${next.ann_id}/prefetch`, {}).catch(() => {});
}

async function openObject(annId) {
  setStatus("loading…");
  const obj = await apiJson(`/api/objects/${annId}`);
  const image = await blobImage(obj.image_url);
  const maskImg = await loadImage(obj.mask.png);
  state.obj = obj;
  state.image = image;
  state.history = [{ clicks: [], mask: obj.mask, maskImg }];
  state.clicks = [];
  state.view = viewRect(obj);
  const score = obj.score === null ? "–" : obj.score.toFixed(3);
  $("info").textContent = `#${obj.ann_id} · ${obj.category} · score ${score} · ${obj.parts} part(s) · ` +
    `status ${obj.status} · editing the ${obj.base === "fix" ? "latest fix" : "pseudo mask"}`;
  canvas.dataset.annId = obj.ann_id;
  highlightQueue();
  draw();
  setStatus("");
}

function current() { return state.history[state.history.length - 1]; }

function viewRect(obj) {
  // The crop window grown by half its size on each side: context around small objects.
  const [x, y, w, h] = obj.crop_box;
  const x0 = Math.max(0, x - w / 2), y0 = Math.max(0, y - h / 2);
  const x1 = Math.min(obj.width, x + 1.5 * w), y1 = Math.min(obj.height, y + 1.5 * h);
  const s = Math.min(canvas.width / (x1 - x0), canvas.height / (y1 - y0));
  const ox = (canvas.width - (x1 - x0) * s) / 2, oy = (canvas.height - (y1 - y0) * s) / 2;
  return { x0, y0, w: x1 - x0, h: y1 - y0, s, ox, oy };
}

function toCanvas(x, y) {  // image pixel centre -> canvas
  const v = state.view;
  return [v.ox + (x + 0.5 - v.x0) * v.s, v.oy + (y + 0.5 - v.y0) * v.s];
}

function draw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.obj) return;
  const v = state.view;
  const cur = current();
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(state.image, v.x0, v.y0, v.w, v.h, v.ox, v.oy, v.w * v.s, v.h * v.s);
  if (state.showMask) {
    ctx.imageSmoothingEnabled = false;  // show mask pixels as they are
    ctx.drawImage(cur.maskImg, v.x0, v.y0, v.w, v.h, v.ox, v.oy, v.w * v.s, v.h * v.s);
  }
  for (const [x, y] of state.obj.extreme_points) dot(x, y, "#ffd43b", 4);
  for (const [x, y, pos] of state.clicks) dot(x, y, pos ? "#40c057" : "#fa5252", 6);
  canvas.dataset.maskArea = cur.mask.area;
  canvas.dataset.clicks = state.clicks.length;
}

function dot(x, y, color, r) {
  const [cx, cy] = toCanvas(x, y);
  ctx.beginPath();
  ctx.arc(cx, cy, r, 0, 2 * Math.PI);
  ctx.fillStyle = color;
  ctx.fill();
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = "#000";
  ctx.stroke();
}

// ---- clicks ------------------------------------------------------------------------------
function onMouseDown(ev) {
  if (!state.obj || (ev.button !== 0 && ev.button !== 2)) return;
  ev.preventDefault();
  const rect = canvas.getBoundingClientRect();
  const px = (ev.clientX - rect.left) * canvas.width / rect.width;
  const py = (ev.clientY - rect.top) * canvas.height / rect.height;
  const v = state.view;
  const x = v.x0 + (px - v.ox) / v.s - 0.5, y = v.y0 + (py - v.oy) / v.s - 0.5;
  const xi = Math.round(x), yi = Math.round(y);
  if (xi < 0 || yi < 0 || xi >= state.obj.width || yi >= state.obj.height) return;
  if (state.clicks.length >= state.meta.max_clicks) { setStatus(`at most ${state.meta.max_clicks} clicks`, true); return; }
  state.clicks.push([xi, yi, ev.button === 0]);
  draw();
  runPredict();
}

async function runPredict() {
  if (state.busy) { state.pending = true; return; }
  state.busy = true;
  canvas.dataset.busy = "1";
  const annId = state.obj.ann_id;
  const clicks = state.clicks.slice();
  try {
    const body = { clicks: clicks.map(([x, y, p]) => ({ x, y, positive: p })), prev_rle: current().mask.rle };
    const res = await apiJson(`/api/objects/${annId}/predict`, body);
    const maskImg = await loadImage(res.mask.png);
    if (state.obj && state.obj.ann_id === annId) {
      state.history.push({ clicks, mask: res.mask, maskImg });
      setStatus(`${clicks.length} click(s) · mask ${res.mask.area} px`);
    }
  } catch (e) {
    state.clicks = current().clicks.slice();  // drop clicks the server refused
    setStatus(e.message, true);
  } finally {
    state.busy = false;
    canvas.dataset.busy = "";
  }
  draw();
  if (state.pending) {
    state.pending = false;
    if (state.obj && state.obj.ann_id === annId && state.clicks.length > current().clicks.length) runPredict();
  }
}

function undo() {
  if (!state.obj || state.busy || state.history.length < 2) return;
  state.history.pop();
  state.clicks = current().clicks.slice();
  draw();
  setStatus("undone");
}

function reset() {
  if (!state.obj || state.busy) return;
  state.history = state.history.slice(0, 1);
  state.clicks = [];
  draw();
  setStatus("reset to the starting mask");
}

function queueItem(annId) {
  return [...$("queue").children].find((el) => el.dataset.annId === String(annId));
}

// The server could not store the decision (disk full, read-only run folder, conflict, network):
// the mask and clicks stay as they are, the object is not marked decided, and pressing
// accept / reject again sends the same fix.
function markUnsaved(obj, decision, err) {
  state.unsaved = { annId: obj.ann_id, decision, leaveArmed: false };
  canvas.dataset.unsaved = decision;
  const li = queueItem(obj.ann_id);
  if (li) {
    li.classList.add("unsaved");
    const badge = li.querySelector(".badge");
    if (badge) badge.textContent = "not saved";
  }
  const n = current().clicks.length;
  const key = decision === "accept" ? "a" : "x";
  const hint = err.status === 409
    ? "Someone decided this object meanwhile: reload it (open it again) to see their decision."
    : `Your mask and ${n} click(s) are still here: press ${decision} (${key}) again to retry.`;
  setStatus(`#${obj.ann_id} NOT saved (${decision}): ${err.message}. ${hint}`, true);
}

function clearUnsaved() {
  const u = state.unsaved;
  if (!u) return;
  state.unsaved = null;
  delete canvas.dataset.unsaved;
  const li = queueItem(u.annId);
  if (li) {
    li.classList.remove("unsaved");
    const item = state.queue.find((q) => q.ann_id === u.annId);
    const badge = li.querySelector(".badge");
    if (badge && item) badge.textContent = item.status;
  }
}

async function decide(decision) {
  if (!state.obj || state.busy || state.saving) return;
  const obj = state.obj;
  const cur = current();
  const body = {
    decision, base: obj.base, revision: obj.revision, user: $("user").value || undefined,
    clicks: cur.clicks.map(([x, y, p]) => ({ x, y, positive: p })),
  };
  if (decision === "accept") body.rle = cur.mask.rle;
  state.saving = true;
  canvas.dataset.saving = "1";
  let res;
  try {
    res = await apiJson(`/api/objects/${obj.ann_id}/decision`, body);
  } catch (e) {
    markUnsaved(obj, decision, e);
    return;
  } finally {
    state.saving = false;
    canvas.dataset.saving = "";
  }
  clearUnsaved();
  obj.revision = res.revision;
  const item = state.queue.find((q) => q.ann_id === obj.ann_id);
  if (item) item.status = res.status;
  const li = queueItem(obj.ann_id);
  if (li) { li.className = res.status; li.querySelector(".badge").textContent = res.status; }
  canvas.dataset.lastDecision = `${obj.ann_id}:${res.status}`;
  refreshMeta().catch(() => {});
  setStatus(`#${obj.ann_id} ${res.status} (saved)`);
  if (state.index + 1 < state.queue.length) await openAt(state.index + 1);
}

function onKey(ev) {
  const tag = (ev.target.tagName || "").toLowerCase();
  if (tag === "input" || tag === "select" || tag === "textarea") return;
  const k = ev.key;
  const actions = {
    a: () => decide("accept"), Enter: () => decide("accept"), x: () => decide("reject"), Delete: () => decide("reject"),
    u: undo, r: reset, n: () => openAt(state.index + 1), ArrowRight: () => openAt(state.index + 1),
    p: () => openAt(state.index - 1), ArrowLeft: () => openAt(state.index - 1),
    m: () => { state.showMask = !state.showMask; $("show-mask").checked = state.showMask; draw(); },
  };
  if ((ev.ctrlKey || ev.metaKey) && k === "z") { ev.preventDefault(); undo(); return; }
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !(k in actions)) return;
  ev.preventDefault();
  actions[k]();
}

async function main() {
  initToken();
  canvas.addEventListener("mousedown", onMouseDown);
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  document.addEventListener("keydown", onKey);
  window.addEventListener("beforeunload", (ev) => {
    if (state.unsaved) { ev.preventDefault(); ev.returnValue = ""; }  // the browser asks before losing it
  });
  $("btn-undo").onclick = undo;
  $("btn-reset").onclick = reset;
  $("btn-accept").onclick = () => decide("accept");
  $("btn-reject").onclick = () => decide("reject");
  $("btn-next").onclick = () => openAt(state.index + 1);
  $("btn-prev").onclick = () => openAt(state.index - 1);
  $("btn-review-done").onclick = () => reviewDone();
  $("show-mask").onchange = (ev) => { state.showMask = ev.target.checked; draw(); };
  $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadQueue().catch((e) => setStatus(e.message, true)); });
  try {
    await refreshMeta();
    const sel = $("f-category");
    for (const c of state.meta.categories) sel.append(new Option(c.name, c.id));
    const user = $("user");
    user.value = localStorage.getItem("exits-user") || state.meta.user;
    user.onchange = () => localStorage.setItem("exits-user", user.value);
    await loadQueue();
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus(e.message, true);
  }
}

window.spotfix = state;  // for inspection from the browser console
main();
