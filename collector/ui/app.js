// Damselfly's built-in UI: plain JavaScript, no framework, no build step, no network access beyond the collector.
// Views are chosen by the URL fragment (#/fleet, #/vm/<agent id>, #/map, #/sql, #/alerts, #/health); every view
// reads the public HTTP API. Tables are rendered as one HTML string per refresh (1,000 rows stay fast), charts are
// drawn as SVG by hand.
"use strict";

const $main = document.getElementById("main");
const REFRESH_MS = 10000;
/// The window within which a VM's latest values are looked for: a few agent intervals.
const LATEST_WINDOW = "INTERVAL '10 minutes'";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

let timer = null;       // the current view's refresh timer
let viewToken = 0;      // bumped on every navigation, so a late answer never draws into another view

// ---------------------------------------------------------------------------------------------------------------
// Helpers

function esc(v) {
  return String(v === null || v === undefined ? "" : v)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/// A SQL string literal (quotes doubled): the only way user or agent text enters a query.
function sqlStr(s) {
  return "'" + String(s).replace(/'/g, "''") + "'";
}

// With auth on (collector `[auth]`), every API request carries a token; the page itself needs none. The token stays
// in this browser's localStorage and is sent only to this collector, as `Authorization: Bearer`.
const TOKEN_KEY = "damselfly.token";
let sessionToken = "";   // where the token lives when the browser refuses localStorage
function token() {
  try { return localStorage.getItem(TOKEN_KEY) || sessionToken; } catch (e) { return sessionToken; }
}

function showTokenBar(why) {
  document.getElementById("token-why").textContent = why;
  document.getElementById("token-bar").hidden = false;
}

/// GET or POST, answering {ok, status, body} and never throwing: a failed request is shown, not logged.
async function api(path, options) {
  options = Object.assign({}, options);
  const t = token();
  if (t) options.headers = Object.assign({}, options.headers, { Authorization: "Bearer " + t });
  try {
    const r = await fetch(path, options);
    if (r.status === 401) showTokenBar(t ? "The collector refused this token; paste another." : "This collector asks for an API token.");
    const text = await r.text();
    let body = text;
    if ((r.headers.get("content-type") || "").includes("json")) {
      try { body = JSON.parse(text); } catch (e) { body = text; }
    }
    return { ok: r.ok, status: r.status, body };
  } catch (e) {
    return { ok: false, status: 0, body: { error: "cannot reach the collector: " + e.message } };
  }
}

function errorText(res) {
  if (res.body && typeof res.body === "object" && res.body.error) return res.body.error;
  return "HTTP " + res.status + ": " + String(res.body).slice(0, 500);
}

async function sql(text) {
  return api("/api/v1/sql?format=json", { method: "POST", body: text, headers: { "Content-Type": "text/plain" } });
}

function fmtNum(v, digits) {
  if (v === null || v === undefined || v === "") return "";
  const n = Number(v);
  if (!Number.isFinite(n)) return esc(v);
  return n.toFixed(digits === undefined ? 1 : digits);
}

function fmtBytes(n) {
  if (!Number.isFinite(n)) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

/// Timestamps from the API are RFC 3339; a naive one (no zone) is UTC.
function parseTime(v) {
  if (typeof v !== "string") return NaN;
  const s = /[zZ]|[+-]\d\d:?\d\d$/.test(v) ? v : v + "Z";
  return Date.parse(s);
}

function pctCell(v) {
  if (v === null || v === undefined) return '<td class="num muted">–</td>';
  const n = Number(v);
  const cls = n >= 90 ? "hot" : n >= 70 ? "warm" : "";
  const w = Math.max(0, Math.min(100, n)) * 0.5;
  return `<td class="num">${n.toFixed(1)}<span class="bar ${cls}" style="width:${w}px"></span></td>`;
}

function setView(name) {
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.view === name));
}

function every(ms, fn) {
  if (timer) clearInterval(timer);
  timer = setInterval(fn, ms);
}

// ---------------------------------------------------------------------------------------------------------------
// Charts (SVG)

/// Draws series [{name, points: [[ms, value], ...]}] as a line chart; bars when `kind` is "bar" (categorical x).
function lineChart(title, series, opts) {
  opts = opts || {};
  const W = 640, H = 220, L = 48, R = 12, T = 10, B = 24;
  const all = series.flatMap(s => s.points);
  let body;
  if (all.length === 0) {
    body = `<text x="${W / 2}" y="${H / 2}" text-anchor="middle" fill="#6b7380">no data in this range</text>`;
  } else {
    let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
    let y0 = Math.min(0, ...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
    if (opts.max !== undefined) y1 = Math.max(y1, opts.max);
    if (x1 === x0) { x0 -= 1000; x1 += 1000; }
    if (y1 === y0) { y1 = y0 + 1; }
    const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
    const ticks = [];
    for (let i = 0; i <= 4; i++) {
      const v = y0 + (y1 - y0) * i / 4, y = sy(v);
      ticks.push(`<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" stroke="#e5e7eb"/>` +
        `<text x="${L - 4}" y="${y + 3}" text-anchor="end" font-size="10" fill="#6b7380">${fmtAxis(v)}</text>`);
    }
    for (let i = 0; i <= 4; i++) {
      const t = x0 + (x1 - x0) * i / 4, x = sx(t);
      ticks.push(`<text x="${x}" y="${H - 6}" text-anchor="middle" font-size="10" fill="#6b7380">${esc(fmtTime(t, x1 - x0))}</text>`);
    }
    const lines = series.map((s, i) => {
      const c = COLORS[i % COLORS.length];
      const pts = s.points.slice().sort((a, b) => a[0] - b[0]).map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1));
      if (pts.length === 1) {
        const [x, y] = pts[0].split(",");
        return `<circle cx="${x}" cy="${y}" r="3" fill="${c}"><title>${esc(s.name)}</title></circle>`;
      }
      return `<polyline fill="none" stroke="${c}" stroke-width="1.5" points="${pts.join(" ")}"><title>${esc(s.name)}</title></polyline>`;
    });
    body = ticks.join("") + lines.join("");
  }
  const legend = series.map((s, i) => `<span style="--c:${COLORS[i % COLORS.length]}">${esc(s.name)}</span>`).join("");
  return `<div class="panel chart"><h2>${esc(title)}</h2><div class="legend">${legend}</div>` +
    `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="${esc(title)}">${body}</svg></div>`;
}

function barChart(title, labels, values) {
  const W = 640, H = 220, L = 48, B = 40, T = 10;
  const n = labels.length;
  if (n === 0) return "";
  const max = Math.max(0, ...values), min = Math.min(0, ...values);
  const span = max - min || 1;
  const bw = (W - L - 8) / n;
  const sy = v => H - B - (v - min) / span * (H - T - B);
  const bars = values.map((v, i) => {
    const x = L + i * bw, y = Math.min(sy(v), sy(0)), h = Math.abs(sy(v) - sy(0));
    const label = n <= 30 ? `<text x="${x + bw / 2}" y="${H - B + 12}" font-size="9" text-anchor="middle" fill="#6b7380">${esc(String(labels[i]).slice(0, 10))}</text>` : "";
    return `<rect x="${x + 1}" y="${y}" width="${Math.max(1, bw - 2)}" height="${h}" fill="${COLORS[0]}"><title>${esc(labels[i])}: ${esc(values[i])}</title></rect>${label}`;
  }).join("");
  const axis = [0, 0.5, 1].map(f => {
    const v = min + span * f;
    return `<text x="${L - 4}" y="${sy(v) + 3}" text-anchor="end" font-size="10" fill="#6b7380">${fmtAxis(v)}</text>`;
  }).join("");
  return `<div class="panel chart"><h2>${esc(title)}</h2><svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${axis}${bars}</svg></div>`;
}

function fmtAxis(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  return a >= 100 || v === 0 ? v.toFixed(0) : v.toFixed(1);
}

function fmtTime(ms, span) {
  const d = new Date(ms);
  const pad = x => String(x).padStart(2, "0");
  const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
  return span > 2 * 86400e3 ? (d.getMonth() + 1) + "/" + d.getDate() + " " + hm : hm;
}

// ---------------------------------------------------------------------------------------------------------------
// Fleet

const fleet = { sort: "hostname", desc: false, filter: "", status: "", rows: [] };

/// The fleet's latest CPU, memory and disk use: one SQL query over whichever of the three tables exist.
async function latestValues() {
  const tables = await sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' " +
    "AND table_name IN ('cpu', 'mem', 'disk')");
  if (!tables.ok) return { error: errorText(tables), values: {} };
  const have = new Set(tables.body.map(r => r.table_name));
  const parts = [];
  if (have.has("cpu")) parts.push(`SELECT agent_id, 'cpu' AS metric, last_value(100 - usage_idle ORDER BY time) AS value ` +
    `FROM cpu WHERE cpu = 'cpu-total' AND time > now() - ${LATEST_WINDOW} GROUP BY agent_id`);
  if (have.has("mem")) parts.push(`SELECT agent_id, 'mem' AS metric, last_value(used_percent ORDER BY time) AS value ` +
    `FROM mem WHERE time > now() - ${LATEST_WINDOW} GROUP BY agent_id`);
  // The fullest file system: each mount's latest value, then the largest.
  if (have.has("disk")) parts.push(`SELECT agent_id, 'disk' AS metric, max(value) AS value FROM ` +
    `(SELECT agent_id, path, last_value(used_percent ORDER BY time) AS value FROM disk ` +
    `WHERE time > now() - ${LATEST_WINDOW} GROUP BY agent_id, path) GROUP BY agent_id`);
  const values = {};
  if (parts.length === 0) return { values };
  const res = await sql(parts.join(" UNION ALL "));
  if (!res.ok) return { error: errorText(res), values };
  for (const r of res.body) {
    (values[r.agent_id] = values[r.agent_id] || {})[r.metric] = r.value;
  }
  return { values };
}

async function viewFleet(token) {
  setView("fleet");
  $main.innerHTML = `<h1>Fleet</h1>
    <div class="toolbar">
      <input id="fleet-filter" type="search" placeholder="filter: hostname, cloud, region, MCIS…" size="40" value="${esc(fleet.filter)}">
      <select id="fleet-status"><option value="">any status</option><option>healthy</option><option>stale</option>
        <option>down</option><option>unregistered</option></select>
      <span id="fleet-count" class="muted"></span><span id="fleet-error" class="error"></span>
    </div>
    <div class="panel"><table id="fleet"><thead><tr>
      <th data-k="status">Status</th><th data-k="hostname">Hostname</th><th data-k="csp">Cloud</th>
      <th data-k="region">Region</th><th data-k="mcis">MCIS</th><th data-k="vm">VM</th>
      <th data-k="cpu">CPU %</th><th data-k="mem">Memory %</th><th data-k="disk">Disk %</th>
      <th data-k="seen">Last seen</th></tr></thead><tbody id="fleet-body"></tbody></table></div>`;
  document.getElementById("fleet-status").value = fleet.status;
  document.getElementById("fleet-filter").addEventListener("input", e => { fleet.filter = e.target.value; renderFleet(); });
  document.getElementById("fleet-status").addEventListener("change", e => { fleet.status = e.target.value; renderFleet(); });
  document.querySelector("#fleet thead").addEventListener("click", e => {
    const k = e.target.dataset && e.target.dataset.k;
    if (!k) return;
    if (fleet.sort === k) fleet.desc = !fleet.desc; else { fleet.sort = k; fleet.desc = false; }
    renderFleet();
  });
  document.getElementById("fleet-body").addEventListener("click", e => {
    const tr = e.target.closest("tr[data-agent]");
    if (tr) location.hash = "#/vm/" + encodeURIComponent(tr.dataset.agent);
  });
  const load = async () => {
    const [agents, latest] = await Promise.all([api("/api/v1/agents"), latestValues()]);
    if (token !== viewToken) return;
    const err = [];
    if (!agents.ok) err.push(errorText(agents));
    if (latest.error) err.push("latest values: " + latest.error);
    document.getElementById("fleet-error").textContent = err.join("; ");
    if (agents.ok) {
      fleet.rows = agents.body.map(a => {
        const id = a.identity || {};
        const v = latest.values[a.agent_id] || {};
        return {
          agent: a.agent_id, status: a.status, hostname: id.hostname || a.agent_id, csp: id.csp || "",
          region: id.region || "", mcis: [id.ns_id, id.mcis_id].filter(Boolean).join("/"), vm: id.vm_id || "",
          cpu: v.cpu ?? null, mem: v.mem ?? null, disk: v.disk ?? null, seen: a.last_seen_secs_ago,
        };
      });
      renderFleet();
    }
  };
  await load();
  every(REFRESH_MS, load);
}

function renderFleet() {
  const body = document.getElementById("fleet-body");
  if (!body) return;
  const f = fleet.filter.trim().toLowerCase();
  let rows = fleet.rows.filter(r => (!fleet.status || r.status === fleet.status) &&
    (!f || [r.hostname, r.csp, r.region, r.mcis, r.vm, r.agent].some(s => String(s).toLowerCase().includes(f))));
  const k = fleet.sort, dir = fleet.desc ? -1 : 1;
  rows.sort((a, b) => {
    const x = a[k], y = b[k];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * dir;
  });
  // One string, one assignment: the browser lays out 1,000 rows once.
  body.innerHTML = rows.map(r => `<tr class="link" data-agent="${esc(r.agent)}">` +
    `<td><span class="pill st-${esc(r.status)}">${esc(r.status)}</span></td><td>${esc(r.hostname)}</td>` +
    `<td>${esc(r.csp)}</td><td>${esc(r.region)}</td><td>${esc(r.mcis)}</td><td>${esc(r.vm)}</td>` +
    pctCell(r.cpu) + pctCell(r.mem) + pctCell(r.disk) + `<td class="num">${esc(r.seen)} s ago</td></tr>`).join("");
  document.querySelectorAll("#fleet th").forEach(th => {
    th.classList.toggle("sorted-asc", th.dataset.k === k && !fleet.desc);
    th.classList.toggle("sorted-desc", th.dataset.k === k && fleet.desc);
  });
  document.getElementById("fleet-count").textContent = `${rows.length} of ${fleet.rows.length} VMs`;
}

// ---------------------------------------------------------------------------------------------------------------
// One VM

const RANGES = { "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800 };
let vmRange = "1h";

async function viewVm(token, agentId) {
  setView("fleet");
  $main.innerHTML = `<h1>VM <span id="vm-title">${esc(agentId)}</span></h1>
    <div class="toolbar">Range: <select id="vm-range">${Object.keys(RANGES).map(r => `<option>${r}</option>`).join("")}</select>
      <a href="#/fleet">← fleet</a><span id="vm-error" class="error"></span></div>
    <div class="panel" id="vm-info"><p class="muted">Loading…</p></div><div class="charts" id="vm-charts"></div>`;
  const sel = document.getElementById("vm-range");
  sel.value = vmRange;
  sel.addEventListener("change", () => { vmRange = sel.value; load(); });
  const load = async () => {
    const secs = RANGES[vmRange];
    const bucket = Math.max(10, Math.round(secs / 120));
    const where = `agent_id = ${sqlStr(agentId)} AND time > now() - INTERVAL '${secs} seconds'`;
    const bin = `date_bin(INTERVAL '${bucket} seconds', time)`;
    const queries = {
      cpu: `SELECT ${bin} AS t, avg(usage_user) AS user, avg(usage_system) AS system, avg(usage_iowait) AS iowait, ` +
        `avg(100 - usage_idle) AS busy FROM cpu WHERE ${where} AND cpu = 'cpu-total' GROUP BY 1 ORDER BY 1`,
      mem: `SELECT ${bin} AS t, avg(used_percent) AS used_percent FROM mem WHERE ${where} GROUP BY 1 ORDER BY 1`,
      disk: `SELECT ${bin} AS t, path, avg(used_percent) AS used_percent FROM disk WHERE ${where} GROUP BY 1, 2 ORDER BY 1`,
      system: `SELECT ${bin} AS t, avg(load1) AS load1, avg(load5) AS load5, avg(load15) AS load15 FROM system ` +
        `WHERE ${where} GROUP BY 1 ORDER BY 1`,
    };
    const names = Object.keys(queries);
    const [agents, ...answers] = await Promise.all([api("/api/v1/agents"), ...names.map(n => sql(queries[n]))]);
    if (token !== viewToken) return;
    const a = agents.ok ? agents.body.find(x => x.agent_id === agentId) : null;
    document.getElementById("vm-info").innerHTML = a ? vmInfo(a) : `<p class="muted">This agent is not in the registry.</p>`;
    if (a && a.identity && a.identity.hostname) document.getElementById("vm-title").textContent = a.identity.hostname;
    const charts = [];
    const errors = [];
    names.forEach((n, i) => {
      const res = answers[i];
      // A table the agent has not written yet is "no data", not an error worth shouting about.
      if (!res.ok) { if (!/not found|doesn't exist|does not exist/i.test(errorText(res))) errors.push(n + ": " + errorText(res)); return; }
      if (n === "disk") charts.push(lineChart("Disk used % (per mount)", pivot(res.body, "path", "used_percent"), { max: 100 }));
      else charts.push(lineChart({ cpu: "CPU %", mem: "Memory used %", system: "Load" }[n], columnsToSeries(res.body), n === "system" ? {} : { max: 100 }));
    });
    document.getElementById("vm-charts").innerHTML = charts.join("");
    document.getElementById("vm-error").textContent = errors.join("; ");
  };
  await load();
  every(REFRESH_MS, load);
}

function vmInfo(a) {
  const id = a.identity || {}, f = a.facts || {};
  const kv = [["status", `<span class="pill st-${esc(a.status)}">${esc(a.status)}</span>`], ["agent", esc(a.agent_id)],
    ...Object.entries(id).map(([k, v]) => [esc(k), esc(v)]),
    ["vCPUs", esc(f.vcpus)], ["memory", esc(fmtBytes(f.memory_bytes))], ["OS", esc((f.os_name || "") + " " + (f.os_version || ""))],
    ["kernel", esc(f.kernel_version)], ["CPU", esc(f.cpu_model)], ["agent version", esc(a.version)],
    ["last seen", esc(a.last_seen_secs_ago) + " s ago"]];
  return `<dl class="kv wide">${kv.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("")}</dl>`;
}

/// Rows [{t, a, b}] → one series per numeric column.
function columnsToSeries(rows) {
  if (rows.length === 0) return [];
  return Object.keys(rows[0]).filter(k => k !== "t").map(k => ({
    name: k, points: rows.filter(r => r[k] !== null).map(r => [parseTime(r.t), Number(r[k])]),
  }));
}

/// Rows [{t, key, value}] → one series per key.
function pivot(rows, key, value) {
  const by = new Map();
  for (const r of rows) {
    if (r[value] === null) continue;
    if (!by.has(r[key])) by.set(r[key], []);
    by.get(r[key]).push([parseTime(r.t), Number(r[value])]);
  }
  return [...by.entries()].map(([name, points]) => ({ name: String(name), points }));
}

// ---------------------------------------------------------------------------------------------------------------
// MCIS map

const MAP_W = 1000, MAP_H = 403, LAT_TOP = 85, LAT_SPAN = 145;
const mapX = lon => (lon + 180) / 360 * MAP_W;
const mapY = lat => (LAT_TOP - lat) / LAT_SPAN * MAP_H;
let regionsCache = null;
let placement = null;   // the last placement answer drawn on the map
let mapMcis = "";

const PLACEMENT_EXAMPLE = JSON.stringify({
  groups: [{ name: "web", count: 3, clouds: ["aws", "gcp", "azure"] }, { name: "db", clouds: ["gcp"] }],
  policy: { weights: { cost: 1, location: 2 }, locations: [{ lat: 37.5665, lon: 126.978 }, { lat: 50.11, lon: 8.68 }] },
  limit: 5,
}, null, 2);

async function viewMap(token) {
  setView("map");
  $main.innerHTML = `<h1>MCIS map</h1>
    <div class="toolbar">MCIS: <select id="map-mcis"><option value="">all</option></select>
      <span id="map-summary" class="muted"></span><span id="map-error" class="error"></span></div>
    <div class="grid2"><div class="panel map" id="map"></div>
    <div class="panel"><h2>Placement</h2>
      <p class="muted">A request for <code>POST /api/v1/placement</code>; the top candidates of each group are drawn as rings.</p>
      <textarea id="place-req" class="json"></textarea>
      <div class="toolbar"><button id="place-run">Place</button><button id="place-clear" class="secondary">Clear</button></div>
      <div id="place-out"></div></div></div>`;
  document.getElementById("place-req").value = PLACEMENT_EXAMPLE;
  document.getElementById("place-run").addEventListener("click", () => runPlacement(token));
  document.getElementById("place-clear").addEventListener("click", () => { placement = null; document.getElementById("place-out").innerHTML = ""; load(); });
  const sel = document.getElementById("map-mcis");
  sel.addEventListener("change", () => { mapMcis = sel.value; load(); });
  if (!regionsCache) {
    const r = await api("/api/v1/regions");
    if (r.ok) regionsCache = r.body;
  }
  let agents = [];
  const load = async () => {
    const res = await api("/api/v1/agents");
    if (token !== viewToken) return;
    if (!res.ok) { document.getElementById("map-error").textContent = errorText(res); return; }
    agents = res.body;
    const mcisList = [...new Set(agents.map(a => mcisOf(a)).filter(Boolean))].sort();
    const keep = sel.value;
    sel.innerHTML = `<option value="">all</option>` + mcisList.map(m => `<option>${esc(m)}</option>`).join("");
    sel.value = mcisList.includes(keep) ? keep : "";
    drawMap(agents.filter(a => !mapMcis || mcisOf(a) === mapMcis));
  };
  await load();
  every(REFRESH_MS, load);
}

function mcisOf(a) {
  const id = a.identity || {};
  return id.mcis_id ? (id.ns_id ? id.ns_id + "/" : "") + id.mcis_id : "";
}

function regionCoord(csp, region) {
  if (!regionsCache || !region) return null;
  const c = String(csp || "").toLowerCase(), r = String(region).toLowerCase();
  return regionsCache.find(x => x.csp === c && x.region.toLowerCase() === r) ||
    regionsCache.find(x => x.region.toLowerCase() === r) || null;
}

function drawMap(agents) {
  const grat = [];
  for (let lon = -180; lon <= 180; lon += 30) grat.push(`<line class="grat" x1="${mapX(lon)}" x2="${mapX(lon)}" y1="0" y2="${MAP_H}"/>`);
  for (let lat = -60; lat <= 80; lat += 20) grat.push(`<line class="grat" x1="0" x2="${MAP_W}" y1="${mapY(lat)}" y2="${mapY(lat)}"/>`);
  const land = (window.DAMSELFLY_WORLD || []).map(ring =>
    `<polygon class="land" points="${ring.map(([lo, la]) => mapX(lo).toFixed(1) + "," + mapY(la).toFixed(1)).join(" ")}"/>`).join("");
  const regions = (regionsCache || []).map(r =>
    `<circle class="region" cx="${mapX(r.longitude).toFixed(1)}" cy="${mapY(r.latitude).toFixed(1)}" r="1.6"><title>${esc(r.csp)} ${esc(r.region)} ${esc(r.display || "")}</title></circle>`).join("");
  // VMs grouped by region: one marker per region, its size by VM count, its colour by the worst status.
  const groups = new Map();
  let unplaced = 0;
  for (const a of agents) {
    const id = a.identity || {};
    const rc = regionCoord(id.csp, id.region);
    if (!rc) { unplaced++; continue; }
    const key = rc.csp + "/" + rc.region;
    if (!groups.has(key)) groups.set(key, { rc, vms: [] });
    groups.get(key).vms.push(a);
  }
  const rank = { healthy: 0, unregistered: 1, stale: 2, down: 3 };
  const color = { healthy: "#16a34a", unregistered: "#6b7280", stale: "#d97706", down: "#dc2626" };
  const vms = [...groups.values()].map(g => {
    const worst = g.vms.reduce((w, a) => (rank[a.status] ?? 0) > (rank[w] ?? 0) ? a.status : w, "healthy");
    // Logarithmic: a region of 500 VMs must not hide its neighbours.
    const r = 3 + 2.2 * Math.log(1 + g.vms.length);
    const x = mapX(g.rc.longitude), y = mapY(g.rc.latitude);
    const names = g.vms.slice(0, 20).map(a => (a.identity && a.identity.hostname) || a.agent_id).join(", ");
    return `<g class="vm-group" data-region="${esc(g.rc.csp + "/" + g.rc.region)}"><circle class="vm" cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="${r.toFixed(1)}" fill="${color[worst] || "#2563eb"}">` +
      `<title>${esc(g.rc.csp)} ${esc(g.rc.region)}: ${g.vms.length} VM(s) — ${esc(names)}</title></circle>` +
      `<text x="${(x + r + 2).toFixed(1)}" y="${(y + 3).toFixed(1)}">${g.vms.length}</text></g>`;
  }).join("");
  const cands = [];
  if (placement && Array.isArray(placement.groups)) {
    placement.groups.forEach((g, gi) => {
      (g.ranking || []).slice(0, 5).forEach(c => {
        const rc = regionCoord(c.csp, c.region);
        if (!rc) return;
        const x = mapX(rc.longitude), y = mapY(rc.latitude);
        cands.push(`<g class="candidate"><circle class="cand" cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="${(10 - c.rank).toFixed(0)}" stroke="${COLORS[(gi + 4) % COLORS.length]}">` +
          `<title>${esc(g.name)} #${c.rank}: ${esc(c.csp)} ${esc(c.region)} ${esc(c.spec)} (total ${fmtNum(c.total, 3)})</title></circle>` +
          `<text x="${(x - 3).toFixed(1)}" y="${(y - 11).toFixed(1)}">${esc(g.name)}#${c.rank}</text></g>`);
      });
    });
  }
  document.getElementById("map").innerHTML = `<svg viewBox="0 0 ${MAP_W} ${MAP_H}" role="img" aria-label="world map">` +
    grat.join("") + land + regions + vms + cands.join("") + `</svg>`;
  document.getElementById("map-summary").textContent =
    `${agents.length} VMs in ${groups.size} regions` + (unplaced ? `; ${unplaced} without known region coordinates` : "");
}

async function runPlacement(token) {
  const out = document.getElementById("place-out");
  let body;
  try { body = JSON.stringify(JSON.parse(document.getElementById("place-req").value)); }
  catch (e) { out.innerHTML = `<p class="error">The request is not valid JSON: ${esc(e.message)}</p>`; return; }
  out.innerHTML = `<p class="muted">Placing…</p>`;
  const res = await api("/api/v1/placement", { method: "POST", body, headers: { "Content-Type": "application/json" } });
  if (token !== viewToken) return;
  if (!res.ok) { out.innerHTML = `<p class="error">${esc(errorText(res))}</p>`; return; }
  placement = res.body;
  out.innerHTML = (placement.groups || []).map(g => `<h2>${esc(g.name)} <span class="muted">(${esc(g.candidates)} candidates)</span></h2>` +
    `<table><thead><tr><th>#</th><th>Cloud</th><th>Region</th><th>Spec</th><th>Price/h</th><th>Total</th></tr></thead><tbody>` +
    (g.ranking || []).map(c => `<tr><td>${esc(c.rank)}</td><td>${esc(c.csp)}</td><td>${esc(c.region)}</td><td>${esc(c.spec)}</td>` +
      `<td class="num">${fmtNum(c.price_per_hour, 4)}</td><td class="num">${fmtNum(c.total, 3)}</td></tr>`).join("") +
    `</tbody></table>`).join("");
  const sel = document.getElementById("map-mcis");
  const res2 = await api("/api/v1/agents");
  if (token !== viewToken || !res2.ok) return;
  drawMap(res2.body.filter(a => !sel.value || mcisOf(a) === sel.value));
}

// ---------------------------------------------------------------------------------------------------------------
// SQL console

let lastSql = "SELECT hostname, date_bin(INTERVAL '1 minute', time) AS t, avg(100 - usage_idle) AS cpu_busy\n" +
  "FROM cpu WHERE cpu = 'cpu-total' AND time > now() - INTERVAL '30 minutes'\nGROUP BY 1, 2 ORDER BY 2";

function viewSql(token) {
  setView("sql");
  $main.innerHTML = `<h1>SQL</h1>
    <div class="panel"><textarea id="sql-text" class="sql" spellcheck="false"></textarea>
    <div class="toolbar"><button id="sql-run">Run</button><span class="muted">Ctrl+Enter runs; read-only, DataFusion SQL
      (<code>SHOW TABLES</code>, <code>SELECT * FROM damselfly.metrics</code>)</span><span id="sql-status" class="muted"></span></div></div>
    <div id="sql-chart"></div><div class="panel scroll" id="sql-result"></div>`;
  const ta = document.getElementById("sql-text");
  ta.value = lastSql;
  const run = async () => {
    lastSql = ta.value;
    const status = document.getElementById("sql-status");
    status.textContent = "running…";
    const started = performance.now();
    const res = await sql(lastSql);
    if (token !== viewToken) return;
    const ms = Math.round(performance.now() - started);
    const out = document.getElementById("sql-result");
    if (!res.ok) {
      status.textContent = `HTTP ${res.status} after ${ms} ms`;
      out.innerHTML = `<p class="error">${esc(errorText(res))}</p>`;
      document.getElementById("sql-chart").innerHTML = "";
      return;
    }
    const rows = Array.isArray(res.body) ? res.body : [];
    status.textContent = `${rows.length} rows in ${ms} ms`;
    out.innerHTML = resultTable(rows, 2000);
    document.getElementById("sql-chart").innerHTML = resultChart(rows);
  };
  document.getElementById("sql-run").addEventListener("click", run);
  ta.addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); } });
}

function resultTable(rows, max) {
  if (rows.length === 0) return `<p class="muted">No rows.</p>`;
  const cols = Object.keys(rows[0]);
  const shown = rows.slice(0, max);
  return `<table id="sql-table"><thead><tr>${cols.map(c => `<th>${esc(c)}</th>`).join("")}</tr></thead><tbody>` +
    shown.map(r => `<tr>${cols.map(c => typeof r[c] === "number" ? `<td class="num">${esc(r[c])}</td>` :
      `<td>${esc(r[c] !== null && typeof r[c] === "object" ? JSON.stringify(r[c]) : r[c])}</td>`).join("")}</tr>`).join("") +
    `</tbody></table>` + (rows.length > max ? `<p class="muted">${rows.length - max} more rows not shown.</p>` : "");
}

/// A chart of a result: a time column and numeric columns make lines (split by the first text column, if any);
/// a label column and a numeric column make bars.
function resultChart(rows) {
  if (rows.length === 0) return "";
  const cols = Object.keys(rows[0]);
  const sample = rows.find(r => cols.every(c => r[c] !== null)) || rows[0];
  const timeCol = cols.find(c => typeof sample[c] === "string" && /^\d{4}-\d\d-\d\dT/.test(sample[c]));
  const numCols = cols.filter(c => typeof sample[c] === "number");
  const textCol = cols.find(c => c !== timeCol && typeof sample[c] === "string");
  if (numCols.length === 0) return "";
  if (timeCol) {
    let series;
    if (textCol) {
      series = pivot(rows.map(r => ({ t: r[timeCol], k: r[textCol], v: r[numCols[0]] })), "k", "v")
        .map(s => ({ name: textCol + "=" + s.name + " " + numCols[0], points: s.points }));
    } else {
      series = numCols.map(c => ({ name: c, points: rows.filter(r => r[c] !== null).map(r => [parseTime(r[timeCol]), Number(r[c])]) }));
    }
    return lineChart("Chart", series.slice(0, 20));
  }
  if (textCol) return barChart(`${numCols[0]} by ${textCol}`, rows.slice(0, 200).map(r => r[textCol]), rows.slice(0, 200).map(r => Number(r[numCols[0]])));
  return "";
}

// ---------------------------------------------------------------------------------------------------------------
// Active alerts (GET /api/v1/alerts; a collector without alerting answers 404)

async function viewAlerts(token) {
  setView("alerts");
  $main.innerHTML = `<h1>Active alerts</h1><div class="panel" id="alerts"><p class="muted">Loading…</p></div>`;
  const load = async () => {
    const res = await api("/api/v1/alerts");
    if (token !== viewToken) return;
    const el = document.getElementById("alerts");
    if (res.status === 404) { el.innerHTML = `<p class="muted" id="alerts-disabled">alerting not enabled on this collector</p>`; return; }
    if (!res.ok) { el.innerHTML = `<p class="error">${esc(errorText(res))}</p>`; return; }
    const list = Array.isArray(res.body) ? res.body : [];
    if (list.length === 0) { el.innerHTML = `<p class="muted" id="alerts-none">No active alerts.</p>`; return; }
    // Firing first, then by severity and rule.
    const sev = { critical: 0, warning: 1, info: 2 };
    list.sort((a, b) => (a.state === b.state ? 0 : a.state === "firing" ? -1 : 1) ||
      ((sev[a.severity] ?? 9) - (sev[b.severity] ?? 9)) || String(a.rule).localeCompare(String(b.rule)));
    el.innerHTML = `<table id="alerts-table"><thead><tr><th>State</th><th>Severity</th><th>Rule</th><th>Group</th>` +
      `<th>Value</th><th>Threshold</th><th>Since</th><th>Summary</th></tr></thead><tbody>` +
      list.map(a => `<tr><td>${esc(a.state)}${a.silenced ? " (silenced)" : ""}</td>` +
        `<td><span class="pill sev-${esc(a.severity)}">${esc(a.severity)}</span></td><td>${esc(a.rule)}</td>` +
        `<td>${esc(Object.entries(a.group || {}).map(([k, v]) => k + "=" + v).join(" "))}</td>` +
        `<td class="num">${fmtNum(a.value, 2)}</td><td class="num">${fmtNum(a.threshold, 2)}</td>` +
        `<td>${esc(a.since)}</td><td>${esc(a.summary)}</td></tr>`).join("") + `</tbody></table>`;
  };
  await load();
  every(REFRESH_MS, load);
}

// ---------------------------------------------------------------------------------------------------------------
// The collector's own health

/// Prometheus text → [{name, labels, value}] (enough for our own page: no escapes inside label values).
function parseProm(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    (m[3] || "").split(",").filter(Boolean).forEach(kv => {
      const i = kv.indexOf("=");
      labels[kv.slice(0, i)] = kv.slice(i + 1).replace(/^"|"$/g, "");
    });
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

async function viewHealth(token) {
  setView("health");
  $main.innerHTML = `<h1>Collector</h1><div id="health-cards" class="cards"></div>
    <div class="grid2"><div class="panel" id="health-metrics"></div><div class="panel" id="health-store"></div></div>`;
  const load = async () => {
    const [h, m] = await Promise.all([api("/health"), api("/metrics")]);
    if (token !== viewToken) return;
    const store = (h.body && h.body.store) || {};
    const samples = m.ok ? parseProm(String(m.body)) : [];
    const sum = (name, f) => samples.filter(s => s.name === name && (!f || f(s.labels))).reduce((a, s) => a + s.value, 0);
    const mean = base => { const c = sum(base + "_count"); return c ? (sum(base + "_sum") / c * 1000).toFixed(1) + " ms" : "–"; };
    const cards = [
      ["status", h.body && h.body.status ? h.body.status : "HTTP " + h.status],
      ["shard", h.body && h.body.shard], ["version", h.body && h.body.version],
      ["points stored", sum("damselfly_ingest_points_total")], ["batches stored", sum("damselfly_ingest_batches_total")],
      ["buffer", fmtBytes(Number(store.buffered_bytes))], ["Parquet files", store.parquet_files], ["tables", store.tables],
      ["queries", sum("damselfly_query_seconds_count")], ["mean query", mean("damselfly_query_seconds")],
      ["mean WAL commit", mean("damselfly_wal_sync_seconds")], ["mean flush", mean("damselfly_flush_seconds")],
      ["errors", sum("damselfly_errors_total")], ["uptime", Math.round(sum("damselfly_uptime_seconds")) + " s"],
    ];
    document.getElementById("health-cards").innerHTML = cards.map(([k, v]) =>
      `<div class="card"><div class="k">${esc(k)}</div><div class="v">${esc(v)}</div></div>`).join("");
    const interesting = samples.filter(s => !s.name.endsWith("_bucket"));
    document.getElementById("health-metrics").innerHTML = `<h2>/metrics</h2>` + (m.ok ? `<table id="metrics-table"><thead><tr><th>metric</th><th>labels</th><th>value</th></tr></thead><tbody>` +
      interesting.map(s => `<tr><td>${esc(s.name)}</td><td>${esc(Object.entries(s.labels).map(([k, v]) => k + "=" + v).join(" "))}</td>` +
        `<td class="num">${esc(s.value)}</td></tr>`).join("") + `</tbody></table>` : `<p class="error">${esc(errorText(m))}</p>`);
    document.getElementById("health-store").innerHTML = `<h2>/health</h2><dl class="kv">` +
      Object.entries(store).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("") + `</dl>`;
  };
  await load();
  every(5000, load);
}

// ---------------------------------------------------------------------------------------------------------------
// The header badge and the router

async function badge() {
  const h = await api("/health");
  const el = document.getElementById("health-badge");
  const status = h.body && h.body.status ? h.body.status : "unreachable";
  el.textContent = "collector: " + status;
  el.className = "badge " + (status === "ok" ? "ok" : "failed");
}

function route() {
  const token = ++viewToken;
  if (timer) { clearInterval(timer); timer = null; }
  const hash = location.hash.replace(/^#\/?/, "");
  const [view, ...rest] = hash.split("/");
  switch (view) {
    case "vm": return viewVm(token, decodeURIComponent(rest.join("/")));
    case "map": return viewMap(token);
    case "sql": return viewSql(token);
    case "alerts": return viewAlerts(token);
    case "health": return viewHealth(token);
    default: return viewFleet(token);
  }
}

document.getElementById("token-toggle").addEventListener("click", e => {
  e.preventDefault();
  const bar = document.getElementById("token-bar");
  if (bar.hidden) showTokenBar(token() ? "A token is set for this collector." : "No token is set."); else bar.hidden = true;
});
document.getElementById("token-bar").addEventListener("submit", e => {
  e.preventDefault();
  const v = document.getElementById("token-input").value.trim();
  sessionToken = v;
  try { localStorage.setItem(TOKEN_KEY, v); } catch (err) { /* storage refused: kept for this page only */ }
  document.getElementById("token-input").value = "";
  document.getElementById("token-bar").hidden = true;
  route();
  badge();
});
document.getElementById("token-clear").addEventListener("click", () => {
  sessionToken = "";
  try { localStorage.removeItem(TOKEN_KEY); } catch (err) { /* nothing stored */ }
  document.getElementById("token-bar").hidden = true;
  route();
});
window.addEventListener("hashchange", route);
route();
badge();
setInterval(badge, REFRESH_MS);
