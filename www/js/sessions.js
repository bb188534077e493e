// The Sessions list: the caller's sessions (GET /api/sessions: running, detached and kept),
// in a menu under the bar's Sessions button, with what each offers: Open, Resume (a kept one:
// POST .../resume, then open it), Export (GET .../workspace, downloaded), Fork (POST .../fork,
// then open the new one), Put away (POST .../put-away) and Delete (asked first; DELETE).
// Loaded by app.js when the button is first used; the words are js/keeping.js's (pure).

import { ACTIONS, apiError, confirmText, sessionPage, sessionRows } from "./keeping.js";
import { downloadInFrame } from "./transfer.js";

const REFRESH_MS = 15000;

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

// A request to the session API; resolves to its JSON body, or rejects with capsule's error,
// whole.
function api(path, method = "GET") {
  return fetch(`api/sessions${path}`, {
    method,
    credentials: "same-origin",
    cache: "no-store",
    // The page's referrer policy would send "Origin: null" with a POST, which capsule refuses.
    referrerPolicy: "same-origin",
    headers: { Accept: "application/json" },
  }).then((response) => response.json().catch(() => ({})).then((body) => {
    if (!response.ok) throw new Error(apiError(response.status, body));
    return body;
  }), (e) => {
    throw new Error(`capsule did not answer (${e.message})`);
  });
}

// `ui`: { sessionsButton, sessionsMenu }; `sessionId()`: this page's session (null: none);
// `resumeCurrent()`: resume this page's own kept session through its socket; `go(url)`: to
// another session's page; `confirm(text)`: asks before what cannot be undone; `closing()`:
// what closing this tab does (js/leaving.js), said here too (a phone's bar has no room for it).
export function setupSessions(ui, { sessionId, resumeCurrent, go = (url) => location.assign(url),
  confirm = (text) => window.confirm(text), closing = () => null }) {
  let refreshTimer = null;
  let busy = false;
  let sessions = new Map(); // id -> the session as the API described it

  const list = element("ul", { id: "sessions-list", className: "sessions-list" });
  const error = element("p", { id: "sessions-error", className: "sessions-error", role: "alert" });
  const leaving = element("p", { className: "sessions-leaving" });
  const close = element("button", { type: "button", className: "icon sessions-close",
    textContent: "×", title: "Close", ariaLabel: "Close the sessions list" });
  ui.sessionsMenu.append(
    element("div", { className: "sessions-head" }, [
      element("h2", { textContent: "Your sessions" }), close]),
    element("p", { className: "sessions-about", textContent: "A session put away keeps its " +
      "files (nothing runs in it) until the date shown: resume it, export its /workspace, " +
      "fork it into a new session, or delete it." }),
    leaving, error, list);

  function say(message) {
    error.textContent = message || "";
  }

  function render(body) {
    const now = Date.now() / 1000;
    const tab = closing();
    leaving.textContent = tab ? `${tab.short}.` : "";
    leaving.dataset.outcome = tab ? tab.outcome : "";
    const current = sessionId();
    sessions = new Map((body.sessions || []).filter((s) => s && s.id).map((s) => [s.id, s]));
    const rows = sessionRows(body, current, now);
    list.replaceChildren();
    if (rows.length === 0) {
      list.append(element("li", { className: "sessions-none", textContent: "No sessions." }));
      return;
    }
    for (const row of rows) {
      const item = element("li", { className: "sessions-row" });
      item.dataset.state = row.state;
      item.dataset.id = row.id;
      const head = element("div", { className: "sessions-line" }, [
        element("span", { className: "sessions-state", textContent: row.stateText }),
        element("code", { className: "sessions-id", textContent: row.id, title: row.id }),
      ]);
      item.append(head);
      if (row.details) {
        item.append(element("div", { className: "sessions-details", textContent: row.details }));
      }
      if (row.command || row.reason) {
        const what = [row.command ? `ran ${row.command}` : "", row.reason].filter(Boolean);
        item.append(element("div", { className: "sessions-details", textContent: what.join(" · ") }));
      }
      const buttons = element("div", { className: "sessions-actions" });
      for (const action of row.actions) {
        const spec = ACTIONS[action];
        const button = element("button", { type: "button", textContent: spec.label,
          title: spec.title, className: spec.danger ? "danger" : "" });
        button.dataset.action = action;
        button.addEventListener("click", () => act(action, row, button));
        buttons.append(button);
      }
      item.append(buttons);
      list.append(item);
    }
  }

  function refresh() {
    return api("").then(render).catch((e) => say(`the sessions could not be listed: ${e.message}`));
  }

  const path = (id, rest = "") => `/${encodeURIComponent(id)}${rest}`;

  function act(action, row, button) {
    if (busy) return;
    const question = confirmText(action, row.id);
    if (question && !confirm(question)) return;
    const session = sessions.get(row.id) || {};
    say("");
    let work;
    switch (action) {
      case "open":
        go(sessionPage(location.href, row.id, session.url));
        return;
      case "export":
        downloadInFrame(`api/sessions${path(row.id, "/workspace")}`, (message) => say(message));
        return;
      case "resume":
        if (row.current) {
          setOpen(false);
          resumeCurrent();
          return;
        }
        work = api(path(row.id, "/resume"), "POST").then((body) =>
          go(sessionPage(location.href, row.id, body.url)));
        break;
      case "fork":
        work = api(path(row.id, "/fork"), "POST").then((body) =>
          go(sessionPage(location.href, body.id, body.url)));
        break;
      case "put-away":
        work = api(path(row.id, "/put-away"), "POST").then(refresh);
        break;
      case "delete":
        work = api(path(row.id), "DELETE").then(refresh);
        break;
      default:
        return;
    }
    busy = true;
    const label = button.textContent;
    button.disabled = true;
    button.textContent = `${label}…`;
    work.catch((e) => say(`${ACTIONS[action].label} failed: ${e.message}`)).finally(() => {
      busy = false;
      button.disabled = false;
      button.textContent = label;
    });
  }

  function setOpen(open) {
    ui.sessionsMenu.hidden = !open;
    ui.sessionsButton.setAttribute("aria-expanded", String(open));
    clearInterval(refreshTimer);
    refreshTimer = null;
    if (open) {
      say("");
      refresh();
      refreshTimer = setInterval(refresh, REFRESH_MS);
    }
  }

  close.addEventListener("click", () => {
    setOpen(false);
    ui.sessionsButton.focus();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !ui.sessionsMenu.hidden) {
      setOpen(false);
      ui.sessionsButton.focus();
    }
  });
  document.addEventListener("pointerdown", (event) => {
    if (!ui.sessionsMenu.hidden && !ui.sessionsMenu.contains(event.target) &&
        !ui.sessionsButton.contains(event.target)) setOpen(false);
  });

  return {
    toggle() {
      setOpen(ui.sessionsMenu.hidden);
    },
    refresh,
  };
}
