// The tether console: renders /api/events snapshots (polls /api/agents if
// server-sent events are unavailable). Builds DOM nodes, never HTML strings,
// so names from agents cannot inject markup.
//
// With a thousand agents it stays usable: online agents come first, the
// search box filters by agent or service name, and at most RENDER_CAP cards
// are in the page at once. Admins also see the live streams (from the admin
// API, /api/v1/streams).
"use strict";
(function () {
  const RENDER_CAP = 60;
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

  function matches(a, q) {
    if (onlineEl.checked && !a.online) return false;
    if (!q) return true;
    return a.name.toLowerCase().includes(q) || a.services.some((s) => s.name.toLowerCase().includes(q));
  }

  function render() {
    if (!snap) return;
    const q = searchEl.value.trim().toLowerCase();
    // Online first, then by name.
    const all = snap.agents.slice().sort((x, y) => (y.online - x.online) || (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
    const shown = all.filter((a) => matches(a, q));
    agentsEl.replaceChildren(...shown.slice(0, RENDER_CAP).map(card));
    const online = snap.agents.filter((a) => a.online).length;
    let text = online + " of " + snap.agents.length + " agents online";
    if (q || onlineEl.checked) text += " · " + shown.length + " match";
    if (shown.length > RENDER_CAP) text += " · showing the first " + RENDER_CAP + ": refine the search";
    statusEl.textContent = text + " · updated " + new Date().toLocaleTimeString() + pollingNote;
  }

  function accept(s) {
    snap = s;
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
    fetch("/api/v1/streams", { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then((body) => {
        const rows = body.streams.slice().sort((x, y) => (y.bytes_up + y.bytes_down) - (x.bytes_up + x.bytes_down));
        streamsBody.replaceChildren(...rows.slice(0, STREAM_ROWS).map((s) =>
          el("tr", { "data-stream": String(s.id) },
            el("td", {}, s.who), el("td", {}, s.agent + "/" + s.service), el("td", {}, s.protocol),
            el("td", {}, age(s.age_secs)), el("td", { class: "num" }, bytes(s.bytes_up)),
            el("td", { class: "num" }, bytes(s.bytes_down)))));
        streamsNote.textContent = rows.length
          ? rows.length + " live stream" + (rows.length === 1 ? "" : "s") + " on replica " + body.replica +
            (rows.length > STREAM_ROWS ? " · the " + STREAM_ROWS + " busiest shown" : "")
          : "no live streams on replica " + body.replica;
      })
      .catch(() => { streamsNote.textContent = "cannot read the live streams; retrying"; })
      .finally(() => setTimeout(pollStreams, TICK_MS));
  }

  searchEl.addEventListener("input", render);
  onlineEl.addEventListener("change", render);

  function poll() {
    fetch("/api/agents", { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then(accept)
      .catch(() => { statusEl.textContent = "cannot reach the server; retrying"; })
      .finally(() => setTimeout(poll, 3000));
  }

  if (window.EventSource) {
    const es = new EventSource("/api/events");
    es.addEventListener("agents", (e) => accept(JSON.parse(e.data)));
    es.onerror = () => {
      if (es.readyState !== EventSource.CLOSED) {
        statusEl.textContent = "reconnecting…";
        return;
      }
      // Refused for good (a 429: this client has 16 live consoles open
      // elsewhere, the server's cap): keep the page current by polling.
      es.close();
      pollingNote = " · refreshing every 3 s (live updates refused: too many consoles open)";
      statusEl.textContent = pollingNote.slice(3);
      poll();
    };
  } else {
    poll();
  }
  setTimeout(sample, TICK_MS);
})();
