/* edgefleet dashboard: fills the page from the JSON API and keeps it up to date by polling (no reload).
   Everything from the API is inserted as text (textContent), never as HTML. uPlot draws the charts.
   window.edgefleet exposes the page's state (last data, chart instances) for the browser tests. */
"use strict";

const REFRESH_MS = 2000;
const state = { page: document.body.dataset.page, updates: 0, charts: {}, data: {}, markers: [] };
window.edgefleet = state;

// -- small helpers ---------------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "href") node.setAttribute("href", value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return value.toFixed(digits);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function ago(epochSeconds) {
  if (epochSeconds === null || epochSeconds === undefined) return "never";
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

const badge = (text) => el("span", { class: "badge " + String(text).replace(/[^a-z_-]/gi, "") }, text);
const link = (href, text) => el("a", { href }, text);
const enc = encodeURIComponent;

function numCell(value, digits) { return el("td", { class: "num" }, fmt(value, digits)); }

function fillRows(table, rows, emptyText) {
  const body = table.querySelector("tbody");
  const cols = table.querySelectorAll("thead th").length;
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: cols }, emptyText))]));
}

let leavingForLogin = false;

async function api(path) {
  // same-origin fetch: the login cookie (HttpOnly) goes along; a 401 means the login ended (token revoked,
  // rotated or expired cookie), so back to the login page, then here again. Several calls can be refused at
  // once: only the first navigates (a second would abort the first navigation).
  const response = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  if (response.status === 401) {
    if (!leavingForLogin) {
      leavingForLogin = true;
      window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
    }
    throw new Error("logged out");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || body.title || response.statusText);
  return body;
}

function setStatus(text, error) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.classList.toggle("error", !!error);
}

async function poll(refresh) {
  try {
    await refresh();
    state.updates += 1;
    state.lastUpdate = Date.now();
    setStatus("live · updated " + new Date().toLocaleTimeString());
  } catch (err) {
    setStatus("update failed: " + err.message, true);
  }
  setTimeout(() => poll(refresh), REFRESH_MS);
}

// -- fleet overview ------------------------------------------------------------------------

async function refreshFleet() {
  const [devices, rollouts, models] = await Promise.all([
    api("/api/v1/devices"), api("/api/v1/rollouts?limit=10"), api("/api/v1/models")]);
  const profiles = [...new Set(devices.map((d) => d.profile))].sort();
  const profileLatency = await Promise.all(
    profiles.map((p) => api("/api/v1/profiles/" + enc(p) + "/latency?since=5m&step=5m")));
  state.data = { devices, rollouts, models, profileLatency };

  document.getElementById("profiles").replaceChildren(...profiles.map((profile, i) => {
    const members = devices.filter((d) => d.profile === profile);
    const online = members.filter((d) => d.online).length;
    const versions = {};
    for (const d of members) {
      const key = d.active_model ? d.active_model + ":" + d.active_version : "no model";
      versions[key] = (versions[key] || 0) + 1;
    }
    const dl = el("dl", {},
      el("dt", {}, "devices"), el("dd", {}, `${online} online / ${members.length - online} offline`),
      el("dt", {}, "models"), el("dd", {}, Object.entries(versions).map(([k, n]) => `${k} ×${n}`).join(", ")));
    for (const v of profileLatency[i].versions) {
      dl.append(el("dt", {}, `p95 ${v.model}:${v.version}`), el("dd", {}, `${fmt(v.p95_ms)} ms (${fmt(v.calls)} calls)`));
    }
    if (!profileLatency[i].versions.length) dl.append(el("dt", {}, "p95"), el("dd", {}, "no calls in 5 min"));
    return el("div", { class: "card", "data-profile": profile }, el("h3", {}, profile), dl);
  }));

  fillRows(document.getElementById("devices"), devices.map((d) => {
    const l = d.latency || {};
    return el("tr", { "data-device": d.name },
      el("td", {}, link("/devices/" + enc(d.name), d.name)), el("td", {}, d.profile),
      el("td", {}, badge(d.online ? "online" : "offline")),
      el("td", {}, d.active_model ? link(`/models/${enc(d.active_model)}/${d.active_version}`,
        `${d.active_model}:${d.active_version}`) : "–"),
      el("td", {}, d.active_recipe || d.active_quantization || "–"),
      numCell(l.calls_per_s, 2), numCell(l.p50_ms), numCell(l.p95_ms), el("td", {}, ago(l.last_report)));
  }), "no devices registered");

  fillRows(document.getElementById("rollouts"), rollouts.map((r) => el("tr", {},
    el("td", {}, link("/rollouts/" + enc(r.rollout), r.rollout)), el("td", {}, `${r.model}:${r.version}`),
    el("td", {}, badge(r.state)), el("td", {}, r.waves), numCell(r.devices), numCell(r.committed), numCell(r.failed),
    el("td", {}, when(r.created_at)))), "no rollouts yet");

  const modelRows = [];
  for (const m of models) {
    for (const v of m.versions) {
      modelRows.push(el("tr", {}, el("td", {}, m.model),
        el("td", {}, link(`/models/${enc(m.model)}/${v.version}`, "v" + v.version)), el("td", {}, when(v.created)),
        numCell(v.reference_accuracy, 4),
        el("td", {}, v.builds.map((b) => `${b.profile}: ${b.recipe}`).join(", ") || "not built")));
    }
  }
  fillRows(document.getElementById("models"), modelRows, "no models yet");
}

// -- device page ---------------------------------------------------------------------------

const RANGES = [["15m", 900], ["1h", 3600], ["6h", 21600], ["24h", 86400]];
state.range = "1h";

function tile(label, value) {
  return el("div", { class: "tile" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

// Dashed vertical lines with the new version's label where the served model changed.
function markerPlugin() {
  return {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.strokeStyle = "#7c3aed";
        ctx.fillStyle = "#7c3aed";
        ctx.setLineDash([6, 4]);
        ctx.lineWidth = 1.5 * devicePixelRatio;
        ctx.font = `${12 * devicePixelRatio}px system-ui, sans-serif`;
        for (const m of state.markers) {
          const x = u.valToPos(m.ts, "x", true);
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillText(m.label, x + 4 * devicePixelRatio, u.bbox.top + 14 * devicePixelRatio);
        }
        ctx.restore();
      }],
    },
  };
}

function chart(id, series, data, yLabel) {
  const host = document.getElementById(id);
  const width = Math.max(320, host.clientWidth - 16);
  const existing = state.charts[id];
  if (existing) {
    existing.setData(data);
    existing.redraw(false, true);
    return existing;
  }
  host.replaceChildren();
  const opts = {
    width, height: id === "latency-chart" ? 300 : 160,
    scales: { x: { time: true } },
    axes: [{}, { label: yLabel, size: 60 }],
    series: [{}, ...series],
    plugins: id === "latency-chart" ? [markerPlugin()] : [],
  };
  const plot = new uPlot(opts, data, host);
  state.charts[id] = plot;
  window.addEventListener("resize", () => plot.setSize({ width: Math.max(320, host.clientWidth - 16), height: opts.height }));
  return plot;
}

async function refreshDevice() {
  const name = document.body.dataset.device;
  const seconds = Object.fromEntries(RANGES)[state.range];
  const [detail, series] = await Promise.all([
    api("/api/v1/devices/" + enc(name)), api(`/api/v1/devices/${enc(name)}/latency?since=${seconds}s`)]);
  state.data = { detail, series };
  const d = detail.device;
  const l = detail.latency || {};
  document.getElementById("title").textContent = d.name;
  document.getElementById("subtitle").textContent =
    `${d.profile} · ${d.online ? "online" : "offline"} · ${d.active_model ? d.active_model + ":" + d.active_version : "no model"}` +
    ` (${d.active_recipe || d.active_quantization || "–"}) · ${d.runtime || "runtime unknown"}`;
  document.getElementById("tiles").replaceChildren(
    tile("calls/s (5 min)", fmt(l.calls_per_s, 2)), tile("p50 ms", fmt(l.p50_ms)), tile("p95 ms", fmt(l.p95_ms)),
    tile("p99 ms", fmt(l.p99_ms)), tile("errors (5 min)", fmt(l.errors)), tile("last report", ago(l.last_report)));

  const pts = series.points;
  const xs = pts.map((p) => p.end);
  state.markers = series.changes.map((c) => ({ ts: c.ts, label: `${c.model}:${c.version}`, change: c }));
  const chartHost = document.getElementById("latency-chart");
  if (!pts.length && !state.charts["latency-chart"]) {
    chartHost.replaceChildren(el("div", { class: "nodata" }, "no serving reports in this range"));
  } else {
    chart("latency-chart", [
      { label: "p50 ms", stroke: "#2563eb", width: 2, points: { show: true, size: 4 } },
      { label: "p90 ms", stroke: "#f59e0b", width: 1.5 },
      { label: "p99 ms", stroke: "#dc2626", width: 1.5 },
    ], [xs, pts.map((p) => p.p50_ms), pts.map((p) => p.p90_ms), pts.map((p) => p.p99_ms)], "ms");
    chart("calls-chart", [{ label: "calls/s", stroke: "#15803d", fill: "rgba(21,128,61,.12)", width: 1.5 }],
      [xs, pts.map((p) => p.calls / Math.max(1e-9, p.end - p.start))], "calls/s");
  }

  fillRows(document.getElementById("versions"), series.versions.map((v) => el("tr", {},
    el("td", {}, link(`/models/${enc(v.model)}/${v.version}`, `${v.model}:${v.version}`)), numCell(v.calls),
    numCell(v.errors), numCell(v.p50_ms), numCell(v.p90_ms), numCell(v.p95_ms), numCell(v.p99_ms), numCell(v.mean_ms))),
  "no calls in this range");

  fillRows(document.getElementById("deployments"), detail.deployments.map((x) => el("tr", {},
    el("td", {}, x.id), el("td", {}, link("/rollouts/" + enc(x.rollout), x.rollout)),
    el("td", {}, `${x.model}:${x.version}`), el("td", {}, x.kind), el("td", {}, x.wave === null ? "–" : x.wave + 1),
    el("td", {}, badge(x.state)), numCell(x.p50_ms), numCell(x.p95_ms), numCell(x.accuracy, 4),
    el("td", {}, when(x.updated_at)), el("td", {}, x.reason || ""))), "no deployments yet");
}

function initDevice() {
  const box = document.getElementById("ranges");
  for (const [label] of RANGES) {
    const button = el("button", { type: "button", class: label === state.range ? "active" : "" }, label);
    button.addEventListener("click", () => {
      state.range = label;
      for (const b of box.children) b.classList.toggle("active", b === button);
      refreshDevice().catch((err) => setStatus("update failed: " + err.message, true));
    });
    box.append(button);
  }
}

// -- rollout page --------------------------------------------------------------------------

const DONE = new Set(["committed"]);
const FAILED = new Set(["failed", "rolled_back", "removed", "cancelled"]);

async function refreshRollout() {
  const r = await api("/api/v1/rollouts/" + enc(document.body.dataset.rollout));
  state.data = { rollout: r };
  document.getElementById("title").textContent = `Rollout ${r.rollout}`;
  document.getElementById("subtitle").replaceChildren(
    `${r.model}:${r.version} to ${r.selection} · `, badge(r.state), r.state_reason ? " " + r.state_reason : "");

  document.getElementById("waves").replaceChildren(...r.waves.map((w, i) => {
    const members = r.devices.filter((d) => d.wave === w.index);
    // target_count is cumulative (a wave of "100%" counts the earlier waves' devices too): this wave's own share
    const earlier = i > 0 ? (r.waves[i - 1].target_count || 0) : 0;
    const target = Math.max((w.target_count || 0) - earlier, members.length, 1);
    const done = members.filter((d) => DONE.has(d.state)).length;
    const failed = members.filter((d) => FAILED.has(d.state)).length;
    const busy = members.length - done - failed;
    const bar = el("div", { class: "progress", title: `${done} committed, ${failed} failed, ${busy} in progress of ${target}` },
      el("div", { class: "done", style: `width:${100 * done / target}%` }),
      el("div", { class: "failed", style: `width:${100 * failed / target}%` }),
      el("div", { class: "busy", style: `width:${100 * busy / target}%` }));
    const gates = el("table", { class: "grid gates" },
      el("thead", {}, el("tr", {}, el("th", {}, "Gate"), el("th", { class: "num" }, "Measured"),
        el("th", { class: "num" }, "Threshold"), el("th", {}, "Result"), el("th", {}, "Detail"))),
      el("tbody", {}, ...(w.gates.length ? w.gates.map((g) => el("tr", { "data-gate": g.name },
        el("td", {}, g.name), numCell(g.measured, 4), numCell(g.threshold, 4),
        el("td", { class: g.passed ? "gate-pass" : "gate-fail" }, g.passed ? "pass" : "fail"),
        el("td", {}, g.detail || ""))) : [el("tr", {}, el("td", { class: "empty", colspan: 5 }, "not evaluated yet"))])));
    return el("div", { class: "wave", "data-wave": w.index },
      el("div", { class: "wave-head" }, el("h3", {}, `Wave ${w.index + 1}: ${w.spec}`), badge(w.state),
        el("span", { class: "muted" }, `${done}/${target} committed${failed ? `, ${failed} failed` : ""}`)),
      bar, gates);
  }));

  const latency = r.latency || { by_profile: {}, by_device: {} };
  fillRows(document.getElementById("before-after"), Object.entries(latency.by_profile).map(([profile, ba]) => {
    const b = ba.before || {};
    const a = ba.after || {};
    return el("tr", { "data-profile": profile }, el("td", {}, profile), numCell(b.calls), numCell(b.p50_ms),
      numCell(b.p95_ms), numCell(a.calls), numCell(a.p50_ms), numCell(a.p95_ms),
      numCell(ba.ratio_p95 === null ? null : ba.ratio_p95, 2));
  }), "no serving reports around this rollout");

  fillRows(document.getElementById("rollout-devices"), r.devices.map((d) => {
    const ba = latency.by_device[d.device] || {};
    return el("tr", { "data-device": d.device }, el("td", {}, link("/devices/" + enc(d.device), d.device)),
      el("td", {}, d.profile), el("td", {}, d.wave === null ? "–" : d.wave + 1), el("td", {}, badge(d.state)),
      el("td", {}, d.recipe), numCell(d.p95_ms), numCell(d.previous_p95_ms), numCell(d.accuracy, 4),
      numCell((ba.before || {}).p95_ms), numCell((ba.after || {}).p95_ms), el("td", {}, d.reason || ""));
  }), "no devices");
}

// -- model page ----------------------------------------------------------------------------

async function refreshModel() {
  const { model, version } = document.body.dataset;
  const reports = await api(`/api/v1/models/${enc(model)}/${enc(version)}/report`);
  state.data = { reports };
  document.getElementById("title").textContent = `${model}:${version}`;
  document.getElementById("subtitle").textContent = reports.length
    ? `compression report for ${reports.length} profile(s); the chosen variant is what the profile ships`
    : "not built for any profile yet ('edgefleet model build')";
  document.getElementById("reports").replaceChildren(...reports.map((rep) => {
    const head = el("tr", {}, ...["Recipe", "Quantization", "Bytes", "Gzip", "Accuracy", "Δ vs float", "p50 ms",
      "p95 ms", "Peak RSS", "Verdict", "Why"].map((h, i) => el("th", { class: i >= 2 && i <= 8 ? "num" : "" }, h)));
    const rows = rep.variants.map((v) => el("tr", { class: v.chosen ? "chosen" : "", "data-recipe": v.recipe },
      el("td", {}, (v.chosen ? "★ " : "") + v.recipe + (v.experiment ? " (experiment)" : "")), el("td", {}, v.quantization),
      el("td", { class: "num" }, bytes(v.size_bytes)), el("td", { class: "num" }, bytes(v.gzip_bytes)),
      numCell(v.accuracy, 4), numCell(v.accuracy === null ? null : v.accuracy - rep.reference_accuracy, 4),
      numCell(v.p50_ms), numCell(v.p95_ms), el("td", { class: "num" }, bytes(v.peak_rss_bytes)),
      el("td", {}, badge(v.verdict)), el("td", {}, v.reason || "")));
    return el("section", { class: "report", "data-profile": rep.profile },
      el("h2", {}, `${rep.profile} `, el("span", { class: "muted" },
        `objective ${rep.objective}, budget ${rep.accuracy_budget} below float accuracy ${fmt(rep.reference_accuracy, 4)}` +
        `${rep.eval_labelled ? "" : " (unlabelled eval: accuracy is agreement)"}; ships ${rep.ships || "nothing"}`)),
      el("table", { class: "grid" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  }));
}

// -- start ---------------------------------------------------------------------------------

const PAGES = { fleet: refreshFleet, device: refreshDevice, rollout: refreshRollout, model: refreshModel };
if (state.page === "device") initDevice();
if (PAGES[state.page]) poll(PAGES[state.page]);
