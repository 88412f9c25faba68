// The edgesplit dashboard: polls /api/state and redraws. No libraries, nothing from the internet.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;
let etag = null;

function el(tag, attrs = {}, text = "") {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== "") node.textContent = text;
  return node;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return typeof value === "number" ? (Number.isInteger(value) ? String(value) : value.toFixed(digits)) : String(value);
}

function bytes(count) {
  const units = ["B", "KB", "MB", "GB"];
  let value = count, unit = 0;
  while (Math.abs(value) >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

// A line chart of one per-round number, drawn as SVG; data-rounds says how many rounds it shows.
function lineChart(container, rounds, key, total) {
  const points = rounds.filter((r) => typeof r[key] === "number").map((r) => [r.round, r[key]]);
  const width = 360, height = 180, pad = { left: 42, right: 10, top: 10, bottom: 24 };
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": key });
  const maxRound = Math.max(total || 1, ...points.map((p) => p[0]), 1);
  const values = points.map((p) => p[1]);
  let low = Math.min(...values, key === "loss" ? Infinity : 0), high = Math.max(...values, key === "loss" ? 0 : 1);
  if (!Number.isFinite(low)) low = 0;
  if (high <= low) high = low + 1;
  const x = (round) => pad.left + ((round - 1) / Math.max(maxRound - 1, 1)) * (width - pad.left - pad.right);
  const y = (value) => height - pad.bottom - ((value - low) / (high - low)) * (height - pad.top - pad.bottom);
  for (const tick of [low, (low + high) / 2, high]) {
    svg.append(el("svg:line", { x1: pad.left, x2: width - pad.right, y1: y(tick), y2: y(tick), stroke: "#eee" }));
    svg.append(el("svg:text", { x: pad.left - 4, y: y(tick) + 4, "text-anchor": "end", "font-size": 10 }, fmt(tick, 2)));
  }
  svg.append(el("svg:text", { x: width - pad.right, y: height - 6, "text-anchor": "end", "font-size": 10 },
    `round ${points.length ? points[points.length - 1][0] : 0} / ${maxRound}`));
  if (points.length) {
    svg.append(el("svg:polyline", {
      points: points.map(([r, v]) => `${x(r)},${y(v)}`).join(" "), fill: "none", stroke: "#2b6cb0", "stroke-width": 2,
    }));
    if (points.length <= 60) {
      for (const [r, v] of points) {
        const dot = el("svg:circle", { cx: x(r), cy: y(v), r: 2.5, fill: "#2b6cb0" });
        dot.append(el("svg:title", {}, `round ${r}: ${fmt(v)}`));
        svg.append(dot);
      }
    }
  }
  container.replaceChildren(svg);
  container.dataset.rounds = String(points.length);
}

function confusion(table, matrix, classes, recall) {
  table.replaceChildren();
  if (!matrix.length) return;
  const head = el("tr");
  head.append(el("th", { class: "name" }, "true \\ predicted"));
  classes.forEach((name) => head.append(el("th", {}, name)));
  head.append(el("th", {}, "recall"));
  table.append(head);
  const peak = Math.max(1, ...matrix.flat());
  matrix.forEach((row, i) => {
    const line = el("tr");
    line.append(el("th", { class: "name" }, classes[i] ?? String(i)));
    row.forEach((count, j) => {
      const shade = Math.round(255 - (count / peak) * 150);
      const cell = el("td", { "data-row": i, "data-col": j }, String(count));
      cell.style.background = i === j ? `rgb(${shade},255,${shade})` : `rgb(255,${shade},${shade})`;
      line.append(cell);
    });
    line.append(el("td", {}, fmt(recall[i], 3)));
    table.append(line);
  });
}

const CLIENT_COLUMNS = [
  ["node", "node", (c) => c.node],
  ["board", "board", (c) => c.board || "–"],
  ["machine", "machine", (c) => c.machine || "–"],
  ["engine", "engine", (c) => c.engine],
  ["golden_cosine", "golden cos", (c) => (c.golden_cosine == null ? "–" : fmt(c.golden_cosine, 4))],
  ["samples", "samples", (c) => c.samples],
  ["rounds_joined", "rounds joined", (c) => c.rounds_joined],
  ["last_seen", "last seen", (c) => (c.last_seen ? new Date(c.last_seen * 1000).toLocaleTimeString() : "–")],
  ["train_seconds", "train s (last)", (c) => fmt(c.train_seconds, 3)],
  ["embed_seconds", "embed s", (c) => fmt(c.embed_seconds, 2)],
  ["bytes_up", "bytes up", (c) => bytes(c.bytes_up)],
  ["bytes_down", "bytes down", (c) => bytes(c.bytes_down)],
  ["peak_rss_mb", "peak RSS MB", (c) => fmt(c.peak_rss_mb, 0)],
  ["cpu_temp_c", "CPU °C", (c) => (c.cpu_temp_c == null ? "–" : fmt(c.cpu_temp_c, 1))],
  ["failures", "failures", (c) => c.failures],
  ["rejected", "rejected", (c) => c.rejected],
  ["last_problem", "last problem", (c) => c.last_problem],
];

function clientTable(table, clients) {
  const head = el("tr");
  for (const [key, label] of CLIENT_COLUMNS) head.append(el("th", { class: key === "last_problem" ? "name" : "" }, label));
  const rows = clients.map((client) => {
    const row = el("tr", { "data-node": client.node });
    if (client.failures + client.rejected > 0) row.classList.add("trouble");
    for (const [key, , show] of CLIENT_COLUMNS) {
      row.append(el("td", { "data-key": key, class: key === "last_problem" ? "name" : "" }, String(show(client))));
    }
    return row;
  });
  table.replaceChildren(head, ...rows);
}

// Rounds across, clients down; colour by outcome, and the slowest client of each round outlined.
function timeline(container, columns, clients) {
  const nodes = clients.map((c) => c.node).sort((a, b) => (BigInt(a) < BigInt(b) ? -1 : 1));
  const cell = 16, left = 60, top = 18;
  const svg = el("svg:svg", { width: left + columns.length * cell + 10, height: top + nodes.length * cell + 6 });
  columns.forEach((column, i) => {
    if (i % 5 === 0 || i === columns.length - 1) {
      svg.append(el("svg:text", { x: left + i * cell + cell / 2, y: 12, "font-size": 9, "text-anchor": "middle" }, column.round));
    }
    const seconds = Object.values(column.cells).filter((c) => c.status === "ok").map((c) => c.seconds);
    const slowest = Math.max(...seconds, 0);
    nodes.forEach((node, j) => {
      const entry = column.cells[String(node)];
      if (!entry) return;
      const share = slowest > 0 ? entry.seconds / slowest : 0;
      const fill = entry.status === "failed" ? "#d33" : entry.status === "rejected" ? "#93c" : `rgba(43,108,176,${0.25 + 0.75 * share})`;
      const box = el("svg:rect", {
        x: left + i * cell + 1, y: top + j * cell + 1, width: cell - 2, height: cell - 2, fill,
        stroke: entry.status === "ok" && entry.seconds === slowest && seconds.length > 1 ? "#e80" : "none", "stroke-width": 2,
        "data-status": entry.status,
      });
      box.append(el("svg:title", {}, `round ${column.round}, node ${node}: ${entry.status}` +
        (entry.status === "ok" ? `, ${fmt(entry.seconds, 2)} s` : ` (${entry.reason})`)));
      svg.append(box);
    });
  });
  const boards = Object.fromEntries(clients.map((c) => [c.node, c.board]));
  nodes.forEach((node, j) => svg.append(el("svg:text", { x: left - 4, y: top + j * cell + 12, "font-size": 9, "text-anchor": "end" },
    (boards[node] || String(node)).slice(-8))));
  container.replaceChildren(svg);
}

function render(state) {
  const status = document.getElementById("status");
  status.textContent = state.status;
  status.className = `status ${state.status.split(/[ :]/)[0]}`;
  const meta = document.getElementById("meta");
  meta.replaceChildren();
  const facts = [
    ["run folder", state.run_dir],
    ["backbone", `${state.backbone.name ?? "–"} (engine ${state.backbone.engine || "–"})`],
    ["fingerprint", state.backbone.fingerprint ?? "–"],
    ["final model", state.model_dir ?? (state.status === "finished" ? "not exported" : "at the end of the run")],
  ];
  if (state.privacy) {
    const p = state.privacy;
    facts.push(["privacy (DP)", `epsilon ${fmt(p.epsilon)} at delta ${p.delta} after round ${p.round} ` +
      `(noise multiplier ${p.noise_multiplier}, clipping norm ${p.clipping_norm})`]);
  }
  const secure = state.secure_sums ?? { used: false, sums: [] };
  facts.push(["secure sums", !secure.used ? "no: each board's reply is read in the clear" : secure.sums.map((s) =>
    `${s.phase} (round ${s.round}): ${s.no_sum ? "no sum: " + s.no_sum : s.boards + " boards"}${s.dropped ? `, ${s.dropped} dropped` : ""}`)
    .join("; ") || "yes, none taken yet"]);
  for (const point of state.operating_points ?? []) {
    facts.push([`recall at precision ${fmt(point.target_precision, 2)}`, `${point.name}: ${fmt(point.recall, 3)}`]);
  }
  for (const [term, value] of facts) { meta.append(el("dt", {}, term)); meta.append(el("dd", {}, value)); }
  if (state.status === "finished") {
    const link = el("a", { href: "/run/report.html" }, "static report");
    link.style.color = "#fff";
    meta.append(el("dt", {}, "report")); const dd = el("dd"); dd.append(link); meta.append(dd);
  }
  for (const key of ["accuracy", "macro_f1", "balanced_accuracy", "loss"]) {
    lineChart(document.getElementById(`chart-${key}`), state.rounds, key, state.num_rounds);
  }
  document.getElementById("matrix-round").textContent = state.matrix_round ? `(round ${state.matrix_round})` : "";
  confusion(document.getElementById("confusion"), state.confusion_matrix, state.classes, state.per_class_recall);
  document.getElementById("client-count").textContent = `${state.clients.length} nodes, failures first`;
  clientTable(document.getElementById("clients"), state.clients);
  timeline(document.getElementById("timeline"), state.timeline, state.clients);
  const problems = document.getElementById("problems");
  problems.replaceChildren(...state.problems.slice().reverse().map((p) =>
    el("li", {}, `round ${p.round} node ${p.node} ${p.phase} ${p.kind === "client-failed" ? "failed" : "rejected"}: ${p.reason}`)));
  document.getElementById("config").textContent = JSON.stringify(state.config, null, 2);
}

async function poll() {
  try {
    const response = await fetch("/api/state", { headers: etag ? { "If-None-Match": etag } : {} });
    if (response.status === 200) {
      etag = response.headers.get("ETag");
      render(await response.json());
    }
  } catch (error) {
    document.getElementById("status").textContent = "dashboard unreachable";
  }
  setTimeout(poll, POLL_MS);
}

poll();
