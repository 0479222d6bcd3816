// calltrace session page: a LiveKit agent session's recording, transcript, evaluations
// and logs on one timeline. Plain DOM, no dependencies; every value the agent sent is
// attacker-controlled, so text goes in with textContent only.
"use strict";

const KEY_STORAGE = "calltrace.apiKey"; // the explorer's (collector/ui/app.js)
const $ = (sel) => document.querySelector(sel);
const callId = decodeURIComponent(window.location.pathname.split("/").pop());

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

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE) || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: authHeaders() });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 404) return null;
  if (!response.ok) throw new Error((body && body.error) || response.statusText);
  return body;
}

const fmtOffset = (s) => {
  if (!Number.isFinite(s)) return "–";
  const sign = s < 0 ? "-" : "";
  s = Math.abs(s);
  return sign + Math.floor(s / 60) + ":" + (s % 60).toFixed(1).padStart(4, "0");
};
const fmtSec = (s) => Number.isFinite(s) ? (s >= 1 ? s.toFixed(2) + " s" : (s * 1000).toFixed(0) + " ms") : null;
const SEVERITY = (n) => n >= 17 ? "error" : n >= 13 ? "warn" : n >= 9 ? "info" : n > 0 ? "debug" : "info";

let origin = 0;      // Unix seconds at audio position 0
let length = 1;      // seconds the timeline spans
const marks = [];    // {start, end, item}: list items and waterfall rows the cursor marks
const player = $("#player");
const LABEL_PX = 220; // the waterfall's name column; its bars share the timeline's scale

function seek(offset) {
  if (player.src) player.currentTime = Math.max(0, offset);
  moveCursor(offset);
}

function moveCursor(offset) {
  const fraction = Math.min(Math.max(offset / length, 0), 1);
  $("#cursor").style.left = (100 * fraction) + "%";
  $("#waterfall-cursor").style.left = "calc(" + LABEL_PX + "px + (100% - " + LABEL_PX + "px) * " + fraction + ")";
  document.body.dataset.position = offset.toFixed(3);
  for (const mark of marks) {
    const on = offset >= mark.start && offset < mark.end;
    mark.item.classList.toggle("current", on);
  }
}

function mark(start, end, cls, item, title) {
  const left = 100 * Math.max(start, 0) / length;
  const width = Math.max(100 * (end - start) / length, 0.3);
  const node = el("div", { class: "mark " + cls, title, style: { left: left + "%", width: width + "%" } });
  node.addEventListener("click", (e) => { e.stopPropagation(); seek(start); item.scrollIntoView({ block: "nearest" }); });
  $("#timeline").append(node);
  marks.push({ start, end, item });
  return node;
}

function itemText(item) {
  if (item.type === "message") return (item.content || []).filter((c) => typeof c === "string").join(" ");
  if (item.type === "function_call") return "→ " + item.name + "(" + (item.arguments || "") + ")";
  if (item.type === "function_call_output") return "← " + item.name + ": " + (item.output || "");
  if (item.type === "agent_handoff") return "handoff to " + item.new_agent_id;
  if (item.type === "agent_config_update") return "agent configured" + (item.tools_added ? " (tools: " + item.tools_added.join(", ") + ")" : "");
  return item.type;
}

function renderTranscript(history) {
  const list = $("#transcript");
  for (const item of (history && history.items) || []) {
    const m = item.metrics || {};
    const start = (m.started_speaking_at || item.created_at) - origin;
    const end = (m.stopped_speaking_at || item.created_at + 0.5) - origin;
    const role = item.type === "message" ? item.role : item.type.replace(/_/g, " ");
    const figures = [
      ["e2e", fmtSec(m.e2e_latency)], ["ttft", fmtSec(m.llm_node_ttft)], ["ttfb", fmtSec(m.tts_node_ttfb)],
      ["end of turn", fmtSec(m.end_of_turn_delay)], ["transcription", fmtSec(m.transcription_delay)],
    ].filter(([, v]) => v).map(([k, v]) => k + " " + v).join(" · ");
    const li = el("li", { class: "item-" + item.type, "data-offset": start.toFixed(3) },
      el("span", { class: "when" }, fmtOffset(start)),
      el("span", { class: "role role-" + role }, role),
      el("span", { class: item.type.startsWith("function") ? "tool" : "text" }, itemText(item)),
      item.interrupted ? el("span", { class: "interrupted" }, "interrupted") : null,
      figures ? el("div", { class: "metrics" }, figures) : null);
    li.addEventListener("click", () => seek(start));
    list.append(li);
    if (item.type === "message") mark(start, end, item.role === "user" ? "user" : "assistant", li, itemText(item));
  }
}

function renderEvaluations(logs, summary) {
  const list = $("#evaluations");
  for (const log of logs) {
    const a = log.attributes || {};
    if (log.body === "evaluation" && a.evaluation) {
      const e = a.evaluation;
      list.append(el("li", {}, el("strong", {}, e.name || "judge"), " ",
        el("span", { class: "verdict-" + e.verdict }, e.verdict || "?"),
        el("div", { class: "metrics" }, e.reasoning || "")));
    } else if (log.body === "outcome" && a.outcome) {
      $("#outcome").append(el("span", { class: "verdict-" + (a.outcome.outcome === "success" ? "pass" : "fail") },
        "outcome: " + a.outcome.outcome), a.outcome.reason ? " – " + a.outcome.reason : "");
    }
  }
  const tags = (summary && summary.tags) || [];
  $("#tags").append(...tags.map((t) => el("span", { class: "tag" }, t)));
}

// The call's spans on the recording's time axis: one row per span (tree order), a bar
// from its start to its end; the cursor runs over them, a click seeks to that time.
function flattenTree(nodes, depth, out) {
  for (const node of nodes) {
    out.push([node, depth]);
    flattenTree(node.children || [], depth + 1, out);
  }
  return out;
}

const SPAN_KIND = (name) => /stt|transcri|user_turn|user_speaking|eou/.test(name) ? "stt"
  : /llm/.test(name) ? "llm" : /tts/.test(name) ? "tts" : /tool/.test(name) ? "tool" : /turn/.test(name) ? "turn" : "other";

function renderWaterfall(call) {
  const box = $("#session-waterfall");
  const rows = flattenTree((call && call.tree) || [], 0, []).filter(([s]) => !s.placeholder).slice(0, 2000);
  if (!rows.length) return;
  box.hidden = false;
  const toPercent = (s) => 100 * Math.min(Math.max(s / length, 0), 1);
  for (const [span, depth] of rows) {
    const start = Number(BigInt(span.start_ns) / 1000n) / 1e6 - origin;
    const end = Number(BigInt(span.end_ns) / 1000n) / 1e6 - origin;
    const left = toPercent(start);
    const bar = el("div", {
      class: "sw-bar cat-" + SPAN_KIND(span.name) + (span.status_code === 2 ? " error" : ""),
      style: { left: left + "%", width: Math.max(toPercent(end) - left, 0.2) + "%" },
    });
    const row = el("div", { class: "sw-row", "data-span-id": span.span_id, "data-offset": start.toFixed(3), title: span.name },
      el("span", { class: "sw-name", style: { paddingLeft: (depth * 10) + "px" } }, span.name),
      el("div", { class: "sw-track" }, bar));
    row.addEventListener("click", (e) => {
      e.stopPropagation();
      const track = row.querySelector(".sw-track").getBoundingClientRect();
      seek(e.clientX >= track.left ? length * (e.clientX - track.left) / track.width : start);
    });
    box.append(row);
    if (depth > 0) marks.push({ start, end, item: row });
  }
  // The box scrolls; its cursor runs down all of its rows.
  $("#waterfall-cursor").style.bottom = "auto";
  $("#waterfall-cursor").style.height = box.scrollHeight + "px";
}

function applyLevel(floor) {
  for (const li of $("#logs").children) li.hidden = Number(li.dataset.severity) < floor;
  for (const node of document.querySelectorAll("#timeline .mark.log")) node.hidden = Number(node.dataset.severity) < floor;
}

function renderLogs(logs) {
  const list = $("#logs");
  const python = logs.filter((l) => !["session report", "chat item", "evaluation", "tag", "outcome"].includes(l.body));
  for (const log of python) {
    const offset = log.time_unix_nano / 1e9 - origin;
    const severity = SEVERITY(log.severity_number);
    const li = el("li", { class: "sev-" + severity, "data-severity": String(log.severity_number) },
      el("span", { class: "when" }, fmtOffset(offset)),
      el("strong", {}, (log.severity_text || severity).toUpperCase()), " ",
      typeof log.body === "string" ? log.body : JSON.stringify(log.body),
      el("span", { class: "when" }, " " + (log.scope || "")));
    li.addEventListener("click", () => seek(offset));
    list.append(li);
    mark(offset, offset + 0.05, "log sev-" + severity, li, String(log.body)).dataset.severity = String(log.severity_number);
  }
  // The level is in the URL (?level=13), so a link shows the same logs.
  const level = new URLSearchParams(location.search).get("level");
  if (level && [...$("#level").options].some((o) => o.value === level)) $("#level").value = level;
  applyLevel(Number($("#level").value));
  $("#level").addEventListener("change", () => {
    const url = new URL(location.href);
    if ($("#level").value === "0") url.searchParams.delete("level"); else url.searchParams.set("level", $("#level").value);
    history.replaceState(null, "", url);
    applyLevel(Number($("#level").value));
  });
}

async function loadAudio(url) {
  // <audio src> cannot send the API key: the audio is fetched with it, then played
  // from memory (a Blob URL; the CSP allows blob: media only).
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw new Error("audio: " + response.statusText);
  player.src = URL.createObjectURL(await response.blob());
}

async function main() {
  $("#title").textContent = "Session " + callId;
  const [recording, logsBody, call] = await Promise.all([
    api("/api/v1/calls/" + encodeURIComponent(callId) + "/recording"),
    api("/api/v1/calls/" + encodeURIComponent(callId) + "/logs"),
    api("/api/v1/calls/" + encodeURIComponent(callId)),
  ]);
  if (call) {
    $("#call-link").href = "/#/calls/" + encodeURIComponent(callId);
    $("#call-link").hidden = false;
  }
  const logs = (logsBody && logsBody.logs) || [];
  if (!recording && !logs.length) { $("#status").textContent = "No recording or logs for this call."; return; }
  const summary = recording ? recording.session_summary : null;
  const history = recording ? recording.chat_history : null;
  const items = (history && history.items) || [];
  const startNs = recording ? recording.start_time_unix_nano : 0;
  origin = startNs ? startNs / 1e9 : (items.length ? items[0].created_at : logs.length ? logs[0].time_unix_nano / 1e9 : 0);
  length = Math.max(((recording && recording.duration_ms) || 0) / 1000, 1);
  for (const item of items) length = Math.max(length, (item.created_at || 0) - origin + 1);
  const facts = [
    ["room", recording ? recording.room_id : ""], ["job", recording ? recording.job_id : ""],
    ["agent", summary && summary.agent_name], ["duration", fmtSec(length)],
    ["close reason", summary && summary.close_reason], ["SDK", summary && summary.sdk_version],
  ];
  for (const [k, v] of facts) if (v) $("#summary").append(el("dt", {}, k), el("dd", {}, v));
  renderTranscript(history);
  renderEvaluations(logs, summary);
  renderLogs(logs);
  renderWaterfall(call);
  moveCursor(0);
  $("#timeline").addEventListener("click", (e) => {
    const box = $("#timeline").getBoundingClientRect();
    seek(length * (e.clientX - box.left) / box.width);
  });
  $("#session-waterfall").addEventListener("click", (e) => {
    const box = $("#session-waterfall").getBoundingClientRect();
    if (e.clientX >= box.left + LABEL_PX) seek(length * (e.clientX - box.left - LABEL_PX) / (box.width - LABEL_PX));
  });
  player.addEventListener("timeupdate", () => moveCursor(player.currentTime));
  player.addEventListener("seeked", () => moveCursor(player.currentTime));
  if (recording && recording.audio_url) await loadAudio(recording.audio_url);
  document.body.dataset.ready = "true";
}

main().catch((error) => { $("#status").textContent = String(error.message || error); });
