// torchship status page: polls /status, turns counters into live rates, runs the playground.
"use strict";

// ?refresh=SECONDS polls faster or slower (at least every 0.5 s)
const POLL_MS = Math.max(500, 1000 * (parseFloat(new URLSearchParams(location.search).get("refresh")) || 2));
const HISTORY = 90; // sparkline points
const WINDOW_S = 10; // rates and percentiles over about this long
const $ = (id) => document.getElementById(id);
let previous = null; // the last /status answer: the sparkline's per-poll rate
const snapshots = []; // /status answers of the last WINDOW_S: the numbers' baseline
const rates = [];
let drawn = false;

// --- formatting --------------------------------------------------------------------------

function ms(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "-";
  const v = seconds * 1000;
  return v < 10 ? `${v.toFixed(2)} ms` : v < 1000 ? `${v.toFixed(1)} ms` : `${(v / 1000).toFixed(2)} s`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

// --- live numbers ------------------------------------------------------------------------

function bound(le) {
  return le === "+Inf" ? Infinity : parseFloat(le);
}

// Prometheus' histogram_quantile over cumulative buckets [[le, count], ...].
function quantile(q, buckets) {
  if (!buckets.length) return null;
  const total = buckets[buckets.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let lowerLe = 0;
  let lowerCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (!Number.isFinite(le)) return lowerLe;
      const inBucket = count - lowerCount;
      return lowerLe + (le - lowerLe) * (inBucket > 0 ? (rank - lowerCount) / inBucket : 1);
    }
    lowerLe = le;
    lowerCount = count;
  }
  return lowerLe;
}

function deltaBuckets(now, before) {
  const old = new Map((before ? before.latency.buckets : []).map(([le, n]) => [le, n]));
  return now.latency.buckets.map(([le, n]) => {
    const d = n - (old.get(le) || 0);
    return [bound(le), d >= 0 ? d : n]; // a restarted server starts from zero
  });
}

function updateLive(status) {
  const m = status.metrics;
  $("total").textContent = Math.round(m.requests).toLocaleString();
  snapshots.push(status);
  while (snapshots.length > 2 && snapshots[1].time <= status.time - WINDOW_S) snapshots.shift();
  const base = snapshots[0];
  const dt = status.time - base.time;
  if (dt > 0) {
    const before = base.metrics;
    const requests = Math.max(0, m.requests - before.requests);
    const errors = Math.max(0, m.errors - before.errors);
    const rate = requests / dt;
    const buckets = deltaBuckets(m, before);
    $("window").textContent = dt.toFixed(1);
    $("rate").textContent = rate.toFixed(rate < 10 ? 2 : 1);
    $("error-rate").textContent = requests ? `${((100 * errors) / requests).toFixed(1)} %` : "-";
    $("p50").textContent = requests ? ms(quantile(0.5, buckets)) : "-";
    $("p99").textContent = requests ? ms(quantile(0.99, buckets)) : "-";
  }
  if (previous && status.time > previous.time) {
    rates.push(Math.max(0, m.requests - previous.metrics.requests) / (status.time - previous.time));
    if (rates.length > HISTORY) rates.shift();
    drawSparkline();
  }
}

function drawSparkline() {
  const c = $("sparkline");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const top = Math.max(1, ...rates);
  ctx.strokeStyle = "#0969da";
  ctx.lineWidth = 2;
  ctx.beginPath();
  rates.forEach((r, i) => {
    const x = (i / (HISTORY - 1)) * c.width;
    const y = c.height - 2 - (r / top) * (c.height - 4);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

// --- models and traffic ------------------------------------------------------------------

function updateModels(status) {
  const body = $("models").querySelector("tbody");
  body.replaceChildren();
  const perVersion = status.metrics.versions;
  for (const model of status.models) {
    for (const v of model.versions) {
      const ref = `${model.name}:${v.version}`;
      const counts = perVersion[ref] || { requests: 0, errors: 0 };
      const input = v.input ? `${v.input.kind} ${v.input.shape.join("x")}` : "-";
      body.append(
        el("tr", { "data-ref": ref },
          el("td", {}, model.name), el("td", { class: "version" }, v.version),
          el("td", {}, v.ready ? "yes" : "no"), el("td", {}, v.runtime), el("td", {}, v.device),
          el("td", {}, v.max_batch_size), el("td", {}, input), el("td", {}, `${v.load_seconds} s`),
          el("td", {}, Math.round(counts.requests)), el("td", {}, Math.round(counts.errors))),
      );
    }
  }
  const errors = Object.entries(status.load_errors || {});
  $("load-errors").textContent = errors.map(([ref, e]) => `${ref}: ${e}`).join("\n");
}

function describePolicy(traffic) {
  if (!traffic) return "no traffic policy";
  const p = traffic.policy || {};
  switch (p.kind) {
    case "fixed":
      return `fixed: all traffic to version ${p.version}`;
    case "split":
      return `split: ${Object.entries(p.weights || {}).map(([v, w]) => `v${v} ${(100 * w).toFixed(0)}%`).join(", ")}` +
        (p.sticky_header || traffic.sticky_header ? ` (sticky by ${p.sticky_header || traffic.sticky_header})` : "");
    case "canary": {
      const c = traffic.canary || {};
      const verdict = c.verdict ? ` - SLO: ${c.verdict.ok === false ? "breached" : "ok"}` : "";
      return `canary: v${p.candidate} at ${c.percent ?? p.percent}% (steps ${(c.steps || p.steps || []).join(" -> ")}), baseline v${p.baseline}${verdict}`;
    }
    case "shadow":
      return `shadow: serving v${p.primary}, mirroring ${(100 * (p.fraction ?? 1)).toFixed(0)}% to v${p.candidate}`;
    default:
      return JSON.stringify(p);
  }
}

function updateTraffic(status) {
  const box = $("traffic");
  box.replaceChildren(
    ...status.models.map((m) =>
      el("div", { class: "policy", "data-model": m.name }, el("strong", {}, m.name), ": ", describePolicy(m.traffic))),
  );
}

function updateModelSelect(status) {
  const select = $("model-select");
  const options = [];
  for (const m of status.models) {
    options.push([m.name, "", `${m.name} (traffic policy)`]);
    for (const v of m.versions) options.push([m.name, v.version, `${m.name}:${v.version}`]);
  }
  const key = options.map((o) => o.join("|")).join(",");
  if (select.dataset.key === key) return;
  const chosen = select.value;
  select.replaceChildren(...options.map(([name, version, text]) => el("option", { value: `${name}|${version}` }, text)));
  select.dataset.key = key;
  if (options.some(([n, v]) => `${n}|${v}` === chosen)) select.value = chosen;
}

let waitingForKey = false;

async function poll() {
  try {
    const r = await fetch("/status", { headers: torchshipKey.headers({ Accept: "application/json" }) });
    if (torchshipKey.refused(r.status)) {
      // auth is on: ask for a key, poll again once one is entered
      $("ready").textContent = "API key needed";
      $("ready").className = "badge bad";
      waitingForKey = true;
      torchshipKey.ask(r.status, await r.json().catch(() => null), () => {
        waitingForKey = false;
        poll();
      });
      return;
    }
    const status = await r.json();
    const badge = $("ready");
    badge.textContent = status.ready ? "ready" : status.draining ? "draining" : "not ready";
    badge.className = `badge ${status.ready ? "ok" : "bad"}`;
    $("server-version").textContent = `v${status.version}`;
    updateModels(status);
    updateTraffic(status);
    updateModelSelect(status);
    updateLive(status);
    previous = status;
  } catch (err) {
    $("ready").textContent = "unreachable";
    $("ready").className = "badge bad";
  } finally {
    if (!waitingForKey) setTimeout(poll, POLL_MS);
  }
}

// --- playground --------------------------------------------------------------------------

function clearCanvas() {
  const c = $("canvas");
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, c.width, c.height);
  drawn = false;
}

function setupCanvas() {
  const c = $("canvas");
  const ctx = c.getContext("2d");
  clearCanvas();
  let drawing = false;
  const at = (e) => {
    const r = c.getBoundingClientRect();
    return [((e.clientX - r.left) * c.width) / r.width, ((e.clientY - r.top) * c.height) / r.height];
  };
  c.addEventListener("pointerdown", (e) => {
    drawing = true;
    c.setPointerCapture(e.pointerId);
    ctx.strokeStyle = "#111";
    ctx.lineWidth = 22;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...at(e));
    ctx.lineTo(...at(e));
    ctx.stroke();
    drawn = true;
  });
  c.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.lineTo(...at(e));
    ctx.stroke();
  });
  const stop = () => {
    if (!drawing) return;
    drawing = false;
    predictCanvas();
  };
  c.addEventListener("pointerup", stop);
  c.addEventListener("pointercancel", stop);
}

function predictUrl() {
  const [name, version] = ($("model-select").value || "|").split("|");
  const params = new URLSearchParams({ top_k: "3" });
  if (name) params.set("model", name);
  if (version) params.set("version", version);
  return `/predict?${params}`;
}

async function predict(blob, filename) {
  const form = new FormData();
  form.append("file", blob, filename);
  const result = $("result");
  result.setAttribute("data-state", "pending");
  try {
    const r = await fetch(predictUrl(), { method: "POST", body: form, headers: torchshipKey.headers() });
    const body = await r.json();
    if (torchshipKey.refused(r.status)) torchshipKey.ask(r.status, body, () => predict(blob, filename));
    if (!r.ok) {
      result.replaceChildren(el("div", { class: "error", id: "result-error" }, `${r.status} ${body.code}: ${body.error}`),
        body.hint ? el("div", { class: "muted" }, body.hint) : "");
      result.setAttribute("data-state", "error");
      return;
    }
    const p = body.predictions[0];
    const bars = (p.top_k || []).map((t) =>
      el("div", { class: "bar" }, el("span", {}, t.label),
        el("span", { class: "fill", style: "" }), el("span", { class: "muted" }, `${(100 * t.probability).toFixed(1)} %`)));
    (p.top_k || []).forEach((t, i) => { bars[i].children[1].style.width = `${Math.max(2, 160 * t.probability)}px`; });
    result.replaceChildren(
      el("div", { id: "result-label" }, p.label ?? JSON.stringify(p.output)),
      ...bars,
      el("div", { class: "muted", id: "result-served" },
        `${body.model}:${body.version} (${body.runtime}) in ${body.latency_ms.toFixed(1)} ms, request ${r.headers.get("X-Request-ID")}`),
    );
    result.setAttribute("data-state", "done");
  } catch (err) {
    result.replaceChildren(el("div", { class: "error", id: "result-error" }, String(err)));
    result.setAttribute("data-state", "error");
  }
}

function predictCanvas() {
  if (!drawn) return;
  $("canvas").toBlob((blob) => predict(blob, "canvas.png"), "image/png");
}

function showUpload(file) {
  const img = new Image();
  img.onload = () => {
    clearCanvas();
    const c = $("canvas");
    const scale = Math.min(c.width / img.width, c.height / img.height);
    const w = img.width * scale;
    const h = img.height * scale;
    c.getContext("2d").drawImage(img, (c.width - w) / 2, (c.height - h) / 2, w, h);
    drawn = true;
    URL.revokeObjectURL(img.src);
  };
  img.src = URL.createObjectURL(file);
}

function setupPlayground() {
  setupCanvas();
  $("clear").addEventListener("click", () => {
    clearCanvas();
    $("result").replaceChildren(el("div", { class: "muted" }, "Draw a digit (dark on white) or upload an image."));
    $("result").setAttribute("data-state", "idle");
  });
  $("predict").addEventListener("click", predictCanvas);
  $("upload").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return;
    showUpload(file);
    predict(file, file.name);
    e.target.value = "";
  });
}

setupPlayground();
poll();
