// capsule terminal page: xterm.js <-> the /ws protocol (see the docs' Protocol section). The
// page's entry module, loaded without a build step: it finds the page's elements and wires
// the terminal (js/terminal.js), the connection (js/connection.js, whose states are
// js/machine.js), the status bar (js/status.js), uploads and exports (js/transfer.js) and
// attention (js/attention.js). Terminal and its addons are the UMD globals that index.html's
// bootstrap runs from node_modules/ before it runs this module (after the first screen is
// drawn); index.html preloads them and the modules.

import { createAttention } from "./js/attention.js";
import { setupAway } from "./js/awayplayer.js";
import { createConnection } from "./js/connection.js";
import { keptText } from "./js/keeping.js";
import { createLeaving } from "./js/leaving.js";
import { setupPorts } from "./js/ports.js";
import { setupShare } from "./js/share.js";
import { expiryText, watchToken } from "./js/sharing.js";
import { createStatusBar } from "./js/status.js";
import { createTerminal } from "./js/terminal.js";
import { setupTransfer } from "./js/transfer.js";
import { createWatch } from "./js/watch.js";

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
  user: $("user"),
  profile: $("profile"),
  shareButton: $("share"),
  shareCount: $("share-count"),
  shareMenu: $("share-menu"),
  sessionsButton: $("sessions"),
  sessionsMenu: $("sessions-menu"),
  leaveNote: $("leave-note"),
  ports: $("ports"),
  watchBadge: $("watch-badge"),
  terminal: $("terminal"),
  banner: $("banner"),
  bannerTitle: $("banner-title"),
  bannerMessage: $("banner-message"),
  bannerHint: $("banner-hint"),
  bannerCountdown: $("banner-countdown"),
  bannerRetry: $("banner-retry"),
  bannerAction: $("banner-action"),
};

// A spectator's page (/watch/#TOKEN: a read-only share link), else null.
const watching = watchToken(location);

// Users: whether capsule has them (null: not known yet).
let hasUsers = null;
let connection = null;
// The add-ons loaded after the first prompt (js/extras.js): the terminal's input passes
// through them (the key bar's sticky Ctrl) once they are there.
let extras = null;

const status = createStatusBar(ui, {
  onState: (name) => {
    leaving.state(name);
    if (ports && (name === "ended" || name === "expired")) ports.clear();
  },
  onAgain: () => {
    connection.again();
    term.focus();
  },
});
const leaving = createLeaving({ status, note: ui.leaveNote });
const term = createTerminal(ui.terminal, {
  onInput: (data) => {
    connection.input(extras ? extras.input(data) : data);
    leaving.worked();
  },
  onBinaryInput: (data) => connection.binaryInput(data),
  onResize: () => connection.resized(),
  onBell: () => attention.bell(),
  readOnly: watching !== null,
});
const attention = createAttention({
  button: ui.notifyButton,
  status,
  sessionId: () => connection.sessionId,
  active: () => !connection.leaving,
  focus: () => term.focus(),
});
let share = null;
let ports = null;
let away = null;
if (watching === null) {
  connection = createConnection({
    term,
    status,
    attention,
    profile: new URLSearchParams(location.search).get("profile"),
    onAttached: (frame) => {
      leaving.attached(frame);
      showProfile(frame.profile);
      ports.attached(frame.session_id);
      away.attached(frame);
    },
    // A refused upgrade looks the same as capsule being down; its API tells them apart.
    checkLogin: () => {
      if (hasUsers !== false) checkLogin();
    },
    onWatchers: (count) => share && share.setWatchers(count),
    onPorts: (frame) => ports.update(frame),
    onKept: describeKept,
    findKept,
  });
  setupTransfer(ui, {
    status,
    sessionId: () => connection.sessionId,
    checkLogin,
    focus: () => term.focus(),
    worked: () => leaving.worked(),
  });
  share = setupShare(ui, { sessionId: () => connection.sessionId, status });
  // What the session printed while no page was attached, played back on request.
  away = setupAway({ sessionId: () => connection.sessionId, focus: () => term.focus() });
  // The ports that listen in the session, with their previews: a strip above the terminal.
  ports = setupPorts(ui, {
    sessionId: () => connection.sessionId,
    status,
    relayout: () => {
      term.fit();
      connection.resized();
    },
  });
} else {
  connection = createWatch({
    term,
    status,
    action: ui.actionButton,
    token: watching,
    onExpiry: showExpiry,
    onEnd: () => {
      clearInterval(expiryTimer);
      ui.watchBadge.hidden = false;
      ui.watchBadge.textContent = "read-only · not watching";
    },
  });
  // What the owner's page offers is not a spectator's to use.
  for (const button of [ui.uploadButton, ui.exportButton, ui.notifyButton, ui.shareButton,
    ui.sessionsButton]) {
    button.hidden = true;
  }
  document.body.classList.add("watching");
  document.title = "capsule (watching, read-only)";
  ui.terminal.addEventListener("keydown", () => connection.typed(), true);
  ui.terminal.addEventListener("paste", () => connection.typed(), true);
}

// --- a spectator's badge: read-only, and when the link expires ----------------------

let expiryTimer = null;
// The profile the session runs (capsule's connected frame names it), beside the brand; the
// tab's title says it too.
function showProfile(name) {
  if (typeof name !== "string" || !name) return;
  ui.profile.textContent = name;
  ui.profile.hidden = false;
  document.title = `capsule · ${name}`;
}

function showExpiry(at) {
  clearInterval(expiryTimer);
  const render = () => {
    const text = `read-only · ${expiryText((at - Date.now()) / 1000)}`;
    if (ui.watchBadge.textContent !== text) ui.watchBadge.textContent = text;
  };
  ui.watchBadge.hidden = false;
  ui.watchBadge.title = "You watch someone's terminal through a read-only link: you cannot" +
    " type, and the link stops working when it expires or its owner revokes it.";
  render();
  expiryTimer = setInterval(render, 1000);
}

// --- kept sessions: the Sessions list, and the page opened on a kept session -----------

// The Sessions list (js/sessions.js), loaded when its button is first used.
let sessionsList = null;
function openSessions() {
  if (!sessionsList) {
    sessionsList = import("./js/sessions.js").then(({ setupSessions }) => setupSessions(ui, {
      sessionId: () => connection.sessionId,
      resumeCurrent: () => connection.again(),
      closing: () => leaving.closing,
    }));
  }
  sessionsList.then((list) => list.toggle()).catch((e) => {
    sessionsList = null;
    status.error(`the sessions list did not load: ${e.message}`);
  });
}
if (watching === null) ui.sessionsButton.addEventListener("click", openSessions);

// The page opened on a kept session (or whose session was put away): capsule's sentence says
// when it was put away and until when it is kept; the API says it in the page's time zone,
// with why.
function findKept(id) {
  return fetch(`api/sessions/${encodeURIComponent(id)}`, {
    credentials: "same-origin",
    cache: "no-store",
    headers: { Accept: "application/json" },
  }).then((response) => (response.ok ? response.json() : null))
    .then((session) => (session && session.state === "kept" ? session : null));
}

function describeKept(id, details) {
  if (!id) return;
  const show = (kept) => {
    if (status.state === "kept") status.explain(keptText(kept, details.message, Date.now() / 1000));
  };
  show(details);
  findKept(id).then((kept) => kept && show(kept)).catch(() => {});
}

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

// Who is logged in, and "Log out" where capsule has users.
function showLogout() {
  askSessions().then((response) => {
    if (!response || !response.ok) return;
    return response.json().then((body) => {
      hasUsers = typeof body.user === "string";
      ui.logoutButton.hidden = !hasUsers;
      status.user(hasUsers ? body.user : null);
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

// The session's id, whole (the API takes it): a click copies it.
ui.session.addEventListener("click", () => {
  const id = connection.sessionId;
  if (!id) return;
  const selection = getSelection();
  selection.selectAllChildren(ui.session);
  const copied = navigator.clipboard ? navigator.clipboard.writeText(id) : Promise.reject(new Error());
  copied.then(() => status.flash("session id copied"),
    () => status.flash("session id selected: copy it with your keyboard"));
});

ui.actionButton.addEventListener("click", () => {
  connection.again();
  if (watching === null) term.focus();
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
// first prompt: asked when the main thread is next idle (at most a second from now). A
// spectator has no login to end.
if (watching !== null) {
  // nothing: the token is its credential
} else if (window.requestIdleCallback) requestIdleCallback(showLogout, { timeout: 1000 });
else setTimeout(showLogout, 100);

// The key bar, the clipboard, search and the WebGL renderer are not on the way to the first
// prompt either: loaded when the main thread is next idle.
function loadExtras() {
  import("./js/extras.js").then(({ setupExtras }) => {
    extras = setupExtras(term, {
      // A spectator types nothing: no key bar, no pastes, no copies by programs.
      readOnly: watching !== null,
      send: (data) => connection.input(data),
      refit: () => {
        term.fit();
        connection.resized();
      },
    });
  }).catch((e) => console.error("capsule: the page's add-ons did not load", e));
}
if (window.requestIdleCallback) requestIdleCallback(loadExtras, { timeout: 1000 });
else setTimeout(loadExtras, 100);
