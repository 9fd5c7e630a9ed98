// onp-repair dashboard: plain JavaScript over the JSON API, no build step, no external code.
// The API key lives in localStorage and goes out only as "Authorization: Bearer" to this origin.
"use strict";

const KEY_NAME = "onp.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const $ = (sel) => document.querySelector(sel);

function apiKey() { return localStorage.getItem(KEY_NAME); }

class ApiError extends Error {
  constructor(status, detail, retryAfter) { super(detail); this.status = status; this.retryAfter = retryAfter; }
}

function toLogin() {
  const next = encodeURIComponent(location.pathname + location.search);
  location.href = "/login?next=" + next;
}

async function detailOf(resp) {
  try {
    const body = await resp.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => (d.loc || []).join(".") + ": " + d.msg).join("; ");
  } catch (e) { /* not JSON */ }
  return resp.status + " " + resp.statusText;
}

// fetch with the key; 401 sends the user to the login page, other errors throw ApiError(detail).
async function api(path, options = {}, key = apiKey()) {
  const headers = Object.assign({}, options.headers || {}, key ? { Authorization: "Bearer " + key } : {});
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401 && !options.noRedirect) { localStorage.removeItem(KEY_NAME); toLogin(); }
  if (!resp.ok) throw new ApiError(resp.status, await detailOf(resp), Number(resp.headers.get("Retry-After")) || 0);
  return resp;
}

function toast(text) {
  const el = $("#toast");
  el.textContent = text; el.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { el.hidden = true; }, 5000);
}

function pct(v) { return v === null || v === undefined ? "—" : (100 * v).toFixed(2) + "%"; }
function when(s) { return s ? new Date(s).toLocaleString() : "—"; }
function ago(s) {
  if (!s) return "—";
  const sec = Math.max(0, (Date.now() - new Date(s).getTime()) / 1000);
  if (sec < 60) return Math.round(sec) + " s ago";
  if (sec < 3600) return Math.round(sec / 60) + " min ago";
  if (sec < 86400) return Math.round(sec / 3600) + " h ago";
  return new Date(s).toLocaleDateString();
}
function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) { if (k === "class") e.className = v; else e[k] = v; }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function badge(status) { return el("span", { class: "badge " + status }, status); }
function pair(before, after) { return before === undefined || before === null ? pct(after) : pct(before) + " → " + pct(after); }

// Poll fn every `ms`, backing off on 429/503/network errors, until fn returns true.
function poll(fn, ms) {
  let delay = ms;
  const tick = async () => {
    let done = false;
    try { done = await fn(); delay = ms; } catch (e) {
      if (e instanceof ApiError && ![429, 502, 503, 504].includes(e.status)) { toast(e.message); }
      delay = Math.min(10000, Math.max(delay * 2, (e.retryAfter || 0) * 1000));
    }
    if (!done) setTimeout(tick, document.hidden ? Math.max(delay, 5000) : delay);
  };
  tick();
}

function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: filename });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}
function filenameOf(resp, fallback) {
  const m = /filename="?([^";]+)"?/.exec(resp.headers.get("Content-Disposition") || "");
  return m ? m[1] : fallback;
}
async function sha256Hex(blob) {
  if (!(window.crypto && crypto.subtle)) return null; // only in secure contexts (https, localhost)
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, "0")).join("");
}

// ------------------------------------------------------------------ pages

function setupHeader() {
  const key = apiKey();
  if (!key) return;
  $("#who").textContent = "key " + key.slice(0, 12) + "…";
  $("#who").hidden = false;
  const out = $("#logout");
  out.hidden = false;
  out.addEventListener("click", () => { localStorage.removeItem(KEY_NAME); location.href = "/login"; });
}

function loginPage() {
  if (apiKey()) $("#api-key").value = apiKey();
  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = $("#api-key").value.trim();
    const err = $("#login-error");
    err.hidden = true;
    try {
      await api("/v1/repairs?limit=1", { noRedirect: true }, key);
      localStorage.setItem(KEY_NAME, key);
      const next = new URLSearchParams(location.search).get("next");
      location.href = next && next.startsWith("/") && !next.startsWith("//") ? next : "/";
    } catch (e) {
      err.textContent = e.status === 401 ? "That key was not accepted: " + e.message : e.message;
      err.hidden = false;
    }
  });
}

function jobRow(j) {
  const after = (j.metrics && j.metrics.after) || {}, before = (j.metrics && j.metrics.before) || {};
  const bar = el("span", { class: "mini" }, el("span", { class: "bar" }, el("span")), Math.round(100 * j.progress) + "%");
  bar.querySelector(".bar span").style.width = (100 * j.progress) + "%";
  const link = el("a", { href: "/jobs/" + j.id, title: j.id }, el("code", {}, j.id.slice(0, 8)));
  const row = el("tr", { id: "job-" + j.id },
    el("td", {}, link), el("td", {}, badge(j.status)), el("td", {}, j.method),
    el("td", {}, bar, " ", el("span", { class: "muted" }, j.status === "running" ? j.phase : "")),
    el("td", { title: when(j.created_at) }, ago(j.created_at)),
    el("td", { class: "n" }, after.acc !== undefined && after.acc !== null ? pair(before.acc, after.acc) : "—"),
    el("td", { class: "n" }, after.asr !== undefined && after.asr !== null ? pair(before.asr, after.asr) : "—"));
  row.dataset.status = j.status;
  return row;
}

function indexPage() {
  if (!apiKey()) return toLogin();
  let limit = 25;
  const body = $("#jobs-body"), filter = $("#status-filter"), more = $("#more");
  const load = async () => {
    const qs = new URLSearchParams({ limit: String(limit) });
    if (filter.value) qs.set("status", filter.value);
    const page = await (await api("/v1/repairs?" + qs)).json();
    body.replaceChildren(...(page.items.length ? page.items.map(jobRow)
      : [el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "No repairs yet: start one on the left."))]));
    more.hidden = !page.next_cursor;
    return false; // keep polling: jobs change while the page is open
  };
  filter.addEventListener("change", load);
  more.addEventListener("click", () => { limit = Math.min(100, limit + 25); load(); });
  poll(load, 3000);

  const form = $("#submit-form");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const err = $("#submit-error");
    err.hidden = true;
    let methodOptions = {};
    const text = $("#f-options").value.trim();
    if (text) {
      try { methodOptions = JSON.parse(text); } catch (e) { err.textContent = "Method options are not JSON: " + e.message; err.hidden = false; return; }
    }
    const fd = new FormData();
    fd.append("model", $("#f-model").files[0]);
    fd.append("data", $("#f-data").files[0]);
    if ($("#f-manifest").files[0]) fd.append("manifest", $("#f-manifest").files[0]);
    if ($("#f-triggered").files[0]) fd.append("triggered", $("#f-triggered").files[0]);
    if ($("#f-target").value !== "") fd.append("target", $("#f-target").value);
    fd.append("options", JSON.stringify({ method: $("#f-method").value, device: $("#f-device").value,
      seed: Number($("#f-seed").value || 0), options: methodOptions }));
    upload(fd, err);
  });
}

// XMLHttpRequest rather than fetch: it reports upload progress, which matters for large models.
function upload(fd, err) {
  const box = $("#upload-progress"), button = $("#submit-button");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/repairs");
  xhr.setRequestHeader("Authorization", "Bearer " + apiKey());
  xhr.setRequestHeader("Idempotency-Key", "dashboard-" + Date.now() + "-" + Math.random().toString(16).slice(2));
  box.hidden = false; button.disabled = true;
  xhr.upload.onprogress = (e) => {
    if (!e.lengthComputable) return;
    box.querySelector(".bar span").style.width = (100 * e.loaded / e.total) + "%";
    box.querySelector("small").textContent = "uploading " + Math.round(100 * e.loaded / e.total) + "%";
  };
  xhr.upload.onload = () => { box.querySelector("small").textContent = "validating the model and data…"; };
  xhr.onerror = () => { button.disabled = false; box.hidden = true; err.textContent = "Network error while uploading."; err.hidden = false; };
  xhr.onload = () => {
    button.disabled = false; box.hidden = true;
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status === 401) { localStorage.removeItem(KEY_NAME); return toLogin(); }
    if (xhr.status >= 400) {
      const d = body.detail;
      err.textContent = "Rejected (" + xhr.status + "): " + (typeof d === "string" ? d : JSON.stringify(d || xhr.statusText));
      err.hidden = false;
      return;
    }
    location.href = "/jobs/" + body.id;
  };
  xhr.send(fd);
}

function jobPage() {
  if (!apiKey()) return toLogin();
  const id = document.body.dataset.jobId;
  let after = 0, reportShown = false, current = null;

  const renderJob = (j) => {
    current = j;
    document.title = j.method + " " + j.id.slice(0, 8) + " · onp-repair";
    $("#j-method").textContent = j.method + " repair";
    const st = $("#j-status");
    st.className = "badge " + j.status; st.textContent = j.status + (j.cancel_requested && !TERMINAL.includes(j.status) ? " (cancelling)" : "");
    $("#j-bar").style.width = (100 * j.progress) + "%";
    $("#j-pct").textContent = Math.round(100 * j.progress) + "%";
    $("#j-phase").textContent = j.phase;
    let eta = "";
    if (j.status === "running" && j.started_at && j.progress > 0.02) {
      const el_ = (Date.now() - new Date(j.started_at).getTime()) / 1000;
      eta = "· about " + Math.max(1, Math.round(el_ * (1 - j.progress) / j.progress)) + " s left";
    }
    $("#j-eta").textContent = eta;
    $("#j-created").textContent = when(j.created_at);
    $("#j-started").textContent = when(j.started_at);
    $("#j-finished").textContent = when(j.finished_at);
    $("#j-format").textContent = j.model_format;
    $("#j-device").textContent = (j.options && j.options.device) || "cpu";
    $("#j-attempts").textContent = j.attempts;
    const err = $("#j-error");
    err.hidden = !j.error; err.textContent = j.error || "";
    $("#cancel").hidden = TERMINAL.includes(j.status);
    const m = j.metrics || {};
    if (m.before || m.after) {
      $("#metrics-card").hidden = false;
      for (const w of ["before", "after"]) for (const k of ["acc", "asr", "ra"]) $("#m-" + w + "-" + k).textContent = pct((m[w] || {})[k]);
      const bits = [];
      if (m.der !== null && m.der !== undefined) bits.push("DER " + pct(m.der));
      if (m.num_pruned !== null && m.num_pruned !== undefined) bits.push(m.num_pruned + " neurons pruned");
      if (m.seconds) bits.push(m.seconds.toFixed(1) + " s of repair");
      if (m.before && m.before.asr === null) bits.push("ASR needs a triggered set and target");
      for (const w of m.warnings || []) bits.push("⚠ " + w);
      $("#m-summary").textContent = bits.join(" · ");
    }
    if (j.status === "succeeded" && !reportShown) { reportShown = true; showResults(j); }
  };

  const loadEvents = async () => {
    const page = await (await api("/v1/repairs/" + id + "/events?after=" + after)).json();
    const list = $("#events");
    for (const e of page.items) {
      const t = new Date(e.at).toLocaleTimeString();
      list.append(el("li", {}, el("time", {}, t), el("b", {}, e.phase), el("span", {}, e.message || "")));
    }
    if (page.items.length) list.scrollTop = list.scrollHeight;
    after = page.next_after || after;
  };

  // Fetch the job, then its events, and only then render both: the events are read after the
  // job, so a terminal badge never shows before the event that made it terminal is listed.
  poll(async () => {
    const j = await (await api("/v1/repairs/" + id)).json();
    await loadEvents();
    renderJob(j);
    return TERMINAL.includes(j.status);
  }, 1000);

  $("#cancel").addEventListener("click", async () => {
    if (!confirm("Cancel this repair?")) return;
    try { renderJob(await (await api("/v1/repairs/" + id + "/cancel", { method: "POST" })).json()); toast("Cancel requested."); }
    catch (e) { toast(e.message); }
  });
}

async function showResults(j) {
  const note = $("#download-note");
  for (const b of ["#download-model", "#open-report", "#download-report", "#download-json"]) $(b).hidden = false;
  $("#download-model").addEventListener("click", async () => {
    note.textContent = "downloading…";
    try {
      const resp = await api(j.links.model);
      const blob = await resp.blob();
      const expected = resp.headers.get("X-Checksum-SHA256");
      const got = await sha256Hex(blob);
      if (got && expected && got !== expected) { note.textContent = "checksum mismatch: download corrupt, try again"; return; }
      saveBlob(blob, filenameOf(resp, "repaired-" + j.id));
      note.textContent = got ? "sha256 verified " + got.slice(0, 12) + "…" : "saved (checksum not verified: needs https)";
    } catch (e) { note.textContent = e.message; }
  });
  const reportHtml = async () => (await api("/v1/repairs/" + j.id + "/report.html")).text();
  $("#open-report").addEventListener("click", async () => {
    const url = URL.createObjectURL(new Blob([await reportHtml()], { type: "text/html" }));
    window.open(url, "_blank", "noopener");
  });
  $("#download-report").addEventListener("click", async () => {
    saveBlob(new Blob([await reportHtml()], { type: "text/html" }), "report-" + j.id + ".html");
  });
  $("#download-json").addEventListener("click", async () => {
    saveBlob(await (await api(j.links.report)).blob(), "report-" + j.id + ".json");
  });
  try {
    const frame = $("#report-frame");
    frame.addEventListener("load", () => {
      try { frame.style.height = (frame.contentDocument.documentElement.scrollHeight + 20) + "px"; } catch (e) { /* sandboxed */ }
    });
    frame.srcdoc = await reportHtml();
    $("#report-card").hidden = false;
  } catch (e) { toast("Report: " + e.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  setupHeader();
  const page = document.body.dataset.page;
  if (page === "login") loginPage();
  else if (page === "index") indexPage();
  else if (page === "job") jobPage();
});
