// moray dashboard front end: hash-routed views over the JSON API, polled every POLL_MS while shown.
"use strict";

const POLL_MS = 2000;
const state = {view: null, timer: null, job: null, app: "moray", generation: 0};
window.morayTimings = {};

// ---- small helpers ----------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// forms are built once and moved into each redraw, so what is typed (and a reply shown) stays
const kept = new Map();
function keep(id, build) {
  if (!kept.has(id)) kept.set(id, build());
  return kept.get(id);
}

function table(headers, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map(t => h("th", {}, t)))), h("tbody", {}, rows));
}

const status = s => h("span", {class: `status ${s || ""}`}, s || "-");
const when = t => t ? new Date(t * 1000).toLocaleString() : "-";
const dur = s => s == null ? "-" : s < 90 ? `${s.toFixed(0)} s` : s < 5400 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`;
const bytes = b => b == null ? "-" : `${(b / 2 ** 30).toFixed(1)} GiB`;
const pct = p => p == null ? "-" : `${p.toFixed(0)}%`;
const short = id => id ? id.slice(0, 8) : "-";

function flash(text, isError) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.className = isError ? "error" : "";
  el.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { el.hidden = true; }, 6000);
}

function token() { return document.getElementById("token").value.trim(); }

async function api(path, options) {
  const headers = {"content-type": "application/json"};
  if (token()) headers.authorization = `Bearer ${token()}`;
  const r = await fetch(`/api${path}`, {...options, headers});
  const text = await r.text();
  let body;
  try { body = JSON.parse(text); } catch { body = text; }
  if (!r.ok) throw new Error(body && (body.error || body.detail) || `${r.status} ${r.statusText}`);
  return body;
}

async function act(question, path, payload, done) {
  if (question && !window.confirm(question)) return;
  try {
    const result = await api(path, {method: "POST", body: JSON.stringify(payload || {})});
    if (done) done(result);
    refresh();
  } catch (e) {
    flash(e.message, true);
  }
}

// ---- overview -----------------------------------------------------------------------------

async function overview(show) {
  const d = await api(`/overview?app=${encodeURIComponent(state.app)}`);
  return show(
    h("h2", {}, "Overview"),
    h("section", {}, h("div", {class: "kv"},
      h("div", {}, "Ray", h("b", {id: "ray-version"}, d.ray_version)),
      h("div", {}, "moray", h("b", {id: "moray-version"}, d.moray_version)),
      h("div", {}, "nodes", h("b", {}, d.nodes.filter(n => n.state === "ALIVE").length)),
      h("div", {}, "CPUs free / total", h("b", {}, `${(d.available.CPU || 0).toFixed(1)} / ${d.resources.CPU || 0}`)),
      h("div", {}, "GPUs free / total", h("b", {}, `${(d.available.GPU || 0).toFixed(1)} / ${d.resources.GPU || 0}`)))),
    h("section", {id: "alerts"}, h("h3", {}, "Alerts"),
      d.alerts.length ? d.alerts.map(a => h("div", {class: `alert ${a.level}`}, a.what)) : h("div", {class: "muted"}, "none")),
    h("section", {}, h("h3", {}, "Nodes"), table(
      ["node", "address", "state", "CPUs", "CPU use", "memory used / total", "GPUs", "GPU use", "GPU memory used"],
      d.nodes.map(n => h("tr", {class: "node-row"},
        h("td", {title: n.node_id}, short(n.node_id), n.head ? " (head)" : ""), h("td", {}, n.ip), h("td", {}, status(n.state)),
        h("td", {}, n.cpus), h("td", {}, pct(n.cpu_percent)), h("td", {}, `${bytes(n.mem_used)} / ${bytes(n.mem_total)}`),
        h("td", {}, n.gpus), h("td", {}, pct(n.gpu_percent)),
        h("td", {}, n.gpu_mem_used_mb == null ? "-" : `${(n.gpu_mem_used_mb / 1024).toFixed(1)} GiB`))))),
    h("section", {}, h("h3", {}, "Recent admin actions"),
      d.audit.length ? table(["when", "who", "action", "target", "outcome"], d.audit.slice().reverse().map(a =>
        h("tr", {}, h("td", {}, when(a.time)), h("td", {}, a.who), h("td", {}, a.action), h("td", {}, a.target),
          h("td", {}, a.outcome)))) : h("div", {class: "muted"}, "none yet")));
}

// ---- training jobs ------------------------------------------------------------------------

function submitForm() {
  return h("section", {}, h("h3", {}, "Submit a training job"),
    h("form", {class: "inline", id: "submit-job", onsubmit: e => {
      e.preventDefault();
      const f = e.target;
      const overrides = f.overrides.value.split(/\s+/).filter(Boolean);
      act(null, "/jobs", {preset: f.preset.value.trim(), overrides}, r => flash(`submitted job ${r.id}`));
    }},
      h("label", {}, "preset", h("input", {name: "preset", value: "tiny", size: 12})),
      h("label", {}, "overrides (dotlist, space separated)",
        h("textarea", {name: "overrides", rows: 2, cols: 60}, "train.max_steps=50 train.num_workers=1")),
      h("button", {type: "submit"}, "Submit")));
}

function jobCharts(metrics) {
  const pts = key => metrics.filter(m => m[key] != null).map(m => [m.step, m[key]]);
  const mk = () => h("canvas", {class: "chart", width: 420, height: 200});
  const [loss, speed, load] = [mk(), mk(), mk()];
  loss.id = "chart-loss"; speed.id = "chart-tokens"; load.id = "chart-load";
  Charts.line(loss, "loss", [{name: "loss", points: pts("loss")}, {name: "mtp", points: pts("mtp_loss")}], "steps");
  Charts.line(speed, "tokens/s", [{name: "tokens/s", points: pts("tokens_per_s")}], "steps");
  const layers = metrics.length ? (metrics[metrics.length - 1].layer_imbalance || []).length : 0;
  const perLayer = Array.from({length: layers}, (_, l) => ({name: `layer ${l}`, color: Charts.shardColor(l),
    points: metrics.filter(m => m.layer_imbalance).map(m => [m.step, m.layer_imbalance[l]])}));
  Charts.line(load, "expert load max/mean per MoE layer", perLayer, "steps");
  return h("div", {class: "charts", "data-points": metrics.length}, loss, speed, load);
}

async function jobs(show) {
  const {jobs} = await api("/jobs");
  if (!state.job && jobs.length) state.job = jobs[0].id;
  const rows = jobs.map(j => h("tr", {class: `clickable job-row${j.id === state.job ? " selected" : ""}`, "data-job": j.id,
    onclick: () => { state.job = j.id; refresh(); }},
    h("td", {}, j.id), h("td", {}, status(j.status)), h("td", {}, j.run || "-"), h("td", {}, when(j.start_time)),
    h("td", {}, dur(j.duration_s)), h("td", {class: "muted"}, j.message)));
  const parts = [h("h2", {}, "Training jobs"),
    h("section", {}, jobs.length ? table(["job", "status", "run", "submitted", "duration", "message"], rows)
      : h("div", {class: "muted"}, "no jobs submitted to this cluster yet")), keep("submit-job", submitForm)];
  if (state.job) {
    const [job, logs] = await Promise.all([api(`/jobs/${state.job}`), api(`/jobs/${state.job}/logs`)]);
    const last = job.metrics[job.metrics.length - 1];
    parts.push(h("section", {id: "job-detail", "data-job": job.id},
      h("h3", {}, `${job.id} `, status(job.status), job.run ? ` run ${job.run}` : ""),
      h("div", {class: "kv"},
        h("div", {}, "step", h("b", {id: "job-step"}, last ? last.step : "-")),
        h("div", {}, "loss", h("b", {}, last ? last.loss.toFixed(3) : "-")),
        h("div", {}, "tokens/s", h("b", {}, last ? Charts.fmt(last.tokens_per_s) : "-")),
        h("div", {}, h("button", {class: "danger", id: "stop-job", disabled: ["RUNNING", "PENDING"].includes(job.status) ? null : true,
          onclick: () => act(`Stop job ${job.id}?`, `/jobs/${job.id}/stop`, {}, r => flash(r.message))}, "Stop job"))),
      jobCharts(job.metrics),
      h("h3", {}, "Logs"), h("pre", {class: "logs", id: "job-logs"}, logs.slice(-20000).replace(/\x1b\[[0-9;]*m/g, ""))));
  }
  if (!show(...parts)) return false;
  const pre = document.getElementById("job-logs");
  if (pre) pre.scrollTop = pre.scrollHeight;
  return true;
}

// ---- endpoints ----------------------------------------------------------------------------

function trafficCells(t) {
  t = t || {};
  return [Charts.fmt(t.requests_per_s), t.p50_ms == null ? "-" : `${t.p50_ms.toFixed(0)} ms`,
          t.p99_ms == null ? "-" : `${t.p99_ms.toFixed(0)} ms`, t.tokens_total ? Charts.fmt(t.tokens_per_s) : "-",
          String(t.errors_total || 0)].map(v => h("td", {}, v));
}

function completionForm(app) {
  const out = h("pre", {class: "logs", id: "completion-out", hidden: true});
  return h("section", {}, h("h3", {}, `Send a test completion to ${app}`),
    h("form", {class: "inline", id: "test-completion", onsubmit: e => {
      e.preventDefault();
      const f = e.target;
      out.textContent = "waiting...";
      out.hidden = false;
      act(null, `/endpoints/${app}/completion`,
        {prompt: f.prompt.value, max_tokens: Number(f.max_tokens.value), temperature: Number(f.temperature.value)},
        r => { out.textContent = `${f.prompt.value}${r.text}\n\n(${r.usage.completion_tokens} tokens in ${r.latency_s.toFixed(2)} s)`; });
    }},
      h("label", {}, "prompt", h("input", {name: "prompt", value: "def main(", size: 40})),
      h("label", {}, "max tokens", h("input", {name: "max_tokens", type: "number", value: 16, min: 1, max: 256})),
      h("label", {}, "temperature", h("input", {name: "temperature", type: "number", value: 0, step: 0.1, min: 0, max: 2})),
      h("button", {type: "submit"}, "Send")), out);
}

async function endpoints(show) {
  const {applications} = await api("/endpoints");
  const parts = [h("h2", {}, "Endpoints")];
  if (!applications.length) parts.push(h("section", {class: "muted"}, "no Serve applications"));
  for (const app of applications) {
    const rows = app.deployments.map(d => {
      const a = d.autoscaling;
      const replicas = d.replicas.map(r => h("div", {class: "replica"}, `${r.replica_id} `, status(r.state),
        ` on ${short(r.node_id)}`, r.shards.length ? ` + ${r.shards.length} shards: ` : "",
        r.shards.map(s => h("span", {class: "shard", title: `${s.n_experts} expert copies`},
          `#${s.index} on ${short(s.node_id)} `, status(s.alive ? "ALIVE" : "DEAD"), "; "))));
      return h("tr", {class: "deployment-row", "data-deployment": d.name},
        h("td", {}, d.name), h("td", {}, status(d.status), h("div", {class: "muted"}, d.status_trigger || "")),
        h("td", {}, replicas), h("td", {}, a ? `${a.min_replicas}..${a.max_replicas} (target ${d.target_replicas})` : `fixed ${d.target_replicas}`),
        ...trafficCells(d.traffic));
    });
    parts.push(h("section", {class: "application", "data-app": app.name},
      h("h3", {}, `${app.name} `, status(app.status), " ", h("span", {class: "muted"}, app.url)),
      app.message ? h("div", {class: "alert error"}, app.message) : "",
      table(["deployment", "status", "replicas and shards", "autoscaling", "requests/s", "p50", "p99", "tokens/s", "errors"], rows)));
  }
  if (applications.length) {
    const app = applications.some(a => a.name === state.app) ? state.app : applications[0].name;
    parts.push(keep(`completion:${app}`, () => completionForm(app)));
  }
  return show(...parts);
}

// ---- experts ------------------------------------------------------------------------------

function owners(placement, nExperts) {
  // per layer: expert -> list of shards holding it
  return placement.map(shards => {
    const own = Array.from({length: nExperts}, () => []);
    shards.forEach((experts, s) => experts.forEach(e => own[e].push(s)));
    return own;
  });
}

function cellSize(cols, rows) {
  const w = Math.max(2, Math.min(24, Math.floor((window.innerWidth - 80) / cols)));
  return {w, h: Math.max(4, Math.min(20, Math.floor(360 / rows)))};
}

function drawExperts(status, placementCanvas, heatCanvas) {
  const t0 = performance.now();
  const layers = status.load.length, nExperts = status.load[0].length;
  const own = owners(status.placement, nExperts);
  const cell = cellSize(nExperts, layers);
  const colors = status.shards.map((_, s) => Charts.rgbOf(Charts.shardColor(s)));
  const none = [220, 220, 220];
  const ctx = Charts.grid(placementCanvas, layers, nExperts, cell, (l, e) => own[l][e].length ? colors[own[l][e][0]] : none);
  ctx.fillStyle = "#fff";
  own.forEach((row, l) => row.forEach((sh, e) => {  // replicated experts: a white mark
    if (sh.length > 1) ctx.fillRect(e * cell.w + cell.w / 4, l * cell.h + cell.h / 4, Math.max(1, cell.w / 2), Math.max(1, cell.h / 2));
  }));
  const maxima = status.load.map(row => Math.max(1, ...row));
  Charts.grid(heatCanvas, layers, nExperts, cell, (l, e) => Charts.heat(status.load[l][e] / maxima[l]));
  const total = status.load.reduce((a, row) => a + row.reduce((x, y) => x + y, 0), 0);
  heatCanvas.dataset.loadTotal = total;
  placementCanvas.dataset.placement = JSON.stringify(status.placement);
  for (const c of [placementCanvas, heatCanvas]) {
    c.onmousemove = ev => {
      const r = c.getBoundingClientRect(), e = Math.floor((ev.clientX - r.left) / cell.w), l = Math.floor((ev.clientY - r.top) / cell.h);
      const tip = document.getElementById("tooltip");
      if (l < 0 || l >= layers || e < 0 || e >= nExperts) { tip.hidden = true; return; }
      tip.hidden = false;
      tip.style.left = `${ev.clientX + 12}px`; tip.style.top = `${ev.clientY + 12}px`;
      tip.textContent = `layer ${l}, expert ${e}: shard ${own[l][e].join("+") || "none"}, load ${status.load[l][e]}`;
    };
    c.onmouseleave = () => { document.getElementById("tooltip").hidden = true; };
  }
  window.morayTimings.expertsDrawMs = performance.now() - t0;
}

function expertActions(app, shards) {
  return h("section", {}, h("h3", {}, "Actions"), h("div", {class: "inline"},
    h("button", {id: "rebalance", onclick: () => act(`Rebalance the experts of ${app} from their measured load?`,
      `/experts/${app}/rebalance`, {}, ev => flash(`rebalance: ${ev.message || (ev.ok ? "done" : "failed")}`, ev.ok === false))}, "Rebalance"),
    " ",
    h("label", {}, " shards ", h("input", {id: "shard-count", type: "number", min: 1, value: shards, style: "width:60px"})),
    h("button", {id: "scale", class: "secondary", onclick: () => {
      const n = Number(document.getElementById("shard-count").value);
      act(`Scale ${app} to ${n} expert shards?`, `/experts/${app}/scale`, {shards: n},
        ev => flash(`scale: ${ev.message || (ev.ok ? "done" : "failed")}`, ev.ok === false));
    }}, "Scale shards"),
    " ",
    h("select", {id: "drain-node"}),
    h("button", {id: "drain", class: "danger", onclick: () => {
      const n = document.getElementById("drain-node").value;
      act(`Drain node ${short(n)}: move its shards elsewhere?`, `/experts/${app}/drain`, {node_id: n},
        ev => flash(`drain: ${ev.message || (ev.ok ? "done" : "failed")}`, ev.ok === false));
    }}, "Drain node")));
}

function setNodeChoices(section, nodes) {
  const select = section.querySelector("#drain-node"), chosen = select.value;
  if ([...select.options].map(o => o.value).join() === nodes.join()) return;
  select.replaceChildren(...nodes.map(n => h("option", {value: n, selected: n === chosen}, short(n))));
}

async function experts(show) {
  const st = await api(`/experts/${encodeURIComponent(state.app)}`);
  const actions = keep(`actions:${state.app}`, () => expertActions(state.app, st.shards.length));
  setNodeChoices(actions, [...new Set(st.shards.map(s => s.node_id))]);
  const placement = h("canvas", {class: "grid", id: "placement"}), heatmap = h("canvas", {class: "grid", id: "heatmap"});
  const loads = st.shard_load || [];
  const events = (st.events || []).slice().reverse().map(ev => h("tr", {class: "event-row"},
    h("td", {}, when(ev.time)), h("td", {}, ev.action), h("td", {}, status(ev.ok ? "SUCCEEDED" : "FAILED")),
    h("td", {}, ev.duration_s == null ? "-" : `${ev.duration_s.toFixed(2)} s`), h("td", {}, ev.message || "")));
  drawExperts(st, placement, heatmap);
  const shown = show(
    h("h2", {}, `Experts of ${state.app}`),
    h("section", {}, h("div", {class: "kv"},
      h("div", {}, "MoE layers x experts", h("b", {}, `${st.load.length} x ${st.load[0].length}`)),
      h("div", {}, "shards alive", h("b", {id: "shards-alive"}, `${st.shards.filter(s => s.alive).length} / ${st.shards.length}`)),
      h("div", {}, "imbalance (max/mean)", h("b", {id: "imbalance"}, Charts.fmt(st.imbalance))),
      h("div", {}, "tokens routed", h("b", {id: "load-total"}, Charts.fmt(Number(heatmap.dataset.loadTotal)))))),
    actions,
    h("section", {}, h("h3", {}, "Placement (rows: MoE layers, columns: experts; colour: shard, white mark: replicated)"),
      h("div", {class: "legend"}, st.shards.map((s, i) => h("span", {}, h("i", {style: `background:${Charts.shardColor(i)}`}),
        `shard ${s.index} on ${short(s.node_id)}${s.alive ? "" : " (dead)"}: ${s.n_experts} experts, load ${Charts.fmt(loads[i])}`))),
      h("div", {class: "grid-wrap"}, placement)),
    h("section", {}, h("h3", {}, "Load per expert (sliding window; colour relative to the layer's busiest expert)"),
      h("div", {class: "grid-wrap"}, heatmap)),
    h("section", {}, h("h3", {}, "Events"), events.length ? table(["when", "action", "result", "took", "message"], events)
      : h("div", {class: "muted"}, "none yet")));
  if (shown && window.morayTimings.expertsReadyMs === undefined) window.morayTimings.expertsReadyMs = performance.now();
  return shown;
}

// ---- routing and polling --------------------------------------------------------------------

const VIEWS = {overview, jobs, endpoints, experts};

async function refresh() {
  clearTimeout(state.timer);
  const view = state.view, generation = ++state.generation;
  const root = document.getElementById("view");
  // the new page replaces the old one only if it is still wanted and no field has the focus:
  // a form is never redrawn under the user's hands (checked when the data has arrived)
  const show = (...parts) => {
    const focused = document.activeElement;
    if (generation !== state.generation ||
        (root.contains(focused) && ["INPUT", "TEXTAREA", "SELECT"].includes(focused.tagName))) return false;
    root.replaceChildren(...parts);
    return true;
  };
  try {
    if (await VIEWS[view](show)) {
      document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      document.body.dataset.refreshes = Number(document.body.dataset.refreshes || 0) + 1;
      document.body.dataset.rendered = view;
    }
  } catch (e) {
    if (generation === state.generation) root.replaceChildren(h("h2", {}, view), h("div", {class: "alert error"}, e.message));
  }
  if (generation === state.generation) state.timer = setTimeout(refresh, POLL_MS);
}

function route() {
  state.view = (location.hash || "#overview").slice(1).split("/")[0];
  if (!VIEWS[state.view]) state.view = "overview";
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.view === state.view));
  document.body.dataset.view = state.view;
  delete document.body.dataset.rendered;
  document.getElementById("view").replaceChildren(h("div", {class: "muted"}, "loading..."));
  document.getElementById("flash").hidden = true;
  refresh();
}

(async () => {
  const tok = document.getElementById("token");
  tok.value = sessionStorage.getItem("moray-token") || "";
  tok.addEventListener("change", () => { sessionStorage.setItem("moray-token", tok.value.trim()); refresh(); });
  document.body.append(h("div", {id: "tooltip", hidden: true}));
  try { state.app = (await api("/session")).app; } catch { /* reads need the token: asked for below */ }
  window.addEventListener("hashchange", route);
  route();
})();
