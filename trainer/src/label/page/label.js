// weld-trainer labelling page: one frame at a time (RGB and false-colour depth, the rules'
// findings, the model's pre-label), keyboard first, and a grid for labelling many at once.
// URLs are relative, so the page also works behind a reverse proxy under a sub-path.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const KIND_COLOURS = { pore: "#f87171", undercut: "#fbbf24", spatter: "#a78bfa", burn_through: "#fb923c" };
const PREFETCH = 3; // frames ahead whose images are fetched and decoded before they are needed
const CACHE_MAX = 8 * PREFETCH;

let info = null; // /api/info
let mode = "unlabeled";
let queue = []; // frames of the queue, in order
let pos = 0;
let pending; // undefined: nothing picked; null: "unlabelled"; a string: a class
let gridOn = false;
const selected = new Set();
let anchor = null; // the last tile clicked, for Shift+click ranges
let showToken = 0;
const cache = new Map(); // url -> prefetched Image
// Keystroke to next frame drawn, ms (read by the browser test, shown in the footer).
const timings = [];
window.labelTimings = timings;

// Key actions run one after another, in the order pressed.
let work = Promise.resolve();
function serial(fn) {
  work = work.then(fn).catch((err) => toast(err.message || String(err)));
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  const text = await resp.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON: reported below */ }
  if (!resp.ok) throw new Error((json && json.error) || `${method} ${path}: HTTP ${resp.status}`);
  return json;
}

function frameUrl(f, view) {
  const cut = f.id.indexOf("/");
  const folder = f.id.slice(0, cut);
  const stem = f.id.slice(cut + 1);
  return `api/frames/${encodeURIComponent(folder)}/${encodeURIComponent(stem)}/${view}`;
}

const pct = (x) => `${Math.round(x * 100)}%`;
const opinion = (o) => (o ? `${o.class} ${pct(o.confidence)}` : "—");

let toastTimer = 0;
function toast(message, kind) {
  const t = $("toast");
  t.textContent = message;
  t.className = `toast ${kind || ""}`;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, kind === "info" ? 2000 : 6000);
}

// ------------------------------------------------------------------ header

function renderInfo() {
  $("dataset").textContent = info.dataset;
  $("user").textContent = `labelling as ${info.user}`;
  $("model").textContent = info.model ? `pre-labels: ${info.model.name} ${info.model.version}` : "no model: start with --model for pre-labels";
  const counts = $("counts");
  counts.replaceChildren(...info.counts.map(([name, n]) => {
    const c = document.createElement("span");
    c.className = "chip";
    c.dataset.folder = name;
    c.dataset.value = String(n);
    c.textContent = `${name} ${n}`;
    return c;
  }));
  $("undo").disabled = info.undoable === 0;
  $("undo").textContent = info.undoable ? `Undo (${info.undoable})` : "Undo";
}

function setupQueueSelect() {
  const sel = $("queue");
  for (const c of info.classes) {
    const o = document.createElement("option");
    o.value = `class:${c}`;
    o.textContent = `Review: ${c}`;
    sel.append(o);
  }
  for (const o of sel.options) {
    if ((o.value === "confidence" || o.value === "disagreement") && !info.model) {
      o.disabled = true;
      o.textContent += " (needs --model)";
    }
  }
  sel.addEventListener("change", () => {
    mode = sel.value;
    sel.blur();
    serial(() => loadQueue(null));
  });
  const bulk = $("bulk-class");
  for (const c of [...info.classes, null]) {
    const o = document.createElement("option");
    o.value = c === null ? "" : c;
    o.textContent = c === null ? "unlabelled" : c;
    bulk.append(o);
  }
}

// ------------------------------------------------------------------ the queue

function belongs(f) {
  if (mode === "all") return true;
  if (mode.startsWith("class:")) return f.label === mode.slice(6);
  return f.label === null;
}

async function loadQueue(keepId) {
  const r = await api("GET", `api/queue?mode=${encodeURIComponent(mode)}`);
  queue = r.frames;
  const at = keepId ? queue.findIndex((f) => f.id === keepId) : -1;
  pos = at >= 0 ? at : Math.min(pos, Math.max(0, queue.length - 1));
  if (keepId === null) pos = 0;
  selected.clear();
  if (gridOn) renderGrid();
  await show();
}

// ------------------------------------------------------------------ one frame

function setImage(img, src) {
  if (img.getAttribute("src") !== src) img.setAttribute("src", src);
  return img.decode().catch(() => {});
}

function prefetch() {
  for (let i = pos + 1; i <= pos + PREFETCH && i < queue.length; i++) {
    const f = queue[i];
    for (const view of f.has_depth ? ["rgb", "depth"] : ["rgb"]) {
      const u = frameUrl(f, view);
      if (cache.has(u)) continue;
      const im = new Image();
      im.src = u;
      im.decode().catch(() => {});
      cache.set(u, im);
      if (cache.size > CACHE_MAX) cache.delete(cache.keys().next().value);
    }
  }
}

function drawFindings(svg, f) {
  svg.replaceChildren();
  if (!f.width || !f.height) return;
  svg.setAttribute("viewBox", `0 0 ${f.width} ${f.height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  for (const fd of f.findings || []) {
    const [x, y, w, h] = fd.bbox;
    const colour = KIND_COLOURS[fd.kind] || "#ffffff";
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", x); r.setAttribute("y", y);
    r.setAttribute("width", Math.max(w, 1)); r.setAttribute("height", Math.max(h, 1));
    r.setAttribute("stroke", colour);
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", Math.max(y - 4, 12));
    t.setAttribute("fill", colour);
    t.setAttribute("font-size", String(Math.max(12, Math.round(f.width / 45))));
    const size = fd.depth_mm != null ? ` ${fd.depth_mm.toFixed(1)} mm deep` : fd.diameter_mm != null ? ` ⌀${fd.diameter_mm.toFixed(1)} mm` : "";
    t.textContent = fd.kind.replace("_", " ") + size;
    svg.append(r, t);
  }
}

function target(f) {
  if (pending !== undefined) return pending;
  if (f.label !== null) return f.label;
  return f.model ? f.model.class : undefined;
}

function renderPanel() {
  const f = queue[pos];
  $("position").textContent = `${pos + 1} / ${queue.length}`;
  $("frame-id").textContent = f.id;
  $("current").textContent = f.label === null ? "unlabelled" : f.label;
  $("rules").textContent = opinion(f.rules);
  $("prelabel").textContent = info.model ? opinion(f.model) : "no model";
  $("frame-error").hidden = !f.error;
  $("frame-error").textContent = f.error || "";
  const t = target(f);
  for (const b of $("classes").children) {
    const c = b.dataset.class;
    b.classList.toggle("current", c === f.label);
    b.classList.toggle("prelabel", !!f.model && c === f.model.class);
    b.classList.toggle("pending", c === t && t !== f.label);
  }
  let hint;
  if (t === undefined) hint = "Pick a class with 1-9, then Enter";
  else if (t === f.label) hint = `Enter: keep ${t === null ? "unlabelled" : t} and move on`;
  else if (pending === undefined) hint = `Enter: accept the model's ${t} (${pct(f.model.confidence)})`;
  else hint = `Enter: save as ${t === null ? "unlabelled" : t}`;
  $("pending").textContent = hint;
}

async function show(t0) {
  const token = ++showToken;
  const f = queue[pos];
  pending = undefined;
  $("empty").hidden = !!f;
  document.querySelector("#single .views").hidden = !f;
  document.querySelector("#single .panel").hidden = !f;
  if (!f) return;
  renderPanel();
  drawFindings($("rgb-findings"), f);
  drawFindings($("depth-findings"), f);
  $("no-depth").hidden = f.has_depth;
  $("depth").hidden = !f.has_depth;
  const loads = [setImage($("rgb"), frameUrl(f, "rgb"))];
  if (f.has_depth) loads.push(setImage($("depth"), frameUrl(f, "depth")));
  else $("depth").removeAttribute("src");
  await Promise.all(loads);
  if (token !== showToken) return;
  if (t0 !== undefined) {
    // The frame is decoded; the next animation frame is when it is on screen.
    requestAnimationFrame(() => {
      const ms = performance.now() - t0;
      timings.push(ms);
      const sorted = [...timings].sort((a, b) => a - b);
      const p50 = sorted[Math.floor(sorted.length / 2)];
      $("timing").textContent = `keystroke to next frame: ${ms.toFixed(0)} ms (median ${p50.toFixed(0)} ms over ${timings.length})`;
    });
  }
  prefetch();
}

function pick(c) {
  if (!queue[pos]) return;
  pending = c;
  renderPanel();
}

async function move(step, t0) {
  if (!queue.length) return;
  const next = pos + step;
  if (next < 0 || next >= queue.length) {
    toast(next < 0 ? "first frame of the queue" : "last frame of the queue", "info");
    return;
  }
  pos = next;
  await show(t0);
}

async function save(t0) {
  const f = queue[pos];
  if (!f) return;
  const t = target(f);
  if (t === undefined) {
    toast("Pick a class with 1-9 first");
    return;
  }
  if (t !== f.label) {
    const r = await api("POST", "api/label", { frames: [f.id], label: t });
    info = r.info;
    renderInfo();
    for (const m of r.moved) if (m.from === f.id) f.id = m.to;
    f.label = t;
  }
  if (belongs(f)) {
    if (pos + 1 < queue.length) pos += 1;
    else toast("last frame of the queue", "info");
  } else {
    queue.splice(pos, 1);
    if (pos >= queue.length) pos = Math.max(0, queue.length - 1);
  }
  if (gridOn) renderGrid();
  await show(t0);
}

async function undo() {
  const r = await api("POST", "api/undo");
  info = r.info;
  renderInfo();
  toast(`Undone: ${r.moved.length} frame(s) moved back`, "info");
  await loadQueue(r.moved.length ? r.moved[0].to : undefined);
}

// ------------------------------------------------------------------ the grid

function renderGrid() {
  const grid = $("grid");
  const tiles = queue.map((f, i) => {
    const tile = document.createElement("div");
    tile.className = "tile";
    tile.dataset.id = f.id;
    tile.classList.toggle("selected", selected.has(f.id));
    tile.classList.toggle("cursor", i === pos);
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = f.id;
    img.src = frameUrl(f, "thumb");
    const cap = document.createElement("div");
    const name = document.createElement("span");
    name.textContent = f.stem;
    const what = document.createElement("span");
    what.className = "muted";
    what.textContent = f.label !== null ? f.label : f.model ? `${f.model.class}? ${pct(f.model.confidence)}` : "unlabelled";
    cap.append(name, what);
    tile.append(img, cap);
    tile.addEventListener("click", (e) => clickTile(i, e.shiftKey));
    return tile;
  });
  grid.replaceChildren(...tiles);
  $("selected-count").textContent = `${selected.size} selected`;
}

function clickTile(i, range) {
  const id = queue[i].id;
  if (range && anchor !== null) {
    const [a, b] = anchor < i ? [anchor, i] : [i, anchor];
    for (let k = a; k <= b; k++) selected.add(queue[k].id);
  } else if (selected.has(id)) selected.delete(id);
  else selected.add(id);
  anchor = i;
  pos = i;
  renderGrid();
}

async function bulk(label) {
  if (!selected.size) {
    toast("Select frames first (click, Shift+click)");
    return;
  }
  const r = await api("POST", "api/label", { frames: [...selected], label });
  info = r.info;
  renderInfo();
  toast(`${r.moved.length} frame(s) labelled ${label === null ? "unlabelled" : label}`, "info");
  anchor = null;
  await loadQueue(undefined);
}

function toggleGrid() {
  gridOn = !gridOn;
  $("grid-view").hidden = !gridOn;
  $("single").hidden = gridOn;
  $("view-toggle").textContent = gridOn ? "One frame" : "Grid";
  if (gridOn) renderGrid();
  else serial(() => show());
}

function toggleHelp(on) {
  const h = $("help");
  h.hidden = on === undefined ? !h.hidden : !on;
}

// ------------------------------------------------------------------ keys and buttons

document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLSelectElement || e.altKey || e.metaKey) return;
  const k = e.key;
  const t0 = e.timeStamp;
  if (e.ctrlKey) {
    if (k === "z") { e.preventDefault(); serial(undo); }
    return;
  }
  if (k === "?") { toggleHelp(); return; }
  if (k === "Escape") {
    if (!$("help").hidden) toggleHelp(false);
    else if (gridOn) { selected.clear(); renderGrid(); }
    return;
  }
  if (!$("help").hidden || !info) return;
  if (k === "g" || k === "G") { toggleGrid(); return; }
  if (k === "u" || k === "U") { serial(undo); return; }
  if (/^[1-9]$/.test(k)) {
    const c = info.classes[Number(k) - 1];
    if (c === undefined) return;
    if (gridOn) serial(() => bulk(c));
    else pick(c);
    return;
  }
  if (gridOn) return;
  switch (k) {
    case "Enter": e.preventDefault(); serial(() => save(t0)); break;
    case "s": case "S": serial(() => move(1, t0)); break;
    case "ArrowRight": e.preventDefault(); serial(() => move(1, t0)); break;
    case "ArrowLeft": e.preventDefault(); serial(() => move(-1, t0)); break;
    case "c": case "C": pick(null); break;
    default: break;
  }
});

function button(id, fn) {
  $(id).addEventListener("click", (e) => { e.currentTarget.blur(); fn(); });
}

async function start() {
  info = await api("GET", "api/info");
  renderInfo();
  setupQueueSelect();
  $("classes").replaceChildren(...info.classes.map((c, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.class = c;
    const kbd = document.createElement("kbd");
    kbd.textContent = i < 9 ? String(i + 1) : " ";
    b.append(kbd, c);
    b.addEventListener("click", () => { b.blur(); pick(c); });
    return b;
  }));
  button("view-toggle", toggleGrid);
  button("undo", () => serial(undo));
  button("help-toggle", () => toggleHelp());
  button("select-none", () => { selected.clear(); renderGrid(); });
  button("bulk-apply", () => {
    const v = $("bulk-class").value;
    serial(() => bulk(v === "" ? null : v));
  });
  $("help").addEventListener("click", () => toggleHelp(false));
  await loadQueue(null);
}

serial(start);
