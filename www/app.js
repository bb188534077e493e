// capsule terminal page: xterm.js <-> the /ws protocol (see the docs' Protocol section). The
// page's entry module, loaded without a build step: it finds the page's elements and wires
// the terminal (js/terminal.js), the connection (js/connection.js, whose states are
// js/machine.js), the status bar (js/status.js), uploads and exports (js/transfer.js) and
// attention (js/attention.js). Terminal and its addons are the UMD globals that index.html's
// bootstrap runs from node_modules/ before it runs this module (after the first screen is
// drawn); index.html preloads them and the modules.

import { createAttention } from "./js/attention.js";
import { createConnection } from "./js/connection.js";
import { createStatusBar } from "./js/status.js";
import { createTerminal } from "./js/terminal.js";
import { setupTransfer } from "./js/transfer.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  label: $("status-label"),
  message: $("status-message"),
  countdown: $("status-countdown"),
  session: $("session"),
  exportButton: $("export"),
  uploadButton: $("upload"),
  uploadInput: $("upload-input"),
  notifyButton: $("notify"),
  dropZone: $("drop-zone"),
  actionButton: $("action"),
  logoutButton: $("logout"),
  terminal: $("terminal"),
};

// Users: whether capsule has them (null: not known yet).
let hasUsers = null;
let connection = null;

const status = createStatusBar(ui);
const term = createTerminal(ui.terminal, {
  onInput: (data) => connection.input(data),
  onBinaryInput: (data) => connection.binaryInput(data),
  onResize: () => connection.resized(),
  onBell: () => attention.bell(),
});
const attention = createAttention({
  button: ui.notifyButton,
  status,
  sessionId: () => connection.sessionId,
  active: () => !connection.leaving,
  focus: () => term.focus(),
});
connection = createConnection({
  term,
  status,
  attention,
  profile: new URLSearchParams(location.search).get("profile"),
  // A refused upgrade looks the same as capsule being down; its API tells them apart.
  checkLogin: () => {
    if (hasUsers !== false) checkLogin();
  },
});
setupTransfer(ui, {
  status,
  sessionId: () => connection.sessionId,
  checkLogin,
  focus: () => term.focus(),
});

// --- users: the login and logging out ---------------------------------------------

// GET api/sessions: 200 with the user ({"user": null} when capsule has no users), 401 without
// a login. Resolves to the response, or null when capsule did not answer.
function askSessions() {
  return fetch("api/sessions", {
    credentials: "same-origin",
    cache: "no-store",
    headers: { Accept: "application/json" },
  }).catch(() => null);
}

// To the login page (which comes back here) when the login expired or ended elsewhere.
function checkLogin() {
  askSessions().then((response) => {
    if (response && response.status === 401 && !connection.leaving) connection.loginExpired();
  });
}

function showLogout() {
  askSessions().then((response) => {
    if (!response || !response.ok) return;
    return response.json().then((body) => {
      hasUsers = typeof body.user === "string";
      ui.logoutButton.hidden = !hasUsers;
    });
  }).catch(() => {});
}

function logOut() {
  ui.logoutButton.disabled = true;
  // The page's referrer policy (no-referrer) would send "Origin: null", which capsule refuses
  // as cross-site: this request keeps its origin.
  fetch("logout", {
    method: "POST",
    credentials: "same-origin",
    cache: "no-store",
    referrerPolicy: "same-origin",
  }).then((response) => {
    if (!response.ok) throw new Error(`capsule answered ${response.status}`);
    connection.loggedOut(response.redirected ? response.url : "login");
  }).catch((e) => {
    ui.logoutButton.disabled = false;
    status.error(`log out failed: ${e.message}`);
  });
}

ui.logoutButton.addEventListener("click", logOut);

ui.actionButton.addEventListener("click", () => {
  connection.again();
  term.focus();
});

// --- start ----------------------------------------------------------------------------

term.fit();
connection.start();
term.focus();
// The bootstrap's first screen (index.html) gives way once xterm has drawn the same output,
// in the same frame.
term.whenDrawn(() => {
  const first = document.getElementById("first-screen");
  if (first) first.remove();
  performance.mark("capsule:terminal");
});
// Whether to offer "Log out" (a request, and its answer's handling) is not on the way to the
// first prompt: asked when the main thread is next idle (at most a second from now).
if (window.requestIdleCallback) requestIdleCallback(showLogout, { timeout: 1000 });
else setTimeout(showLogout, 100);
