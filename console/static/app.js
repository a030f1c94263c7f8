// Flynn operator console: plain JS module, no build step, no external assets.
// Every value from the server is put into the page as text (never as HTML).

const FEED_MAX = 300;
let ME = null;
let active = null; // {name, cleanup: []}

const $ = (sel, root = document) => root.querySelector(sel);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function say(msg, isError = false) {
  const st = $("#status");
  st.textContent = msg;
  st.className = isError ? "error" : "";
}

function toSignin() { window.location.assign("/signin"); }

async function api(path, opts = {}) {
  const init = { credentials: "same-origin", headers: {} };
  if (opts.body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-Flynn-CSRF"] = ME ? ME.csrf : "";
    init.body = JSON.stringify(opts.body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) { toSignin(); throw new Error("signed out"); }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const e = data.error || { code: String(resp.status), message: resp.statusText };
    const v = (e.violations || []).map((x) => `${x.field}: ${x.description}`).join("; ");
    throw new Error(`${e.code}: ${e.message}${v ? " (" + v + ")" : ""}`);
  }
  return data;
}

function stream(path, event, onData) {
  const es = new EventSource(path);
  es.addEventListener(event, (e) => onData(JSON.parse(e.data)));
  es.addEventListener("error", (e) => {
    if (e.data) {
      const err = JSON.parse(e.data);
      say(`${err.code}: ${err.message}`, true);
      if (err.code === "UNAUTHENTICATED") { es.close(); toSignin(); }
    }
  });
  active.cleanup.push(() => es.close());
  return es;
}

function table(id, caption, headers, rows) {
  return h("table", { id },
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col", class: x.num ? "num" : null }, x.label || x)))),
    h("tbody", {}, rows));
}

function pager(state, reload) {
  const prev = h("button", { type: "button", class: "secondary", disabled: state.stack.length === 0 ? true : null,
    onclick: () => { state.token = state.stack.pop() || ""; reload(); } }, "Previous page");
  const next = h("button", { type: "button", class: "secondary", disabled: state.next ? null : true,
    onclick: () => { state.stack.push(state.token); state.token = state.next; reload(); } }, "Next page");
  return h("div", { class: "pager" }, prev, next, h("span", { class: "muted" }, `page ${state.stack.length + 1}`));
}

const fmtTime = (t) => (t ? t.replace("T", " ").replace(/\.\d+Z$/, "Z") : "");
const pct = (x) => `${(x * 100).toFixed(2)} %`;

// ---------------------------------------------------------------------------------------- Runs

function runsView(main) {
  const paging = { token: "", next: "", stack: [] };
  const feed = h("ul", { id: "run-feed", class: "feed", "aria-label": "Run events, newest first", "aria-live": "off" });
  const sessionsBox = h("div", { id: "sessions-box" });
  const detail = h("section", { id: "run-detail", "aria-label": "Run timeline" });
  const stateSel = h("select", { id: "sessions-state" },
    ["", "started", "queued", "cancel_requested", "completed", "cancelled", "error"].map((s) => h("option", { value: s }, s || "any state")));
  main.append(
    h("h1", {}, "Runs"),
    h("section", {}, h("h2", {}, "Sessions"),
      h("div", { class: "row" }, h("label", { for: "sessions-state" }, "Runs in state"), stateSel),
      sessionsBox),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Live run events"), feed),
      detail));

  async function cancel(body, label) {
    try {
      const r = await api("/api/cancel", { body });
      say(`${label}: ${r.outcome.toLowerCase()}${r.dropped_messages ? `, ${r.dropped_messages} queued dropped` : ""}`);
    } catch (e) { say(String(e.message), true); }
  }

  function renderSessions(data) {
    paging.next = data.next_page_token || "";
    const rows = data.sessions.map((s) => h("tr", { dataset: { session: s.session_key } },
      h("td", {}, h("code", {}, s.session_key)),
      h("td", {}, s.channel || ""),
      h("td", {}, s.active_run_id ? h("a", { href: `#/runs/${encodeURIComponent(s.active_run_id)}` }, s.active_run_id) : h("span", { class: "muted" }, "none")),
      h("td", { class: "run-state" }, (s.active_run_state || "").toLowerCase()),
      h("td", { class: "num" }, s.queue_depth ?? ""),
      h("td", {}, `${(s.mode || "").toLowerCase()} (${(s.mode_source || "").toLowerCase()}${s.mode_revision ? ", r" + s.mode_revision : ""})`),
      h("td", {},
        h("button", { type: "button", class: "danger", disabled: s.active_run_id ? null : true,
          "aria-label": `Cancel run ${s.active_run_id || ""} of ${s.session_key}`,
          onclick: () => cancel({ run_id: s.active_run_id, scope: "run" }, `cancel ${s.active_run_id}`) }, "Cancel run"),
        " ",
        h("button", { type: "button", class: "secondary", "aria-label": `Cancel ${s.session_key} and its queue`,
          onclick: () => cancel({ session_key: s.session_key, scope: "session_and_queue" }, `cancel ${s.session_key} + queue`) }, "Cancel session + queue"))));
    sessionsBox.replaceChildren(
      table("sessions-table", "Sessions on this page of runs (newest first)",
        ["Session", "Channel", "Active run", "State", { label: "Queue", num: true }, "Mode (source)", "Actions"], rows),
      pager(paging, reloadSessions));
  }

  let sessionsStream = null;
  function reloadSessions() {
    if (sessionsStream) sessionsStream.close();
    const q = new URLSearchParams({ page_token: paging.token, state: stateSel.value, page_size: "25" });
    sessionsStream = stream(`/api/stream/poll/sessions?${q}`, "sessions", renderSessions);
  }
  stateSel.addEventListener("change", () => { paging.token = ""; paging.stack = []; reloadSessions(); });
  reloadSessions();

  stream("/api/stream/runs", "runs", (batch) => {
    // Newest first; one DOM insertion per batch, at most FEED_MAX rows kept.
    const items = batch.items.slice(-FEED_MAX);
    const frag = document.createDocumentFragment();
    for (let i = items.length - 1; i >= 0; i--) {
      const ev = items[i];
      const text = ev.type === "RUN_OUTPUT" ? ` “${ev.text.slice(0, 60)}”` : ev.reason ? ` (${ev.reason})` : "";
      frag.append(h("li", { dataset: { runId: ev.run_id, type: ev.type, seq: ev.global_seq } },
        h("span", { class: "muted" }, `#${ev.global_seq} ${fmtTime(ev.time)} `),
        h("strong", {}, ev.type.toLowerCase()), " ",
        ev.run_id ? h("a", { href: `#/runs/${encodeURIComponent(ev.run_id)}` }, ev.run_id) : "",
        ` ${ev.session_key}${text}`));
    }
    feed.prepend(frag);
    while (feed.childElementCount > FEED_MAX) feed.lastElementChild.remove();
  });

  const runId = decodeURIComponent((location.hash.split("/")[2] || ""));
  if (runId) showRun(runId, detail, cancel);
  else detail.append(h("h2", {}, "Run timeline"), h("p", { class: "muted" }, "Choose a run to see its timeline."));
}

async function showRun(runId, detail, cancel) {
  detail.replaceChildren(h("h2", {}, `Run ${runId}`), h("p", {}, "Loading…"));
  async function load() {
    const { run, timeline } = await api(`/api/runs/${encodeURIComponent(runId)}`);
    const terminal = ["COMPLETED", "CANCELLED", "ERROR"].includes(run.state);
    detail.replaceChildren(
      h("h2", {}, `Run ${run.run_id}`),
      h("p", {}, "State: ", h("strong", { id: "run-state" }, run.state.toLowerCase()), ` · session ${run.session_key} · mode ${run.mode.toLowerCase()}`),
      h("button", { type: "button", class: "danger", id: "run-cancel", disabled: terminal ? true : null,
        onclick: async () => { await cancel({ run_id: run.run_id, scope: "run", reason: "operator stop" }, `cancel ${run.run_id}`); load(); } }, "Cancel this run"),
      table("run-timeline", "Timeline", ["Seq", "Time", "Event", "Detail"],
        timeline.map((ev) => h("tr", {}, h("td", { class: "num" }, ev.global_seq), h("td", {}, fmtTime(ev.time)),
          h("td", {}, ev.type.toLowerCase()), h("td", {}, ev.reason || ev.error_kind || ev.text.slice(0, 80))))),
      h("h2", {}, "Output"), h("pre", { id: "run-output" }, run.output || ""));
    return terminal;
  }
  try {
    let done = await load();
    const timer = setInterval(async () => { if (!done) { try { done = await load(); } catch (e) { say(e.message, true); } } }, 1000);
    active.cleanup.push(() => clearInterval(timer));
  } catch (e) { detail.replaceChildren(h("p", { class: "error" }, e.message)); }
}

// ---------------------------------------------------------------------------------------- Gates

function gatesView(main) {
  const cfgBox = h("div", { id: "config-box" });
  const watchersBox = h("div", { id: "watchers-box" });
  const historyBox = h("div", { id: "history-box" });
  const diffBox = h("div", { id: "gate-diff", "aria-live": "polite" });
  const key = h("input", { id: "gate-key", name: "key", required: true, size: 40, placeholder: "server.queue.mode" });
  const value = h("input", { id: "gate-value", name: "value", required: true, size: 30, placeholder: "followup" });
  const reason = h("input", { id: "gate-reason", name: "reason", size: 40, placeholder: "why (required to apply)" });
  let head = 0;
  const histPaging = { token: "", next: "", stack: [] };
  const form = h("form", { id: "gate-form", onsubmit: (e) => { e.preventDefault(); preview(); } },
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "gate-key" }, "Dotted key"), key),
      h("div", { class: "field" }, h("label", { for: "gate-value" }, "New value (YAML)"), value),
      h("div", { class: "field" }, h("label", { for: "gate-reason" }, "Reason"), reason),
      h("button", { type: "submit", id: "gate-preview" }, "Preview diff"),
      h("button", { type: "button", id: "gate-apply", class: "danger", onclick: () => apply() }, "Apply")));
  main.append(h("h1", {}, "Gates"),
    h("section", {}, h("h2", {}, "Edit a gate"), form, diffBox),
    h("section", {}, h("h2", {}, "Which revision each service runs"), watchersBox),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Effective config"), cfgBox),
      h("section", {}, h("h2", {}, "History"), historyBox)));

  function diffTable(diff) {
    if (!diff.length) return h("p", {}, "No change.");
    return table("diff-table", "Diff", ["Path", "Old", "New"], diff.map((d) => h("tr", {},
      h("td", {}, h("code", {}, d.path)), h("td", { class: "diff-old" }, d.old_value || "(unset)"), h("td", { class: "diff-new" }, d.new_value || "(unset)"))));
  }
  async function preview() {
    try {
      const r = await api("/api/config/preview", { body: { key: key.value, value: value.value, reason: reason.value, expected_revision: head } });
      diffBox.replaceChildren(h("p", {}, `Dry run against revision ${r.expected_revision}:`), diffTable(r.diff));
    } catch (e) { diffBox.replaceChildren(h("p", { class: "error", role: "alert" }, e.message)); }
  }
  async function apply() {
    if (!reason.value.trim()) { diffBox.replaceChildren(h("p", { class: "error", role: "alert" }, "A reason is required to apply.")); reason.focus(); return; }
    try {
      const r = await api("/api/config/apply", { body: { key: key.value, value: value.value, reason: reason.value, expected_revision: head } });
      if (!r.unchanged) head = r.revision;
      diffBox.replaceChildren(h("p", { id: "gate-applied" }, r.unchanged ? "Unchanged." : `Committed revision ${r.revision}.`), diffTable(r.diff));
      say(`Committed revision ${r.revision}`);
      refresh();
    } catch (e) { diffBox.replaceChildren(h("p", { class: "error", role: "alert" }, e.message)); }
  }
  async function rollback(rev) {
    const why = window.prompt(`Reason for rolling back to revision ${rev}?`, `roll back to revision ${rev}`);
    if (why === null) return;
    try {
      const r = await api("/api/config/rollback", { body: { to_revision: rev, reason: why } });
      say(r.unchanged ? "Rollback changed nothing." : `Rolled back: revision ${r.revision} restores ${rev}.`);
      refresh();
    } catch (e) { say(e.message, true); }
  }
  async function loadConfig() {
    const c = await api("/api/config");
    head = c.revision;
    cfgBox.replaceChildren(
      h("p", {}, "Head revision ", h("strong", { id: "config-revision" }, String(c.revision))),
      table("gates-overview", "Gates, overrides and rollouts", ["Gate", "Value", "Overrides", "Rollout"],
        c.gates.map((g) => h("tr", { dataset: { key: g.key } }, h("td", {}, h("code", {}, g.key)), h("td", { class: "gate-value" }, g.value),
          h("td", {}, g.overrides.join("; ")), h("td", {}, g.rollout)))),
      h("details", {}, h("summary", {}, "Every set key"),
        table("config-flat", "Effective config", ["Key", "Value"], c.flat.map((f) => h("tr", {}, h("td", {}, h("code", {}, f.key)), h("td", {}, f.value))))));
  }
  async function loadHistory() {
    const hdata = await api(`/api/config/history?page_token=${encodeURIComponent(histPaging.token)}`);
    histPaging.next = hdata.next_page_token || "";
    // The newest revision on the first page is the head, whatever order the other reads finished in.
    const headRev = histPaging.stack.length === 0 && hdata.revisions.length ? Number(hdata.revisions[0].revision) : head;
    historyBox.replaceChildren(
      table("history-table", "Revisions (newest first)", ["Rev", "Kind", "Actor", "Reason", "Changes", ""],
        hdata.revisions.map((r) => h("tr", { dataset: { revision: r.revision } },
          h("td", { class: "num" }, r.revision), h("td", {}, r.kind.toLowerCase()), h("td", {}, r.actor || ""),
          h("td", {}, r.reason || ""), h("td", {}, (r.diff || []).map((d) => `${d.path}: ${d.old_value || "∅"} → ${d.new_value || "∅"}`).join("; ")),
          h("td", {}, Number(r.revision) === headRev ? h("span", { class: "muted" }, "head") :
            h("button", { type: "button", class: "secondary", "aria-label": `Roll back to revision ${r.revision}`, dataset: { rollback: r.revision },
              onclick: () => rollback(Number(r.revision)) }, "Roll back to this"))))),
      pager(histPaging, loadHistory));
  }
  function renderWatchers(w) {
    watchersBox.replaceChildren(
      h("p", {}, `Head revision ${w.head_revision}. Stale = not connected or behind the head.`),
      table("watchers-table", "Config watchers", ["Service", "Instance", "Applied", "Connected", "Last NACK", "Last seen", ""],
        w.watchers.map((x) => h("tr", { dataset: { service: x.service, applied: x.applied_revision } },
          h("td", {}, x.service), h("td", {}, x.instance_id), h("td", { class: "num" }, x.applied_revision),
          h("td", {}, x.connected ? "yes" : "no"), h("td", {}, x.last_nack_reason ? `r${x.last_nack_revision}: ${x.last_nack_reason}` : ""),
          h("td", {}, fmtTime(x.last_seen_time)), h("td", { class: x.stale ? "stale" : "pass" }, x.stale ? "stale" : "current")))));
    if (w.head_revision !== head) { head = w.head_revision; loadConfig().catch((e) => say(e.message, true)); loadHistory().catch(() => {}); }
  }
  function refresh() { loadConfig().catch((e) => say(e.message, true)); loadHistory().catch((e) => say(e.message, true)); }
  refresh();
  stream("/api/stream/poll/config", "config", renderWatchers);
}

// ---------------------------------------------------------------------------------------- Replicas

function replicasView(main) {
  const box = h("div", { id: "replicas-box" });
  main.append(h("h1", {}, "Replicas"),
    h("p", { class: "muted" }, "Every replica of the stateful services as it recorded itself in its database (heartbeat every lease/3). " +
      "A replica silent for longer than its bound (its lease) is shown as gone; without a database each service is one process."),
    box);
  const secs = (x) => `${Number(x || 0).toFixed(1)} s`;
  function render(data) {
    box.replaceChildren(...data.services.map((s) => {
      const live = s.replicas.filter((r) => r.state !== "gone").length;
      return h("section", { dataset: { service: s.service } },
        h("h2", {}, `${s.service}: ${live} live of ${s.replicas.length}`),
        s.replicas_detail ? h("p", { class: "error" }, s.replicas_detail) : null,
        table(`replicas-${s.service}`, `Replicas of ${s.service} (service health ${s.health.toLowerCase()})`,
          ["Replica", "Address", "State", "Started", { label: "Last heartbeat", num: true }, "Database", "Lease", "Holds", "Detail"],
          s.replicas.map((r) => h("tr", { dataset: { replica: r.replica_id, state: r.state } },
            h("td", {}, h("code", {}, r.replica_id)), h("td", {}, r.address),
            h("td", { class: r.state === "ready" ? "pass" : r.state === "gone" ? "fail" : "stale" }, r.state.replace("_", " ")),
            h("td", {}, fmtTime(r.start_time)),
            h("td", { class: "num", title: `gone after ${secs(r.gone_after_seconds)}` }, `${secs(r.heartbeat_age_seconds)} ago`),
            h("td", {}, r.database_reachable ? "reachable" : "unreachable"), h("td", {}, r.lease_held ? "held" : "lost"),
            h("td", {}, Object.entries(r.holdings).map(([k, v]) => `${k.replace(/_/g, " ")}: ${v}`).join(", ")),
            h("td", {}, r.detail)))));
    }));
  }
  stream("/api/stream/poll/replicas", "replicas", render);
}

// ---------------------------------------------------------------------------------------- Rollout

function sparkline(points) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "trend"); svg.setAttribute("viewBox", "0 0 160 36"); svg.setAttribute("role", "img");
  if (!points || points.length < 2) { svg.setAttribute("aria-label", "not enough samples yet"); return svg; }
  const ys = points.map((p) => p[1]); const lo = Math.min(...ys); const hi = Math.max(...ys);
  const t0 = points[0][0]; const t1 = points[points.length - 1][0] || t0 + 1;
  const pl = document.createElementNS(ns, "polyline");
  pl.setAttribute("points", points.map(([t, y]) => `${(((t - t0) / (t1 - t0 || 1)) * 156 + 2).toFixed(1)},${(hi === lo ? 18 : 34 - ((y - lo) / (hi - lo)) * 32).toFixed(1)}`).join(" "));
  svg.append(pl);
  svg.setAttribute("aria-label", `trend of ${points.length} samples from ${lo.toFixed(3)} to ${hi.toFixed(3)}`);
  return svg;
}

function rolloutView(main) {
  const box = h("div", { id: "rollout-box" });
  const snap = async (label) => { try { await api("/api/rollout/snapshot", { body: { label } }); say(`Snapshot “${label}” taken.`); } catch (e) { say(e.message, true); } };
  main.append(h("h1", {}, "Rollout gates"),
    h("div", { class: "row" },
      h("button", { type: "button", id: "snap-before", onclick: () => snap("before") }, "Take “before” snapshot"),
      h("button", { type: "button", id: "snap-after", onclick: () => snap("after") }, "Take “after” snapshot")),
    box);
  stream("/api/stream/poll/rollout", "rollout", (d) => {
    if (!d.available) {
      box.replaceChildren(h("div", { class: "notice", id: "rollout-unavailable", role: "note" },
        h("strong", {}, "Not available yet. "),
        "The gateway does not serve System.GetMetrics yet, so the playbook gates cannot be judged here. ",
        h("span", { class: "muted" }, d.detail || "")));
      return;
    }
    const result = (g) => h("td", { class: g.no_observations ? "no_data" : g.status, title: g.inconclusive ? `below the minimum sample of ${g.min_sample}` : "" },
      g.status + (g.no_observations ? " (nothing to measure)" : g.inconclusive ? ` (${g.sample ?? 0} of ${g.min_sample} needed)` : ""));
    const rows = d.gates.map((g) => h("tr", { dataset: { gate: g.gate } },
      h("td", {}, g.title), h("td", {}, g.display), h("td", {}, g.threshold), result(g), h("td", {}, sparkline(d.trend[g.gate]))));
    const snaps = Object.entries(d.snapshots).map(([k, v]) => `${k}: ${fmtTime(v.taken)}`).join(" · ");
    const parts = [table("gates-table", "Playbook gates since each service started (as `flynn gates check --window 0` judges them; inconclusive = below the gate's minimum sample)", ["Gate", "Measured", "Threshold", "Result", "Trend"], rows), h("h2", {}, "Snapshots")];
    if (d.comparison.length) {
      parts.push(h("p", {}, snaps),
        table("snapshot-compare", "Before / after", ["Gate", "Before", "After", "Changed"],
          d.comparison.map((c) => h("tr", { dataset: { gate: c.gate } }, h("td", {}, c.title), h("td", { class: c.before_status }, c.before), h("td", { class: c.after_status }, c.after), h("td", {}, c.changed ? "yes" : "no")))),
        table("snapshot-window", `Gates over the window from “before” to ${d.snapshots.after ? "“after”" : "now"} (as \`flynn gates compare\` judges them)`, ["Gate", "Measured", "Threshold", "Result"],
          d.window.map((g) => h("tr", { dataset: { gate: g.gate } }, h("td", {}, g.title), h("td", {}, g.display), h("td", {}, g.threshold), result(g)))));
    } else {
      parts.push(h("p", { class: "muted" }, "Take a “before” snapshot to compare."));
    }
    box.replaceChildren(...parts);
  });
}

// ---------------------------------------------------------------------------------------- Reactions

function reactionsView(main) {
  const statsBox = h("div", { id: "stats-box" });
  const tracesBox = h("div", { id: "traces-box" });
  const rule = h("input", { id: "trace-rule", name: "rule_id" });
  const ev = h("input", { id: "trace-event", name: "event_id" });
  const matched = h("select", { id: "trace-matched" }, h("option", { value: "" }, "any"), h("option", { value: "true" }, "matched"), h("option", { value: "false" }, "skipped"));
  const form = h("form", { id: "traces-form", onsubmit: (e) => { e.preventDefault(); loadTraces(); } },
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "trace-rule" }, "Rule id"), rule),
      h("div", { class: "field" }, h("label", { for: "trace-event" }, "Event id"), ev),
      h("div", { class: "field" }, h("label", { for: "trace-matched" }, "Outcome"), matched),
      h("button", { type: "submit" }, "Why (not)?")));
  main.append(h("h1", {}, "Reactions"), h("section", {}, h("h2", {}, "Matches and skips by rule"), statsBox),
    h("section", {}, h("h2", {}, "Why didn’t rule X fire for event Y"), form, tracesBox));
  const reasons = ["SCOPE", "CONDITION", "COOLDOWN", "MAX_FIRES", "RECURSION_GUARD", "DISABLED", "ROLLOUT", "EXCLUSIVE", "ERROR"];
  stream("/api/stream/poll/reactions", "reactions", (d) => {
    const row = (r, total) => h("tr", { dataset: { rule: r.rule_id } }, h("td", {}, total ? h("strong", {}, "all rules") : h("code", {}, r.rule_id)),
      h("td", { class: "num" }, r.matches), reasons.map((x) => h("td", { class: "num" }, r.skips[x] || 0)),
      h("td", { class: "num" }, r.false_positives), h("td", { class: `num ${r.false_positive_rate > 0.03 ? "fail" : ""}` }, pct(r.false_positive_rate || 0)));
    statsBox.replaceChildren(table("rule-stats", "Rule statistics", ["Rule", { label: "Matches", num: true }, ...reasons.map((x) => ({ label: x.toLowerCase().replace("_", " "), num: true })), { label: "FP", num: true }, { label: "FP rate", num: true }],
      [...d.rules.map((r) => row(r, false)), row(d.total, true)]));
  });
  async function loadTraces() {
    try {
      const q = new URLSearchParams({ rule_id: rule.value, event_id: ev.value, matched: matched.value, page_size: "50" });
      const d = await api(`/api/reactions/traces?${q}`);
      tracesBox.replaceChildren(table("traces-table", "Traces (newest first)", ["Time", "Event", "Type", "Rule", "Outcome", "Detail", ""],
        d.traces.map((t) => h("tr", {}, h("td", {}, fmtTime(t.time)), h("td", {}, h("code", {}, t.event_id)), h("td", {}, t.event_type.toLowerCase()),
          h("td", {}, t.rule_id), h("td", { class: t.matched ? "pass" : "muted" }, t.matched ? "fired" : `skipped: ${t.skip_reason.toLowerCase()}`), h("td", {}, t.detail || ""),
          h("td", {}, !t.matched ? "" : t.false_positive ? h("span", { class: "fail" }, "false positive") :
            h("button", { type: "button", class: "secondary", dataset: { flag: t.trace_id }, "aria-label": `Flag match ${t.trace_id} of ${t.rule_id} as a false positive`,
              onclick: async () => {
                const why = window.prompt("Why was this match wrong?", "wrong match");
                if (why === null) return;
                try { await api("/api/reactions/flag", { body: { match_id: t.trace_id, reason: why } }); say(`Flagged ${t.trace_id} as a false positive.`); loadTraces(); } catch (e) { say(e.message, true); }
              } }, "Flag false positive"))))));
    } catch (e) { tracesBox.replaceChildren(h("p", { class: "error" }, e.message)); }
  }
  loadTraces();
}

// ---------------------------------------------------------------------------------------- Nodes & canvas

function readFileB64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",", 2)[1] || "");
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function nodesView(main) {
  const nodesBox = h("div", { id: "nodes-box" });
  const eventsFeed = h("ul", { id: "node-feed", class: "feed", "aria-label": "Node events, newest first" });
  const canvasBox = h("div", { id: "canvas-box" });
  const viewBox = h("section", { id: "artifact-view", "aria-label": "Artifact" });
  const nodePaging = { token: "", next: "", stack: [] };
  const canvasPaging = { token: "", next: "", stack: [] };
  const statusSel = h("select", { id: "nodes-status" }, h("option", { value: "" }, "all"), h("option", { value: "online" }, "online"), h("option", { value: "offline" }, "offline"));
  const name = h("input", { id: "canvas-name", name: "name", required: true, placeholder: "notes/today.md" });
  const ctype = h("input", { id: "canvas-type", name: "content_type", placeholder: "from the file" });
  const file = h("input", { id: "canvas-file", name: "file", type: "file", required: true });
  const prefix = h("input", { id: "canvas-prefix", name: "prefix" });
  const upload = h("form", { id: "canvas-upload", onsubmit: async (e) => {
    e.preventDefault();
    const f = file.files[0]; if (!f) return;
    try {
      const a = await api("/api/canvas/put", { body: { name: name.value, content_type: ctype.value || f.type || "application/octet-stream", content_b64: await readFileB64(f) } });
      say(`Stored ${a.name} version ${a.version}.`); loadCanvas(); showArtifact(a.name, 0);
    } catch (err) { say(err.message, true); }
  } },
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "canvas-name" }, "Artifact name"), name),
      h("div", { class: "field" }, h("label", { for: "canvas-type" }, "Content type"), ctype),
      h("div", { class: "field" }, h("label", { for: "canvas-file" }, "File"), file),
      h("button", { type: "submit", id: "canvas-submit" }, "Upload")));
  main.append(h("h1", {}, "Nodes and canvas"),
    h("section", {}, h("h2", {}, "Nodes"), h("div", { class: "row" }, h("label", { for: "nodes-status" }, "Status"), statusSel), nodesBox),
    h("section", {}, h("h2", {}, "Node events"), eventsFeed),
    h("div", { class: "grid2" },
      h("section", {}, h("h2", {}, "Canvas artifacts"), upload,
        h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); canvasPaging.token = ""; canvasPaging.stack = []; loadCanvas(); } },
          h("label", { for: "canvas-prefix" }, "Name prefix"), prefix, h("button", { type: "submit", class: "secondary" }, "Filter")),
        canvasBox),
      viewBox));

  let nodesStream = null;
  function reloadNodes() {
    if (nodesStream) nodesStream.close();
    const q = new URLSearchParams({ status: statusSel.value, page_token: nodePaging.token, page_size: "50" });
    nodesStream = stream(`/api/stream/poll/nodes?${q}`, "nodes", (d) => {
      nodePaging.next = d.next_page_token || "";
      nodesBox.replaceChildren(table("nodes-table", "Nodes (50 a page)", ["Node", "Role", "Status", "Capabilities", { label: "Epoch", num: true }, "Last seen", { label: "Reconnects", num: true }],
        d.nodes.map((n) => h("tr", { dataset: { node: n.node_id } }, h("td", {}, h("code", {}, n.node_id)), h("td", {}, n.role || ""),
          h("td", {}, n.status.toLowerCase() + (n.offline_reason ? ` (${n.offline_reason})` : "")), h("td", {}, (n.capabilities || []).join(", ")),
          h("td", { class: "num" }, n.epoch), h("td", {}, fmtTime(n.last_seen_time)), h("td", { class: "num" }, n.reconnect_count)))),
      pager(nodePaging, reloadNodes));
    });
  }
  statusSel.addEventListener("change", () => { nodePaging.token = ""; nodePaging.stack = []; reloadNodes(); });
  reloadNodes();
  stream("/api/stream/node-events", "nodes", (b) => {
    for (const ev of b.items) {
      eventsFeed.prepend(h("li", {}, h("span", { class: "muted" }, `#${ev.seq} ${fmtTime(ev.time)} `), h("strong", {}, ev.type.toLowerCase()), ` ${ev.node_id || ev.artifact_name} ${ev.reason || ""}`));
      if (ev.type === "CANVAS_CHANGED") loadCanvas();
    }
    while (eventsFeed.children.length > 200) eventsFeed.lastElementChild.remove();
  });

  async function loadCanvas() {
    try {
      const d = await api(`/api/canvas?${new URLSearchParams({ prefix: prefix.value, page_token: canvasPaging.token, page_size: "50" })}`);
      canvasPaging.next = d.next_page_token || "";
      canvasBox.replaceChildren(table("canvas-table", "Artifacts", ["Name", { label: "Version", num: true }, "Type", { label: "Bytes", num: true }, "Updated", ""],
        d.artifacts.map((a) => h("tr", { dataset: { name: a.name } },
          h("td", {}, h("button", { type: "button", class: "secondary", onclick: () => showArtifact(a.name, 0) }, a.name)),
          h("td", { class: "num" }, a.version), h("td", {}, a.content_type), h("td", { class: "num" }, a.size_bytes), h("td", {}, fmtTime(a.update_time)),
          h("td", {}, h("button", { type: "button", class: "danger", "aria-label": `Delete ${a.name}`, onclick: async () => {
            if (!window.confirm(`Delete every version of ${a.name}?`)) return;
            try { await api("/api/canvas/delete", { body: { name: a.name, etag: a.etag } }); say(`Deleted ${a.name}.`); loadCanvas(); viewBox.replaceChildren(); } catch (e) { say(e.message, true); }
          } }, "Delete"))))),
        pager(canvasPaging, loadCanvas));
    } catch (e) { canvasBox.replaceChildren(h("p", { class: "error" }, e.message)); }
  }
  async function showArtifact(n, version) {
    try {
      const a = await api(`/api/canvas/artifact?${new URLSearchParams({ name: n, version: String(version) })}`);
      const versions = h("select", { id: "artifact-version", "aria-label": "Version", onchange: (e) => showArtifact(n, Number(e.target.value)) });
      const latest = version ? Math.max(version, a.version) : a.version;
      for (let v = latest; v >= Math.max(1, latest - 49); v--) versions.append(h("option", { value: v, selected: v === a.version ? true : null }, `version ${v}`));
      let body;
      if (a.render === "image") body = h("img", { class: "artifact", id: "artifact-image", alt: `${a.name} version ${a.version}`, src: `/api/canvas/raw?${new URLSearchParams({ name: a.name, version: String(a.version) })}` });
      else if (a.render === "binary") body = h("p", { class: "muted" }, `${a.content_type}, ${a.size_bytes} bytes (not shown)`);
      else body = h("pre", { id: "artifact-text" }, a.text);
      viewBox.replaceChildren(h("h2", {}, a.name), h("p", {}, `${a.content_type} · ${a.size_bytes} bytes · by ${a.actor || "?"} · `, versions), body);
    } catch (e) { viewBox.replaceChildren(h("p", { class: "error" }, e.message)); }
  }
  loadCanvas();
}

// ---------------------------------------------------------------------------------------- Voice

function voiceView(main) {
  const metricsBox = h("div", { id: "voice-metrics" });
  const countsBox = h("div", { id: "voice-counts" });
  const list = h("ul", { id: "voice-replies", class: "feed", "aria-label": "Latest replies" });
  main.append(h("h1", {}, "Voice"), h("section", {}, h("h2", {}, "TTS figures"), metricsBox),
    h("section", {}, h("h2", {}, "Replies by channel and delivery"), countsBox), h("section", {}, h("h2", {}, "Latest replies"), list));
  let tally = { finals: 0, fallbacks: 0, by_mode: [], reasons: [] };
  function renderCounts() {
    countsBox.replaceChildren(
      h("p", {}, "Final replies: ", h("strong", { id: "voice-finals" }, String(tally.finals)), " · fell back to text: ", h("strong", { id: "voice-fallbacks" }, String(tally.fallbacks))),
      table("voice-table", "Final replies by channel, delivery and engine", ["Channel", "Delivery", "Engine", { label: "Count", num: true }],
        tally.by_mode.map((m) => h("tr", {}, h("td", {}, m.channel), h("td", {}, m.delivery.replaceAll("_", " ")), h("td", {}, m.engine), h("td", { class: "num" }, m.count)))),
      table("voice-reasons", "Fallback reasons", ["Reason", { label: "Count", num: true }], tally.reasons.map((r) => h("tr", {}, h("td", {}, r.reason), h("td", { class: "num" }, r.count)))));
  }
  renderCounts();
  stream("/api/stream/replies", "replies", (b) => {
    // The server tallies every reply; the page shows the latest ones.
    const frag = document.createDocumentFragment();
    for (let i = b.items.length - 1; i >= 0; i--) {
      const r = b.items[i];
      if (r.kind !== "final") continue;
      const li = h("li", { dataset: { reply: r.reply_id, delivery: r.delivery } }, h("strong", {}, r.delivery.replaceAll("_", " ")), ` ${r.channel} ${r.session_key}: ${r.text.slice(0, 80)} `,
        r.tts_fallback_reason ? h("span", { class: "muted" }, `(${r.tts_fallback_reason}) `) : "");
      if (r.has_audio) li.append(h("audio", { controls: true, preload: "none", src: `/api/audio/${encodeURIComponent(r.reply_id)}`, "aria-label": `Audio of reply ${r.reply_id} (${r.engine})` }));
      frag.append(li);
    }
    list.prepend(frag);
    while (list.childElementCount > 100) list.lastElementChild.remove();
    if (b.tally) { tally = b.tally; renderCounts(); }
  });
  stream("/api/stream/poll/rollout", "rollout", (d) => {
    if (!d.available) { metricsBox.replaceChildren(h("p", { class: "notice", id: "voice-metrics-unavailable" }, "System.GetMetrics is not available yet: the counts below come from the replies stream.")); return; }
    const v = d.metrics.voice || {};
    metricsBox.replaceChildren(table("voice-metrics-table", "TTS (System.GetMetrics)", ["Figure", { label: "Value", num: true }], [
      h("tr", {}, h("td", {}, "TTS requests"), h("td", { class: "num" }, v.tts_requests || 0)),
      h("tr", {}, h("td", {}, "TTS fallbacks"), h("td", { class: "num", id: "voice-metric-fallbacks" }, v.tts_fallbacks || 0)),
      ...(v.tts_failures || []).map((f) => h("tr", {}, h("td", {}, `failures: ${f.name}`), h("td", { class: "num" }, f.value)))]));
  });
}

// ---------------------------------------------------------------------------------------- Audit

function auditView(main) {
  const box = h("div", { id: "audit-box" });
  const svc = h("select", { id: "audit-service", name: "service" }, h("option", { value: "" }, "all services"));
  const ev = h("input", { id: "audit-event", name: "event" });
  const actor = h("input", { id: "audit-actor", name: "actor" });
  const text = h("input", { id: "audit-text", name: "q" });
  let es = null;
  const form = h("form", { id: "audit-filter", onsubmit: (e) => { e.preventDefault(); start(); } },
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "audit-service" }, "Service"), svc),
      h("div", { class: "field" }, h("label", { for: "audit-event" }, "Event contains"), ev),
      h("div", { class: "field" }, h("label", { for: "audit-actor" }, "Actor contains"), actor),
      h("div", { class: "field" }, h("label", { for: "audit-text" }, "Any text"), text),
      h("button", { type: "submit" }, "Filter")));
  main.append(h("h1", {}, "Audit"), form, box);
  function start() {
    if (es) es.close();
    const q = new URLSearchParams({ service: svc.value, event: ev.value, actor: actor.value, q: text.value, limit: "200" });
    es = stream(`/api/stream/poll/audit?${q}`, "audit", (d) => {
      const cur = svc.value;
      if (svc.options.length - 1 !== d.services.length) {
        svc.replaceChildren(h("option", { value: "" }, "all services"), ...d.services.map((s) => h("option", { value: s, selected: s === cur ? true : null }, s)));
      }
      const rows = d.entries.slice().reverse().map((e) => {
        const { time, service, event, actor: who, ...rest } = e;
        return h("tr", {}, h("td", {}, fmtTime(time)), h("td", {}, service), h("td", {}, event), h("td", {}, who || ""), h("td", {}, h("code", {}, JSON.stringify(rest).slice(0, 300))));
      });
      box.replaceChildren(table("audit-table", `Newest ${d.entries.length} entries (newest first)`, ["Time", "Service", "Event", "Actor", "Details"], rows));
    });
  }
  start();
}

// ---------------------------------------------------------------------------------------- shell

const VIEWS = { runs: runsView, gates: gatesView, rollout: rolloutView, reactions: reactionsView, nodes: nodesView, voice: voiceView, replicas: replicasView, audit: auditView };

function route() {
  const name = (location.hash.split("/")[1] || "runs");
  const view = VIEWS[name] || runsView;
  if (active) for (const f of active.cleanup) f();
  active = { name, cleanup: [] };
  for (const a of document.querySelectorAll("nav a")) {
    if (a.id === `nav-${name}`) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const main = $("#main");
  main.replaceChildren();
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · Flynn console`;
  say("");
  view(main);
  main.dataset.view = name;
}

async function boot() {
  try { ME = await api("/api/me"); } catch { return; }
  $("#whoami").textContent = `${ME.actor}`;
  $("#signout-csrf").value = ME.csrf;
  window.addEventListener("hashchange", route);
  route();
}

boot();
