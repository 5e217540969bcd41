// Charter's dashboard: vanilla JavaScript, no build step, no library, nothing loaded from elsewhere.
//
// Login: the token arrives in the URL fragment (#token=chd_...), which browsers never send to a
// server; it is kept in sessionStorage (this tab only), removed from the address bar, and sent as
// `Authorization: Bearer` on every call. No cookie exists, so a cross-site request carries nothing.
// Every piece of data is put in the page with textContent or DOM nodes, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "charter.dashboard.token";
  const EVENT_BUFFER = 1000;
  const REFRESH_MS = 5000;
  const REFLECT_MS = 30000;      // reflection runs every truth: at most this stale when nothing happens...
  const REFLECT_SOON_MS = 1000;  // ...and rechecked this soon after an event that may change a truth
  // events that may raise or resolve a contradiction (see src/charter/reflect/truths.py)
  const REFLECT_ON = /^charter\.(agents|budget|capsules|archive|services|health|supervisor|approvals|decisions|models\.health|reflect)\./;
  const REFUSED = "The daemon refused this token (401). Each daemon start makes a new one: run \u201ccharter dashboard\u201d for a fresh link.";

  const S = {
    token: null,
    view: "overview",
    arg: null,
    agents: new Map(),        // id -> agent record
    events: [],               // [{seq, hash, envelope}] oldest first
    lastSeq: 0,
    streamCtrl: null,
    streamGen: 0,
    paused: false,
    filter: "",
    features: { services: null, archive: null },  // null unknown, false absent (404), else the route that answered
    pending: 0,
    rendering: 0,             // renders under way (see refresh)
    renderAgain: false,       // a refresh was asked for meanwhile
    reflect: null,
    reflectAt: 0,
    reflectDirty: false,
    renderGen: 0,
    refreshTimer: null,
    soonTimer: null,
    reflectTimer: null,
    busy: false,
  };

  // ---------------------------------------------------------------------------------------------
  // small helpers

  const $ = (sel) => document.querySelector(sel);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const SVGNS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") el.textContent = v;
      else el.setAttribute(k, String(v));
    }
    for (const c of children.flat()) if (c) el.append(c);
    return el;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const pad = (n) => String(n).padStart(2, "0");

  function clock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function when(ms) {
    if (!ms) return "—";
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(ms)}`;
  }

  function ago(ms) {
    if (!ms) return "never";
    const s = Math.round((Date.now() - ms) / 1000);
    if (s < -1) return "in " + duration(-s);
    if (s < 2) return "just now";
    return duration(s) + " ago";
  }

  function duration(s) {
    s = Math.max(0, Math.round(s));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function usd(micros) {
    const v = (micros || 0) / 1e6;
    if (v === 0) return "$0";
    if (Math.abs(v) < 0.01) return "$" + v.toFixed(4);
    return "$" + v.toFixed(2);
  }

  function amount(unit, value) {
    return unit === "usd" ? usd(value) : `${Number(value || 0).toLocaleString("en-US")} ${unit}`;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function preview(value, max = 160) {
    let text;
    try { text = JSON.stringify(value); } catch { text = String(value); }
    if (text === undefined) text = "";
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  const GOOD = /^(closed|up|ok|passing|healthy|running|active|fresh|approved|allow|used|verified|true)$/i;
  const BAD = /^(open|down|critical|failed|fatal|revoked|denied|deny|error|stale|false|expired|unhealthy|exited)$/i;
  function tone(state) {
    const v = String(state);
    if (GOOD.test(v)) return "ok";
    if (BAD.test(v)) return "bad";
    return "warn";
  }
  function badge(state, label) {
    return h("span", { class: `badge ${tone(state)}`, dataset: { state: String(state) } }, label ?? String(state).replace("_", "-"));
  }

  function agentName(id) {
    if (id === "operator") return "operator";
    const a = S.agents.get(id);
    return a ? a.name : (id || "").slice(0, 12);
  }

  function toast(message, bad = false) {
    const t = $("#toast");
    t.textContent = message;
    t.className = "toast" + (bad ? " bad" : "");
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, bad ? 7000 : 3500);
  }

  // ---------------------------------------------------------------------------------------------
  // the API: every call carries the token; a 401 means the token is gone (a new daemon start)

  class HttpError extends Error {
    constructor(status, body) {
      const e = body && body.error;
      super(e && e.message ? `${e.message} (${status}${e.code ? " " + e.code : ""})` : `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, { method = "GET", body, quiet404 = false } = {}) {
    const headers = { Authorization: `Bearer ${S.token}`, Accept: "application/json" };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    let data = null;
    const text = await r.text();
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (r.status === 401) {
      logout(REFUSED);
      throw new HttpError(401, data);
    }
    if (r.status === 404 && quiet404) return null;
    if (!r.ok) throw new HttpError(r.status, data);
    return data;
  }

  // optional routes that other parts of Charter add: a 404 hides their panel
  async function optional(name, paths) {
    for (const p of paths) {
      try {
        const data = await api(p, { quiet404: true });
        if (data !== null) {
          S.features[name] = p;
          showFeature(name, true);
          return data;
        }
      } catch (e) {
        if (e.status === 401) throw e;
        S.features[name] = p;
        showFeature(name, true);
        return { __error: e.message };
      }
    }
    S.features[name] = false;
    showFeature(name, false);
    return null;
  }

  function showFeature(name, on) {
    const li = $(`#nav-${name}`);
    if (li) li.hidden = !on;
  }

  // ---------------------------------------------------------------------------------------------
  // login and logout

  function takeTokenFromFragment() {
    const m = /(?:^#|[&#])token=([^&]+)/.exec(location.hash);
    if (!m) return;
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search + "#/overview");
  }

  function logout(message) {
    S.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    S.streamGen++;
    if (S.streamCtrl) S.streamCtrl.abort();
    clearInterval(S.refreshTimer);
    $("#shell").hidden = true;
    $("#login").hidden = false;
    const msg = $("#login-message");
    msg.textContent = message || "";
    msg.hidden = !message;
    $("#token-input").value = "";
    $("#token-input").focus();
  }

  async function login(token) {
    S.token = token;
    let status;
    try {
      status = await api("/v1/admin/status");
    } catch (e) {
      if (e.status !== 401) logout(`Could not reach the daemon: ${e.message}`);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#login").hidden = true;
    $("#shell").hidden = false;
    showDaemon(status);
    await loadAgents().catch(() => {});
    startStream();
    clearInterval(S.refreshTimer);
    S.refreshTimer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
    route();
  }

  function showDaemon(st) {
    if (!st) return;
    const started = Date.now() - st.uptime_s * 1000;
    $("#daemon-meta").textContent = `Charter ${st.version} · pid ${st.pid} · started ${when(started)}`;
  }

  async function loadAgents() {
    const data = await api("/v1/admin/agents");
    S.agents = new Map(data.agents.map((a) => [a.id, a]));
    return data.agents;
  }

  // ---------------------------------------------------------------------------------------------
  // the live stream: fetch() and a ReadableStream reader (EventSource cannot send a header)

  function setConn(state, text) {
    const c = $("#conn");
    c.dataset.state = state;
    c.textContent = text || state;
  }

  async function startStream() {
    const gen = ++S.streamGen;
    if (S.streamCtrl) S.streamCtrl.abort();
    if (S.lastSeq === 0) {
      try {
        const recent = await api("/v1/events?pattern=%3E&limit=200");
        for (const e of recent.events) addEvent(e, false);
      } catch (e) {
        if (e.status === 401) return;
      }
    }
    let backoff = 500;
    while (S.token && gen === S.streamGen) {
      const ctrl = new AbortController();
      S.streamCtrl = ctrl;
      let watchdog = null;
      const kick = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => ctrl.abort(), 35000);  // heartbeats come every 10 s
      };
      try {
        setConn(backoff > 500 ? "reconnecting" : "connecting", backoff > 500 ? "reconnecting…" : "connecting…");
        const from = S.lastSeq + 1;
        const r = await fetch(`/v1/subscribe?pattern=%3E&from_seq=${from}&heartbeat=10s`, {
          headers: { Authorization: `Bearer ${S.token}`, Accept: "text/event-stream" },
          cache: "no-store", credentials: "omit", signal: ctrl.signal,
        });
        if (r.status === 401) {
          logout(REFUSED);
          return;
        }
        if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
        setConn("live", `live · #${S.lastSeq}`);
        backoff = 500;
        kick();
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          kick();
          buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const frame = buf.slice(0, i);
            buf = buf.slice(i + 2);
            onFrame(frame);
          }
        }
        throw new Error("the stream ended");
      } catch (e) {
        clearTimeout(watchdog);
        if (!S.token || gen !== S.streamGen) return;
        setConn("down", `disconnected; retrying (last #${S.lastSeq})`);
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 8000);
      } finally {
        clearTimeout(watchdog);
      }
    }
  }

  function onFrame(frame) {
    let event = "message";
    const data = [];
    for (const line of frame.split("\n")) {
      if (!line || line.startsWith(":")) continue;  // a comment: heartbeat or the greeting
      const k = line.indexOf(":");
      const field = k < 0 ? line : line.slice(0, k);
      const value = k < 0 ? "" : line.slice(k + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    if (event === "error") {
      let msg = data.join("\n");
      try { msg = JSON.parse(msg).message || msg; } catch { /* keep the text */ }
      toast(`Event stream: ${msg}`, true);
      return;
    }
    if (event !== "envelope") return;
    try {
      addEvent(JSON.parse(data.join("\n")), true);
    } catch {
      /* a malformed frame: skip it */
    }
  }

  function addEvent(entry, live) {
    if (!entry || typeof entry.seq !== "number" || entry.seq <= S.lastSeq) return;
    S.lastSeq = entry.seq;
    S.events.push(entry);
    if (live && $("#conn").dataset.state === "live") $("#conn").textContent = `live · #${entry.seq}`;
    if (S.events.length > EVENT_BUFFER) S.events.splice(0, S.events.length - EVENT_BUFFER);
    if (!live) return;
    if (S.view === "events" && !S.paused) prependEventRow(entry);
    reactTo(entry.envelope);
  }

  // what an event changes on screen: refresh the affected view soon (debounced)
  function reactTo(env) {
    const subj = String(env.subject || "");
    if (subj.startsWith("charter.agents.")) loadAgents().catch(() => {});
    if (subj.startsWith("charter.approvals.") || subj.startsWith("charter.decisions.")) updatePending();
    if (REFLECT_ON.test(subj)) S.reflectDirty = true;
    const affects = {
      overview: /^charter\./,
      agents: /^charter\.(agents|budget)\./,
      agent: /^charter\.(agents|budget|approvals|decisions)\./,
      approvals: /^charter\.(approvals|decisions)\./,
      spend: /^charter\.(budget|models\.calls)/,
      models: /^charter\.models\./,
      services: /^charter\.(services|health|supervisor)/,
      archive: /^charter\.archive/,
    }[S.view];
    if (affects && affects.test(subj)) refreshSoon();
  }

  function refreshSoon() {
    clearTimeout(S.soonTimer);
    S.soonTimer = setTimeout(refresh, 150);
  }

  async function updatePending() {
    try {
      const data = await api("/v1/admin/approvals?state=pending");
      setPending(data.approvals.length);
    } catch { /* shown on the next refresh */ }
  }

  function setPending(n) {
    S.pending = n;
    const b = $("#nav-pending");
    b.textContent = String(n);
    b.hidden = n === 0;
    b.setAttribute("aria-label", `${n} pending`);
  }

  // ---------------------------------------------------------------------------------------------
  // routing: #/view or #/agents/NAME

  const VIEWS = {
    overview: { title: "Overview", render: renderOverview },
    events: { title: "Live events", render: renderEvents },
    agents: { title: "Agents", render: renderAgents },
    agent: { title: "Agent", render: renderAgent },
    approvals: { title: "Approvals", render: renderApprovals },
    spend: { title: "Spend", render: renderSpend },
    models: { title: "Models", render: renderModels },
    services: { title: "Services", render: renderServices },
    archive: { title: "Archive", render: renderArchive },
  };

  function route() {
    if (!S.token) return;
    const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    let view = parts[0] || "overview";
    let arg = null;
    if (view === "agents" && parts[1]) { view = "agent"; arg = parts[1]; }
    if (!VIEWS[view]) view = "overview";
    S.view = view;
    S.arg = arg;
    for (const a of document.querySelectorAll("#nav a")) {
      const on = a.dataset.view === view || (view === "agent" && a.dataset.view === "agents");
      if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    document.title = `${VIEWS[view].title} · Charter`;
    refresh(true);
  }

  // One render at a time for the same view: a refresh asked for while one is under way runs once
  // it ends. Started each time instead, with the newest winning, a daemon whose events came faster
  // than a render (a loaded machine, a slow link) discarded every render and the page never moved.
  async function refresh(fresh = false) {
    if (!S.token) return;
    if (!fresh && S.rendering > 0) {
      S.renderAgain = true;
      return;
    }
    S.rendering += 1;
    try {
      await render(fresh);
    } finally {
      S.rendering -= 1;
      if (S.renderAgain && S.rendering === 0) {
        S.renderAgain = false;
        refreshSoon();
      }
    }
  }

  async function render(fresh) {
    const view = S.view;
    const gen = ++S.renderGen;
    const main = $("#main");
    if (fresh) {
      main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
      main.scrollTop = 0;
    }
    if (view === "events" && !fresh) return;  // the stream keeps this view current
    let node;
    try {
      node = await VIEWS[view].render();
    } catch (e) {
      if (e.status === 401) return;
      node = h("div", { class: "card" }, h("h2", { text: "Could not load this view" }), h("p", { class: "error", text: e.message }));
    }
    if (gen !== S.renderGen || view !== S.view || !S.token) return;  // the view changed meanwhile
    if (!fresh && main.contains(document.activeElement) && document.activeElement.matches("input")) {
      return;  // don't yank the field someone is typing in
    }
    const top = main.scrollTop;
    main.replaceChildren(node);
    if (!fresh) main.scrollTop = top;
  }

  function head(title, sub, ...extra) {
    return h("div", { class: "view-head" }, h("div", {}, h("h1", { text: title }), sub ? h("div", { class: "sub", text: sub }) : null), ...extra);
  }

  // ---------------------------------------------------------------------------------------------
  // overview

  async function renderOverview() {
    const [status, agents, approvals, budget, models, capsules] = await Promise.all([
      api("/v1/admin/status"),
      loadAgents(),
      api("/v1/admin/approvals?state=pending"),
      api("/v1/admin/budget"),
      api("/v1/admin/models").catch((e) => ({ __error: e.message })),
      api("/v1/admin/capsules", { quiet404: true }).catch(() => null),
    ]);
    const [services, archive] = await Promise.all([
      optional("services", ["/v1/admin/services"]),
      optional("archive", ["/v1/admin/archive/status", "/v1/admin/archive"]),
    ]);
    const sinceReflect = Date.now() - S.reflectAt;
    if (sinceReflect > REFLECT_MS || (S.reflectDirty && sinceReflect > REFLECT_SOON_MS)) {
      S.reflectAt = Date.now();
      S.reflectDirty = false;
      S.reflect = await api("/v1/admin/reflect", { quiet404: true }).catch(() => null);
    } else if (S.reflectDirty) {
      clearTimeout(S.reflectTimer);  // a burst of events: one more check once the pause is over
      S.reflectTimer = setTimeout(() => { if (S.view === "overview") refreshSoon(); }, REFLECT_SOON_MS - sinceReflect + 50);
    }
    showDaemon(status);
    setPending(approvals.approvals.length);

    const grid = h("div", { class: "grid" });
    if (services && (services.__error || serviceList(services).length)) grid.append(servicesCard(services, true));
    grid.append(agentsCard(agents, status));
    grid.append(pendingCard(approvals.approvals));
    grid.append(budgetCard(budget.budgets));
    grid.append(modelsCard(models));
    if (archive) grid.append(archiveCard(archive));
    if (capsules) grid.append(capsuleCard(capsules));
    if (S.reflect) grid.append(reflectCard(S.reflect));
    grid.append(daemonCard(status));
    return h("div", {}, head("Overview", `Everything at a glance · refreshed ${clock(Date.now())}`), grid);
  }

  function agentsCard(agents, status) {
    const by = status.agents || {};
    const list = agents.length
      ? h("table", {}, h("tbody", {}, agents.slice(0, 10).map((a) =>
          h("tr", { class: "clickable", dataset: { agent: a.name }, onclick: () => go(`#/agents/${a.name}`) },
            h("td", {}, h("a", { href: `#/agents/${encodeURIComponent(a.name)}`, text: a.name })),
            h("td", { class: "muted", text: a.role }),
            h("td", {}, badge(a.status))))))
      : h("p", { class: "empty" }, "No agents enrolled yet. ", h("code", { text: "charter invite ROLE" }), " makes an invite.");
    return h("section", { class: "card", id: "card-agents", "aria-labelledby": "h-agents" },
      h("h2", { id: "h-agents" }, "Agents", h("a", { href: "#/agents", text: "all agents →" })),
      h("div", { class: "buttons" },
        ["active", "suspended", "revoked"].map((st) =>
          h("div", { class: "stat" }, h("div", { class: "big", text: String(by[st] || 0) }), badge(st)))),
      h("h3", { text: "By name" }), list, agents.length > 10 ? h("p", { class: "muted small", text: `and ${agents.length - 10} more` }) : null);
  }

  function pendingCard(pending) {
    return h("section", { class: "card", id: "card-approvals", "aria-labelledby": "h-pending" },
      h("h2", { id: "h-pending" }, "Pending approvals", h("a", { href: "#/approvals", text: "decide →" })),
      h("div", { class: "big" + (pending.length ? " attn" : ""), id: "pending-count", text: String(pending.length) }),
      pending.length
        ? h("ul", { class: "small" }, pending.slice(0, 5).map((a) => h("li", {}, h("b", { text: a.agent_name }), ` wants `, h("code", { text: a.action }), ` (${a.tier})`)))
        : h("p", { class: "muted", text: "Nothing is waiting for you." }));
  }

  function budgetRows(rows) {
    if (!rows.length) return h("p", { class: "empty", text: "No budgets." });
    return h("div", {}, rows.map((b) => {
      const used = (b.committed || 0) + (b.reserved || 0);
      const ratio = b.hard > 0 ? used / b.hard : (used > 0 ? 1 : 0);
      const meter = h("div", { class: "meter" + (ratio >= 1 ? " bad" : ratio >= (b.soft_ratio || 0.8) ? " warn" : ""),
        role: "meter", "aria-valuemin": 0, "aria-valuemax": b.hard, "aria-valuenow": used,
        "aria-label": `${b.name} ${b.unit} per ${b.period}: ${Math.round(ratio * 100)}% used` }, h("span"));
      meter.firstChild.style.width = `${Math.min(100, ratio * 100).toFixed(1)}%`;
      return h("div", { class: "budget-row", dataset: { scope: b.scope } },
        h("div", { class: "line" },
          h("span", {}, h("b", { text: b.name }), h("span", { class: "muted", text: ` · ${b.unit} per ${b.period}` })),
          h("span", { class: "small" }, `${amount(b.unit, used)} used · `, h("b", { text: amount(b.unit, b.left) }), " left")),
        meter);
    }));
  }

  function budgetCard(rows) {
    return h("section", { class: "card", id: "card-budgets", "aria-labelledby": "h-budgets" },
      h("h2", { id: "h-budgets" }, "Budgets, this period", h("a", { href: "#/spend", text: "spend →" })), budgetRows(rows));
  }

  function modelsCard(models) {
    const body = models.__error
      ? h("p", { class: "error", text: models.__error })
      : models.backends.length
        ? h("table", {}, h("tbody", {}, models.backends.map((b) =>
            h("tr", { dataset: { backend: b.backend, state: b.state } },
              h("td", {}, h("b", { text: b.backend }), h("span", { class: "muted small", text: ` ${b.kind}` })),
              h("td", {}, badge(b.state, `circuit ${b.state.replace("_", "-")}`)),
              h("td", { class: "small muted", text: b.probe ? (b.probe.ok ? `probe ok ${b.probe.ms ?? ""}ms` : b.probe.ok === false ? "probe failed" : "not probed") : "no probe yet" })))))
        : h("p", { class: "empty", text: "No model backends configured." });
    return h("section", { class: "card", id: "card-models", "aria-labelledby": "h-models" },
      h("h2", { id: "h-models" }, "Models and circuits", h("a", { href: "#/models", text: "details →" })), body);
  }

  function capsuleCard(c) {
    const f = c.freshness || {};
    const age = f.built_at ? Date.now() / 1000 - f.built_at : null;
    const fresh = age !== null && (!f.max_age_s || age <= f.max_age_s);
    const state = age === null ? "unknown" : fresh ? "fresh" : "stale";
    return h("section", { class: "card", id: "card-capsules", "aria-labelledby": "h-capsules",
      dataset: { state, builtAt: f.built_at ?? "" } },
      h("h2", { id: "h-capsules" }, "Capsule freshness"),
      h("p", {}, badge(state), " AI_ALIGNMENT built ",
        h("b", { text: f.built_at ? ago(f.built_at * 1000) : "never" }),
        f.max_age_s ? h("span", { class: "muted", text: ` (max age ${duration(f.max_age_s)})` }) : null),
      h("table", {}, h("tbody", {}, (c.capsules || []).slice(0, 6).map((x) =>
        h("tr", { dataset: { capsule: x.agent ? `${x.name}/${x.agent}` : x.name } },
          h("td", { text: x.agent ? `${x.name} · ${x.agent}` : x.name }), h("td", { class: "muted small", text: ago(x.modified * 1000) }))))));
  }

  function reflectCard(r) {
    const list = r.contradictions || [];
    const shown = 6;
    return h("section", { class: "card", id: "card-reflect", "aria-labelledby": "h-reflect",
      dataset: { count: list.length, critical: r.critical || 0 } },
      h("h2", { id: "h-reflect" }, "Contradictions"),
      h("p", {}, list.length ? badge(r.critical ? "critical" : "warning", `${list.length} standing${r.critical ? `, ${r.critical} critical` : ""}`) : badge("ok", "none: every truth holds"),
        h("span", { class: "muted small", text: ` checked ${ago((r.checked_at || 0) * 1000)}` })),
      list.length ? h("ul", { class: "small" }, list.slice(0, shown).map((c) =>
        h("li", { dataset: { truth: c.truth, severity: c.severity }, title: c.fix ? `fix: ${c.fix}` : null },
          badge(c.severity === "critical" ? "critical" : "warning", c.severity), " ", h("b", { text: c.truth }), ": ", c.evidence))) : null,
      list.length > shown ? h("p", { class: "muted small", text: `and ${list.length - shown} more: charter reflect` }) : null);
  }

  function daemonCard(st) {
    return h("section", { class: "card", id: "card-daemon", "aria-labelledby": "h-daemon" },
      h("h2", { id: "h-daemon" }, "Daemon"),
      h("dl", { class: "kv" },
        h("dt", { text: "version" }), h("dd", { text: st.version }),
        h("dt", { text: "uptime" }), h("dd", { text: duration(st.uptime_s) }),
        h("dt", { text: "log head" }), h("dd", { class: "mono", text: `#${st.log.head_seq} ${st.log.head_hash.slice(0, 16)}…` }),
        h("dt", { text: "accepted" }), h("dd", { text: String(st.counters.accepted || 0) }),
        h("dt", { text: "refused" }), h("dd", { text: Object.entries(st.counters).filter(([k]) => k !== "accepted").map(([k, v]) => `${k} ${v}`).join(", ") || "none" }),
        h("dt", { text: "root key" }), h("dd", { class: "mono", text: st.root_key_id }),
        h("dt", { text: "home" }), h("dd", { class: "mono", text: st.home })));
  }

  // ---------------------------------------------------------------------------------------------
  // services and archive: shapes belong to other parts of Charter, so they are read generously

  function serviceList(data) {
    if (Array.isArray(data)) return data;
    if (data && Array.isArray(data.services)) return data.services;
    if (data && typeof data === "object") return Object.entries(data).filter(([, v]) => v && typeof v === "object").map(([k, v]) => ({ name: k, ...v }));
    return [];
  }
  const svcName = (x) => x.label || x.name || x.id || "?";
  const svcState = (x) => x.state ?? x.status ?? (x.up === true ? "up" : x.up === false ? "down" : "unknown");

  function servicesCard(data, compact) {
    if (data.__error) return h("section", { class: "card", id: "card-services" }, h("h2", { text: "Services" }), h("p", { class: "error", text: data.__error }));
    const list = serviceList(data);
    const up = list.filter((x) => tone(svcState(x)) === "ok").length;
    return h("section", { class: "card" + (compact ? "" : " wide"), id: "card-services", "aria-labelledby": "h-services" },
      h("h2", { id: "h-services" }, "Services", compact ? h("a", { href: "#/services", text: "details →" }) : null),
      h("p", {}, h("b", { text: `${up} of ${list.length}` }), " up"),
      list.length ? serviceTable(list, compact) : h("p", { class: "empty", text: "No services configured." }));
  }

  function serviceTable(list, compact) {
    const at = (v) => (typeof v === "number" ? ago(v > 1e12 ? v : v * 1000) : v ? String(v) : "—");
    const pct = (v) => (typeof v === "number" ? `${(v <= 1 ? v * 100 : v).toFixed(1)}%` : "—");
    const cols = compact
      ? []
      : [["tier", (x) => x.tier ?? "—"], ["check", (x) => x.check ?? x.kind ?? "—"],
         ["checked", (x) => at(x.last_checked ?? x.checked_at)], ["since", (x) => at(x.since)],
         ["restarts", (x) => String(x.restarts ?? 0)], ["uptime 24h", (x) => pct(x.uptime_24h)],
         ["reason", (x) => (x.reason == null ? "" : typeof x.reason === "object" ? preview(x.reason, 80) : String(x.reason))]];
    return h("table", { "aria-label": "Services" },
      h("thead", {}, h("tr", {}, h("th", { text: "service" }), h("th", { text: "state" }), cols.map(([t]) => h("th", { text: t })))),
      h("tbody", {}, list.map((x) => h("tr", { dataset: { service: svcName(x), state: String(svcState(x)) } },
        h("td", {}, h("b", { text: svcName(x) }), !compact && x.name && x.name !== svcName(x) ? h("div", { class: "muted small", text: x.name }) : null),
        h("td", {}, badge(svcState(x))),
        cols.map(([, f]) => h("td", { class: "small", text: f(x) }))))));
  }

  async function renderServices() {
    const data = await optional("services", ["/v1/admin/services"]);
    if (!data) return h("div", {}, head("Services"), h("p", { class: "empty", text: "This daemon has no supervisor." }));
    return h("div", { class: "stack" }, head("Services", "What the supervisor watches, live"), servicesCard(data, false));
  }

  function flatten(obj, prefix = "", out = []) {
    for (const [k, v] of Object.entries(obj || {})) {
      if (k === "__error") continue;
      if (v && typeof v === "object" && !Array.isArray(v) && prefix.split(".").length < 3) flatten(v, `${prefix}${k}.`, out);
      else out.push([prefix + k, v]);
    }
    return out;
  }

  function archiveCard(data, inView = false) {
    const known = data && "archived_seq" in data;
    const body = [];
    if (data.__error) body.push(h("p", { class: "error", text: data.__error }));
    if (known) {
      const lag = typeof data.head_seq === "number" ? Math.max(0, data.head_seq - (data.archived_seq || 0)) : null;
      const verdict = data.verified === true ? "verified" : data.verified === false ? "failed" : "not verified yet";
      body.push(h("p", {}, badge(data.enabled === false ? "disabled" : verdict), data.first_bad_seq ? h("span", { class: "error", text: ` first bad seq #${data.first_bad_seq}` }) : null));
      body.push(h("dl", { class: "kv" },
        h("dt", { text: "archived" }), h("dd", { text: `up to #${data.archived_seq || 0} of #${data.head_seq ?? "?"}` }),
        h("dt", { text: "lag" }), h("dd", { text: lag === null ? "—" : `${lag} ${lag === 1 ? "entry" : "entries"}` }),
        h("dt", { text: "segments" }), h("dd", { text: String(data.segments ?? "—") }),
        h("dt", { text: "checkpoints" }), h("dd", { text: String(data.checkpoints ?? "—") }),
        h("dt", { text: "verified" }), h("dd", { text: data.verified_at ? ago(tsMs(data.verified_at)) : "never" }),
        h("dt", { text: "last sync" }), h("dd", { text: data.last_sync_at ? ago(tsMs(data.last_sync_at)) : "never" }),
        h("dt", { text: "mirrors" }), h("dd", { text: Array.isArray(data.mirrors) ? String(data.mirrors.length) : "—" }),
        data.last_error ? [h("dt", { text: "last error" }), h("dd", { class: "error small", text: String(data.last_error) })] : null));
    } else {
      body.push(h("dl", { class: "kv" }, flatten(data).slice(0, 14).map(([k, v]) => [h("dt", { text: k.replace(/_/g, " ") }),
        h("dd", { class: "small", text: typeof v === "object" ? preview(v, 80) : String(v) })])));
    }
    const facts = known ? { archivedSeq: data.archived_seq || 0, segments: data.segments ?? "", checkpoints: data.checkpoints ?? "",
      verified: data.verified === true ? "yes" : data.verified === false ? "no" : "unknown" } : {};
    return h("section", { class: "card", id: "card-archive", "aria-labelledby": "h-archive", dataset: facts },
      h("h2", { id: "h-archive" }, "Archive", inView ? null : h("a", { href: "#/archive", text: "details →" })), body);
  }

  function tsMs(v) {
    if (typeof v === "number") return v > 1e12 ? v : v * 1000;
    const t = Date.parse(v);
    return Number.isNaN(t) ? 0 : t;
  }

  async function renderArchive() {
    const data = await optional("archive", ["/v1/admin/archive/status", "/v1/admin/archive"]);
    if (!data) return h("div", {}, head("Archive"), h("p", { class: "empty", text: "This daemon has no archivist." }));
    const rows = flatten(data);
    return h("div", { class: "stack" }, head("Archive", "Sealed segments, verification and sync"), archiveCard(data, true),
      h("section", { class: "card" }, h("h2", { text: "Everything the archivist reports" }), h("dl", { class: "kv" }, rows.map(([k, v]) => [h("dt", { text: k }), h("dd", { class: "mono", text: typeof v === "object" ? JSON.stringify(v) : String(v) })]))));
  }

  // ---------------------------------------------------------------------------------------------
  // live events

  function eventRow(entry, fresh) {
    const env = entry.envelope || {};
    const row = h("tr", { class: "clickable" + (fresh ? " fresh" : ""), dataset: { seq: entry.seq, subject: env.subject || "" },
      tabindex: 0, "aria-label": `event ${entry.seq} ${env.subject}`, onclick: () => toggleDetail(row, entry),
      onkeydown: (e) => { if (e.key === "Enter") toggleDetail(row, entry); } },
      h("td", { class: "seq", text: `#${entry.seq}` }),
      h("td", { class: "time", text: env.ts ? clock(env.ts) : "" }),
      h("td", { class: "sender", title: env.sender, text: agentName(env.sender) }),
      h("td", { class: "subject", text: env.subject }),
      h("td", { class: "payload", title: preview(env.payload, 600), text: preview(env.payload) }));
    return row;
  }

  function toggleDetail(row, entry) {
    const next = row.nextElementSibling;
    if (next && next.classList.contains("detail")) { next.remove(); return; }
    row.after(h("tr", { class: "detail" }, h("td", { colspan: 5 },
      h("div", { class: "small muted", text: `seq ${entry.seq} · hash ${entry.hash} · kind ${entry.envelope.kind} · id ${entry.envelope.id} · ${when(entry.envelope.ts)}` }),
      h("pre", { text: JSON.stringify(entry.envelope.payload, null, 2) }))));
  }

  function matchesFilter(entry) {
    if (!S.filter) return true;
    const env = entry.envelope || {};
    const f = S.filter.toLowerCase();
    return String(env.subject).toLowerCase().includes(f) || agentName(env.sender).toLowerCase().includes(f);
  }

  function prependEventRow(entry) {
    const body = $("#events-body");
    if (!body || !matchesFilter(entry)) return;
    const empty = $("#events-empty");
    if (empty) empty.remove();
    body.prepend(eventRow(entry, true));
    while (body.children.length > 500) body.lastElementChild.remove();
    const count = $("#events-count");
    if (count) count.textContent = `last #${S.lastSeq}`;
  }

  async function renderEvents() {
    const body = h("tbody", { id: "events-body" });
    const shown = S.events.filter(matchesFilter).slice(-300).reverse();
    for (const e of shown) body.append(eventRow(e, false));
    const filter = h("input", { type: "search", id: "events-filter", placeholder: "filter by subject or sender", "aria-label": "Filter events by subject or sender",
      value: S.filter, oninput: (e) => { S.filter = e.target.value.trim(); redrawEvents(); } });
    const pause = h("button", { type: "button", id: "events-pause", "aria-pressed": S.paused ? "true" : "false",
      "aria-label": S.paused ? "Resume the live event list" : "Pause the live event list",
      onclick: () => { S.paused = !S.paused; redrawEvents(); } }, S.paused ? "Resume" : "Pause");
    return h("div", {},
      head("Live events", "Every entry on the bus as it is appended; click a row for the whole payload",
        h("span", { id: "events-count", class: "muted", text: `last #${S.lastSeq}` })),
      h("div", { class: "toolbar" }, filter, pause),
      h("div", { class: "scroll" }, h("table", { class: "events-table", "aria-label": "Bus events, newest first" },
        h("thead", {}, h("tr", {}, h("th", { class: "num", text: "seq" }), h("th", { text: "time" }), h("th", { text: "sender" }), h("th", { text: "subject" }), h("th", { text: "payload" }))),
        body)),
      shown.length ? null : h("p", { class: "empty", id: "events-empty", text: "No events yet; they appear here as they happen." }));
  }

  async function redrawEvents() {
    const focus = document.activeElement && document.activeElement.id;
    const node = await renderEvents();
    $("#main").replaceChildren(node);
    if (focus) { const el = document.getElementById(focus); if (el) { el.focus(); if (el.setSelectionRange && el.value) el.setSelectionRange(el.value.length, el.value.length); } }
  }

  // ---------------------------------------------------------------------------------------------
  // agents

  async function renderAgents() {
    const [agents, budget] = await Promise.all([loadAgents(), api("/v1/admin/budget")]);
    const spend = new Map();
    for (const b of budget.budgets) if (b.unit === "usd" && b.scope.startsWith("agent:")) spend.set(b.scope.slice(6), b);
    const q = (S.agentQuery || "").toLowerCase();
    const rows = agents.filter((a) => !q || a.name.includes(q) || a.role.includes(q) || a.status.includes(q) || a.id.toLowerCase().includes(q));
    const search = h("input", { type: "search", id: "agent-search", placeholder: "find an agent by name, role or status", "aria-label": "Find an agent",
      value: S.agentQuery || "", oninput: (e) => { S.agentQuery = e.target.value.trim(); redraw(); } });
    const redraw = async () => {
      const node = await renderAgents();
      $("#main").replaceChildren(node);
      const el = $("#agent-search");
      el.focus();
      el.setSelectionRange(el.value.length, el.value.length);
    };
    const table = h("table", { "aria-label": "Agents" },
      h("thead", {}, h("tr", {}, ["name", "role", "status", "policy", "max tier", "spent today", "charter expires"].map((t) => h("th", { text: t })))),
      h("tbody", {}, rows.map((a) => {
        const b = spend.get(a.id);
        return h("tr", { class: "clickable", dataset: { agent: a.name }, onclick: () => go(`#/agents/${a.name}`) },
          h("td", {}, h("a", { href: `#/agents/${encodeURIComponent(a.name)}`, text: a.name })),
          h("td", { text: a.role }), h("td", {}, badge(a.status)),
          h("td", { class: "mono small", text: a.policy ? `${a.policy.id} v${a.policy.version}` : "—" }),
          h("td", { text: a.max_tier || "—" }),
          h("td", { class: "num", text: b ? `${usd(b.committed + b.reserved)} of ${usd(b.hard)}` : "—" }),
          h("td", { class: "small", text: a.status === "revoked" ? "—" : ago(a.expires_at) }));
      })));
    return h("div", { class: "stack" }, head("Agents", `${agents.length} enrolled`),
      h("div", { class: "toolbar" }, search),
      h("section", { class: "card" }, rows.length ? table : h("p", { class: "empty", text: agents.length ? "No agent matches." : "No agents enrolled yet." })));
  }

  async function renderAgent() {
    const ref = S.arg;
    const [a, budget, history] = await Promise.all([
      api(`/v1/admin/agents/${encodeURIComponent(ref)}`),
      api("/v1/admin/budget"),
      api(`/v1/admin/budget/history?by=day&agent=${encodeURIComponent(ref)}`),
    ]);
    const c = a.charter || {};
    const limits = budget.budgets.filter((b) => b.scope === `agent:${a.id}`);
    const revoked = a.status === "revoked";
    const act = (action, label, cls, disabled) => h("button", { type: "button", class: cls, id: `agent-${action}`, disabled: disabled || null,
      "aria-label": `${label} agent ${a.name}`, onclick: () => agentAction(a, action) }, label);
    const sb = c.sandbox || a.sandbox || {};
    const recent = S.events.filter((e) => e.envelope && (e.envelope.sender === a.id || (e.envelope.payload && e.envelope.payload.agent_id === a.id))).slice(-12).reverse();
    return h("div", { class: "stack", dataset: { agentPage: a.name } },
      head(a.name, `${a.role} · ${a.id}`,
        h("div", { class: "buttons" }, badge(a.status), a.reason ? h("span", { class: "muted small", text: `(${a.reason})` }) : null)),
      h("div", { class: "card", id: "agent-actions" },
        h("div", { class: "buttons" },
          act("suspend", "Suspend", "danger", a.status !== "active"),
          act("resume", "Resume", "good", a.status !== "suspended"),
          act("revoke", "Revoke", "danger", revoked)),
        h("p", { class: "muted small", text: revoked ? "Revocation is final." : "Suspend stops the agent at once (its calls, streams and keys); resume undoes it. Revoke is final." })),
      h("div", { class: "grid two" },
        h("section", { class: "card", "aria-labelledby": "h-charter" }, h("h2", { id: "h-charter", text: "Charter" }),
          h("dl", { class: "kv" },
            h("dt", { text: "serial" }), h("dd", { class: "mono", text: c.serial || "—" }),
            h("dt", { text: "role" }), h("dd", { text: a.role }),
            h("dt", { text: "key id" }), h("dd", { class: "mono", text: a.key_id }),
            h("dt", { text: "max tier" }), h("dd", { text: c.max_tier || "—" }),
            h("dt", { text: "issued" }), h("dd", { text: when(c.issued_at) }),
            h("dt", { text: "expires" }), h("dd", { text: `${when(c.expires_at)} (${ago(c.expires_at)})` }),
            h("dt", { text: "renew after" }), h("dd", { text: when(c.renew_after) }),
            h("dt", { text: "sandbox" }), h("dd", { class: "mono small", text: sb.path || "—" }),
            h("dt", { text: "sandbox use" }), h("dd", { text: `${bytes(a.sandbox_used_bytes)} of ${bytes(sb.quota_bytes)}` }),
            h("dt", { text: "daily budget" }), h("dd", { text: c.budget ? `${c.budget.usd_per_day != null ? "$" + c.budget.usd_per_day : "no usd limit"}${c.budget.tokens_per_day != null ? `, ${c.budget.tokens_per_day} tokens` : ""}` : "—" }))),
        h("section", { class: "card", "aria-labelledby": "h-scopes" }, h("h2", { id: "h-scopes", text: "Scopes" }),
          ["publish", "subscribe", "read"].map((k) => [h("h3", { text: k }),
            (c.scopes && c.scopes[k] && c.scopes[k].length) ? h("div", { class: "chips" }, c.scopes[k].map((p) => h("span", { class: "chip", text: p }))) : h("p", { class: "muted small", text: "none" })]),
          h("h3", { text: "Policy binding" }),
          c.policy ? h("dl", { class: "kv" },
            h("dt", { text: "policy" }), h("dd", {}, h("b", { text: c.policy.id }), ` version ${c.policy.version}`),
            h("dt", { text: "hash" }), h("dd", { class: "mono small", text: c.policy.hash })) : h("p", { class: "muted", text: "none" })),
        h("section", { class: "card", "aria-labelledby": "h-spend" }, h("h2", { id: "h-spend", text: "Spend" }),
          budgetRows(limits.map((b) => ({ ...b, name: "budget" }))),
          h("h3", { text: "USD per day" }),
          barChart(history.history.slice(-30).map((r) => ({ label: String(r.day).slice(5), value: (r.usd_micros || 0) / 1e6 })),
            { format: (v) => "$" + v.toFixed(2), label: `${a.name}'s spend per day`, height: 170 })),
        h("section", { class: "card", "aria-labelledby": "h-recent" }, h("h2", { id: "h-recent", text: "Recent events about this agent" }),
          recent.length ? h("table", {}, h("tbody", {}, recent.map((e) => h("tr", {},
            h("td", { class: "mono small muted", text: `#${e.seq}` }), h("td", { class: "mono small", text: clock(e.envelope.ts) }),
            h("td", { class: "mono small", text: e.envelope.subject }))))) : h("p", { class: "empty", text: "None in the recent stream." }))));
  }

  async function agentAction(a, action) {
    const text = {
      suspend: `Suspend ${a.name}? Its calls, streams and keys stop working at once until you resume it.`,
      resume: `Resume ${a.name}? It may act again within its charter.`,
      revoke: `Revoke ${a.name}? This is final: the agent can never be resumed.`,
    }[action];
    const verb = action[0].toUpperCase() + action.slice(1);
    const ok = await confirmDialog(`${verb} ${a.name}`, text, verb, action !== "resume");
    if (ok === null) return;
    try {
      await api(`/v1/admin/agents/${encodeURIComponent(a.id)}/${action}`, { method: "POST", body: { reason: ok } });
      toast(`${a.name}: ${action} done`);
      await loadAgents();
      refresh();
    } catch (e) {
      if (e.status !== 401) toast(`${verb} failed: ${e.message}`, true);
    }
  }

  // the confirmation dialog: resolves to the reason typed (maybe "") or null when cancelled
  function confirmDialog(title, text, okLabel, danger, withReason = true) {
    const dlg = $("#confirm");
    $("#confirm-title").textContent = title;
    $("#confirm-text").textContent = text;
    const ok = $("#confirm-ok");
    ok.textContent = okLabel;
    ok.setAttribute("aria-label", `Confirm: ${title}`);
    ok.className = danger ? "primary danger-fill" : "primary";
    const reason = $("#confirm-reason");
    reason.value = "";
    reason.hidden = !withReason;
    $("#confirm-reason-label").hidden = !withReason;
    return new Promise((resolve) => {
      const form = $("#confirm-form");
      const done = (value) => {
        form.removeEventListener("submit", onSubmit);
        $("#confirm-cancel").removeEventListener("click", onCancel);
        dlg.removeEventListener("cancel", onCancel);
        if (dlg.open) dlg.close();
        resolve(value);
      };
      const onSubmit = (e) => { e.preventDefault(); done(reason.value.trim()); };
      const onCancel = (e) => { e.preventDefault(); done(null); };
      form.addEventListener("submit", onSubmit);
      $("#confirm-cancel").addEventListener("click", onCancel);
      dlg.addEventListener("cancel", onCancel);
      dlg.showModal();
      ok.focus();
    });
  }

  // ---------------------------------------------------------------------------------------------
  // approvals

  async function renderApprovals() {
    const [pending, all] = await Promise.all([api("/v1/admin/approvals?state=pending"), api("/v1/admin/approvals")]);
    setPending(pending.approvals.length);
    const decided = all.approvals.filter((a) => a.state !== "pending").slice(0, 20);
    return h("div", { class: "stack" },
      head("Approvals", "T3 and other approve-rules wait here for you; the daemon signs your decision with the root key"),
      h("section", { class: "card", "aria-labelledby": "h-waiting", id: "pending-list" },
        h("h2", { id: "h-waiting", text: `Waiting (${pending.approvals.length})` }),
        pending.approvals.length ? pending.approvals.map(approvalCard) : h("p", { class: "empty", text: "Nothing is waiting for you." })),
      h("section", { class: "card", "aria-labelledby": "h-decided" }, h("h2", { id: "h-decided", text: "Recently decided" }),
        decided.length ? h("table", {},
          h("thead", {}, h("tr", {}, ["agent", "action", "tier", "state", "decided", "note"].map((t) => h("th", { text: t })))),
          h("tbody", {}, decided.map((a) => h("tr", { dataset: { approval: a.id } },
            h("td", { text: a.agent_name }), h("td", { class: "mono", text: a.action }), h("td", { text: a.tier }),
            h("td", {}, badge(a.state), a.window_until ? h("span", { class: "muted small", text: ` window until ${clock(a.window_until)}` }) : null),
            h("td", { class: "small", text: a.decided_at ? ago(a.decided_at) : "—" }),
            h("td", { class: "small muted", text: (a.decision && a.decision.note) || "" }))))) : h("p", { class: "empty", text: "No decisions yet." })));
  }

  function approvalCard(a) {
    const button = (label, cls, verdict, windowS, aria) => h("button", { type: "button", class: cls, "aria-label": aria,
      dataset: { verdict, window: windowS || "" }, onclick: (e) => decide(a, verdict, windowS, e.currentTarget) }, label);
    return h("article", { class: "approval", dataset: { approval: a.id, agent: a.agent_name, action: a.action }, "aria-label": `${a.agent_name} asks for ${a.action}` },
      h("div", {},
        h("div", { class: "what" }, h("span", { text: a.agent_name }), " wants ", h("code", { text: a.action }), " ", badge("warn", a.tier)),
        h("div", { class: "small muted", text: `rule ${a.rule}: ${a.reason}` }),
        h("div", { class: "small muted", text: `asked ${ago(a.created_at)} · expires ${ago(a.expires_at)} · ${a.id}` }),
        h("pre", { text: JSON.stringify(a.attrs, null, 2) })),
      h("div", { class: "buttons" },
        button("Approve", "good", "approve", null, `Approve ${a.action} for ${a.agent_name} once`),
        button("Approve for 1 hour", "", "approve", 3600, `Approve ${a.action} for ${a.agent_name} for one hour`),
        button("Deny", "danger", "deny", null, `Deny ${a.action} for ${a.agent_name}`)));
  }

  async function decide(a, verdict, windowS, btn) {
    const card = btn.closest(".approval");
    for (const b of card.querySelectorAll("button")) b.disabled = true;
    try {
      const out = await api(`/v1/admin/approvals/${encodeURIComponent(a.id)}/decide`, {
        method: "POST", body: { verdict, window_s: windowS, note: "" },
      });
      toast(`${a.agent_name}'s ${a.action}: ${out.state}${windowS ? " for 1 hour" : ""}`);
      card.remove();
      await refresh();
    } catch (e) {
      for (const b of card.querySelectorAll("button")) b.disabled = false;
      if (e.status !== 401) toast(`Could not decide: ${e.message}`, true);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // spend: hand-written SVG charts

  async function renderSpend() {
    const [byDay, byModel, byAgent, budget] = await Promise.all([
      api("/v1/admin/budget/history?by=day"),
      api("/v1/admin/budget/history?by=model"),
      api("/v1/admin/budget/history?by=agent"),
      api("/v1/admin/budget"),
    ]);
    const days = byDay.history.slice(-30);
    const total = byDay.history.reduce((t, r) => t + (r.usd_micros || 0), 0);
    return h("div", {},
      head("Spend", `${usd(total)} recorded in all · budgets in ${budget.timezone}`),
      h("div", { class: "grid two" },
        h("section", { class: "card", id: "chart-day", "aria-labelledby": "h-day" }, h("h2", { id: "h-day", text: "USD per day" }),
          barChart(days.map((r) => ({ label: String(r.day).slice(5), value: (r.usd_micros || 0) / 1e6, note: `${r.calls} calls` })),
            { format: (v) => "$" + v.toFixed(v < 1 ? 3 : 2), label: "Spend in US dollars per day" })),
        h("section", { class: "card", id: "chart-tokens", "aria-labelledby": "h-tokens" }, h("h2", { id: "h-tokens", text: "Tokens per day" }),
          lineChart(days.map((r) => ({ label: String(r.day).slice(5), value: (r.tokens_in || 0) + (r.tokens_out || 0) })),
            { format: (v) => Math.round(v).toLocaleString("en-US"), label: "Tokens in and out per day" })),
        h("section", { class: "card", id: "chart-model", "aria-labelledby": "h-model" }, h("h2", { id: "h-model", text: "USD by model" }),
          hbarChart(byModel.history.map((r) => ({ label: r.model || "(none)", value: (r.usd_micros || 0) / 1e6, note: `${r.calls} calls, ${((r.tokens_in || 0) + (r.tokens_out || 0)).toLocaleString("en-US")} tokens` })),
            { format: (v) => "$" + v.toFixed(v < 1 ? 4 : 2), label: "Spend in US dollars by model" })),
        h("section", { class: "card", "aria-labelledby": "h-by-agent" }, h("h2", { id: "h-by-agent", text: "By agent" }),
          byAgent.history.length ? h("table", {},
            h("thead", {}, h("tr", {}, h("th", { text: "agent" }), h("th", { class: "num", text: "calls" }), h("th", { class: "num", text: "tokens" }), h("th", { class: "num", text: "USD" }), h("th", { class: "num", text: "overruns" }))),
            h("tbody", {}, byAgent.history.map((r) => h("tr", {},
              h("td", {}, h("a", { href: `#/agents/${encodeURIComponent(r.name)}`, text: r.name })),
              h("td", { class: "num", text: String(r.calls) }), h("td", { class: "num", text: ((r.tokens_in || 0) + (r.tokens_out || 0)).toLocaleString("en-US") }),
              h("td", { class: "num", text: usd(r.usd_micros) }), h("td", { class: "num", text: String(r.overruns || 0) }))))) : h("p", { class: "empty", text: "No spend recorded yet." })),
        h("section", { class: "card wide", "aria-labelledby": "h-limits" }, h("h2", { id: "h-limits", text: "Budgets this period: used and left" }), budgetRows(budget.budgets))));
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function frame(width, height, label) {
    return s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, preserveAspectRatio: "xMidYMid meet" },
      s("title", { text: label }));
  }

  function yAxis(svg, m, w, hgt, max, format) {
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      const y = m.top + hgt - (hgt * i) / 4;
      svg.append(s("line", { class: i ? "grid" : "axis", x1: m.left, x2: m.left + w, y1: y, y2: y }));
      svg.append(s("text", { x: m.left - 6, y: y + 4, "text-anchor": "end", text: format(v) }));
    }
  }

  function noData(label) {
    return h("p", { class: "empty", role: "img", "aria-label": label, text: "No spend recorded yet." });
  }

  function barChart(data, { format = String, label = "chart", height = 220 } = {}) {
    if (!data.length) return noData(label);
    const width = 520, m = { top: 16, right: 12, bottom: 34, left: 56 };
    const w = width - m.left - m.right, hgt = height - m.top - m.bottom;
    const max = niceMax(Math.max(...data.map((d) => d.value)));
    const svg = frame(width, height, label);
    yAxis(svg, m, w, hgt, max, format);
    const slot = w / data.length, bw = Math.max(2, Math.min(48, slot * 0.7));
    const every = Math.ceil(data.length / 10);
    data.forEach((d, i) => {
      const bh = (d.value / max) * hgt;
      const x = m.left + i * slot + (slot - bw) / 2;
      svg.append(s("rect", { class: "bar", x, y: m.top + hgt - bh, width: bw, height: Math.max(bh, d.value > 0 ? 1 : 0) },
        s("title", { text: `${d.label}: ${format(d.value)}${d.note ? " · " + d.note : ""}` })));
      if (data.length <= 12 && d.value > 0) svg.append(s("text", { class: "value", x: x + bw / 2, y: m.top + hgt - bh - 4, "text-anchor": "middle", text: format(d.value) }));
      if (i % every === 0) svg.append(s("text", { x: x + bw / 2, y: m.top + hgt + 16, "text-anchor": "middle", text: d.label }));
    });
    return svg;
  }

  function lineChart(data, { format = String, label = "chart", height = 220 } = {}) {
    if (!data.length) return noData(label);
    const width = 520, m = { top: 16, right: 16, bottom: 34, left: 56 };
    const w = width - m.left - m.right, hgt = height - m.top - m.bottom;
    const max = niceMax(Math.max(...data.map((d) => d.value)));
    const svg = frame(width, height, label);
    yAxis(svg, m, w, hgt, max, format);
    const x = (i) => m.left + (data.length === 1 ? w / 2 : (w * i) / (data.length - 1));
    const y = (v) => m.top + hgt - (v / max) * hgt;
    svg.append(s("polyline", { class: "line", points: data.map((d, i) => `${x(i).toFixed(1)},${y(d.value).toFixed(1)}`).join(" ") }));
    const every = Math.ceil(data.length / 10);
    data.forEach((d, i) => {
      svg.append(s("circle", { class: "dot", cx: x(i), cy: y(d.value), r: 3.5 }, s("title", { text: `${d.label}: ${format(d.value)}` })));
      if (data.length <= 12) svg.append(s("text", { class: "value", x: x(i), y: y(d.value) - 8, "text-anchor": "middle", text: format(d.value) }));
      if (i % every === 0) svg.append(s("text", { x: x(i), y: m.top + hgt + 16, "text-anchor": "middle", text: d.label }));
    });
    return svg;
  }

  function hbarChart(data, { format = String, label = "chart" } = {}) {
    if (!data.length) return noData(label);
    data = [...data].sort((a, b) => b.value - a.value).slice(0, 12);
    const row = 26, width = 520, m = { top: 8, right: 70, bottom: 8, left: 170 };
    const height = m.top + m.bottom + row * data.length;
    const w = width - m.left - m.right;
    const max = niceMax(Math.max(...data.map((d) => d.value)));
    const svg = frame(width, height, label);
    svg.append(s("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: height - m.bottom }));
    data.forEach((d, i) => {
      const y = m.top + i * row;
      const bw = (d.value / max) * w;
      const name = d.label.length > 26 ? d.label.slice(0, 25) + "…" : d.label;
      svg.append(s("text", { x: m.left - 8, y: y + row / 2 + 4, "text-anchor": "end", text: name }));
      svg.append(s("rect", { class: "bar", x: m.left, y: y + 4, width: Math.max(bw, d.value > 0 ? 1 : 0), height: row - 8 },
        s("title", { text: `${d.label}: ${format(d.value)}${d.note ? " · " + d.note : ""}` })));
      svg.append(s("text", { class: "value", x: m.left + bw + 6, y: y + row / 2 + 4, text: format(d.value) }));
    });
    return svg;
  }

  // ---------------------------------------------------------------------------------------------
  // models

  async function renderModels() {
    const data = await api("/v1/admin/models");
    const rows = data.backends.map((b) => {
      const p = b.probe || {};
      return h("tr", { dataset: { backend: b.backend, state: b.state } },
        h("td", {}, h("b", { text: b.backend })), h("td", { text: b.kind }), h("td", { class: "mono small", text: b.url || "—" }),
        h("td", {}, badge(b.state, `circuit ${b.state.replace("_", "-")}`)),
        h("td", { class: "num", text: String(b.failures) }),
        h("td", { class: "small", text: b.state === "open" ? `retry in ${b.retry_in_s}s` : "—" }),
        h("td", { class: "small", text: p.at ? `${p.ok === true ? "ok" : p.ok === false ? "failed" : "skipped"} ${ago(p.at * 1000)}${p.ms != null ? ` · ${p.ms} ms` : ""}` : "—" }),
        h("td", { class: "small muted", text: b.last_reason || p.reason || "" }));
    });
    const aliases = Object.entries(data.aliases || {});
    return h("div", { class: "stack" },
      head("Models", "The gateway's backends, their circuits and probes"),
      h("section", { class: "card", "aria-labelledby": "h-backends" }, h("h2", { id: "h-backends", text: "Backends" }),
        rows.length ? h("table", { "aria-label": "Model backends" },
          h("thead", {}, h("tr", {}, ["backend", "kind", "url", "circuit", "failures", "retry", "last probe", "last reason"].map((t) => h("th", { text: t })))),
          h("tbody", {}, rows)) : h("p", { class: "empty", text: "No model backends configured." })),
      h("section", { class: "card", "aria-labelledby": "h-aliases" }, h("h2", { id: "h-aliases", text: "Aliases: fallback chains" }),
        aliases.length ? h("table", {}, h("tbody", {}, aliases.map(([name, chain]) => h("tr", {},
          h("td", {}, h("b", { text: name })),
          h("td", {}, h("div", { class: "chips" }, (Array.isArray(chain) ? chain : [chain]).map((c, i) => [i ? " → " : null, h("span", { class: "chip", text: String(c) })]))))))) : h("p", { class: "empty", text: "No aliases." })));
  }

  function go(hash) {
    if (location.hash === hash) route(); else location.hash = hash;
  }

  // ---------------------------------------------------------------------------------------------
  // start

  document.addEventListener("DOMContentLoaded", () => {
    takeTokenFromFragment();
    window.addEventListener("hashchange", () => {
      if (/token=/.test(location.hash)) { takeTokenFromFragment(); login(sessionStorage.getItem(TOKEN_KEY)); return; }
      route();
    });
    $("#login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const t = $("#token-input").value.trim();
      if (t) login(t);
    });
    $("#logout").addEventListener("click", () => logout("Logged out. The token still works until the daemon restarts."));
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) login(token); else logout("");
  });
})();
