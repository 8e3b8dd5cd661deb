// The tether console: renders /api/events snapshots (polls /api/agents if
// server-sent events are unavailable). Builds DOM nodes, never HTML strings,
// so names from agents cannot inject markup.
"use strict";
(function () {
  const agentsEl = document.getElementById("agents");
  const statusEl = document.getElementById("status");

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  function bytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }

  function since(t) {
    if (!t) return "—";
    const d = new Date(t * 1000);
    return d.toLocaleString();
  }

  function render(snap) {
    const cards = snap.agents.map((a) => {
      const services = el("ul", { class: "services" });
      for (const s of a.services) {
        const link = s.url
          ? el("a", { href: s.url, target: "_blank", rel: "noopener", "data-service": s.name }, "open")
          : el("span", { class: "kind" }, "");
        services.append(el("li", {}, el("span", {}, s.name + " ", el("span", { class: "kind" }, s.kind)), link));
      }
      if (!a.services.length) {
        services.append(el("li", { class: "muted" }, a.online ? "no services you can open" : "offline"));
      }
      return el("section", { class: "card agent " + (a.online ? "online" : "offline"), "data-agent": a.name },
        el("h2", {}, el("span", { class: "dot", title: a.online ? "online" : "offline" }), a.name),
        el("dl", {},
          el("dt", {}, "status"), el("dd", { class: "state" }, a.online ? "online" : "offline"),
          el("dt", {}, "version"), el("dd", {}, a.version || "—"),
          el("dt", {}, "since"), el("dd", {}, since(a.since)),
          el("dt", {}, "streams"), el("dd", {}, String(a.streams)),
          el("dt", {}, "instances"), el("dd", { class: "instances" },
            a.instances.length ? a.instances.map((i) => (i.id || "—") + (i.draining ? " (draining)" : "") + " · " + i.streams + " streams").join(", ") : "—"),
          el("dt", {}, "in / out"), el("dd", {}, bytes(a.bytes_in) + " / " + bytes(a.bytes_out))),
        services);
    });
    agentsEl.replaceChildren(...cards);
    const online = snap.agents.filter((a) => a.online).length;
    statusEl.textContent = online + " of " + snap.agents.length + " agents online · updated " +
      new Date().toLocaleTimeString();
  }

  function poll() {
    fetch("/api/agents", { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then(render)
      .catch(() => { statusEl.textContent = "cannot reach the server; retrying"; })
      .finally(() => setTimeout(poll, 3000));
  }

  if (window.EventSource) {
    const es = new EventSource("/api/events");
    es.addEventListener("agents", (e) => render(JSON.parse(e.data)));
    es.onerror = () => { statusEl.textContent = "reconnecting…"; };
  } else {
    poll();
  }
})();
