// weld-edge live dashboard: results from the SSE stream, stats and status polled, the latest
// frame refreshed every second. No libraries (plants are offline); URLs are relative so the page
// also works behind a reverse proxy under a sub-path.
"use strict";

(() => {
  const KEEP_ROWS = 200; // rows in the results table
  const CHART_SECONDS = 120; // width of the latency chart
  const STATS_EVERY_MS = 1000;
  const STATUS_EVERY_MS = 2000;
  const FRAME_EVERY_MS = 1000;
  const RENDER_EVERY_MS = 250; // results are drawn in batches, not one by one at 30 fps
  const FETCH_TIMEOUT_MS = 4000;
  const BACKFILL_WINDOW_MS = 60000;

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  // ------------------------------------------------------------ formatting

  const CLASS_COLORS = {
    good: "#34d399",
    porosity: "#fb923c",
    undercut: "#e879f9",
    spatter: "#facc15",
    burn_through: "#f87171",
    unknown: "#8693a1",
  };
  function classColor(name) {
    if (CLASS_COLORS[name]) return CLASS_COLORS[name];
    let h = 0;
    for (const c of name) h = (h * 31 + c.charCodeAt(0)) % 360;
    return `hsl(${h}, 70%, 62%)`;
  }
  const fmtInt = (n) => (Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "—");
  function fmtMs(v) {
    if (!Number.isFinite(v)) return "—";
    if (v >= 99.95) return v.toFixed(0);
    if (v >= 9.995) return v.toFixed(1);
    return v.toFixed(2);
  }
  function fmtDuration(s) {
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${sec} s`;
    return `${sec} s`;
  }
  const pad = (n, w) => String(n).padStart(w, "0");
  function fmtTime(ms) {
    const t = new Date(ms);
    return `${pad(t.getHours(), 2)}:${pad(t.getMinutes(), 2)}:${pad(t.getSeconds(), 2)}` +
      `.${pad(t.getMilliseconds(), 3)}`;
  }
  function setText(id, text) {
    const e = $(id);
    if (e && e.textContent !== text) e.textContent = text;
  }
  // A number shown formatted, with the raw value in data-value (the browser test reads it).
  function setNum(id, n, text) {
    const e = $(id);
    if (!e) return;
    e.dataset.value = String(n);
    const t = text !== undefined ? text : fmtInt(n);
    if (e.textContent !== t) e.textContent = t;
  }
  function setLevel(e, level) {
    e.classList.toggle("is-ok", level === "ok");
    e.classList.toggle("is-warn", level === "warn");
    e.classList.toggle("is-bad", level === "bad");
  }

  // ------------------------------------------------------------ fetching

  async function fetchT(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      return await fetch(url, { signal: ctl.signal, cache: "no-store" });
    } finally {
      clearTimeout(timer);
    }
  }
  async function getJSON(url) {
    const r = await fetchT(url);
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  // ------------------------------------------------------------ connection state

  const conn = {
    streamOpen: false,
    streamEverOpen: false,
    pollOk: null, // null: no answer yet
    lastOkAt: 0,
  };
  let clockSkewMs = 0; // device clock minus this browser's clock

  function renderConn() {
    const badge = $("conn");
    let text, level;
    if (conn.pollOk && conn.streamOpen) {
      text = "live";
      level = "ok";
    } else if (conn.pollOk === false) {
      const ago = conn.lastOkAt ? ` · ${fmtDuration((Date.now() - conn.lastOkAt) / 1000)}` : "";
      text = `disconnected${ago}`;
      level = "bad";
    } else if (conn.pollOk && conn.streamEverOpen) {
      // The API answers but the result stream dropped; the browser reconnects it.
      text = "stream reconnecting";
      level = "warn";
    } else {
      text = "connecting";
      level = "";
    }
    setText("conn", text);
    setLevel(badge, level);
    const offline = $("offline");
    if (conn.pollOk === false) {
      const since = conn.lastOkAt ? ` since ${fmtTime(conn.lastOkAt).slice(0, 8)}` : "";
      setText("offline", `No answer from the daemon${since}; retrying. The values below are the last ones received.`);
      offline.hidden = false;
      const state = $("state");
      if (state.textContent !== "unknown") state.title = `last known: ${state.textContent}`;
      setText("state", "unknown");
      setLevel(state, "");
    } else {
      offline.hidden = true;
    }
    document.body.classList.toggle("is-stale", conn.pollOk === false);
    document.body.classList.toggle("is-connecting", conn.pollOk === null);
  }
  function pollSucceeded() {
    conn.pollOk = true;
    conn.lastOkAt = Date.now();
    setText("updated", `updated ${fmtTime(Date.now()).slice(0, 8)}`);
    renderConn();
  }
  function pollFailed() {
    conn.pollOk = false;
    renderConn();
  }

  // ------------------------------------------------------------ results

  const rows = new Map(); // id -> row data, the ones in the table
  let order = []; // ids in the table, newest first
  let pending = []; // arrived, not drawn yet
  let lagged = 0;

  // Total latency per device-clock second, for the chart.
  const seconds = new Map(); // second -> [total ms]

  function ingest(r) {
    if (!r || typeof r.id !== "string" || rows.has(r.id)) return;
    const ts = Date.parse(r.ts);
    const findings = Array.isArray(r.findings) ? r.findings : [];
    const row = {
      id: r.id,
      seq: r.seq,
      ts,
      cls: String(r.class),
      conf: Number(r.confidence),
      by: String(r.decided_by),
      uncertain: !!r.uncertain,
      findings,
      total: r.latency_ms ? Number(r.latency_ms.total) : NaN,
    };
    rows.set(row.id, row);
    pending.push(row);
    if (Number.isFinite(ts) && Number.isFinite(row.total)) {
      const sec = Math.floor(ts / 1000);
      let list = seconds.get(sec);
      if (!list) seconds.set(sec, (list = []));
      list.push(row.total);
    }
  }

  // "pore" when all are pores (the count is beside it), "pore ×2, spatter ×1" when mixed.
  function findingsText(findings) {
    const by = new Map();
    for (const f of findings) by.set(f.kind, (by.get(f.kind) || 0) + 1);
    if (by.size === 1) return [...by.keys()][0];
    return [...by].map(([k, n]) => `${k} ×${n}`).join(", ");
  }

  function rowElement(r, fresh) {
    const tr = el("tr");
    tr.dataset.id = r.id;
    if (fresh) tr.classList.add("fresh");
    if (r.cls !== "good") tr.classList.add("is-defect");
    if (r.uncertain) tr.classList.add("is-uncertain");

    const time = el("td", "time");
    if (Number.isFinite(r.ts)) {
      const t = fmtTime(r.ts);
      time.append(document.createTextNode(t.slice(0, 8)), el("span", "ms", t.slice(8)));
    } else {
      time.textContent = "—";
    }
    time.title = `${new Date(r.ts).toString()}\nseq ${r.seq} · ${r.id}`;
    tr.append(time);

    const cls = el("td");
    const chip = el("span", "cls");
    const dot = el("span", "dot");
    dot.style.background = classColor(r.cls);
    chip.append(dot, document.createTextNode(r.cls));
    cls.append(chip);
    tr.append(cls);

    tr.append(el("td", "num", Number.isFinite(r.conf) ? `${(r.conf * 100).toFixed(0)}%` : "—"));

    const by = el("td");
    by.append(el("span", `pill pill-${r.by}`, r.by));
    tr.append(by);

    const flag = el("td");
    if (r.uncertain) flag.append(el("span", "pill pill-uncertain", "uncertain"));
    tr.append(flag);

    const f = el("td", "findings");
    f.append(el("b", "", String(r.findings.length)));
    if (r.findings.length) {
      const text = findingsText(r.findings);
      f.append(document.createTextNode(text));
      f.title = text;
    }
    tr.append(f);
    return tr;
  }

  function flushResults() {
    if (!pending.length) return;
    const batch = pending.sort((a, b) => (a.id < b.id ? 1 : -1)); // newest first
    pending = [];
    const body = $("results");
    const newest = order.length ? order[0] : "";
    const prepend = batch[batch.length - 1].id > newest;
    if (prepend) {
      // The usual case: everything is newer than the table's top row.
      order = batch.map((r) => r.id).concat(order);
    } else {
      // Older results too (a backfill after a reconnect): redraw in order.
      const all = new Set(order);
      for (const r of batch) all.add(r.id);
      order = [...all].sort().reverse();
    }
    for (const id of order.splice(KEEP_ROWS)) rows.delete(id);
    const frag = document.createDocumentFragment();
    if (prepend) {
      const fresh = newest !== "";
      for (const r of batch.slice(0, KEEP_ROWS)) frag.append(rowElement(r, fresh));
      body.prepend(frag);
      while (body.children.length > KEEP_ROWS) body.lastElementChild.remove();
    } else {
      for (const id of order) frag.append(rowElement(rows.get(id), false));
      body.replaceChildren(frag);
    }
    $("results-empty").hidden = order.length > 0;
    const note = lagged ? `${fmtInt(lagged)} skipped by a slow connection` : "";
    setText("results-note", `newest first · ${order.length} shown${note ? " · " + note : ""}`);
  }

  // A UUIDv7 whose time is `ms`: results (their ids are UUIDv7) after it are the ones made
  // after that millisecond.
  function idAt(ms) {
    const hex = pad(Math.max(0, Math.floor(ms)).toString(16), 12).slice(-12);
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-7000-8000-000000000000`;
  }
  function idTime(id) {
    return parseInt(id.replace(/-/g, "").slice(0, 12), 16);
  }

  // Fills the table after the page opens or the stream reconnects. `results?after=` pages
  // forward from an id, so the newest rows are found from the newest result's id time.
  let backfilling = false;
  async function backfill() {
    if (backfilling) return;
    backfilling = true;
    try {
      const newest = order[0];
      if (newest) {
        const page = await getJSON(`api/v1/results?after=${newest}&limit=${KEEP_ROWS}`);
        page.forEach(ingest);
        if (page.length < KEEP_ROWS) return;
      }
      let latest;
      const r = await fetchT("api/v1/results/latest");
      if (r.status === 404) return;
      if (!r.ok) throw new Error(`results/latest: HTTP ${r.status}`);
      latest = await r.json();
      const end = idTime(latest.id);
      // Narrow the window until the page holds its newest results.
      for (let w = BACKFILL_WINDOW_MS; w >= 250; w /= 4) {
        const page = await getJSON(`api/v1/results?after=${idAt(end - w)}&limit=1000`);
        if (page.length < 1000 || w < 1000) {
          page.slice(-KEEP_ROWS).forEach(ingest);
          break;
        }
      }
      ingest(latest);
    } catch (e) {
      // The stream still delivers new results; the next reconnect tries again.
      console.warn("backfill failed", e);
    } finally {
      backfilling = false;
      flushResults();
    }
  }

  let stream = null;
  let retryMs = 1000;
  function connectStream() {
    stream = new EventSource("api/v1/results/stream");
    stream.addEventListener("open", () => {
      conn.streamOpen = true;
      conn.streamEverOpen = true;
      retryMs = 1000;
      renderConn();
      backfill();
    });
    stream.addEventListener("result", (e) => {
      try {
        ingest(JSON.parse(e.data));
      } catch (err) {
        console.warn("bad result event", err);
      }
    });
    stream.addEventListener("lagged", (e) => {
      lagged += Number(e.data) || 0;
    });
    stream.addEventListener("error", () => {
      conn.streamOpen = false;
      renderConn();
      // The browser reconnects by itself after a network error; after an HTTP error it gives
      // up (CLOSED), so reconnect here, backing off.
      if (stream.readyState === EventSource.CLOSED) {
        stream.close();
        setTimeout(connectStream, retryMs);
        retryMs = Math.min(retryMs * 2, 15000);
      }
    });
  }

  // ------------------------------------------------------------ stats

  const STAGES = ["capture", "queue", "rules", "preprocess", "model", "total"];
  const classRows = new Map(); // class -> {row, fill, count, pct}

  function renderClasses(classes) {
    const names = Object.keys(classes).sort((a, b) =>
      a === "good" ? -1 : b === "good" ? 1 : a.localeCompare(b));
    const total = names.reduce((s, n) => s + classes[n], 0);
    const box = $("classes");
    if (!names.length) return;
    const max = Math.max(...names.map((n) => classes[n]), 1);
    let changed = names.length !== classRows.size;
    for (const name of names) {
      let r = classRows.get(name);
      if (!r) {
        changed = true;
        const row = el("div", "bar-row");
        row.dataset.class = name;
        const label = el("span", "bar-name");
        const dot = el("span", "dot");
        dot.style.background = classColor(name);
        label.append(dot, document.createTextNode(name));
        label.title = name;
        const track = el("span", "bar-track");
        const fill = el("span", "bar-fill");
        fill.style.background = classColor(name);
        track.append(fill);
        const pct = el("span", "bar-pct");
        const n = el("span", "bar-count class-count");
        row.append(label, track, pct, n);
        r = { row, fill, n, pct };
        classRows.set(name, r);
      }
      const v = classes[name];
      r.fill.style.width = `${((v / max) * 100).toFixed(1)}%`;
      r.n.textContent = fmtInt(v);
      r.n.dataset.value = String(v);
      r.pct.textContent = total ? `${((v / total) * 100).toFixed(0)}%` : "";
    }
    if (changed) box.replaceChildren(...names.map((n) => classRows.get(n).row));
  }

  function renderSplit(decided, frames) {
    const v = { rules: decided.rules || 0, model: decided.model || 0, both: decided.both || 0 };
    const total = v.rules + v.model + v.both;
    for (const k of ["rules", "model", "both"]) {
      $(`split-${k}`).style.width = total ? `${((v[k] / total) * 100).toFixed(2)}%` : "0";
      const pct = total ? ` (${((v[k] / total) * 100).toFixed(0)}%)` : "";
      setNum(`decided-${k}`, v[k], fmtInt(v[k]) + pct);
    }
    setText("model-runs",
      `model runs ${fmtInt(frames.model_runs)} · failures ${fmtInt(frames.model_failures)}`);
  }

  // A candidate model in shadow: how often it agrees with the active one, and its speed.
  function renderShadow(sh) {
    const e = $("shadow");
    e.hidden = !sh;
    if (!sh) return;
    const pct = sh.frames ? `${(sh.agreement * 100).toFixed(1)}%` : "—";
    setText("shadow",
      `shadow ${sh.version}: agrees on ${pct} of ${fmtInt(sh.frames)} frames` +
      ` · p50 ${sh.latency_ms.p50.toFixed(1)} ms (active ${sh.active_latency_ms.p50.toFixed(1)} ms)` +
      (sh.failures ? ` · ${fmtInt(sh.failures)} failed` : ""));
  }

  function renderStages(latency) {
    const body = $("stages");
    const frag = document.createDocumentFragment();
    for (const stage of STAGES) {
      const q = latency[stage];
      if (!q) continue;
      const tr = el("tr", stage === "total" ? "total" : "");
      tr.append(el("td", "", stage));
      for (const k of ["p50", "p90", "p99", "max"]) {
        tr.append(el("td", "", q.count ? fmtMs(q[k]) : "—"));
      }
      frag.append(tr);
    }
    body.replaceChildren(frag);
  }

  function renderStats(s) {
    const f = s.frames;
    setNum("fps", s.fps, s.fps.toFixed(1));
    setNum("processed", f.processed);
    setNum("uncertain", f.uncertain);
    setText("uncertain-pct", f.processed ? `${((f.uncertain / f.processed) * 100).toFixed(1)}% of processed` : "");
    setNum("dropped", f.dropped);
    setText("captured", `of ${fmtInt(f.captured)} captured`);
    renderClasses(s.classes || {});
    renderSplit(s.decided_by || {}, f);
    renderStages(s.latency_ms || {});
    renderShadow(s.shadow);
    setText("uptime", fmtDuration(s.uptime_s));
    const o = s.outbox;
    const outbox = $("outbox");
    setNum("outbox", o.depth,
      `${fmtInt(o.depth)} waiting${o.overflowed ? ` · ${fmtInt(o.overflowed)} lost` : ""}`);
    outbox.title = `${fmtInt(o.bytes)} bytes waiting · ${fmtInt(o.acked)} acknowledged since start`;
  }

  async function pollStats() {
    try {
      renderStats(await getJSON("api/v1/stats"));
      pollSucceeded();
    } catch (e) {
      pollFailed();
    } finally {
      drawChart();
      setTimeout(pollStats, STATS_EVERY_MS);
    }
  }

  // ------------------------------------------------------------ status

  const CAMERA_LEVEL = { ok: "ok", starting: "warn", reconnecting: "warn", ended: "warn", failed: "bad" };

  function renderStatus(s) {
    setText("line", s.line);
    setText("device", s.device);
    document.title = `${s.line}/${s.device} · weld-edge`;
    const state = $("state");
    setText("state", s.state);
    state.title = "device state";
    setLevel(state, s.state === "online" ? "ok" : s.state === "degraded" ? "warn" : "bad");
    const reasons = $("reasons");
    if (s.reasons && s.reasons.length) {
      const ul = el("ul");
      for (const r of s.reasons) ul.append(el("li", "", r));
      reasons.replaceChildren(ul);
      reasons.hidden = false;
    } else {
      reasons.hidden = true;
      reasons.replaceChildren();
    }
    setText("camera", s.camera);
    setLevel($("camera-dot"), CAMERA_LEVEL[s.camera] || "bad");
    setText("model", s.model || "none (rules only)");
    $("model").title = s.model || "no model loaded";
    setText("policy", s.policy);
    setText("software", s.software);
    const m = s.mqtt;
    const mqtt = $("mqtt");
    if (!m) {
      setText("mqtt", "off");
      setLevel($("mqtt-dot"), "");
      mqtt.title = "MQTT is not configured";
    } else if (m.connected) {
      setText("mqtt", "connected");
      setLevel($("mqtt-dot"), "ok");
      mqtt.title = `${m.connects} connects`;
    } else {
      setText("mqtt", m.last_error ? `disconnected: ${m.last_error}` : "disconnected");
      setLevel($("mqtt-dot"), "bad");
      mqtt.title = m.last_error || "not connected";
    }
  }

  async function pollStatus() {
    try {
      const sent = Date.now();
      const s = await getJSON("api/v1/status");
      const ts = Date.parse(s.ts);
      if (Number.isFinite(ts)) clockSkewMs = ts - (sent + Date.now()) / 2;
      renderStatus(s);
      pollSucceeded();
    } catch (e) {
      pollFailed();
    } finally {
      setTimeout(pollStatus, STATUS_EVERY_MS);
    }
  }

  // ------------------------------------------------------------ latest frame

  let frameUrl = null;
  async function pollFrame() {
    try {
      const r = await fetchT(`api/v1/frames/latest.jpg?t=${Date.now()}`);
      if (r.ok) {
        const blob = await r.blob();
        const url = URL.createObjectURL(blob);
        const img = $("frame");
        img.onload = () => {
          setText("frame-info", `${img.naturalWidth}×${img.naturalHeight} · ${fmtTime(Date.now()).slice(0, 8)}`);
        };
        img.src = url;
        img.hidden = false;
        $("frame-none").hidden = true;
        if (frameUrl) URL.revokeObjectURL(frameUrl);
        frameUrl = url;
      } else if (r.status === 404) {
        $("frame-none").hidden = false;
        $("frame").hidden = true;
      }
    } catch (e) {
      // Down: the badge says so; the last picture stays, dimmed.
    } finally {
      setTimeout(pollFrame, FRAME_EVERY_MS);
    }
  }

  // ------------------------------------------------------------ latency chart

  function quantile(sorted, q) {
    if (!sorted.length) return NaN;
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
  }
  // The smallest of 1, 2, 5 x 10^k that is at least v.
  function niceStep(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p * 1.0000001) return m * p;
    return 10 * p;
  }
  const fmtTick = (v) => `${Number(v.toPrecision(6))} ms`;

  function drawChart() {
    const canvas = $("latency-chart");
    const box = canvas.parentElement;
    const dpr = window.devicePixelRatio || 1;
    const w = box.clientWidth, h = box.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const nowSec = Math.floor((Date.now() + clockSkewMs) / 1000);
    const first = nowSec - CHART_SECONDS + 1;
    for (const k of seconds.keys()) if (k < first - 5) seconds.delete(k);
    const p50 = [], p99 = [];
    let top = 0;
    for (let s = first; s <= nowSec; s++) {
      const list = seconds.get(s);
      if (!list || !list.length) {
        p50.push(NaN);
        p99.push(NaN);
        continue;
      }
      const sorted = list.slice().sort((a, b) => a - b);
      const a = quantile(sorted, 0.5), b = quantile(sorted, 0.99);
      p50.push(a);
      p99.push(b);
      top = Math.max(top, b);
    }
    // The legend shows the last complete second (the current one is still filling).
    const lastFull = (arr) => {
      for (let i = arr.length - 2; i >= 0; i--) if (Number.isFinite(arr[i])) return arr[i];
      return NaN;
    };
    setText("lat-p50", Number.isFinite(lastFull(p50)) ? `${fmtMs(lastFull(p50))} ms` : "—");
    setText("lat-p99", Number.isFinite(lastFull(p99)) ? `${fmtMs(lastFull(p99))} ms` : "—");

    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    // Four or five gridlines at round values.
    const step = niceStep(Math.max(top * 1.1, 0.001) / 4);
    const ymax = step * Math.max(1, Math.ceil((top * 1.1) / step));
    ctx.font = "11px system-ui, sans-serif";
    let labelWidth = 0;
    for (let v = 0; v <= ymax + step / 2; v += step) {
      labelWidth = Math.max(labelWidth, ctx.measureText(fmtTick(v)).width);
    }
    const left = Math.ceil(labelWidth) + 10, right = 8, topPad = 8, bottom = 20;
    const pw = w - left - right, ph = h - topPad - bottom;
    const x = (i) => left + (i / (CHART_SECONDS - 1)) * pw;
    const y = (v) => topPad + ph - (Math.min(v, ymax) / ymax) * ph;

    ctx.lineWidth = 1;
    ctx.strokeStyle = color("--line");
    ctx.fillStyle = color("--muted");
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i * step <= ymax + step / 2; i++) {
      const v = i * step;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, yy);
      ctx.lineTo(w - right, yy);
      ctx.stroke();
      ctx.fillText(fmtTick(v), left - 5, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let ago = 120; ago >= 0; ago -= 30) {
      const i = CHART_SECONDS - 1 - ago;
      if (i < 0) continue;
      const xx = Math.round(x(i)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(xx, topPad);
      ctx.lineTo(xx, topPad + ph);
      ctx.stroke();
      ctx.textAlign = ago === 0 ? "right" : ago === 120 ? "left" : "center";
      ctx.fillText(ago ? `−${ago} s` : "now", xx, topPad + ph + 5);
    }

    if (!top) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("waiting for results…", left + pw / 2, topPad + ph / 2);
      return;
    }
    const line = (values, stroke) => {
      ctx.strokeStyle = stroke;
      ctx.fillStyle = stroke;
      ctx.lineWidth = 1.8;
      ctx.lineJoin = "round";
      ctx.beginPath();
      let open = false;
      values.forEach((v, i) => {
        if (!Number.isFinite(v)) {
          open = false;
          return;
        }
        const lone = !Number.isFinite(values[i - 1]) && !Number.isFinite(values[i + 1]);
        if (lone) ctx.fillRect(x(i) - 1.5, y(v) - 1.5, 3, 3);
        if (open) ctx.lineTo(x(i), y(v));
        else ctx.moveTo(x(i), y(v));
        open = true;
      });
      ctx.stroke();
    };
    line(p99, color("--p99"));
    line(p50, color("--p50"));
  }

  // ------------------------------------------------------------ start

  renderConn();
  connectStream();
  pollStatus();
  pollStats();
  pollFrame();
  setInterval(flushResults, RENDER_EVERY_MS);
  setInterval(renderConn, 1000);
  window.addEventListener("resize", drawChart);
})();
