// The open ports notice: a strip between the bar and the terminal, shown while ports listen
// in the session ("port 3000 is open: open preview / copy link / share"), from capsule's
// `ports` frames (sent as the page attaches and whenever the set changes). It takes its own
// room (the terminal is fitted again when it comes and goes), so that it never covers the
// prompt. Hidden with its ×, it comes back when another port opens. "share" is offered only
// where capsule's API has the route for it (api/openapi.json says); the pure parts are
// portlist.js.

import {
  announceText, canSharePorts, openText, portChanges, readPorts, shownPorts,
} from "./portlist.js";

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

// ui: { ports (the strip's element) }; `sessionId()`: the session's id; `status`: the status
// bar (status.js); `relayout()`: fits the terminal to its new room.
export function setupPorts(ui, { sessionId, status, relayout }) {
  let ports = [];
  let more = 0;
  let session = null;
  let dismissed = false;
  let shareable = null; // null: not asked yet
  let fresh = [];
  let freshTimer = null;

  const list = element("ul", { className: "ports-list" });
  const rest = element("span", { className: "ports-rest" });
  const hide = element("button", { type: "button", className: "ports-hide", textContent: "×",
    title: "Hide (shown again when another port opens)" });
  hide.setAttribute("aria-label", "Hide the open ports");
  const live = element("span", { className: "visually-hidden", role: "status" });
  live.setAttribute("aria-live", "polite");
  ui.ports.append(list, rest, hide, live);
  ui.ports.setAttribute("aria-label", "Ports open in the session");

  hide.addEventListener("click", () => {
    dismissed = true;
    render();
  });

  function api(path, options = {}) {
    return fetch(path, {
      credentials: "same-origin",
      cache: "no-store",
      referrerPolicy: "same-origin",
      headers: { Accept: "application/json",
        ...(options.body ? { "Content-Type": "application/json" } : {}) },
      ...options,
    });
  }

  function probeShare() {
    shareable = false;
    api("api/openapi.json").then((r) => (r.ok ? r.json() : null)).then((doc) => {
      shareable = canSharePorts(doc);
      if (shareable) render();
    }).catch(() => {});
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    const field = element("textarea", { value: text, readOnly: true });
    field.style.position = "fixed";
    field.style.opacity = "0";
    document.body.append(field);
    field.select();
    const copied = document.execCommand && document.execCommand("copy");
    field.remove();
    return copied ? Promise.resolve() : Promise.reject(new Error("not allowed"));
  }

  function copyLink(port) {
    copyText(port.url).then(() => status.flash(`link to port ${port.port} copied`),
      () => status.flash(`copy the link yourself: ${port.url}`));
  }

  function share(port, button) {
    const id = sessionId();
    if (!id) return;
    button.disabled = true;
    api(`api/sessions/${encodeURIComponent(id)}/ports/${port.port}/shares`,
      { method: "POST", body: "{}" })
      .then((r) => r.json().catch(() => ({})).then((body) => {
        if (r.status === 404 && body.code !== "session_not_found") {
          shareable = false;
          render();
          status.flash("capsule cannot share ports here");
          return;
        }
        if (!r.ok) throw new Error(body.error || `capsule answered ${r.status}`);
        const url = new URL(body.url, location.href).href;
        return copyText(url).then(() => status.flash(`share link to port ${port.port} copied`),
          () => status.flash(`share link: ${url}`));
      }))
      .catch((e) => status.flash(`port ${port.port} could not be shared: ${e.message}`))
      .finally(() => { button.disabled = false; });
  }

  function row(port) {
    const item = element("li", { className: "ports-row" });
    if (fresh.includes(port.port)) item.classList.add("is-new");
    const open = element("a", { href: port.url, target: "_blank", rel: "noopener noreferrer",
      textContent: "open preview", title: port.url });
    const copy = element("button", { type: "button", textContent: "copy link" });
    copy.addEventListener("click", () => copyLink(port));
    item.append(element("span", { className: "ports-text", textContent: openText(port.port) }),
      open, copy);
    if (shareable === true) {
      const button = element("button", { type: "button", textContent: "share",
        title: "Copy a link others can open" });
      button.addEventListener("click", () => share(port, button));
      item.append(button);
    }
    return item;
  }

  function render() {
    const before = ui.ports.hidden;
    const { shown, rest: restText } = shownPorts(ports, more);
    list.replaceChildren(...shown.map(row));
    rest.textContent = restText;
    // Focus must not be lost to a row that goes: it goes back to the terminal's page.
    ui.ports.hidden = ports.length === 0 || dismissed;
    if (before !== ui.ports.hidden) relayout();
  }

  return {
    // capsule's `ports` frame.
    update(frame) {
      const next = readPorts(frame, location.href);
      const { opened } = portChanges(ports, next.ports);
      ports = next.ports;
      more = next.more;
      if (opened.length) {
        dismissed = false;
        live.textContent = announceText(opened);
        fresh = opened;
        clearTimeout(freshTimer);
        freshTimer = setTimeout(() => {
          fresh = [];
          for (const item of list.querySelectorAll(".is-new")) item.classList.remove("is-new");
        }, 4000);
      }
      if (ports.length && shareable === null) probeShare();
      render();
    },
    // The page is attached to session `id`: another session's ports are not its.
    attached(id) {
      if (id === session) return;
      session = id;
      ports = [];
      more = 0;
      dismissed = false;
      render();
    },
    // The session is over.
    clear() {
      ports = [];
      render();
    },
  };
}
