// ftvm console: renders the server's view (server-sent events on /api/stream) and sends
// the operator's actions (POST /api/action with the session's CSRF token), each behind a
// confirmation. Everything shown is set as text, never as HTML.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
let pending = null;

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function yesNo(flag, yes, no) {
  return el("span", { class: flag ? "ok" : "bad" }, flag ? yes : no);
}

function actionButton(label, action, pair, host, vm) {
  return el("button", {
    type: "button", class: "action", "data-action": action, "data-pair": pair,
    "data-host": host, "data-vm": vm, onclick: () => ask(action, pair, host, vm),
  }, label);
}

function hostCard(pair, host) {
  const card = el("div", { class: "host" + (host.reachable ? "" : " unreachable"), "data-host": host.name });
  card.append(el("h3", {}, host.name));
  if (!host.reachable) {
    card.append(el("div", { class: "bad" }, "not reachable: " + (host.error || "")));
    return card;
  }
  card.append(el("div", {}, "A-links ", el("span", { class: host.links_up === host.links ? "ok" : "bad", "data-links": host.name }, host.links_up + " of " + host.links + " up")));
  card.append(el("div", {}, "peer ", yesNo(host.peer_reachable, "reachable", "unreachable")));
  card.append(el("div", { class: "witness" }, "witness ", yesNo(host.witness_reachable, "reachable", "unreachable")));
  card.append(el("div", {}, "maintenance ", host.disabled ? el("span", { class: "warn" }, "on") : "off", " ",
    host.disabled ? actionButton("Maintenance off", "maintenance-off", pair, host.name)
                  : actionButton("Maintenance on", "maintenance-on", pair, host.name)));
  return card;
}

function vmRow(pair, vm) {
  const percent = vm.sync_percent === null ? (vm.state === "Protected" ? 100 : 0) : vm.sync_percent;
  const bar = el("span", { class: "bar sync-bar", "data-percent": percent.toFixed(1), title: percent.toFixed(1) + " %" },
    el("div", { style: "" }));
  bar.firstChild.style.width = Math.max(0, Math.min(100, percent)) + "%";
  const links = el("td", { class: "links" });
  vm.disk_links.forEach((disk, index) => {
    links.append("disk" + index + " ");
    disk.forEach((up) => links.append(el("span", { class: "dot " + (up ? "up" : "down"), title: up ? "up" : "down" })));
  });
  const nics = el("td", { class: "nics" });
  vm.nics.forEach((nic) => {
    nics.append(el("div", {}, nic.mac + ": " + nic.paths.map(([host, path]) => host + " " + path).join(", ")));
  });
  const primary = vm.primary || "";
  return el("tr", { class: "vm-row health-" + vm.health, "data-vm": vm.name, "data-health": vm.health, "data-state": vm.state, "data-primary": primary },
    el("td", {}, el("b", {}, vm.name), vm.reasons.length ? el("div", { class: "reasons" }, vm.reasons.join("; ")) : null),
    el("td", { class: "level" }, String(vm.level)),
    el("td", { class: "state" }, vm.state + (vm.migrating ? " (moving)" : "")),
    el("td", { class: "primary" }, primary),
    el("td", { class: "secondary" }, vm.secondary || ""),
    el("td", { class: "sync" }, bar, " ", el("span", { class: "sync-text" }, percent.toFixed(1) + " %")),
    links, nics,
    el("td", { class: "actions" },
      actionButton("Protect…", "protect", pair, primary, vm.name),
      actionButton("Unprotect", "unprotect", pair, primary, vm.name),
      actionButton("Fail over", "failover", pair, primary, vm.name),
      actionButton("Migrate", "migrate", pair, primary, vm.name)));
}

function eventRows(events) {
  const body = el("tbody");
  for (const event of events) {
    body.append(el("tr", {},
      el("td", {}, new Date(event.unix_ms).toISOString().replace("T", " ").slice(0, 19)),
      el("td", {}, event.host),
      el("td", { class: "sev-" + event.severity }, event.severity),
      el("td", {}, event.vm || "-"),
      el("td", {}, event.what, event.advice ? el("div", { class: "remedy" }, "remedy: " + event.advice) : null)));
  }
  return body;
}

function render(view) {
  const root = document.getElementById("pairs");
  const sections = (view.pairs || []).map((pair) => {
    const head = el("tr", {}, ...["VM", "Level", "State", "Primary", "Secondary", "Sync", "A-links", "NIC paths", "Actions"].map((h) => el("th", {}, h)));
    const vms = el("table", { class: "vms" }, el("thead", {}, head), el("tbody", {}, ...pair.vms.map((vm) => vmRow(pair.name, vm))));
    const events = el("table", { class: "events" },
      el("thead", {}, el("tr", {}, ...["Time (UTC)", "Host", "Severity", "VM", "Event"].map((h) => el("th", {}, h)))),
      eventRows(pair.events));
    return el("section", { class: "pair", "data-pair": pair.name },
      el("h2", {}, "Pair " + pair.name),
      el("div", { class: "hosts" }, ...pair.hosts.map((host) => hostCard(pair.name, host))),
      vms, el("h3", {}, "Events"), events);
  });
  root.replaceChildren(...sections);
}

const descriptions = {
  "protect": (vm, host) => "Protect " + vm + " (on " + host + ") at the level below?",
  "unprotect": (vm, host) => "Stop protecting " + vm + "? It keeps running on " + host + " without a replica.",
  "failover": (vm, host) => "Planned failover of " + vm + ": stop it on " + host + " and restart it on the peer from its in-sync copy?",
  "migrate": (vm, host) => "Move " + vm + " from " + host + " to the peer without a reboot?",
  "maintenance-on": (vm, host) => "Maintenance on for " + host + ": its VMs move to the peer and it takes none until maintenance is off?",
  "maintenance-off": (vm, host) => "Maintenance off for " + host + ": its VMs rejoin as secondaries and resync?",
};

function ask(action, pair, host, vm) {
  pending = { action, pair, host, vm };
  document.getElementById("confirm-text").textContent = descriptions[action](vm, host);
  document.getElementById("confirm-level-row").hidden = action !== "protect";
  document.getElementById("confirm").showModal();
}

async function send(request) {
  const result = document.getElementById("result");
  result.className = "";
  result.textContent = request.action + " " + (request.vm || request.host) + ": sent…";
  try {
    const response = await fetch("/api/action", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(request),
    });
    const answer = await response.json().catch(() => ({ ok: false, message: response.statusText }));
    result.className = answer.ok ? "done" : "error";
    result.textContent = request.action + " " + (request.vm || request.host) + ": " + answer.message;
  } catch (error) {
    result.className = "error";
    result.textContent = request.action + ": " + error;
  }
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream");
  source.addEventListener("state", (event) => {
    live.className = "live on";
    live.textContent = "live";
    render(JSON.parse(event.data));
  });
  source.onerror = () => {
    live.className = "live off";
    live.textContent = "reconnecting…";
  };
}

document.addEventListener("DOMContentLoaded", () => {
  const dialog = document.getElementById("confirm");
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "yes" && pending) {
      const request = { action: pending.action, pair: pending.pair, host: pending.host, vm: pending.vm || null };
      if (pending.action === "protect") request.level = Number(document.getElementById("confirm-level").value);
      send(request);
    }
    pending = null;
  });
  connect();
});
