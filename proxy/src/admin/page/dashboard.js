// The Chorus dashboard: reads the admin API every REFRESH_MS with the token kept in this tab's
// session storage, and draws the backends, a join under way and the last minutes as charts.
"use strict";

const REFRESH_MS = 2000;
const KEY = "chorus-admin-token";
const PHASES = ["starting", "detaching", "dumping", "restoring", "replaying", "attaching", "verifying", "done"];
const $ = (id) => document.getElementById(id);
let samples = [];
let timer = null;

function token() { return sessionStorage.getItem(KEY); }

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) { logout("The token was refused."); throw new Error("unauthorized"); }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text }; }
  return { ok: r.ok, status: r.status, data };
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "kB", "MB", "GB", "TB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return (n / Math.pow(1024, i)).toFixed(i ? 1 : 0) + " " + u[i];
}

function duration(s) {
  s = Math.floor(s);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function showResult(id, ok, text) {
  const box = $(id);
  box.hidden = false;
  box.className = "result " + (ok ? "ok" : "bad");
  box.textContent = text;
}

function renderSummary(st) {
  const s = $("summary");
  s.replaceChildren(
    el("span", {}, "version ", el("b", { text: st.version })),
    el("span", {}, "up ", el("b", { text: duration(st.uptime_seconds) })),
    el("span", {}, "sessions ", el("b", { id: "sessions", text: String(st.sessions) })),
    el("span", {}, "in sync ", el("b", { id: "in-sync", text: st.in_sync + " of " + st.backends })),
  );
}

function renderBackends(list) {
  const body = $("backends").tBodies[0];
  body.replaceChildren(...list.map((b) => {
    const remove = el("button", { class: "danger", "data-remove": b.name, text: "Remove" });
    remove.disabled = b.state === "removed";
    remove.addEventListener("click", () => removeBackend(b.name));
    const row = el("tr", { "data-backend": b.name },
      el("td", {}, el("b", { text: b.name })),
      el("td", { text: b.address }),
      el("td", {}, el("span", { class: "state " + b.state, "data-state": b.state, text: b.state.replace("_", " ") })),
      el("td", { text: b.version || "" }),
      el("td", { text: String(b.inflight) }),
      el("td", { text: b.lag_bytes ? bytes(b.lag_bytes) : "" }),
      el("td", { class: "reason", title: b.reason || "", text: b.reason || "" }),
      el("td", {}, remove));
    return row;
  }));
}

// The group on etcd (GET /ha; 404 without [ha]: the card stays hidden).
function renderMembers(ha) {
  const card = $("members");
  if (!ha) { card.hidden = true; return; }
  card.hidden = false;
  const lease = ha.role === "leader" ? " · lease " + (ha.lease_left_ms / 1000).toFixed(1) + " s left" : "";
  $("members-title").textContent = "epoch " + ha.epoch + " · this page from " + ha.node + " (" + ha.role + ")" + lease;
  const body = $("members-table").tBodies[0];
  body.replaceChildren(...ha.members.map((m) => {
    const role = m.node === ha.leader ? "leader" : "standby";
    const cell = el("td", {});
    if (ha.role === "leader" && role === "standby") {
      const b = el("button", { "data-switchover": m.node, text: "Switch over to " + m.node });
      b.addEventListener("click", () => switchover(m.node));
      cell.append(b);
    }
    return el("tr", { "data-member": m.node },
      el("td", {}, el("b", { text: m.node })),
      el("td", {}, el("span", { class: "role " + role, "data-role": role, text: role })),
      el("td", { text: m.address }),
      el("td", { text: m.admin }),
      cell);
  }));
}

async function switchover(to) {
  if (!confirm("Hand the leadership to " + to + "? Open transactions finish; each session ends at a transaction boundary and its client reconnects to " + to + ".")) return;
  const r = await api("POST", "/switchover", { to });
  showResult("members-result", r.ok, r.ok
    ? "Switching over to " + to + ": open transactions get " + (r.data.timeout_ms / 1000) + " s; this member then stands by (open " + to + "'s dashboard)."
    : "Switchover refused: " + (r.data && r.data.error));
}

function renderJoin(j) {
  const card = $("join");
  if (!j) { card.hidden = true; return; }
  const p = j.progress;
  card.hidden = false;
  $("join-title").textContent = p.name + " from " + p.donor + " (" + p.method + ")" + (j.running ? "" : " — finished");
  const at = PHASES.indexOf(p.phase);
  const failed = p.phase === "failed";
  $("join-phases").replaceChildren(...PHASES.slice(0, -1).map((name, i) => {
    let cls = "";
    if (failed && i === Math.max(0, lastPhase)) cls = "failed";
    else if (p.phase === "done" || i < at) cls = "done";
    else if (i === at) cls = "current";
    return el("li", { class: cls, "data-phase": name, text: name });
  }));
  if (!failed && at >= 0) lastPhase = at;
  const pct = p.phase === "done" ? 100 : failed ? 100 : Math.round((Math.max(at, 0) / (PHASES.length - 1)) * 100);
  $("join-bar").style.width = pct + "%";
  $("join-bar").style.background = failed ? "var(--bad)" : "";
  const facts = [
    ["phase", p.phase], ["elapsed", (j.running ? Math.max(p.elapsed_seconds, Date.now() / 1000 - p.started_unix) : p.elapsed_seconds).toFixed(1) + " s"],
    ["dumped", bytes(p.bytes_dumped)], ["restored", bytes(p.bytes_restored)],
    ["units written since", String(p.log_units)], ["units applied", String(p.replayed_units)],
    ["lag", String(p.replay_lag_units) + " units"],
    ["detach pause", p.detach_pause_ms == null ? "–" : p.detach_pause_ms.toFixed(1) + " ms"],
    ["attach pause", p.attach_pause_ms == null ? "–" : p.attach_pause_ms.toFixed(1) + " ms"],
  ];
  if (p.error) facts.push(["error", p.error]);
  $("join-facts").replaceChildren(...facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { "data-fact": k, text: v }))));
}
let lastPhase = 0;

// A line chart of the last minutes on a canvas: series = [[key, colour]], values in ms or /s.
function chart(canvas, series) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const left = 48, bottom = 20, top = 8, right = 8;
  const pts = samples.slice(-300);
  let max = 0;
  for (const s of pts) for (const [k] of series) if (s[k] != null) max = Math.max(max, s[k]);
  max = max > 0 ? niceMax(max) : 1;
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = css.getPropertyValue("--muted");
  g.strokeStyle = css.getPropertyValue("--line");
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + ((h - top - bottom) * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
    const v = max * (1 - i / 4);
    g.fillText(v >= 100 ? v.toFixed(0) : v.toPrecision(2), 4, y + 4);
  }
  g.fillText("−5 min", left, h - 4);
  g.fillText("now", w - right - 22, h - 4);
  if (!pts.length) return;
  const now = pts[pts.length - 1].unix;
  const x = (t) => left + ((w - left - right) * (300 - (now - t))) / 300;
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  for (const [k, colour] of series) {
    g.strokeStyle = css.getPropertyValue(colour);
    g.lineWidth = 2;
    g.beginPath();
    let pen = false;
    for (const s of pts) {
      if (s[k] == null) { pen = false; continue; }
      if (pen) g.lineTo(x(s.unix), y(s[k])); else g.moveTo(x(s.unix), y(s[k]));
      pen = true;
    }
    g.stroke();
  }
}

function niceMax(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

async function refresh() {
  try {
    const since = samples.length ? samples[samples.length - 1].unix : 0;
    const [st, bk, se] = await Promise.all([api("GET", "/status"), api("GET", "/backends"), api("GET", "/series?since=" + since)]);
    if (st.ok) renderSummary(st.data);
    if (bk.ok) renderBackends(bk.data);
    // The group, for a member of one ([ha]); an instance alone has none to show.
    const ha = st.ok && st.data.ha_role ? await api("GET", "/ha") : null;
    renderMembers(ha && ha.ok ? ha.data : null);
    if (se.ok) {
      samples = samples.concat(se.data.samples).slice(-600);
      document.body.dataset.samples = String(samples.length);
      chart($("chart-rate"), [["requests", "--c1"], ["errors", "--c3"]]);
      chart($("chart-latency"), [["p50_ms", "--c1"], ["p99_ms", "--c2"]]);
    }
    if (st.ok) renderJoin(st.data.join ? { running: st.data.join_running, progress: st.data.join } : null);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " · every " + REFRESH_MS / 1000 + " s";
    document.body.dataset.refreshed = String(Date.now());
  } catch (e) {
    if (e.message !== "unauthorized") $("updated").textContent = "the admin API did not answer: " + e.message;
  }
}

async function removeBackend(name) {
  if (!confirm("Remove backend " + name + " from the cluster? It stops taking traffic and needs a join to come back.")) return;
  const r = await api("DELETE", "/backends/" + encodeURIComponent(name));
  showResult("action-result", r.ok, r.ok ? name + " was removed." : "Remove refused: " + (r.data && r.data.error));
  refresh();
}

async function verify() {
  const b = $("verify");
  b.disabled = true;
  showResult("verify-result", true, "Verifying: writes pause while the checksums are read…");
  try {
    const r = await api("POST", "/verify");
    if (!r.ok) showResult("verify-result", false, "Verify could not run: " + (r.data && r.data.error));
    else if (r.data.equal) showResult("verify-result", true, "Every table is equal on every in-sync backend (writes paused " + r.data.pause_ms.toFixed(1) + " ms).");
    else showResult("verify-result", false, "Tables differ: " + r.data.unequal.join(", ") + "\n" + r.data.report);
  } finally {
    b.disabled = false;
  }
}

function logout(why) {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  timer = null;
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("summary").replaceChildren();
  $("login-error").textContent = why || "";
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("token").value = "";
    const r = await fetch("/status", { headers: { Authorization: "Bearer " + token() } });
    if (r.ok) start(); else logout("The token was refused.");
  });
  $("logout").addEventListener("click", () => logout(""));
  $("verify").addEventListener("click", verify);
  if (token()) start(); else logout("");
});
