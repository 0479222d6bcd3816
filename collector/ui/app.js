// calltrace explorer: plain DOM, no dependencies, no network but this server's API.
// Every span name and attribute is attacker-controlled: text goes in with textContent only.
"use strict";

const KEY_STORAGE = "calltrace.apiKey";
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function status(message) { $("#status").textContent = message || ""; }

async function api(path, params) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of params || []) url.searchParams.append(k, v);
  const key = localStorage.getItem(KEY_STORAGE) || "";
  const response = await fetch(url, { headers: key ? { Authorization: "Bearer " + key } : {} });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const reason = body && body.error ? body.error : response.statusText;
    throw new Error(response.status === 401 ? "Enter a valid API key (" + reason + ")" : reason);
  }
  return body;
}

const fmtMs = (ms) => (ms === null || ms === undefined) ? "–" : (ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(ms < 10 ? 2 : 0) + " ms");
const fmtTime = (iso) => iso ? new Date(iso).toLocaleString() : "–";

function filterParams(form) {
  const data = new FormData(form);
  const params = [];
  for (const name of ["start", "end"]) {
    const v = data.get(name);
    if (v) params.push([name, new Date(v).toISOString()]);
  }
  for (const name of ["service", "min_duration_ms"]) {
    const v = (data.get(name) || "").toString().trim();
    if (v) params.push([name, v]);
  }
  const spanName = (data.get("name") || "").toString().trim();
  if (spanName) params.push([data.get("substring") ? "name_contains" : "name", spanName]);
  if (data.get("error")) params.push(["status", "error"]);
  for (const token of (data.get("filters") || "").toString().split(/\s+/)) {
    const eq = token.indexOf("=");
    if (eq > 0) params.push([token.slice(0, eq), token.slice(eq + 1)]);
  }
  return params;
}

function show(view) {
  for (const id of ["calls-view", "traces-view", "detail-view"]) $("#" + id).hidden = id !== view;
}

// ---- calls list ---------------------------------------------------------------------

let callsCursor = null;

async function loadCalls(append) {
  const params = filterParams($("#calls-filter"));
  if (append && callsCursor) params.push(["cursor", callsCursor]);
  const body = await api("/api/v1/calls", params);
  const tbody = $("#calls-table tbody");
  if (!append) tbody.replaceChildren();
  for (const call of body.calls) {
    const tags = el("td", {}, ...Object.entries(call.tags || {}).map(([k, v]) => el("span", { class: "tag" }, k + "=" + v)));
    tbody.append(el("tr", { "data-call-id": call.call_id, onclick: () => { location.hash = "#/calls/" + encodeURIComponent(call.call_id); } },
      el("td", {}, fmtTime(call.start)), el("td", {}, call.room_id), el("td", {}, call.source),
      el("td", { class: "num" }, fmtMs(call.duration_ms)), el("td", { class: "num" }, call.turn_count),
      el("td", { class: "num" }, fmtMs(call.median_turn_ms)), el("td", { class: "num" }, fmtMs(call.worst_turn_ms)),
      el("td", { class: "num" }, call.tool_calls), el("td", { class: "num" }, call.error_count), tags));
  }
  callsCursor = body.next_cursor;
  $("#calls-more").hidden = !callsCursor;
  if (!append && body.calls.length === 0) status("No calls match.");
}

// ---- trace search -------------------------------------------------------------------

let tracesCursor = null;

async function loadTraces(append) {
  const params = filterParams($("#traces-filter"));
  if (append && tracesCursor) params.push(["cursor", tracesCursor]);
  const body = await api("/api/v1/traces", params);
  const tbody = $("#traces-table tbody");
  if (!append) tbody.replaceChildren();
  for (const trace of body.traces) {
    tbody.append(el("tr", { "data-trace-id": trace.trace_id, onclick: () => { location.hash = "#/traces/" + trace.trace_id; } },
      el("td", {}, fmtTime(trace.start)), el("td", {}, trace.root_name || "(root missing)"), el("td", {}, trace.service || ""),
      el("td", { class: "num" }, fmtMs(trace.duration_ms)), el("td", { class: "num" }, trace.span_count),
      el("td", {}, trace.has_error ? "error" : ""), el("td", {}, trace.call_id || "")));
  }
  tracesCursor = body.next_cursor;
  $("#traces-more").hidden = !tracesCursor;
  if (!append && body.traces.length === 0) status("No traces match.");
}

// ---- call / trace detail ------------------------------------------------------------

// Colour by what a span does: STT, LLM, TTS, tool, turn; errors get a red outline.
function category(span) {
  if (span.placeholder) return "other";
  const name = span.name || "";
  const op = (span.attributes || {})["gen_ai.operation.name"];
  if (name === "function_tool" || op === "execute_tool") return "tool";
  if (name === "stt" || name.startsWith("stt_") || op === "stt") return "stt";
  if (name.startsWith("llm") || op === "chat" || op === "text_completion") return "llm";
  if (name.startsWith("tts") || op === "tts") return "tts";
  if (["user_turn", "agent_turn", "turn", "conversation", "agent_session"].includes(name)) return "turn";
  return "other";
}

function flatten(nodes, depth, out) {
  for (const node of nodes) {
    out.push([node, depth]);
    flatten(node.children || [], depth + 1, out);
  }
  return out;
}

function kvRows(tbody, obj) {
  tbody.replaceChildren();
  for (const [k, v] of Object.entries(obj || {})) {
    tbody.append(el("tr", {}, el("td", {}, k), el("td", {}, typeof v === "string" ? v : JSON.stringify(v))));
  }
}

let currentResources = {};

function showSpan(span, row) {
  for (const r of document.querySelectorAll(".wf-row.selected")) r.classList.remove("selected");
  row.classList.add("selected");
  $("#span-panel").hidden = false;
  $("#span-name").textContent = span.name;
  const facts = $("#span-facts");
  facts.replaceChildren();
  const add = (k, v) => facts.append(el("dt", {}, k), el("dd", {}, v));
  add("Span id", span.span_id);
  add("Trace id", span.trace_id || "");
  add("Duration", fmtMs(span.duration_ms));
  add("Status", span.status_code === 2 ? "ERROR " + (span.status_message || "") : (span.status_code === 1 ? "OK" : "UNSET"));
  if (span.scope && span.scope.name) add("Scope", span.scope.name + (span.scope.version ? " " + span.scope.version : ""));
  if (span.placeholder) add("Note", "This span never arrived; its children are shown under it.");
  kvRows($("#span-attributes tbody"), span.attributes);
  kvRows($("#span-resource tbody"), currentResources[span.resource_id] || {});
  const events = $("#span-events");
  events.replaceChildren(...(span.events || []).map((e) => el("li", {}, e.name + " " + JSON.stringify(e.attributes || {}))));
}

// A time of 0 is a time (spans of a clock that was never set start at the epoch).
const hasTime = (ns) => ns !== null && ns !== undefined;

// The trace's first start and last end as BigInt ns; spans without a time are skipped,
// and with none at all the extent is [0, 0].
function timeExtent(rows) {
  const starts = rows.filter(([n]) => hasTime(n.start_ns)).map(([n]) => BigInt(n.start_ns));
  const ends = rows.filter(([n]) => hasTime(n.end_ns)).map(([n]) => BigInt(n.end_ns));
  const t0 = starts.reduce((a, b) => (b < a ? b : a), starts.length ? starts[0] : 0n);
  const t1 = ends.reduce((a, b) => (b > a ? b : a), ends.length ? ends[0] : t0);
  return [t0, t1 > t0 ? t1 : t0];
}

// A span's bar as percentages of the trace's extent: [left, width].
function barGeometry(span, t0, total) {
  if (!hasTime(span.start_ns)) return [0, 0];
  const left = Number(BigInt(span.start_ns) - t0) / total * 100;
  const width = hasTime(span.end_ns) ? Math.max(Number(BigInt(span.end_ns) - BigInt(span.start_ns)), 0) / total * 100 : 0;
  return [left, width];
}

function renderWaterfall(tree, resources) {
  currentResources = resources || {};
  const rows = flatten(tree, 0, []);
  const box = $("#waterfall");
  box.replaceChildren();
  if (rows.length === 0) { box.append(el("p", {}, "No spans.")); return; }
  const [t0, t1] = timeExtent(rows);
  const total = Math.max(Number(t1 - t0), 1);
  for (const [span, depth] of rows) {
    const [left, width] = barGeometry(span, t0, total);
    const cat = category(span);
    const label = el("div", { class: "wf-label", style: { paddingLeft: (depth * 14 + 4) + "px" }, title: span.name }, span.name);
    const track = el("div", { class: "wf-track" },
      el("div", { class: "wf-bar cat-" + cat, style: { left: left + "%", width: width + "%" } }),
      el("span", { class: "wf-dur", style: { left: Math.min(left + width, 92) + "%" } }, span.placeholder ? "" : fmtMs(span.duration_ms)));
    const classes = "wf-row" + (span.placeholder ? " placeholder" : "") + (span.status_code === 2 ? " error" : "");
    const row = el("div", { class: classes, "data-span-id": span.span_id, "data-category": cat }, label, track);
    row.addEventListener("click", () => showSpan(span, row));
    box.append(row);
  }
}

function renderTurns(turns) {
  const tbody = $("#turns-table tbody");
  tbody.replaceChildren();
  for (const t of turns || []) {
    const tools = (t.tool_calls || []).map((c) => c.name + (c.error ? " (failed)" : "")).join(", ");
    tbody.append(el("tr", {}, el("td", {}, t.number), el("td", {}, t.user_text || ""),
      el("td", { class: "num" }, fmtMs(t.stt_ms)), el("td", { class: "num" }, fmtMs(t.llm_ttft_ms)),
      el("td", { class: "num" }, fmtMs(t.tts_ttfb_ms)), el("td", {}, tools), el("td", { class: "num" }, fmtMs(t.e2e_ms))));
  }
  $("#turns-table").hidden = $("#turns-heading").hidden = !(turns && turns.length);
}

async function openCall(callId) {
  const body = await api("/api/v1/calls/" + encodeURIComponent(callId));
  show("detail-view");
  const call = body.call;
  $("#detail-title").textContent = "Call " + call.room_id;
  const summary = $("#detail-summary");
  summary.replaceChildren();
  const add = (k, v) => summary.append(el("dt", {}, k), el("dd", {}, v));
  add("Call id", call.call_id); add("Source", call.source); add("Started", fmtTime(call.start));
  add("Duration", fmtMs(call.duration_ms)); add("Turns", call.turn_count);
  add("Median / worst turn", fmtMs(call.median_turn_ms) + " / " + fmtMs(call.worst_turn_ms));
  add("Tool calls", call.tool_calls); add("Errors", call.error_count);
  add("Tags", Object.entries(call.tags || {}).map(([k, v]) => k + "=" + v).join(", ") || "–");
  renderTurns(body.turns);
  $("#span-panel").hidden = true;
  renderWaterfall(body.tree, body.resources);
}

async function openTrace(traceId) {
  const body = await api("/api/v1/traces/" + encodeURIComponent(traceId));
  show("detail-view");
  $("#detail-title").textContent = "Trace " + body.trace_id;
  const summary = $("#detail-summary");
  summary.replaceChildren();
  const add = (k, v) => summary.append(el("dt", {}, k), el("dd", {}, v));
  const trace = body.trace;
  add("Root span", trace.root_name || "(root missing)"); add("Service", trace.service || "–");
  add("Started", fmtTime(trace.start)); add("Duration", fmtMs(trace.duration_ms));
  add("Spans", trace.span_count); add("Status", trace.has_error ? "has errors" : "no errors");
  if (trace.call_id) summary.append(el("dt", {}, "Call"), el("dd", {}, el("a", { href: "#/calls/" + encodeURIComponent(trace.call_id) }, trace.call_id)));
  renderTurns([]);
  $("#span-panel").hidden = true;
  renderWaterfall(body.tree, body.resources);
}

// ---- routing ------------------------------------------------------------------------

// A piece of the URL hash, decoded; a malformed escape ("%", "%zz") is kept as typed
// rather than thrown (the API then says what it makes of it).
function decodeHashPart(part) {
  try { return decodeURIComponent(part); } catch (e) { return part; }
}

async function route() {
  status("");
  const hash = location.hash || "#/calls";
  const parts = hash.slice(2).split("/").map(decodeHashPart);
  try {
    if (parts[0] === "calls" && parts[1]) await openCall(parts[1]);
    else if (parts[0] === "traces" && parts[1]) await openTrace(parts[1]);
    else if (parts[0] === "traces") { show("traces-view"); await loadTraces(false); }
    else { show("calls-view"); await loadCalls(false); }
  } catch (err) {
    status(err.message);
  }
}

$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY_STORAGE, $("#api-key").value.trim());
  $("#api-key").value = "";
  route();
});
$("#calls-filter").addEventListener("submit", (e) => { e.preventDefault(); loadCalls(false).catch((err) => status(err.message)); });
$("#traces-filter").addEventListener("submit", (e) => { e.preventDefault(); loadTraces(false).catch((err) => status(err.message)); });
$("#calls-more").addEventListener("click", () => loadCalls(true).catch((err) => status(err.message)));
$("#traces-more").addEventListener("click", () => loadTraces(true).catch((err) => status(err.message)));
window.addEventListener("hashchange", route);
if (localStorage.getItem(KEY_STORAGE)) $("#api-key").placeholder = "key saved";
route();
