// The operations page (docs/ops-page.md): three views over the JSON of pilehost/ops_web.py, asked
// again every few seconds. Field data (pile ids, auth ids, codes) goes into the page only as text
// nodes and attribute values, never parsed as markup (host_tests/test_ops_web.py greps for the ways to).
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const view = document.getElementById("view");
  const live = document.getElementById("live");
  const liveText = document.getElementById("live-text");
  const banner = document.getElementById("banner");
  let config = {refresh_s: 2, stop_reasons: [], states: []};
  let current = null; // {name, update}
  let generation = 0; // a view's answers arriving after it was left are dropped
  let timer = null;

  // -- building the page ------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) e.append(c);
    return e; // append() of a string makes a text node
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fill(parent, ...children) {
    parent.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  }
  const pileHref = (id) => "#/pile/" + encodeURIComponent(id);

  // -- numbers and times -------------------------------------------------------------------------------
  const nf1 = new Intl.NumberFormat("en", {minimumFractionDigits: 1, maximumFractionDigits: 1});
  const nf2 = new Intl.NumberFormat("en", {minimumFractionDigits: 2, maximumFractionDigits: 2});
  const nf0 = new Intl.NumberFormat("en");
  const kw = (w) => (w === null || w === undefined ? "–" : nf1.format(w / 1000));
  const kwh = (wh) => (wh === null || wh === undefined ? "–" : (wh < 100000 ? nf2 : nf1).format(wh / 1000));
  const withUnit = (value, unit) => [value, el("small", {text: unit})];
  function ms(iso) { const t = Date.parse(iso); return Number.isNaN(t) ? null : t; }
  function when(iso) {
    if (!iso) return "–";
    const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})(:\d{2})?/.exec(iso);
    return m ? m[1] + " " + m[2] + (m[3] || "") : iso;
  }
  function hhmm(t) { return new Date(t).toISOString().slice(11, 16); }
  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    if (h) return h + " h " + String(m).padStart(2, "0") + " min";
    if (m) return m + " min " + String(s % 60).padStart(2, "0") + " s";
    return s + " s";
  }
  function ago(iso, nowIso) {
    const t = ms(iso), now = ms(nowIso);
    if (t === null || now === null) return "never";
    const s = Math.max(0, Math.round((now - t) / 1000));
    if (s < 5) return "just now";
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }
  const STALE_S = 600; // last heard more than this ago: the age is shown as a warning

  // -- states as pills -----------------------------------------------------------------------------------
  const STATE = {
    idle: ["Idle", ""], waiting_for_auth: ["Waiting for auth", "warn"], charging: ["Charging", "ok"],
    suspended_ev: ["Suspended by car", "warn"], suspended_evse: ["Suspended by pile", "warn"],
    finishing: ["Finishing", "warn"], fault: ["Fault", "bad"], unavailable: ["Unavailable", "bad"],
  };
  function statePill(p, offlineFirst = true) {
    if (offlineFirst && p.online === false) return el("span", {class: "pill bad", text: "Offline"});
    const [label, cls] = STATE[p.state] || [p.state || "Unknown", ""];
    return el("span", {class: "pill " + cls, text: label});
  }
  function linkPill(online) {
    if (online === true) return el("span", {class: "pill ok", text: "Online"});
    if (online === false) return el("span", {class: "pill bad", text: "Offline"});
    return el("span", {class: "pill", text: "Unknown"});
  }
  const faultTags = (faults) => (faults && faults.length
    ? faults.map((f) => el("span", {class: "tag", text: f})) : [el("span", {class: "muted", text: "–"})]);
  function lastSeen(iso, now) {
    const t = ms(iso), n = ms(now);
    const stale = t !== null && n !== null && (n - t) / 1000 > STALE_S;
    return el("span", {class: stale ? "stale" : "", title: iso || "", text: ago(iso, now)});
  }

  // -- talking to the server -----------------------------------------------------------------------------
  async function getJson(path) {
    const r = await fetch(path, {cache: "no-store", headers: {accept: "application/json"}});
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
    return body;
  }
  function setLive(ok, message) {
    live.dataset.state = ok ? "live" : "lost";
    liveText.textContent = ok ? "Live · updated " + new Date().toISOString().slice(11, 19) + " UTC"
      : "Connection lost · retrying";
    banner.hidden = ok;
    if (!ok) banner.textContent = message;
  }
  async function refresh() {
    clearTimeout(timer);
    const mine = generation;
    try {
      await current.update(() => mine === generation);
      if (mine === generation) { setLive(true); document.body.dataset.updated = String(Date.now()); }
    } catch (e) {
      if (mine === generation) setLive(false, "Cannot update this view: " + e.message);
    }
    if (mine === generation) timer = setTimeout(refresh, config.refresh_s * 1000);
  }
  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
    const s = q.toString();
    return s ? "?" + s : "";
  }

  // -- the fleet -----------------------------------------------------------------------------------------
  function kpi(label, value, cls, id) {
    return el("div", {class: "kpi " + (cls || ""), id: id},
      el("div", {class: "label", text: label}), el("div", {class: "value"}, value));
  }
  function fleetView() {
    const kpis = el("div", {class: "kpis", id: "kpis"});
    const search = el("input", {type: "search", placeholder: "Pile id contains…", id: "fleet-search",
      "aria-label": "Search piles"});
    const state = el("select", {id: "fleet-state", "aria-label": "State"},
      el("option", {value: "", text: "All states"}), el("option", {value: "offline", text: "Offline"}),
      el("option", {value: "faulted", text: "With faults"}),
      config.states.map((s) => el("option", {value: s, text: (STATE[s] || [s])[0]})));
    const count = el("span", {class: "count"});
    const body = el("tbody", {id: "fleet-rows"});
    let typing = null;
    search.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(refresh, 250); });
    state.addEventListener("change", refresh);
    fill(view,
      el("div", {class: "title-row"}, el("h1", {text: "Fleet"}), el("span", {class: "sub", id: "fleet-day"})),
      kpis,
      el("div", {class: "card flush"},
        el("div", {class: "toolbar"}, el("label", {class: "grow"}, "Search", search), el("label", {}, "Show", state),
          count),
        el("div", {class: "table-wrap"}, el("table", {id: "fleet-table"},
          el("thead", {}, el("tr", {},
            ["Pile", "State", "Link", "Power kW", "Session kWh", "Offer A", "Faults", "Firmware", "Board",
              "Last seen"].map((h, i) => el("th", {class: i >= 3 && i <= 5 ? "num" : "", text: h})))),
          body))));
    return {
      name: "fleet",
      async update(fresh) {
        const d = await getJson("/api/fleet" + query({q: search.value, state: state.value}));
        if (!fresh()) return;
        const s = d.summary;
        fill(kpis,
          kpi("Piles", nf0.format(s.piles), "accent", "kpi-piles"),
          kpi("Online", nf0.format(s.online), "ok", "kpi-online"),
          kpi("Charging", nf0.format(s.charging), "ok", "kpi-charging"),
          kpi("Offline", nf0.format(s.offline), s.offline ? "bad" : "", "kpi-offline"),
          kpi("With faults", nf0.format(s.faulted), s.faulted ? "bad" : "", "kpi-faulted"),
          kpi("Power now", withUnit(kw(s.power_w), "kW"), "accent", "kpi-power"),
          kpi("Energy today", withUnit(kwh(s.energy_today_wh), "kWh"), "", "kpi-energy"));
        document.getElementById("fleet-day").textContent =
          nf0.format(s.sessions_today) + (s.sessions_today === 1 ? " session" : " sessions") + " ended today ("
          + s.day + ")";
        count.textContent = d.piles.length < d.matching
          ? "showing " + nf0.format(d.piles.length) + " of " + nf0.format(d.matching)
          : nf0.format(d.matching) + (d.matching === 1 ? " pile" : " piles");
        const rows = d.piles.map((p) => {
          const tr = el("tr", {class: "link", "data-pile": p.pile_id},
            el("td", {class: "id"}, el("a", {href: pileHref(p.pile_id), text: p.pile_id})),
            el("td", {}, statePill(p, false)), el("td", {}, linkPill(p.online)),
            el("td", {class: "num", text: p.state === "charging" ? kw(p.power_w) : "–"}),
            el("td", {class: "num", text: p.session_id ? kwh(p.session_energy_wh) : "–"}),
            el("td", {class: "num", text: p.offer_a ? nf1.format(p.offer_a) : "–"}),
            el("td", {}, faultTags(p.faults)),
            el("td", {class: "mono", text: p.fw || "–"}), el("td", {class: "mono", text: p.board || "–"}),
            el("td", {}, lastSeen(p.last_seen_at, d.now)));
          tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") location.hash = pileHref(p.pile_id); });
          return tr;
        });
        if (!rows.length) rows.push(el("tr", {}, el("td", {class: "empty", colspan: "10",
          text: search.value || state.value ? "No pile matches." : "No pile has reported yet."})));
        fill(body, rows);
      },
    };
  }

  // -- one pile ------------------------------------------------------------------------------------------
  // The top of an axis with 4 intervals, each a round number (3, 1.5, 250...).
  function niceMax(v) {
    const step = v > 0 ? v / 4 : 0.25;
    const p = Math.pow(10, Math.floor(Math.log10(step)));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= step) return 4 * m * p;
    return 40 * p;
  }
  function fmtAxis(v) {
    if (v >= 10 || v === 0 || Number.isInteger(v)) return nf0.format(Math.round(v));
    return Number.isInteger(v * 10) ? nf1.format(v) : nf2.format(v);
  }

  // The power curve (and the energy so far) of one session, as SVG drawn here: no chart library.
  function chart(session, now) {
    const W = 760, H = 318, L = 50, R = 58, T = 14, B = 30;
    const root = svg("svg", {class: "chart", id: "power-chart", viewBox: "0 0 " + W + " " + H,
      role: "img", "aria-label": "Power and energy of the session over time"});
    const samples = (session.curve || []).map((s) => ({t: ms(s.ts), p: s.power_w, e: s.session_energy_wh}))
      .filter((s) => s.t !== null);
    root.setAttribute("data-points", String(samples.length));
    let t0 = ms(session.start_time);
    if (t0 === null && samples.length) t0 = samples[0].t;
    let t1 = session.running ? Math.max(samples.length ? samples[samples.length - 1].t : t0, t0 || 0)
      : (ms(session.stop_time) || (samples.length ? samples[samples.length - 1].t : t0));
    if (t0 === null || t1 === null) t0 = t1 = 0;
    if (t1 - t0 < 60000) t1 = t0 + 60000;
    const energyPoints = [{t: t0, e: 0}].concat(samples);
    if (!session.running && session.energy_wh !== null && session.energy_wh !== undefined && ms(session.stop_time)) {
      energyPoints.push({t: ms(session.stop_time), e: session.energy_wh});
    }
    const pMax = niceMax(Math.max(1000, ...samples.map((s) => s.p)) * 1.1 / 1000);
    const eMax = niceMax(Math.max(100, ...energyPoints.map((s) => s.e)) * 1.05 / 1000);
    const x = (t) => L + (W - L - R) * (t - t0) / (t1 - t0);
    const yP = (w) => T + (H - T - B) * (1 - w / 1000 / pMax);
    const yE = (wh) => T + (H - T - B) * (1 - wh / 1000 / eMax);

    const defs = svg("defs");
    const grad = svg("linearGradient", {id: "power-fill", x1: "0", y1: "0", x2: "0", y2: "1"});
    grad.append(svg("stop", {offset: "0%", "stop-color": "#2563eb", "stop-opacity": "0.28"}),
      svg("stop", {offset: "100%", "stop-color": "#2563eb", "stop-opacity": "0.02"}));
    defs.append(grad);
    root.append(defs);
    for (let i = 0; i <= 4; i++) {
      const yy = T + (H - T - B) * i / 4;
      root.append(svg("line", {class: "grid-line", x1: L, x2: W - R, y1: yy, y2: yy}));
      root.append(svg("text", {class: "tick", x: L - 8, y: yy + 4, "text-anchor": "end"},
        fmtAxis(pMax * (4 - i) / 4) + (i === 0 ? " kW" : "")));
      root.append(svg("text", {class: "tick", x: W - R + 8, y: yy + 4, "text-anchor": "start"},
        fmtAxis(eMax * (4 - i) / 4) + (i === 0 ? " kWh" : "")));
    }
    root.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
    const span = t1 - t0, steps = [60, 300, 600, 900, 1800, 3600, 7200, 14400].map((s) => s * 1000);
    const step = steps.find((s) => span / s <= 6) || span / 6;
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
      root.append(svg("text", {class: "tick", x: x(t), y: H - B + 18, "text-anchor": "middle"}, hhmm(t)));
    }
    if (!samples.length) {
      root.append(svg("text", {class: "none", x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle"},
        "No meter values yet for this session"));
      return root;
    }
    const pts = samples.map((s) => x(s.t).toFixed(1) + "," + yP(s.p).toFixed(1));
    const base = (H - B).toFixed(1);
    root.append(svg("path", {class: "area", d: "M" + x(samples[0].t).toFixed(1) + "," + base + " L" + pts.join(" L")
      + " L" + x(samples[samples.length - 1].t).toFixed(1) + "," + base + " Z"}));
    root.append(svg("path", {class: "energy", d: "M" + energyPoints.map((s) => x(s.t).toFixed(1) + ","
      + yE(s.e).toFixed(1)).join(" L")}));
    root.append(svg("path", {class: "power", d: "M" + pts.join(" L")}));
    const last = samples[samples.length - 1];
    if (session.running) root.append(svg("circle", {class: "now", cx: x(last.t), cy: yP(last.p), r: 4.5}));
    return root;
  }

  function stat(label, value, id) {
    return el("div", {class: "stat"}, el("div", {class: "label", text: label}), el("div", {class: "value", id: id}, value));
  }
  function kv(pairs) {
    return el("dl", {class: "kv"}, pairs.map(([k, v]) => [el("dt", {text: k}), el("dd", {}, v)]));
  }
  // The pile's own `health` message (docs/telemetry.md), the latest the consumer stored.
  const STEP = {reconnect: "reconnect", wifi_restart: "Wi-Fi restart", reset: "board reset"};
  function reportedHealth(r, now) {
    if (!r) return el("p", {class: "muted", id: "reported-none", text: "No health message yet."});
    const n = (v) => (v === null || v === undefined ? "–" : nf0.format(v));
    const errors = r.meter_errors ? Object.entries(r.meter_errors).filter(([, v]) => v) : [];
    return kv([
      ["Reported", el("span", {id: "reported-at"}, lastSeen(r.received_at, now))],
      ["Boot", "#" + r.boot + ", up " + duration(r.uptime_s) + " · reset: " + r.reset_cause],
      ["Heap free", el("span", {id: "reported-heap", text: n(r.heap_free) + " B (largest " + n(r.heap_largest_free) + " B)"})],
      ["Outbox", n(r.outbox_records) + " records" + (r.outbox_oldest_s ? ", oldest " + duration(r.outbox_oldest_s) : "")],
      ["Wi-Fi", r.wifi_rssi === null ? "–" : r.wifi_rssi + " dBm"],
      ["Link", el("span", {id: "reported-link", text: n(r.connects) + " connects · " + n(r.reconnects) + " reconnects · "
        + n(r.wifi_restarts) + " Wi-Fi restarts · " + n(r.resets) + " resets"})],
      ["Last outage", r.last_step
        ? el("span", {id: "reported-step", title: r.last_reason || "", text: (STEP[r.last_step] || r.last_step)
          + (r.last_reason ? ": " + r.last_reason : "")}) : "none"],
      ["Client id", r.client_id_conflict
        ? el("span", {class: "pill bad", id: "reported-conflict", text: "used by another client"}) : "own"],
      ["Loop", n(r.loop_ms_avg) + " ms avg · " + n(r.loop_ms_max) + " ms max"],
      ["Meter errors", errors.length ? errors.map(([k, v]) => el("span", {class: "tag", text: k + " " + v}))
        : "none"]]);
  }
  function sessionRows(rows, withPile) {
    if (!rows.length) {
      return [el("tr", {}, el("td", {class: "empty", colspan: withPile ? "9" : "8", text: "No session."}))];
    }
    return rows.map((s) => el("tr", {"data-session": s.session_id},
      el("td", {class: "mono", text: s.session_id}),
      withPile ? el("td", {class: "id"}, el("a", {href: pileHref(s.pile_id), text: s.pile_id})) : null,
      el("td", {text: when(s.start_time), title: s.clock_synced ? "" : "pile clock not synced"}),
      el("td", {class: "num", text: duration(s.duration_s)}),
      el("td", {class: "num", text: kwh(s.energy_wh)}),
      el("td", {class: "num", text: kw(s.peak_power_w)}),
      el("td", {}, el("span", {class: "pill plain " + (s.stop_reason === "ev_disconnected" || s.stop_reason === "remote"
        ? "" : "warn"), text: s.stop_reason})),
      el("td", {text: s.auth_source === "remote" ? "remote" : "free vend"}),
      el("td", {class: "mono", text: s.auth_id || "–"})));
  }
  const SESSION_HEAD = (withPile) => el("thead", {}, el("tr", {},
    ["Session", withPile ? "Pile" : null, "Started", "Duration", "Energy kWh", "Peak kW", "Stop reason", "Auth",
      "Auth id"].filter((h) => h !== null).map((h) => el("th", {class: /kWh|kW|Duration/.test(h) ? "num" : "", text: h}))));

  function pileView(pileId) {
    const head = el("div", {class: "title-row"});
    const sessionCard = el("div", {class: "card", id: "session-card"});
    const statusCard = el("div", {class: "card", id: "status-card"});
    const healthCard = el("div", {class: "card", id: "health-card"});
    const reportedCard = el("div", {class: "card", id: "reported-card"});
    const faultsBody = el("tbody", {id: "fault-rows"});
    const sessionsBody = el("tbody", {id: "pile-sessions"});
    fill(view, el("a", {class: "back", href: "#/fleet", text: "← Fleet"}), head,
      el("div", {class: "grid"}, sessionCard, el("div", {class: "stack"}, statusCard, healthCard, reportedCard)),
      el("div", {class: "card flush"}, el("h2", {text: "Recent sessions"}),
        el("div", {class: "table-wrap"}, el("table", {}, SESSION_HEAD(false), sessionsBody))),
      el("div", {class: "card flush gap"}, el("h2", {text: "Fault events"}),
        el("div", {class: "table-wrap"}, el("table", {}, el("thead", {}, el("tr", {},
          ["Event", "Code", "Action", "Pile time", "Session", "Received"].map((h) => el("th", {text: h})))),
        faultsBody))));
    return {
      name: "pile",
      async update(fresh) {
        const d = await getJson("/api/pile" + query({id: pileId}));
        if (!fresh()) return;
        if (!d.pile) {
          fill(head, el("h1", {id: "pile-title", text: pileId}), el("span", {class: "sub", text: "never heard of"}));
          return;
        }
        const p = d.pile;
        fill(head, el("h1", {id: "pile-title", text: p.pile_id}), statePill(p),
          faultTags(p.faults).filter((t) => t.className === "tag"),
          el("span", {class: "sub"}, "last seen ", lastSeen(p.last_seen_at, d.now)));
        const s = d.session;
        if (!s) {
          fill(sessionCard, el("h2", {text: "Session"}), el("p", {class: "muted", text: "No session yet."}));
        } else {
          // the pile's clock on both sides: its last status against its start time
          const [lastTs, startTs] = [ms(p.status_ts), ms(s.start_time)];
          const elapsed = !s.running ? s.duration_s
            : (lastTs !== null && startTs !== null ? (lastTs - startTs) / 1000 : null);
          const started = when(s.start_time);
          const lastPower = s.running ? p.power_w : s.peak_power_w;
          fill(sessionCard,
            el("div", {class: "session-head"},
              el("div", {}, el("h2", {text: s.running ? "Charging now" : "Last session"}),
                el("div", {class: "session-id mono", id: "session-id", text: s.session_id})),
              el("span", {class: "pill " + (s.running ? "ok" : ""), text: s.running ? "Running" : (s.stop_reason || "ended")})),
            el("div", {class: "stats"},
              stat("Energy", withUnit(kwh(s.energy_wh), "kWh"), "session-energy"),
              stat(s.running ? "Power" : "Peak power", withUnit(kw(lastPower), "kW"), "session-power"),
              stat("Duration", duration(elapsed), "session-duration"),
              stat("Started", withUnit(started.slice(11, 16), started.slice(0, 10)), "session-start")),
            chart(s, d.now),
            el("div", {class: "legend"}, el("span", {text: "Power (kW, left)"}),
              el("span", {class: "energy", text: "Energy (kWh, right)"}),
              el("em", {class: "meta", id: "session-meta", text: [
                s.auth_source === "remote" ? "remote start" + (s.auth_id ? " · " + s.auth_id : "") : "free vend",
                s.meter_start_wh !== null && s.meter_start_wh !== undefined
                  ? "meter at start " + kwh(s.meter_start_wh) + " kWh" : null,
                (s.curve || []).length + " meter values",
                s.clock_synced === false ? "pile clock not synced" : null,
              ].filter((x) => x).join(" · ")})));
        }
        fill(statusCard, el("h2", {text: "Status"}), kv([
          ["State", statePill(p)], ["Pilot", p.pilot || "–"],
          ["Offer", p.offer_a ? nf1.format(p.offer_a) + " A" : "–"],
          ["Power", kw(p.power_w) + " kW"], ["Faults", faultTags(p.faults)],
          ["Firmware", el("span", {class: "mono", text: p.fw || "–"})],
          ["Board", el("span", {class: "mono", text: p.board || "–"})],
          ["Status at", when(p.status_at)]]));
        const h = d.health;
        fill(healthCard, el("h2", {text: "Health"}), kv([
          ["Link", linkPill(p.online)],
          ["Since", p.online_at ? ago(p.online_at, d.now) : "–"],
          ["Boot", p.boot === null ? "–" : "#" + p.boot + (p.uptime_s !== null ? ", up " + duration(p.uptime_s) : "")],
          ["Clock", p.clock_synced === false ? el("span", {class: "stale", text: "not synced"}) : "synced"],
          ["Sessions", nf0.format(h.sessions) + " · " + kwh(h.energy_wh) + " kWh"],
          ["Faults raised", nf0.format(h.faults_raised)],
          ["Meter restarts", nf0.format(h.meter_restarts)],
          ["Stale meter stops", nf0.format(h.stale_stops)],
          ["Rejected messages", h.rejected ? el("span", {class: "stale", text: nf0.format(h.rejected)
            + (h.last_rejected ? " (last: " + h.last_rejected.reason + ")" : "")}) : "0"]]));
        fill(reportedCard, el("h2", {text: "Reported health"}), reportedHealth(d.reported, d.now));
        fill(sessionsBody, sessionRows(d.sessions, false));
        fill(faultsBody, d.faults.length ? d.faults.map((f) => el("tr", {},
          el("td", {class: "mono", text: f.event_id}), el("td", {}, el("span", {class: "tag", text: f.code})),
          el("td", {}, el("span", {class: "pill " + (f.action === "raised" ? "bad" : "ok"), text: f.action})),
          el("td", {text: when(f.ts)}), el("td", {class: "mono", text: f.session_id || "–"}),
          el("td", {text: when(f.received_at)})))
          : [el("tr", {}, el("td", {class: "empty", colspan: "6", text: "No fault event."}))]);
      },
    };
  }

  // -- sessions ------------------------------------------------------------------------------------------
  function sessionsView(params) {
    const f = {
      pile: el("input", {type: "search", id: "f-pile", placeholder: "any", value: params.get("pile") || ""}),
      since: el("input", {type: "date", id: "f-since", value: params.get("since") || ""}),
      until: el("input", {type: "date", id: "f-until", value: params.get("until") || ""}),
      stop_reason: el("select", {id: "f-stop"}, el("option", {value: "", text: "any"}),
        config.stop_reasons.map((r) => el("option", {value: r, text: r}))),
      auth_source: el("select", {id: "f-auth"}, el("option", {value: "", text: "any"}),
        el("option", {value: "free_vend", text: "free vend"}), el("option", {value: "remote", text: "remote"})),
    };
    f.stop_reason.value = params.get("stop_reason") || "";
    f.auth_source.value = params.get("auth_source") || "";
    let offset = 0;
    const limit = 50;
    const body = el("tbody", {id: "session-rows"});
    const count = el("span", {class: "count", id: "session-count"});
    const older = el("button", {type: "button", text: "Older →"});
    const newer = el("button", {type: "button", text: "← Newer"});
    const values = () => Object.fromEntries(Object.entries(f).map(([k, e]) => [k, e.value.trim()]));
    function changed() {
      offset = 0;
      history.replaceState(null, "", "#/sessions" + query(values()));
      refresh();
    }
    let typing = null;
    f.pile.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(changed, 300); });
    for (const k of ["since", "until", "stop_reason", "auth_source"]) f[k].addEventListener("change", changed);
    older.addEventListener("click", () => { offset += limit; refresh(); });
    newer.addEventListener("click", () => { offset = Math.max(0, offset - limit); refresh(); });
    fill(view, el("div", {class: "title-row"}, el("h1", {text: "Sessions"}),
      el("span", {class: "sub", id: "session-total"})),
    el("div", {class: "card flush"},
      el("div", {class: "toolbar"},
        el("label", {class: "grow"}, "Pile", f.pile), el("label", {}, "From", f.since), el("label", {}, "To", f.until),
        el("label", {}, "Stop reason", f.stop_reason), el("label", {}, "Auth", f.auth_source), count),
      el("div", {class: "table-wrap"}, el("table", {}, SESSION_HEAD(true), body)),
      el("div", {class: "pager"}, newer, older)));
    return {
      name: "sessions",
      async update(fresh) {
        const d = await getJson("/api/sessions" + query(Object.assign(values(), {limit: limit, offset: offset})));
        if (!fresh()) return;
        const total = nf0.format(d.matching) + (d.capped ? "+" : "");
        document.getElementById("session-total").textContent = d.capped
          ? "more than " + total.slice(0, -1) + " sessions: narrow the filter for totals"
          : total + (d.matching === 1 ? " session · " : " sessions · ") + kwh(d.energy_wh) + " kWh";
        count.textContent = d.rows.length ? (offset + 1) + "–" + (offset + d.rows.length) + " of " + total : "";
        newer.disabled = offset === 0;
        older.disabled = d.rows.length < limit || (!d.capped && offset + d.rows.length >= d.matching);
        fill(body, sessionRows(d.rows, true));
      },
    };
  }

  // -- routing -------------------------------------------------------------------------------------------
  function route() {
    generation += 1;
    clearTimeout(timer);
    const hash = location.hash.replace(/^#/, "") || "/fleet";
    const [path, search] = hash.split("?");
    let name = "fleet";
    if (path.startsWith("/pile/")) {
      let id = path.slice("/pile/".length);
      try { id = decodeURIComponent(id); } catch (e) { /* shown as typed */ }
      current = pileView(id);
      name = "pile";
      document.title = id + " · Pile operations";
    } else if (path === "/sessions") {
      current = sessionsView(new URLSearchParams(search || ""));
      name = "sessions";
      document.title = "Sessions · Pile operations";
    } else {
      current = fleetView();
      document.title = "Fleet · Pile operations";
    }
    for (const a of document.querySelectorAll("nav a")) {
      a.classList.toggle("on", a.dataset.nav === name || (name === "pile" && a.dataset.nav === "fleet"));
    }
    refresh();
  }

  async function start() {
    try {
      config = await getJson("/api/config");
      document.getElementById("store").textContent = config.store;
    } catch (e) {
      setLive(false, "Cannot reach the server: " + e.message);
    }
    window.addEventListener("hashchange", route);
    route();
  }
  start();
})();
