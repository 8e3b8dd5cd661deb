// The tether console: renders /api/events snapshots (polls /api/agents if
// server-sent events are unavailable). Builds DOM nodes, never HTML strings,
// so names from agents cannot inject markup.
//
// With 100 000 agents it stays usable: the server filters (the search box:
// agent or service name; online only), puts online agents first and sends
// one page of them with the counts, so an update is a page, not the fleet.
// A new search reopens the event stream. Admins also see the live streams
// (from the admin API, /api/v1/streams).
"use strict";
(function () {
  const SEARCH_DELAY_MS = 250;
  const SPARK_POINTS = 30;
  const TICK_MS = 2000;
  const STREAM_ROWS = 200;

  const agentsEl = document.getElementById("agents");
  const statusEl = document.getElementById("status");
  const searchEl = document.getElementById("search");
  const onlineEl = document.getElementById("online-only");
  const streamsEl = document.getElementById("streams");
  const streamsBody = document.getElementById("streams-body");
  const streamsNote = document.getElementById("streams-note");

  let snap = null;

  // Said in the status line while the page polls instead of live updates.

  let pollingNote = "";
  // Per agent: last byte total and its traffic rates (bytes/s), newest last.
  const traffic = new Map();

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }

  function bytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }

  function age(secs) {
    secs = Math.floor(secs);
    if (secs < 60) return secs + "s";
    if (secs < 3600) return Math.floor(secs / 60) + "m" + String(secs % 60).padStart(2, "0") + "s";
    return Math.floor(secs / 3600) + "h" + String(Math.floor((secs % 3600) / 60)).padStart(2, "0") + "m";
  }

  function since(t) {
    if (!t) return "—";
    return new Date(t * 1000).toLocaleString();
  }

  // A local port for a forward line: stable per target, in 20000-29999, so
  // the same service gets the same suggestion every time.
  function localPort(target) {
    let h = 2166136261;
    for (let i = 0; i < target.length; i++) { h ^= target.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
    return 20000 + (h % 10000);
  }

  // The exact command that forwards a local port to a TCP or UDP service
  // (the token comes from TETHER_TOKEN).
  function forwardLine(agent, service, kind) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const target = agent + "/" + service;
    const udp = kind === "udp" ? "udp:" : "";
    return "tether client --server " + scheme + "//" + location.host +
      " forward " + udp + "127.0.0.1:" + localPort(target) + "=" + target;
  }

  function sparkline(name) {
    const rates = (traffic.get(name) || { rates: [] }).rates;
    const w = 120, h = 24;
    const s = svg("svg", { class: "spark", viewBox: "0 0 " + w + " " + h, width: w, height: h, role: "img" });
    const max = Math.max(1, ...rates);
    const pts = rates.map((r, i) => {
      const x = rates.length > 1 ? (i * w) / (SPARK_POINTS - 1) : 0;
      return x.toFixed(1) + "," + (h - 1 - (r / max) * (h - 2)).toFixed(1);
    });
    s.append(svg("line", { x1: 0, y1: h - 1, x2: w, y2: h - 1, stroke: "currentColor", "stroke-opacity": "0.25" }));
    s.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: "currentColor", "stroke-width": "1.5" }));
    const now = rates.length ? rates[rates.length - 1] : 0;
    const title = svg("title", {});
    title.textContent = bytes(Math.round(now)) + "/s now, peak " + bytes(Math.round(max)) + "/s";
    s.append(title);
    return s;
  }

  function card(a) {
    const services = el("ul", { class: "services" });
    for (const s of a.services) {
      const item = el("li", { "data-service-row": s.name },
        el("span", {}, s.name + " ", el("span", { class: "kind" }, s.kind)));
      if (s.url) {
        item.append(el("a", { href: s.url, target: "_blank", rel: "noopener", "data-service": s.name }, "open"));
      } else if (s.kind === "tcp" || s.kind === "udp") {
        const line = forwardLine(a.name, s.name, s.kind);
        const code = el("code", { class: "forward", "data-forward": s.name }, line);
        const copy = el("button", { class: "link copy", type: "button", title: "copy the command" }, "copy");
        copy.addEventListener("click", () => {
          if (navigator.clipboard) navigator.clipboard.writeText(line).catch(() => {});
          copy.textContent = "copied";
          setTimeout(() => { copy.textContent = "copy"; }, 1500);
        });
        item.classList.add("with-forward");
        item.append(el("div", { class: "forward-line" }, code, copy));
      }
      services.append(item);
    }
    if (!a.services.length) {
      services.append(el("li", { class: "muted" }, a.online ? "no services you can open" : "offline"));
    }
    return el("section", { class: "card agent " + (a.online ? "online" : "offline"), "data-agent": a.name },
      el("h2", {}, el("span", { class: "dot", title: a.online ? "online" : "offline" }), a.name, sparkline(a.name)),
      el("dl", {},
        el("dt", {}, "status"), el("dd", { class: "state" }, a.online ? "online" : "offline"),
        el("dt", {}, "version"), el("dd", {}, a.version || "—"),
        el("dt", {}, "since"), el("dd", {}, since(a.since)),
        el("dt", {}, "streams"), el("dd", {}, String(a.streams)),
        el("dt", {}, "instances"), el("dd", { class: "instances" },
          a.instances.length ? a.instances.map((i) => (i.id || "—") + (i.draining ? " (draining)" : "") + " · " + i.streams + " streams").join(", ") : "—"),
        el("dt", {}, "in / out"), el("dd", {}, bytes(a.bytes_in) + " / " + bytes(a.bytes_out))),
      services);
  }

  // The filter as the server takes it: ?q=TEXT&online=1.
  function query() {
    const p = new URLSearchParams();
    const q = searchEl.value.trim();
    if (q) p.set("q", q);
    if (onlineEl.checked) p.set("online", "1");
    const s = p.toString();
    return s ? "?" + s : "";
  }

  // The snapshot is already filtered, ordered (online first, then by name)
  // and cut to a page by the server.
  function render() {
    if (!snap) return;
    agentsEl.replaceChildren(...snap.agents.map(card));
    let text = snap.online + " of " + snap.total + " agents online";
    if (snap.filtered) text += " · " + snap.matched + " match";
    if (snap.matched > snap.agents.length) text += " · showing the first " + snap.agents.length + ": refine the search";
    statusEl.textContent = text + " · updated " + new Date().toLocaleTimeString() + pollingNote;
  }

  function accept(s, filtered) {
    snap = s;
    snap.filtered = filtered;
    if (s.admin && streamsEl.hidden) {
      streamsEl.hidden = false;
      pollStreams();
    }
    render();
  }

  // Every tick: each agent's traffic rate since the last tick.
  function sample() {
    if (snap) {
      const now = performance.now();
      for (const a of snap.agents) {
        const total = a.bytes_in + a.bytes_out;
        const t = traffic.get(a.name);
        if (!t) { traffic.set(a.name, { total, at: now, rates: [] }); continue; }
        const rate = Math.max(0, (total - t.total) / ((now - t.at) / 1000));
        t.rates.push(rate);
        if (t.rates.length > SPARK_POINTS) t.rates.shift();
        t.total = total; t.at = now;
      }
      // Only the sparklines change: the cards (and their links) stay.
      for (const sec of agentsEl.querySelectorAll("section[data-agent]")) {
        const old = sec.querySelector("svg.spark");
        if (old) old.replaceWith(sparkline(sec.dataset.agent));
      }
    }
    setTimeout(sample, TICK_MS);
  }

  function pollStreams() {
    // The server sends the busiest STREAM_ROWS, busiest first, and the count.
    fetch("/api/v1/streams?limit=" + STREAM_ROWS, { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then((body) => {
        const rows = body.streams;
        streamsBody.replaceChildren(...rows.map((s) =>
          el("tr", { "data-stream": String(s.id) },
            el("td", {}, s.who), el("td", {}, s.agent + "/" + s.service), el("td", {}, s.protocol),
            el("td", {}, age(s.age_secs)), el("td", { class: "num" }, bytes(s.bytes_up)),
            el("td", { class: "num" }, bytes(s.bytes_down)))));
        streamsNote.textContent = body.total
          ? body.total + " live stream" + (body.total === 1 ? "" : "s") + " on replica " + body.replica +
            (body.total > rows.length ? " · the " + rows.length + " busiest shown" : "")
          : "no live streams on replica " + body.replica;
      })
      .then(() => setTimeout(pollStreams, TICK_MS))
      .catch((status) => {
        // Signed out, or no longer an admin: stop asking (each answer
        // would be a refusal in the server's log).
        if (status === 401 || status === 403) {
          streamsEl.hidden = true;
          return;
        }
        streamsNote.textContent = "cannot read the live streams; retrying";
        setTimeout(pollStreams, TICK_MS);
      });
  }

  let es = null;
  let polling = false;
  // A new filter starts a new round of polls; the previous round stops.
  let pollRound = 0;

  // Signed out (here or in another tab) or the login expired: the sign-in
  // page, coming back here after it. Polls stop (each would be a 401).
  let signedOut = false;
  function toLogin() {
    signedOut = true;
    ++pollRound;
    location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
  }

  function poll() {
    const round = ++pollRound;
    const q = query();
    fetch("/api/agents" + q, { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then((s) => { if (round === pollRound) accept(s, q !== ""); })
      .catch((status) => {
        if (status === 401) return toLogin();
        statusEl.textContent = "cannot reach the server; retrying";
      })
      .finally(() => { if (round === pollRound) setTimeout(() => { if (round === pollRound) poll(); }, 3000); });
  }

  // One event stream for the current filter; a new filter closes it (which
  // gives its slot back) and opens the next.
  function listen() {
    if (es) es.close();
    const q = query();
    es = new EventSource("/api/events" + q);
    const mine = es;
    es.addEventListener("agents", (e) => accept(JSON.parse(e.data), q !== ""));
    es.onerror = () => {
      if (mine.readyState !== EventSource.CLOSED) {
        statusEl.textContent = "reconnecting…";
        return;
      }
      // Refused for good: signed out (a 401), or this client has 16 live
      // consoles open elsewhere (a 429, the server's cap). An EventSource
      // does not say which: one plain request does.
      mine.close();
      if (es !== mine) return;
      es = null;
      fetch("/api/agents", { headers: { Accept: "application/json" } })
        .then((r) => {
          if (r.status === 401) return toLogin();
          if (signedOut || es) return;
          polling = true;
          pollingNote = " · refreshing every 3 s (live updates refused: too many consoles open)";
          statusEl.textContent = pollingNote.slice(3);
          poll();
        })
        .catch(() => { statusEl.textContent = "cannot reach the server; retrying"; setTimeout(listen, 3000); });
    };
  }

  // A new filter tries live updates again (a refusal may have been a slot
  // not yet given back); without EventSource it polls with the new filter.
  let searchTimer = null;
  function refilter() {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      if (!window.EventSource) { poll(); return; }
      if (polling) {
        polling = false;
        pollRound++; // ends the polling round
        pollingNote = "";
      }
      listen();
    }, SEARCH_DELAY_MS);
  }
  searchEl.addEventListener("input", refilter);
  onlineEl.addEventListener("change", refilter);

  if (window.EventSource) {
    listen();
  } else {
    polling = true;
    poll();
  }
  setTimeout(sample, TICK_MS);
})();
