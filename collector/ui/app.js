// calltrace explorer: plain DOM, no dependencies, no network but this server's API.
// Every span name and attribute is attacker-controlled: text goes in with textContent only.
//
// Every view's state lives in the URL hash (#/VIEW[/ID]?PARAMS), so a link can be shared:
// list views keep their filters there, the call and trace views the selected span, the
// highlighted turn and the collapsed subtrees. Times in the URL are UTC (RFC 3339); the
// page shows them in the browser's time zone, named in the header.
"use strict";

const KEY_STORAGE = "calltrace.apiKey";
const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";

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

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

// Errors (red) and notices ("no match", grey) are separate: no match is not an error.
function status(message) { $("#status").textContent = message || ""; }
function notice(message) { $("#notice").textContent = message || ""; }

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
  status("");  // the last error is over once a request succeeds
  return body;
}

// ---- formatting -----------------------------------------------------------------------

const fmtMs = (ms) => (ms === null || ms === undefined) ? "–" : (Math.abs(ms) >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(Math.abs(ms) < 10 ? 2 : 0) + " ms");
const TIME_FORMAT = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
  second: "2-digit", fractionalSecondDigits: 3, timeZoneName: "short",
});
const fmtTime = (iso) => iso ? TIME_FORMAT.format(new Date(iso)) : "–";
const ZONE = (() => {
  const name = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  const minutes = -new Date().getTimezoneOffset();
  const sign = minutes >= 0 ? "+" : "-";
  const abs = Math.abs(minutes);
  return name + " (UTC" + sign + String(Math.floor(abs / 60)).padStart(2, "0") + ":" + String(abs % 60).padStart(2, "0") + ")";
})();

// datetime-local (the browser's zone) <-> RFC 3339 UTC (the URL and the API)
function localToIso(value) { return value ? new Date(value).toISOString() : ""; }
function isoToLocal(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const shifted = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return shifted.toISOString().slice(0, 19);
}

function copyButton(text, label) {
  return el("button", {
    type: "button", class: "copy", title: "Copy " + (label || "value"), "data-copy": text,
    onclick: (e) => { e.stopPropagation(); copyText(text, e.currentTarget); },
  }, "copy");
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard permission: select-and-copy fallback
    const area = el("textarea", {}, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1200); }
}

// ---- the URL ------------------------------------------------------------------------

function safeDecode(text) {
  try { return decodeURIComponent(text); } catch (e) { return text; }
}

function currentRoute() {
  const hash = location.hash || "#/calls";
  const q = hash.indexOf("?");
  const path = (q < 0 ? hash : hash.slice(0, q)).replace(/^#\/?/, "");
  let params;
  try { params = new URLSearchParams(q < 0 ? "" : hash.slice(q + 1)); } catch (e) { params = new URLSearchParams(); }
  return { parts: path.split("/").map(safeDecode), params };
}

function routeHash(parts, params) {
  const path = "#/" + parts.map(encodeURIComponent).join("/");
  const query = params.toString();
  return query ? path + "?" + query : path;
}

// In-view state (selected span, turn, collapsed): the URL changes without a reload.
function replaceParams(update) {
  const { parts, params } = currentRoute();
  for (const [k, v] of Object.entries(update)) {
    if (v === null || v === undefined || v === "") params.delete(k); else params.set(k, v);
  }
  history.replaceState(null, "", routeHash(parts, params));
}

// A list view's form <-> its URL params. Times travel as UTC, the rest as typed.
function formToParams(form) {
  const params = new URLSearchParams();
  for (const field of form.elements) {
    if (!field.name || field.type === "submit") continue;
    if (field.type === "checkbox") { params.set(field.name, field.checked ? "1" : "0"); continue; }
    const value = field.type === "datetime-local" ? localToIso(field.value) : field.value.trim();
    if (value) params.set(field.name, value);
  }
  return params;
}

function paramsToForm(form, params) {
  for (const field of form.elements) {
    if (!field.name || field.type === "submit") continue;
    const value = params.get(field.name);
    if (field.type === "checkbox") { if (value !== null) field.checked = value === "1"; continue; }
    if (field.type === "datetime-local") field.value = value ? isoToLocal(value) : "";
    else field.value = value || (field.tagName === "SELECT" ? field.options[0].value : "");
  }
}

// URL params -> API params: names passed as they are, "filters" split into attr./tag. pairs.
function apiParams(params, names) {
  const out = [];
  for (const name of names) {
    const value = params.get(name);
    if (value) out.push([name, value]);
  }
  for (const token of (params.get("filters") || "").split(/\s+/)) {
    const eq = token.indexOf("=");
    if (eq > 0) out.push([token.slice(0, eq), token.slice(eq + 1)]);
  }
  return out;
}

const VIEWS = ["calls-view", "traces-view", "spans-view", "trends-view", "detail-view"];
function show(view) {
  for (const id of VIEWS) $("#" + id).hidden = id !== view;
  for (const link of document.querySelectorAll("header nav a")) link.classList.toggle("active", link.id === "nav-" + view.replace("-view", ""));
}

// A call's custom tags (tag.KEY=VALUE) and LiveKit session tags; a session tag links
// to the calls carrying it.
function tagChips(call) {
  return [
    ...Object.entries(call.tags || {}).map(([k, v]) => el("span", { class: "tag" }, k + "=" + v)),
    ...(call.session_tags || []).map((t) => el("a", {
      class: "tag session-tag", href: "#/calls?session_tag=" + encodeURIComponent(t),
      onclick: (e) => e.stopPropagation(),
    }, t)),
  ];
}

function sessionLink(callId) {
  return el("a", { id: "session-link", href: "/session/" + encodeURIComponent(callId) }, "Open the session (transcript, audio, logs)");
}

function callLink(callId) {
  return callId ? el("a", { href: "#/calls/" + encodeURIComponent(callId), onclick: (e) => e.stopPropagation() }, callId) : "";
}
function traceLink(traceId, label) {
  return el("a", { href: "#/traces/" + traceId, onclick: (e) => e.stopPropagation() }, label || traceId);
}

// ---- list views ---------------------------------------------------------------------

const lists = {
  calls: {
    path: "/api/v1/calls", field: "calls", names: ["start", "end", "sort", "min_worst_turn_ms", "min_median_turn_ms", "min_e2e_p95_ms", "min_errors", "min_duration_ms", "outcome", "session_tag"],
    empty: "No calls match.",
    row: (call) => el("tr", { "data-call-id": call.call_id, onclick: () => { location.hash = "#/calls/" + encodeURIComponent(call.call_id); } },
      el("td", {}, fmtTime(call.start)), el("td", {}, call.room_id), el("td", {}, call.source),
      el("td", { class: "num" }, fmtMs(call.duration_ms)), el("td", { class: "num" }, call.turn_count),
      el("td", { class: "num" }, fmtMs(call.median_turn_ms)), el("td", { class: "num" }, fmtMs(call.worst_turn_ms)),
      el("td", { class: "num" }, fmtMs(call.e2e_p95_ms)),
      el("td", { class: "num" }, call.tool_calls), el("td", { class: "num" }, call.error_count),
      el("td", { class: "outcome" }, call.outcome ? el("span", { class: "outcome-" + call.outcome, title: call.outcome_reason || "" }, call.outcome) : ""),
      el("td", { class: "tags" }, ...tagChips(call))),
  },
  traces: {
    path: "/api/v1/traces", field: "traces", names: ["start", "end", "service", "min_duration_ms"],
    extra: (params) => {
      const out = [];
      const name = params.get("name");
      if (name) out.push([params.get("substring") === "0" ? "name" : "name_contains", name]);
      if (params.get("error") === "1") out.push(["status", "error"]);
      return out;
    },
    empty: "No traces match.",
    row: (trace) => el("tr", { "data-trace-id": trace.trace_id, onclick: () => { location.hash = traceHashWithMatches(trace); } },
      el("td", {}, fmtTime(trace.start)), el("td", {}, trace.root_name || "(root missing)"), el("td", {}, trace.service || ""),
      el("td", { class: "num" }, fmtMs(trace.duration_ms)), el("td", { class: "num" }, trace.span_count),
      el("td", { class: "num" }, trace.matched_spans.length || ""),
      el("td", {}, trace.has_error ? "error" : ""), el("td", {}, callLink(trace.call_id))),
  },
  spans: {
    path: "/api/v1/spans", field: "spans", names: ["start", "end", "name", "service", "min_duration_ms", "status"],
    empty: "No spans match.",
    row: (span) => el("tr", { "data-span-id": span.span_id, onclick: () => { location.hash = "#/traces/" + span.trace_id + "?span=" + span.span_id; } },
      el("td", {}, fmtTime(new Date(Number(BigInt(span.start_ns) / 1000000n)).toISOString())), el("td", {}, span.name), el("td", {}, span.service || ""),
      el("td", { class: "num" }, fmtMs(span.duration_ms)), el("td", {}, span.status_code === 2 ? "error" : ""),
      el("td", {}, traceLink(span.trace_id, (span.trace.root_name || "trace") + " " + span.trace_id.slice(0, 8))),
      el("td", {}, callLink(span.call_id))),
  },
};
const cursors = {};

// A trace opened from search: its first matched span selected, the matched ones marked.
function traceHashWithMatches(trace) {
  const params = new URLSearchParams();
  const matched = trace.matched_spans.slice(0, 100);
  if (matched.length) { params.set("span", matched[0]); params.set("matched", matched.join(",")); }
  return routeHash(["traces", trace.trace_id], params);
}

async function loadList(kind, params, append) {
  const spec = lists[kind];
  const query = [...apiParams(params, spec.names), ...(spec.extra ? spec.extra(params) : [])];
  if (append && cursors[kind]) query.push(["cursor", cursors[kind]]);
  const body = await api(spec.path, query);
  const tbody = $("#" + kind + "-table tbody");
  if (!append) tbody.replaceChildren();
  const fragment = document.createDocumentFragment();
  for (const item of body[spec.field]) fragment.append(spec.row(item));
  tbody.append(fragment);
  cursors[kind] = body.next_cursor;
  $("#" + kind + "-more").hidden = !cursors[kind];
  notice(!append && body[spec.field].length === 0 ? spec.empty : pendingNotice(body.pending_summaries));
}

function pendingNotice(pending) {
  return pending ? pending + " calls' turn numbers are still being computed: show again to include them." : "";
}

// ---- spans: categories, tree ----------------------------------------------------------

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

// Depth-first rows: [span, depth, index of parent row or -1]
function flatten(nodes) {
  const out = [];
  const stack = [];
  for (let i = nodes.length - 1; i >= 0; i--) stack.push([nodes[i], 0, -1]);
  while (stack.length) {
    const [node, depth, parent] = stack.pop();
    const index = out.length;
    out.push([node, depth, parent]);
    const children = node.children || [];
    for (let i = children.length - 1; i >= 0; i--) stack.push([children[i], depth + 1, index]);
  }
  return out;
}

// A tick step of 1, 2 or 5 times a power of ten giving about 8 ticks.
function tickStep(totalMs) {
  const raw = Math.max(totalMs / 8, 1e-6);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (raw <= m * power) return m * power;
  return 10 * power;
}

function prettyValue(value) {
  if (typeof value === "string") {
    const trimmed = value.trim();
    if ((trimmed.startsWith("{") || trimmed.startsWith("[")) && trimmed.length > 1) {
      try { return { text: JSON.stringify(JSON.parse(trimmed), null, 2), json: true }; } catch (e) { /* not JSON */ }
    }
    return { text: value, json: false };
  }
  const json = typeof value === "object" && value !== null;
  return { text: json ? JSON.stringify(value, null, 2) : JSON.stringify(value), json };
}

function kvRows(tbody, obj) {
  tbody.replaceChildren();
  for (const [k, v] of Object.entries(obj || {})) {
    const { text, json } = prettyValue(v);
    const value = json ? el("pre", { class: "json" }, text) : document.createTextNode(text);
    tbody.append(el("tr", { "data-key": k }, el("td", {}, k), el("td", {}, value, copyButton(text, k))));
  }
}

// ---- the waterfall --------------------------------------------------------------------

const detail = { rows: [], elements: [], byId: new Map(), resources: {}, collapsed: new Set(), turns: [], t0: 0n, total: 1 };

function offsetMs(ns) { return Number(BigInt(ns) - detail.t0) / 1e6; }

function percentAt(ns) {
  return Math.min(100, Math.max(0, Number(BigInt(ns) - detail.t0) / detail.total * 100));
}

function stateLanes(rows) {
  // LiveKit's agent_session events: agent_state_changed / user_state_changed.
  const lanes = { Agent: [], User: [] };
  for (const [span] of rows) {
    for (const event of span.events || []) {
      const lane = event.name === "agent_state_changed" ? "Agent" : event.name === "user_state_changed" ? "User" : null;
      if (lane) lanes[lane].push([BigInt(event.time_ns), String((event.attributes || {})["lk.new_state"] || "")]);
    }
  }
  const out = [];
  const end = detail.t0 + BigInt(Math.round(detail.total));
  for (const [name, changes] of Object.entries(lanes)) {
    if (!changes.length) continue;
    changes.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    const track = el("div", { class: "wf-track" });
    changes.forEach(([at, state], i) => {
      const until = i + 1 < changes.length ? changes[i + 1][0] : end;
      const left = percentAt(at);
      const width = Math.max(percentAt(until) - left, 0);
      const known = ["listening", "thinking", "speaking"].includes(state) ? state : "other";
      track.append(el("div", {
        class: "wf-state state-" + known, "data-state": state,
        style: { left: left + "%", width: width + "%" },
        title: name + " " + state + " from +" + fmtMs(Number(at - detail.t0) / 1e6),
      }, width > 4 ? state : ""));
    });
    out.push(el("div", { class: "wf-lane", "data-lane": name.toLowerCase() },
      el("div", { class: "wf-label" }, el("span", { class: "wf-name" }, name + " state")), track));
  }
  return out;
}

function axisRow() {
  const totalMs = detail.total / 1e6;
  const step = tickStep(totalMs);
  const track = el("div", { class: "wf-track" });
  for (let t = 0; t <= totalMs + 1e-9; t += step) {
    track.append(el("div", { class: "wf-tick", style: { left: (t / totalMs * 100) + "%" } }, fmtMs(t)));
  }
  return el("div", { class: "wf-axis" }, el("div", { class: "wf-label" }, "Span (time from " + fmtTime(new Date(Number(detail.t0 / 1000000n)).toISOString()) + ")"), track);
}

function renderWaterfall(tree, resources) {
  detail.resources = resources || {};
  const rows = flatten(tree);
  detail.rows = rows;
  detail.elements = new Array(rows.length);
  detail.byId = new Map();
  const box = $("#waterfall");
  box.replaceChildren();
  if (rows.length === 0) { box.append(el("p", {}, "No spans.")); return; }
  // Extent of the spans that have times (a placeholder has none; 0 is a time).
  let t0 = null, t1 = null;
  for (const [n] of rows) {
    if (n.start_ns !== null && n.start_ns !== undefined) { const s = BigInt(n.start_ns); if (t0 === null || s < t0) t0 = s; }
    if (n.end_ns !== null && n.end_ns !== undefined) { const e = BigInt(n.end_ns); if (t1 === null || e > t1) t1 = e; }
  }
  detail.t0 = t0 === null ? 0n : t0;
  detail.total = Math.max(t1 === null ? 1 : Number(t1 - detail.t0), 1);
  const fragment = document.createDocumentFragment();
  fragment.append(axisRow(), ...stateLanes(rows));
  const hasChildren = new Array(rows.length).fill(false);
  for (const [, , parent] of rows) if (parent >= 0) hasChildren[parent] = true;
  rows.forEach(([span, depth], index) => {
    const timed = span.start_ns !== null && span.start_ns !== undefined;
    const left = timed ? percentAt(span.start_ns) : 0;
    const width = timed && span.end_ns !== null ? Math.max(percentAt(span.end_ns) - left, 0) : 0;
    const cat = category(span);
    const toggle = hasChildren[index]
      ? el("button", { type: "button", class: "wf-toggle", title: "Collapse or expand", "aria-expanded": "true" }, "▾")
      : el("span", { class: "wf-toggle" });
    const label = el("div", { class: "wf-label", style: { paddingLeft: (depth * 14 + 2) + "px" }, title: span.name }, toggle, el("span", { class: "wf-name" }, span.name));
    const track = el("div", { class: "wf-track" },
      el("div", { class: "wf-bar cat-" + cat, style: { left: left + "%", width: width + "%" } }));
    for (const event of span.events || []) {
      if (event.time_ns === null || event.time_ns === undefined) continue;
      track.append(el("div", {
        class: "wf-event", "data-event": event.name, style: { left: percentAt(event.time_ns) + "%" },
        title: event.name + " at +" + fmtMs(offsetMs(event.time_ns)) + " " + JSON.stringify(event.attributes || {}),
      }));
    }
    track.append(el("span", { class: "wf-dur", style: { left: Math.min(left + width, 92) + "%" } }, span.placeholder ? "" : fmtMs(span.duration_ms)));
    const classes = "wf-row" + (span.placeholder ? " placeholder" : "") + (span.status_code === 2 ? " error" : "");
    const row = el("div", { class: classes, "data-span-id": span.span_id, "data-category": cat, "data-index": index }, label, track);
    detail.elements[index] = row;
    detail.byId.set(span.span_id, index);
    fragment.append(row);
  });
  box.append(fragment);
  $("#jump-error").hidden = !rows.some(([s]) => s.status_code === 2);
}

// One listener for every row: a click on a toggle collapses, elsewhere selects.
$("#waterfall").addEventListener("click", (e) => {
  const row = e.target.closest(".wf-row");
  if (!row) return;
  const index = Number(row.dataset.index);
  if (e.target.closest("button.wf-toggle")) {
    const id = detail.rows[index][0].span_id;
    if (detail.collapsed.has(id)) detail.collapsed.delete(id); else detail.collapsed.add(id);
    applyCollapsed();
    replaceParams({ collapsed: [...detail.collapsed].join(",") });
    return;
  }
  selectSpan(index, false);
});

function applyCollapsed() {
  let hideDeeperThan = Infinity;
  detail.rows.forEach(([span, depth], index) => {
    const row = detail.elements[index];
    if (depth > hideDeeperThan) { row.hidden = true; return; }
    hideDeeperThan = Infinity;
    row.hidden = false;
    const collapsed = detail.collapsed.has(span.span_id);
    const toggle = row.querySelector("button.wf-toggle");
    if (toggle) { toggle.textContent = collapsed ? "▸" : "▾"; toggle.setAttribute("aria-expanded", String(!collapsed)); }
    if (collapsed) hideDeeperThan = depth;
  });
}

function expandTo(index) {
  let changed = false;
  for (let i = detail.rows[index][2]; i >= 0; i = detail.rows[i][2]) {
    if (detail.collapsed.delete(detail.rows[i][0].span_id)) changed = true;
  }
  if (changed) { applyCollapsed(); replaceParams({ collapsed: [...detail.collapsed].join(",") }); }
}

function selectSpan(index, scroll) {
  const [span] = detail.rows[index];
  const row = detail.elements[index];
  expandTo(index);
  for (const r of document.querySelectorAll(".wf-row.selected")) r.classList.remove("selected");
  row.classList.add("selected");
  if (scroll) row.scrollIntoView({ block: "center" });
  replaceParams({ span: span.placeholder ? null : span.span_id });
  $("#span-panel").hidden = false;
  $("#span-name").textContent = span.name;
  const facts = $("#span-facts");
  facts.replaceChildren();
  const add = (k, ...v) => facts.append(el("dt", {}, k), el("dd", {}, ...v));
  add("Span id", span.span_id, copyButton(span.span_id, "span id"));
  add("Trace id", span.trace_id ? traceLink(span.trace_id) : "", span.trace_id ? copyButton(span.trace_id, "trace id") : null);
  if (span.parent_span_id) add("Parent id", span.parent_span_id, copyButton(span.parent_span_id, "parent id"));
  if (span.call_id) add("Call", callLink(span.call_id), copyButton(span.call_id, "call id"));
  if (span.start_ns !== null && span.start_ns !== undefined) {
    add("Start", fmtTime(new Date(Number(BigInt(span.start_ns) / 1000000n)).toISOString()) + " (+" + fmtMs(offsetMs(span.start_ns)) + ")");
  }
  add("Duration", fmtMs(span.duration_ms));
  add("Status", span.status_code === 2 ? "ERROR " + (span.status_message || "") : (span.status_code === 1 ? "OK" : "UNSET"));
  if (span.scope && span.scope.name) add("Scope", span.scope.name + (span.scope.version ? " " + span.scope.version : ""));
  if (span.placeholder) add("Note", "This span never arrived; its children are shown under it.");
  kvRows($("#span-attributes tbody"), span.attributes);
  kvRows($("#span-resource tbody"), detail.resources[span.resource_id] || {});
  const events = $("#span-events");
  events.replaceChildren(...(span.events || []).map((e) => el("li", {},
    e.name + " at +" + fmtMs(span.start_ns !== null && span.start_ns !== undefined ? Number(BigInt(e.time_ns) - BigInt(span.start_ns)) / 1e6 : null) + " ",
    el("code", {}, JSON.stringify(e.attributes || {})))));
}

function jumpToFirstError() {
  const index = detail.rows.findIndex(([s]) => s.status_code === 2);
  if (index >= 0) selectSpan(index, true);
}

// ---- turns ------------------------------------------------------------------------------

const PARTS = [["end_of_turn_ms", "turn", "end of turn"], ["llm_ms", "llm", "LLM"], ["tool_ms", "tool", "tools"], ["tts_ms", "tts", "TTS"], ["other_ms", "gap", "gap"]];

function breakdownBar(turn) {
  const parts = turn.breakdown;
  if (!parts || !turn.e2e_ms) return "–";
  const bar = el("div", { class: "breakdown", title: PARTS.map(([k, , label]) => label + " " + fmtMs(parts[k])).join(" + ") + " = " + fmtMs(turn.e2e_ms) });
  for (const [k, cat] of PARTS) {
    const share = Math.max(parts[k], 0) / turn.e2e_ms * 100;
    if (share > 0) bar.append(el("span", { class: "cat-" + cat, style: { width: share + "%" } }));
  }
  return bar;
}

function renderTurns(turns) {
  detail.turns = turns || [];
  const tbody = $("#turns-table tbody");
  tbody.replaceChildren();
  for (const t of detail.turns) {
    const tools = (t.tool_calls || []).map((c) => c.name + (c.duration_ms !== null ? " " + fmtMs(c.duration_ms) : "") + (c.error ? " (failed)" : "")).join(", ");
    const gap = t.breakdown ? fmtMs(t.breakdown.other_ms) : "–";
    tbody.append(el("tr", { "data-turn": t.number, onclick: () => highlightTurn(t.number, true) },
      el("td", {}, t.number), el("td", { class: "text" }, t.user_text || ""), el("td", { class: "text" }, t.agent_text || ""),
      el("td", { class: "num" }, fmtMs(t.e2e_ms)), el("td", {}, breakdownBar(t)),
      el("td", { class: "num" }, fmtMs(t.end_of_turn_ms)), el("td", { class: "num", title: "inside the end-of-turn wait" }, fmtMs(t.stt_ms)),
      el("td", { class: "num", title: "first LLM request" }, fmtMs(t.llm_ttft_ms)),
      el("td", { class: "num", title: "end of speech to the first token of the answer" }, t.llm_calls > 1 ? fmtMs(t.answer_wait_ms) : "–"),
      el("td", { class: "num" }, fmtMs(t.tts_ttfb_ms)), el("td", {}, tools), el("td", { class: "num" }, gap)));
  }
  const none = detail.turns.length === 0;
  $("#turns-table").hidden = $("#turns-heading").hidden = $("#turns-help").hidden = none;
}

function highlightTurn(number, scroll) {
  const turn = detail.turns.find((t) => String(t.number) === String(number));
  for (const r of document.querySelectorAll("#turns-table tr.selected")) r.classList.remove("selected");
  for (const r of document.querySelectorAll(".wf-row.in-turn")) r.classList.remove("in-turn");
  if (!turn) { replaceParams({ turn: null }); return; }
  const row = document.querySelector('#turns-table tr[data-turn="' + CSS.escape(String(turn.number)) + '"]');
  if (row) row.classList.add("selected");
  const indexes = (turn.span_ids || []).map((id) => detail.byId.get(id)).filter((i) => i !== undefined).sort((a, b) => a - b);
  for (const i of indexes) expandTo(i);
  for (const i of indexes) detail.elements[i].classList.add("in-turn");
  replaceParams({ turn: String(turn.number) });
  if (scroll && indexes.length) detail.elements[indexes[0]].scrollIntoView({ block: "start" });
}

// ---- call / trace views ---------------------------------------------------------------

function summaryList(pairs) {
  const summary = $("#detail-summary");
  summary.replaceChildren();
  for (const [k, ...v] of pairs) summary.append(el("dt", {}, k), el("dd", {}, ...v));
}

function restoreDetailState(params) {
  detail.collapsed = new Set((params.get("collapsed") || "").split(",").filter((id) => detail.byId.has(id)));
  applyCollapsed();
  for (const id of (params.get("matched") || "").split(",")) {
    const index = detail.byId.get(id);
    if (index !== undefined) { expandTo(index); detail.elements[index].classList.add("matched"); }
  }
  if (params.get("turn")) highlightTurn(params.get("turn"), !params.get("span"));
  const spanId = params.get("span");
  if (spanId && detail.byId.has(spanId)) selectSpan(detail.byId.get(spanId), true);
}

async function openCall(callId, params) {
  const started = performance.now();
  const body = await api("/api/v1/calls/" + encodeURIComponent(callId));
  const fetched = performance.now();
  show("detail-view");
  const call = body.call;
  $("#detail-title").textContent = "Call " + call.room_id;
  const traceIds = [...new Set(flatten(body.tree).map(([s]) => s.trace_id))];
  summaryList([
    ["Call id", call.call_id, copyButton(call.call_id, "call id")], ["Source", call.source],
    ["Framework", body.framework], ["Started", fmtTime(call.start)], ["Duration", fmtMs(call.duration_ms)],
    ["Turns", call.turn_count],
    ["Median / worst / p95 turn", fmtMs(call.median_turn_ms) + " / " + fmtMs(call.worst_turn_ms) + " / " + fmtMs(call.e2e_p95_ms)],
    ["Tool calls", call.tool_calls + (call.tool_failures ? " (" + call.tool_failures + " failed)" : "")], ["Errors", call.error_count],
    ["Tags", ...(tagChips(call).length ? tagChips(call) : ["–"])],
    ["Outcome", call.outcome ? call.outcome + (call.outcome_reason ? " – " + call.outcome_reason : "") : "–"],
    ["Session", call.session ? sessionLink(call.call_id) : "–"],
    ["Traces", ...traceIds.flatMap((id) => [traceLink(id), " "])],
  ]);
  renderTurns(body.turns);
  $("#span-panel").hidden = true;
  renderWaterfall(body.tree, body.resources);
  restoreDetailState(params);
  // How long the last call took to arrive and to draw (the browser tests read these).
  $("#waterfall").dataset.fetchMs = String(Math.round(fetched - started));
  $("#waterfall").dataset.renderMs = String(Math.round(performance.now() - fetched));
}

async function openTrace(traceId, params) {
  const body = await api("/api/v1/traces/" + encodeURIComponent(traceId));
  show("detail-view");
  $("#detail-title").textContent = "Trace " + body.trace_id;
  const trace = body.trace;
  summaryList([
    ["Trace id", trace.trace_id, copyButton(trace.trace_id, "trace id")],
    ["Root span", trace.root_name || "(root missing)"], ["Service", trace.service || "–"],
    ["Started", fmtTime(trace.start)], ["Duration", fmtMs(trace.duration_ms)],
    ["Spans", trace.span_count], ["Status", trace.has_error ? "has errors" : "no errors"],
    ["Call", trace.call_id ? callLink(trace.call_id) : "–"],
  ]);
  renderTurns([]);
  $("#span-panel").hidden = true;
  renderWaterfall(body.tree, body.resources);
  restoreDetailState(params);
}

// ---- trends -----------------------------------------------------------------------------

const SERIES_COLOURS = ["#2f80ed", "#eb5757", "#27ae60", "#9b51e0", "#f2994a", "#56ccf2", "#6b7280", "#bb6bd9"];

const SHORT_TIME = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const SHORT_DATE_TIME = new Intl.DateTimeFormat(undefined, { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" });

function chartMax(bodies, component, percentile) {
  let max = 0;
  for (const body of bodies) {
    for (const b of body.buckets) for (const g of b.groups) max = Math.max(max, g.latency[component][percentile] || 0);
  }
  return max || 1;
}

function drawChart(body, component, percentile, max) {
  const width = 640, height = 240, left = 56, right = 12, top = 12, bottom = 34;
  const chart = svg("svg", { class: "chart", viewBox: "0 0 " + width + " " + height, role: "img" });
  const buckets = body.buckets;
  const groups = [...new Set(buckets.flatMap((b) => b.groups.map((g) => g.group === null ? "(none)" : g.group)))];
  const value = (bucket, group) => {
    const found = bucket.groups.find((g) => (g.group === null ? "(none)" : g.group) === group);
    return found ? found.latency[component][percentile] : null;
  };
  const x = (i) => left + (buckets.length > 1 ? i / (buckets.length - 1) : 0.5) * (width - left - right);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  const step = tickStep(max);
  for (let v = 0; v <= max + 1e-9; v += step) {
    chart.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    const label = svg("text", { x: left - 4, y: y(v) + 3, "text-anchor": "end" });
    label.textContent = fmtMs(v);
    chart.append(label);
  }
  chart.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: y(0), y2: y(0) }));
  const labelEvery = Math.max(1, Math.ceil(buckets.length / 6));
  const spanDays = buckets.length > 1 && Date.parse(buckets[buckets.length - 1].start) - Date.parse(buckets[0].start) >= 86400000;
  buckets.forEach((b, i) => {
    if (i % labelEvery) return;
    const label = svg("text", { x: x(i), y: height - bottom + 14, "text-anchor": "middle" });
    label.textContent = (spanDays ? SHORT_DATE_TIME : SHORT_TIME).format(new Date(b.start));
    chart.append(label);
  });
  groups.forEach((group, gi) => {
    const colour = SERIES_COLOURS[gi % SERIES_COLOURS.length];
    const series = svg("g", { class: "series-group", "data-group": group });
    const points = buckets.map((b, i) => [i, value(b, group)]);
    // The line breaks at a bucket without turns rather than bridging it.
    let run = [];
    for (const [i, v] of [...points, [-1, null]]) {
      if (v !== null) { run.push(x(i) + "," + y(v)); continue; }
      if (run.length > 1) series.append(svg("polyline", { class: "series", points: run.join(" "), stroke: colour }));
      run = [];
    }
    for (const [i, v] of points) {  // one point per bucket; hollow where it had no turns
      const point = svg("circle", { class: "pt" + (v === null ? " empty" : ""), cx: x(i), cy: y(v === null ? 0 : v), r: 3, stroke: colour, fill: colour, "data-bucket": buckets[i].start });
      const title = svg("title", {});
      title.textContent = group + " " + fmtTime(buckets[i].start) + ": " + (v === null ? "no turns" : fmtMs(v));
      point.append(title);
      series.append(point);
    }
    chart.append(series);
  });
  const legend = el("div", { class: "series-legend" }, ...groups.map((g, gi) => el("span", {}, el("i", { style: { background: SERIES_COLOURS[gi % SERIES_COLOURS.length] } }), g)));
  return [chart, legend];
}

function countsTable(body) {
  const tbody = el("tbody", {});
  for (const b of body.buckets) {
    for (const g of b.groups) {
      tbody.append(el("tr", {}, el("td", {}, fmtTime(b.start)), el("td", {}, g.group === null ? "(none)" : g.group),
        el("td", { class: "num" }, g.calls), el("td", { class: "num" }, g.turns), el("td", { class: "num" }, g.errors ?? "–"),
        el("td", { class: "num" }, g.tool_failures ?? "–"),
        el("td", { class: "num" }, fmtMs(g.latency.e2e_ms.p50)), el("td", { class: "num" }, fmtMs(g.latency.e2e_ms.p95)),
        el("td", { class: "num" }, fmtMs(g.latency.e2e_ms.p99))));
    }
  }
  return el("div", { class: "counts-box" }, el("table", { class: "results counts" },
    el("thead", {}, el("tr", {}, ...["Bucket", "Group", "Calls", "Turns", "Errors", "Tool failures", "e2e p50", "e2e p95", "e2e p99"].map((h) => el("th", {}, h)))), tbody));
}

function fillTrendPanel(panel, title, body, component, percentile, max) {
  const [chart, legend] = drawChart(body, component, percentile, max);
  panel.dataset.source = body.source;
  const source = body.source === "metrics" ? " · from LiveKit's lk.agents.turn.* histograms" : "";
  panel.replaceChildren(el("h3", {}, title + source), chart, legend, countsTable(body));
}

// Panel A reads start, end, filters; panel B (the comparison) b_start, b_end, b_filters,
// each falling back to A's: two time ranges, or two tag values, side by side.
function trendQuery(params, prefix) {
  const pick = (name) => (prefix && params.has(prefix + name) ? params.get(prefix + name) : params.get(name));
  const query = [];
  for (const name of ["start", "end"]) { const v = pick(name); if (v) query.push([name, v]); }
  for (const name of ["step", "group_by", "source"]) { const v = params.get(name); if (v) query.push([name, v]); }
  query.push(...apiParams(new URLSearchParams({ filters: pick("filters") || "" }), []));
  const start = pick("start"), end = pick("end"), tags = pick("filters");
  const title = (start ? fmtTime(start) : "a day before") + " – " + (end ? fmtTime(end) : "now") + (tags ? " · " + tags : "");
  return [query, title];
}

async function loadTrends(params) {
  const component = params.get("component") || "e2e_ms";
  const percentile = params.get("percentile") || "p50";
  const label = " · " + component + " " + percentile;
  const [queryA, titleA] = trendQuery(params, "");
  const compare = ["b_start", "b_end", "b_filters"].some((name) => params.get(name));
  const [queryB, titleB] = trendQuery(params, "b_");
  const fetchBoth = (extra) => Promise.all([
    api("/api/v1/stats/turns", [...queryA, ...extra]),
    compare ? api("/api/v1/stats/turns", [...queryB, ...extra]) : null,
  ]);
  let [a, b] = await fetchBoth([]);
  // No source chosen and no turn spans in range: livekit-agents' own turn histograms
  // (lk.agents.turn.*, sent with the metrics signal) when they are there.
  const turns = (body) => body ? body.buckets.reduce((n, bucket) => n + bucket.groups.reduce((m, g) => m + g.turns, 0), 0) : 0;
  if (!params.get("source") && turns(a) + turns(b) === 0) {
    const [ma, mb] = await fetchBoth([["source", "metrics"]]);
    if (turns(ma) + turns(mb) > 0) [a, b] = [ma, mb];
  }
  // Side by side on one scale, so the two charts compare at a glance.
  const max = chartMax(b ? [a, b] : [a], component, percentile);
  fillTrendPanel($("#trends-a"), "A: " + titleA + label, a, component, percentile, max);
  $("#trends-b").hidden = !b;
  if (b) fillTrendPanel($("#trends-b"), "B: " + titleB + label, b, component, percentile, max);
  const pending = a.pending_summaries + (b ? b.pending_summaries : 0);
  notice(a.buckets.every((bucket) => bucket.groups.length === 0) && !pending ? "No calls in this range." : pendingNotice(pending));
}

// ---- routing ------------------------------------------------------------------------

async function route() {
  const { parts, params } = currentRoute();
  notice("");
  try {
    if (parts[0] === "calls" && parts[1]) await openCall(parts[1], params);
    else if (parts[0] === "traces" && parts[1]) await openTrace(parts[1], params);
    else if (parts[0] === "trends") {
      show("trends-view");
      paramsToForm($("#trends-filter"), params);
      await loadTrends(params);
    } else {
      const kind = ["traces", "spans"].includes(parts[0]) ? parts[0] : "calls";
      show(kind + "-view");
      paramsToForm($("#" + kind + "-filter"), params);
      await loadList(kind, params, false);
    }
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
for (const kind of ["calls", "traces", "spans", "trends"]) {
  $("#" + kind + "-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    const hash = routeHash([kind], formToParams(e.target));
    if (hash === location.hash) route(); else location.hash = hash;
  });
}
for (const kind of ["calls", "traces", "spans"]) {
  $("#" + kind + "-more").addEventListener("click", () => loadList(kind, currentRoute().params, true).catch((err) => status(err.message)));
}
$("#jump-error").addEventListener("click", jumpToFirstError);
$("#expand-all").addEventListener("click", () => { detail.collapsed.clear(); applyCollapsed(); replaceParams({ collapsed: null }); });
window.addEventListener("hashchange", route);
$("#timezone").textContent = "Times in " + ZONE;
for (const input of document.querySelectorAll("input[type=datetime-local]")) input.title = "In " + ZONE;
if (localStorage.getItem(KEY_STORAGE)) $("#api-key").placeholder = "key saved";
route();
