// One saga: its DAG drawn as in the talk (Start, the vertices, End; an edge per
// dependency), each vertex coloured by its state; its records as a timeline; and
// live updates from the node's event stream (server-sent events of the push path).
"use strict";

const SAGA_ID = decodeURIComponent(location.pathname.split("/").pop());
const SVG_NS = "http://www.w3.org/2000/svg";
const BOX_W = 130, BOX_H = 46, COL_W = 190, ROW_H = 80, PAD = 30, END_R = 22;
const RETRY_MS = 1000;

let seen = 0; // records shown so far; the event stream resumes after them
let ended = false;

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Columns by longest path from Start: a vertex sits right of everything it waits for.
function layout(vertices) {
  const byName = new Map(vertices.map((v) => [v.name, v]));
  const level = new Map();
  const depth = (v, trail = new Set()) => {
    if (level.has(v.name)) return level.get(v.name);
    if (trail.has(v.name)) return 1; // never in a valid definition: the log checks it
    trail.add(v.name);
    const deps = v.depends_on.filter((d) => byName.has(d));
    const l = deps.length ? 1 + Math.max(...deps.map((d) => depth(byName.get(d), trail))) : 1;
    level.set(v.name, l);
    return l;
  };
  vertices.forEach((v) => depth(v));
  const columns = Math.max(1, ...level.values());
  const rows = new Map();
  for (const v of vertices) {
    const l = level.get(v.name);
    if (!rows.has(l)) rows.set(l, []);
    rows.get(l).push(v.name);
  }
  const tallest = Math.max(1, ...[...rows.values()].map((r) => r.length));
  const height = PAD * 2 + tallest * ROW_H;
  const pos = new Map();
  for (const [l, names] of rows) {
    names.forEach((name, i) => {
      const y = height / 2 + (i - (names.length - 1) / 2) * ROW_H;
      pos.set(name, { x: PAD + END_R * 2 + 40 + (l - 1) * COL_W, y });
    });
  }
  const width = PAD * 2 + END_R * 4 + 80 + (columns - 1) * COL_W + BOX_W;
  return { pos, width, height, start: { x: PAD + END_R, y: height / 2 },
           end: { x: width - PAD - END_R, y: height / 2 } };
}

function drawDag(saga) {
  const dag = document.getElementById("dag");
  const { pos, width, height, start, end } = layout(saga.vertices);
  dag.setAttribute("viewBox", `0 0 ${width} ${height}`);
  dag.setAttribute("width", width);
  dag.setAttribute("height", height);
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
                                 markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7280" }));
  defs.append(marker);
  const edges = svg("g", { class: "edges" });
  const edge = (from, to, fromR, toR, label) => {
    edges.append(svg("line", { x1: from.x + fromR, y1: from.y, x2: to.x - toR, y2: to.y,
                               stroke: "#6b7280", "stroke-width": "1.5",
                               "marker-end": "url(#arrow)", "data-edge": label }));
  };
  const needed = new Set(saga.vertices.flatMap((v) => v.depends_on));
  for (const v of saga.vertices) {
    const p = pos.get(v.name);
    const deps = v.depends_on.filter((d) => pos.has(d));
    if (!deps.length) edge(start, p, END_R, 0, "Start->" + v.name);
    for (const d of deps) edge(pos.get(d), p, BOX_W, 0, d + "->" + v.name);
    if (!needed.has(v.name)) edge(p, end, BOX_W, END_R, v.name + "->End");
  }
  const nodes = svg("g", { class: "nodes" });
  const terminal = (p, label, state) => {
    const g = svg("g", { class: "terminal", "data-terminal": label });
    g.append(svg("circle", { cx: p.x, cy: p.y, r: END_R, fill: STATE_COLOURS[state] || "#fff",
                             stroke: "#111827", "stroke-width": "1.5" }));
    g.append(svg("text", { x: p.x, y: p.y + 4, "text-anchor": "middle", class: "terminal-label" },
                 label));
    nodes.append(g);
  };
  terminal(start, "Start", saga.records.length ? "DONE" : "PENDING");
  terminal(end, "End", { COMPLETED: "DONE", ABORTED: "COMPENSATED" }[saga.state] || "PENDING");
  for (const v of saga.vertices) {
    const p = pos.get(v.name);
    const g = svg("g", { class: "vertex", "data-vertex": v.name, "data-state": v.state });
    g.append(svg("title", {}, `${v.name}: ${v.request} / ${v.compensation} at ${v.endpoint}`));
    g.append(svg("rect", { x: p.x, y: p.y - BOX_H / 2, width: BOX_W, height: BOX_H, rx: 8,
                           fill: STATE_COLOURS[v.state] || "#e5e7eb", stroke: "#111827" }));
    g.append(svg("text", { x: p.x + BOX_W / 2, y: p.y - 3, "text-anchor": "middle",
                           class: "vertex-name" }, v.name));
    g.append(svg("text", { x: p.x + BOX_W / 2, y: p.y + 14, "text-anchor": "middle",
                           class: "vertex-state" }, v.state.toLowerCase().replace("_", " ")));
    nodes.append(g);
  }
  dag.replaceChildren(defs, edges, nodes);
}

function drawLegend() {
  const states = ["PENDING", "STARTED", "DONE", "FAILED", "COMPENSATING", "COMPENSATED",
                  "VERTEX_STUCK"];
  document.getElementById("legend").replaceChildren(...states.map((s) => badge(s)));
}

function drawVertices(saga) {
  const rows = saga.vertices.map((v) => {
    const actions = el("td");
    if (v.state === "VERTEX_STUCK") {
      const b = el("button", { class: "resolve", "data-vertex": v.name }, "Resolve…");
      b.addEventListener("click", () => resolve(v.name));
      actions.append(b);
    }
    return el("tr", { "data-vertex": v.name, "data-state": v.state },
      el("td", {}, v.name), el("td", {}, badge(v.state)), el("td", {}, v.attempts),
      el("td", {}, v.compensation_attempts), el("td", { class: "mono" }, v.error || v.output),
      actions);
  });
  document.querySelector("#vertices tbody").replaceChildren(...rows);
}

function drawRecords(saga) {
  const rows = saga.records.map((r) =>
    el("tr", { "data-body": r.body },
      el("td", {}, r.seq), el("td", { class: "mono" }, when(r.time_unix_ms)),
      el("td", {}, r.epoch), el("td", {}, r.body),
      el("td", { class: "mono" }, JSON.stringify(r.fields))));
  document.querySelector("#records tbody").replaceChildren(...rows);
}

function draw(saga) {
  document.title = "saga " + saga.saga_id;
  document.getElementById("saga-id").textContent = saga.saga_id;
  const state = document.getElementById("saga-state");
  state.replaceChildren(badge(saga.state));
  state.dataset.state = saga.state;
  document.getElementById("summary").textContent =
    `${saga.name} · started ${when(saga.started_unix_ms)}` +
    (saga.ended_unix_ms ? ` · ended ${when(saga.ended_unix_ms)}` : "") +
    (saga.purged ? " · records purged by retention" : "");
  document.getElementById("abort-reason").textContent =
    saga.abort_reason ? "abort reason: " + saga.abort_reason : "";
  document.getElementById("abort").hidden = saga.state !== "RUNNING";
  drawDag(saga);
  drawVertices(saga);
  drawRecords(saga);
  seen = saga.records.length;
  ended = saga.state === "COMPLETED" || saga.state === "ABORTED";
}

async function load() {
  const saga = await api("/api/sagas/" + encodeURIComponent(SAGA_ID));
  draw(saga);
  showProblem(null);
}

// Follows the node's event stream; every record re-reads the saga (one Get), so
// the page always shows what the log says. Reconnects after errors and failovers.
async function follow() {
  while (!ended) {
    const live = document.getElementById("live");
    try {
      await load();
      if (ended) break;
      const reply = await fetch(
        `/api/sagas/${encodeURIComponent(SAGA_ID)}/events?from=${seen + 1}`,
        { headers: authHeaders() });
      if (!reply.ok) throw new ApiError(reply.status, (await reply.json()).error);
      live.textContent = "● live";
      const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          if (/^event: (record|end)/m.test(message)) await load();
        }
      }
    } catch (e) {
      showProblem(e);
    }
    live.textContent = ended ? "" : "reconnecting…";
    if (!ended) await new Promise((r) => setTimeout(r, RETRY_MS));
  }
  document.getElementById("live").textContent = "";
}

async function abortSaga() {
  const reason = prompt("Why abort this saga? (logged)", "aborted from the web page");
  if (reason === null) return;
  try {
    await api(`/api/sagas/${encodeURIComponent(SAGA_ID)}/abort`, { json: { reason } });
    await load();
  } catch (e) {
    showProblem(e);
  }
}

async function resolve(vertex) {
  const reason = prompt(`Mark ${vertex}'s compensation as done by hand. Reason (logged):`);
  if (!reason) return;
  try {
    await api(`/api/sagas/${encodeURIComponent(SAGA_ID)}/resolve`, { json: { vertex, reason } });
    await load();
  } catch (e) {
    showProblem(e);
  }
}

setUpTokenForm();
drawLegend();
document.getElementById("abort").addEventListener("click", abortSaga);
follow();
