"use strict";
// The portal dashboard. All text from the server goes into the page through textContent, never innerHTML.

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const headers = { "X-Portal-Request": "1", ...(options.body ? { "Content-Type": "application/json" } : {}) };
  const response = await fetch(path, { credentials: "same-origin", ...options, headers });
  const body = response.headers.get("Content-Type")?.includes("json") ? await response.json() : {};
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function formatUptime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

// A button does nothing while its own call is in flight (a double click must not start two tunnels).
async function whileBusy(button, work) {
  if (button?.disabled) return;
  if (button) button.disabled = true;
  try { await work(); } finally { if (button) button.disabled = false; }
}

// ---- tabs
let activeTab = "apps";
const refreshers = {};
const TABS = [...document.querySelectorAll("#tabs button")].map((b) => b.dataset.tab);

// A refresh that fails says so in the header (the tab keeps its last data) instead of failing silently.
async function refresh(name) {
  try {
    await refreshers[name]?.();
    $("connection").textContent = "";
  } catch (error) {
    $("connection").textContent = `cannot reach the portal (${error.message}); showing the last data`;
  }
}

function showTab(name) {
  if (!TABS.includes(name)) name = "apps";
  activeTab = name;
  history.replaceState(null, "", `#${name}`);
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  for (const section of document.querySelectorAll(".tab")) section.classList.toggle("active", section.id === `tab-${name}`);
  refresh(name);
}
window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => showTab(button.dataset.tab));

// ---- apps
refreshers.apps = async () => {
  const { apps } = await api("api/apps");
  $("apps-body").replaceChildren(...apps.map((app) => {
    const details = app.engine
      ? `model: ${app.engine.model ?? "(none yet)"}, health: ${app.engine.health}` : "";
    return el("tr", { "data-app": app.name },
      el("td", {}, el("a", { href: app.url, target: "_blank", rel: "noopener", text: app.name })),
      el("td", {}, el("span", { class: `badge ${app.status}`, text: app.status })),
      el("td", { text: app.is_proxied ? `${app.external_port} → ${app.internal_port}` : `${app.external_port}` }),
      el("td", { class: "details", text: details }));
  }));
};

// ---- services
// A tab's POST from one of its buttons: progress and outcome in the tab's message (after `label`, when
// given), then the tab refreshed.
async function post(button, tab, path, { body, label } = {}) {
  const message = $(`${tab}-message`), prefix = label ? `${label}: ` : "";
  await whileBusy(button, async () => {
    message.textContent = label ? `${label}…` : "working…";
    try {
      await api(path, { method: "POST", ...(body ? { body: JSON.stringify(body) } : {}) });
      message.textContent = label ? `${label}: done` : "";
    } catch (error) {
      message.textContent = prefix + error.message;
    }
  });
  refresh(tab);
}

function serviceAction(button, name, action) {
  return post(button, "services", `api/services/${encodeURIComponent(name)}/${action}`, { label: `${action} ${name}` });
}
let servicesError = "";
refreshers.services = async () => {
  let programs;
  try {
    ({ programs } = await api("api/services"));
  } catch (error) {
    // No rows that look live while supervisord cannot be asked.
    servicesError = error.message;
    $("services-message").textContent = servicesError;
    $("services-body").replaceChildren();
    return;
  }
  if (servicesError && $("services-message").textContent === servicesError) $("services-message").textContent = "";
  servicesError = "";
  $("services-body").replaceChildren(...programs.map((p) => {
    const buttons = ["start", "stop", "restart"].map((action) => el("button", {
      class: "action", "data-action": action, text: action,
      ...(p.is_protected && action !== "start" ? { disabled: "", title: "runs the portal itself" } : {}),
      onclick: (event) => serviceAction(event.currentTarget, p.name, action),
    }));
    return el("tr", { "data-program": p.name },
      el("td", { text: p.name }), el("td", {}, stateBadge(p)),
      el("td", { class: "pid", text: p.pid ?? "" }), el("td", { text: formatUptime(p.uptime_s) }),
      el("td", {}, ...buttons));
  }));
};

// A wrapper that found its app unconfigured exits 0 on purpose: skipped, not failed.
function stateBadge(p) {
  if (p.skipped) return el("span", { class: "badge state SKIPPED", text: "SKIPPED", title: p.skipped });
  const failed = p.state === "EXITED" && p.exit_status !== 0;
  const text = p.state === "EXITED" ? `EXITED (${p.exit_status})` : p.state;
  return el("span", { class: `badge state ${p.state}${failed ? " failed" : ""}`, text });
}

// ---- logs
const ANSI_SGR = /\x1b\[([0-9;]*)m/g;
// Other CSI sequences, OSC strings, and character-set choices such as tput sgr0's "\x1b(B".
const ANSI_OTHER = /\x1b\[[0-9;?]*[A-Za-ln-z]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]/g;
const MAX_LOG_LINES = 5000;
const logView = { socket: null, live: null, text: "", pendingCR: false };

function renderAnsi(node, raw) {
  const text = raw.replace(ANSI_OTHER, "");
  const spans = [];
  let classes = [], last = 0;
  for (const match of text.matchAll(ANSI_SGR)) {
    if (match.index > last) spans.push(el("span", { class: classes.join(" "), text: text.slice(last, match.index) }));
    const codes = (match[1] || "0").split(";").map(Number);
    for (let i = 0; i < codes.length; i++) {
      const code = codes[i];
      if (code === 38 || code === 48) { i += codes[i + 1] === 5 ? 2 : codes[i + 1] === 2 ? 4 : 0; continue; }
      if (code === 0) classes = [];
      else if (code === 1) classes.push("ansi-bold");
      else if (code === 22) classes = classes.filter((c) => c !== "ansi-bold");
      else if ((code >= 30 && code <= 37) || (code >= 90 && code <= 97)) {
        classes = classes.filter((c) => !c.startsWith("fg-")).concat(`fg-${code}`);
      } else if (code === 39) classes = classes.filter((c) => !c.startsWith("fg-"));
    }
    last = match.index + match[0].length;
  }
  if (last < text.length) spans.push(el("span", { class: classes.join(" "), text: text.slice(last) }));
  node.replaceChildren(...spans);
}

function newLogLine() {
  const view = $("log-view");
  logView.live = view.appendChild(el("div"));
  logView.text = "";
  logView.pendingCR = false;
  while (view.childElementCount > MAX_LOG_LINES) view.firstElementChild.remove();
}

// "\r" starts the line over (progress bars); "\n" and "\r\n" end it.
function feedLog(chunk) {
  for (const part of chunk.split(/(\r\n|\n|\r)/)) {
    if (part === "\n" || part === "\r\n") {
      renderAnsi(logView.live, logView.text);
      newLogLine();
    } else if (part === "\r") {
      logView.pendingCR = true;
    } else if (part) {
      if (logView.pendingCR) logView.text = "";
      logView.pendingCR = false;
      logView.text += part;
    }
  }
  renderAnsi(logView.live, logView.text);
  if ($("log-follow").checked) $("log-view").scrollTop = $("log-view").scrollHeight;
}

// A dropped stream (portal restart, proxy timeout) reconnects by itself, backing off up to 10 s; the
// server starts each connection with the tail again.
function openLog(name, attempt = 0) {
  logView.socket?.close();
  logView.socket = null;
  if (attempt === 0) { $("log-view").replaceChildren(); newLogLine(); }
  if (!name) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(`api/logs/stream?file=${encodeURIComponent(name)}`, location.href);
  url.protocol = scheme;
  const socket = new WebSocket(url);
  logView.socket = socket;
  let failure = null, opened = false;
  socket.onopen = () => { opened = true; $("log-status").textContent = `following ${name}`; };
  socket.onclose = () => {
    if (logView.socket !== socket) return;  // replaced by another choice
    if (failure) { $("log-status").textContent = failure; return; }  // the server said why: keep it
    const next = opened ? 1 : attempt + 1, delay = Math.min(10, 2 ** (next - 1));
    $("log-status").textContent = `disconnected; reconnecting in ${delay} s`;
    setTimeout(() => { if (logView.socket === socket) openLog(name, next); }, delay * 1000);
  };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "init") { $("log-view").replaceChildren(); newLogLine(); }
    if (message.type === "error") failure = message.text;
    else feedLog(message.text);
  };
}

refreshers.logs = async () => {
  const { files } = await api("api/logs");
  const select = $("log-file"), current = select.value;
  select.replaceChildren(el("option", { value: "", text: "choose a log…" }),
    ...files.map((f) => el("option", { value: f.name, text: f.name })));
  if (files.some((f) => f.name === current)) select.value = current;
};
$("log-file").addEventListener("change", (event) => openLog(event.target.value));

// ---- tunnels
function tunnelCall(button, path, body) {
  return post(button, "tunnels", path, { body });
}
refreshers.tunnels = async () => {
  const status = await api("api/tunnels");
  // CF_TUNNEL_TOKEN: the named tunnel takes the place of quick tunnels.
  $("tunnels-toolbar").hidden = !status.available || status.named;
  $("named-toolbar").hidden = !status.available || !status.named || status.tunnels.some((t) => t.id === "named");
  if (!status.available) $("tunnels-message").textContent = status.message;
  $("quick-off").hidden = !status.available || !status.named;
  $("tunnels-warning").hidden = !status.named_warning;
  $("tunnels-warning").textContent = status.named_warning;
  const select = $("tunnel-target"), current = select.value;
  select.replaceChildren(...status.targets.map((t) => el("option", { value: t.target, text: `${t.name} (${t.target})` })));
  if (current) select.value = current;
  $("tunnels-body").replaceChildren(...status.tunnels.map((t) => el("tr", {},
    el("td", { text: t.target }),
    el("td", {}, t.public_url ? el("a", { href: t.public_url, target: "_blank", rel: "noopener", text: t.public_url }) : ""),
    el("td", {}, el("span", { class: `badge ${t.state}`, text: t.state })),
    el("td", {},
      el("button", { class: "action", text: "refresh", onclick: (e) => tunnelCall(e.currentTarget, `api/tunnels/${t.id}/refresh`) }),
      el("button", { class: "action", text: "stop", onclick: (e) => tunnelCall(e.currentTarget, `api/tunnels/${t.id}/stop`) })))));
};
$("tunnel-start").addEventListener("click", (e) => tunnelCall(e.currentTarget, "api/tunnels", { target: $("tunnel-target").value }));
$("named-start").addEventListener("click", (e) => tunnelCall(e.currentTarget, "api/tunnels/named/start"));

// ---- metrics
const CHARTS = [
  ["cpu_percent", "CPU %", 100], ["ram_percent", "RAM %", 100], ["disk_percent", "Disk %", 100],
  ["gpu_percent", "GPU %", 100], ["gpu_memory_percent", "GPU memory %", 100],
  ["requests_running", "Requests running", null], ["requests_waiting", "Requests waiting", null],
  ["tokens_per_s", "Generated tokens/s", null], ["kv_cache_usage", "KV cache use", 1],
  ["prefix_hit_rate", "Prefix cache hit rate", 1],
];

function drawChart(canvas, values, max) {
  const ctx = canvas.getContext("2d"), w = (canvas.width = canvas.clientWidth), h = (canvas.height = 70);
  ctx.clearRect(0, 0, w, h);
  const top = max ?? Math.max(1, ...values);
  ctx.strokeStyle = "#5b9dff";
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = values.length > 1 ? (i / (values.length - 1)) * w : w, y = h - 2 - (v / top) * (h - 4);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
}

refreshers.metrics = async () => {
  const { history } = await api("api/metrics");
  const charts = $("charts");
  for (const [key, title, max] of CHARTS) {
    const values = history.map((p) => p[key]).filter((v) => v !== null && v !== undefined);
    let box = charts.querySelector(`[data-metric="${key}"]`);
    if (!values.length) { box?.remove(); continue; }
    if (!box) box = charts.appendChild(el("div", { class: "chart", "data-metric": key }, el("h3"), el("canvas")));
    const latest = values[values.length - 1];
    box.querySelector("h3").textContent = `${title}: ${Number.isInteger(latest) ? latest : latest.toFixed(2)}`;
    drawChart(box.querySelector("canvas"), values, max);
  }
};

// ---- start
async function loadSession() {
  const session = await api("api/session");
  $("session").textContent = session.auth_enabled ? (session.authenticated ? "signed in" : "open port") : "auth off";
}
loadSession().catch(console.warn);
showTab(location.hash.slice(1) || "apps");
setInterval(() => refresh(activeTab), 3000);
