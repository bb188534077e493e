// The status bar: the connection's state, a message, the countdown to the next attempt, the
// session's id, who is logged in, and which of Upload, Export and the state's button are
// offered; and the banner over the terminal that shows a refusal whole (js/banner.js).

import { bannerFor } from "./banner.js";

// How long "new session" or "resumed session" stays in the bar before the bar says the
// session's lasting state again (what closing the tab would do, or nothing).
export const FLASH_MS = 4000;

// Each state: its label in the status bar, the button it offers, if any, and whether the
// session is gone (no upload, no export).
export const DISPLAY = Object.freeze({
  connecting: { label: "connecting" },
  connected: { label: "connected" },
  reconnecting: { label: "reconnecting" },
  ended: { label: "ended", action: "New session", gone: true },
  expired: { label: "ended", action: "New session", gone: true },
  taken: { label: "disconnected", action: "Reconnect here" },
  failed: { label: "error", action: "Reconnect" },
  refused: { label: "error" },
  kept: { label: "put away", action: "Resume" },
  login: { label: "logged out" },
});

// What the countdown says: the next attempt at `retryAt` (null: under way now).
export function countdownText(retryAt, now, attempt) {
  const seconds = retryAt === null ? 0 : Math.ceil((retryAt - now) / 1000);
  return seconds > 0 ? `next try in ${seconds} s (attempt ${attempt})` : `trying now (attempt ${attempt})`;
}

// Why Upload and Export cannot be used in connection state `state` (not connected: the page
// cannot reach the session), or null when they can.
function disconnectedReason(state) {
  switch (state) {
    case "connected": return null;
    case "connecting": return "the page is not connected to the session yet";
    case "reconnecting": return "the page is disconnected from the session (reconnecting)";
    case "taken": return "another tab or window has the session";
    case "kept": return "the session is put away: resume it first (or export it from Sessions)";
    case "login": return "the page is logged out";
    default: return "the page is not connected to a session";
  }
}

// The Upload and Export buttons' state for a session (null: none), the connection's state, and
// whether an upload is under way.
export function transferButtons(sessionId, state, uploading) {
  const gone = !sessionId || Boolean(DISPLAY[state] && DISPLAY[state].gone);
  const away = gone ? null : disconnectedReason(state);
  return {
    exportDisabled: gone || away !== null,
    exportTitle: gone ? "Export is not available: the session has ended"
      : away ? `Export is not available: ${away}` : "Download /workspace as .tar.gz",
    uploadDisabled: gone || away !== null || uploading,
    uploadTitle: gone ? "Upload is not available: there is no session"
      : away ? `Upload is not available: ${away}`
        : uploading ? "An upload is under way" : "Upload files to /workspace (or drop them on the terminal)",
  };
}

// `ui`: the page's elements; `onState(name)`: after each change of the connection's state;
// `onAgain()`: the banner's "Try now" or "Reconnect".
export function createStatusBar(ui, { onState = () => {}, onAgain = () => {} } = {}) {
  let state = "connecting";
  let sessionId = null;
  let uploading = false;
  let countdown = null; // { retryAt, attempt } while reconnecting
  let countdownTimer = null;
  let idle = { text: "", title: "" }; // what the message says when there is nothing else
  let flashTimer = null;
  let banner = null; // what the banner shows (bannerFor), or null

  function renderSession() {
    // The whole id, which the API takes (the bar shows its start; a click copies it).
    ui.session.textContent = sessionId || "";
    ui.session.title = sessionId || "";
    ui.session.hidden = !sessionId;
    const buttons = transferButtons(sessionId, state, uploading);
    ui.exportButton.disabled = buttons.exportDisabled;
    ui.exportButton.title = buttons.exportTitle;
    ui.uploadButton.disabled = buttons.uploadDisabled;
    ui.uploadButton.title = buttons.uploadTitle;
  }

  function renderCountdown() {
    if (countdown === null) return;
    const text = countdownText(countdown.retryAt, Date.now(), countdown.attempt);
    if (ui.countdown.textContent !== text) ui.countdown.textContent = text;
    if (ui.bannerCountdown.textContent !== text) ui.bannerCountdown.textContent = text;
  }

  function stopCountdown() {
    clearInterval(countdownTimer);
    countdownTimer = null;
    countdown = null;
    ui.countdown.textContent = "";
    ui.bannerCountdown.textContent = "";
  }

  function setMessage(text, error, title = "") {
    clearTimeout(flashTimer);
    flashTimer = null;
    ui.message.textContent = text;
    ui.message.title = title || text;
    ui.message.classList.toggle("is-error", error);
    ui.message.dataset.idle = String(text === idle.text && !error);
  }

  function showIdle() {
    setMessage(idle.text, false, idle.title);
  }

  function renderBanner() {
    ui.banner.hidden = banner === null;
    if (banner === null) return;
    ui.bannerTitle.textContent = banner.title;
    ui.bannerMessage.textContent = banner.message;
    ui.bannerMessage.hidden = !banner.message;
    ui.bannerHint.textContent = banner.hint;
    ui.bannerRetry.hidden = !banner.retry;
    ui.bannerCountdown.hidden = !banner.retry;
    ui.bannerAction.hidden = !banner.action;
    ui.bannerAction.parentElement.hidden = !banner.retry && !banner.action;
    ui.bannerAction.textContent = banner.action || "";
  }

  ui.bannerRetry.addEventListener("click", () => onAgain());
  ui.bannerAction.addEventListener("click", () => {
    if (banner && banner.dismiss) {
      banner = null;
      renderBanner();
    } else {
      onAgain();
    }
  });

  return {
    get state() {
      return state;
    },
    // Whether the session cannot take uploads and exports now (see whyNoUpload).
    get gone() {
      return transferButtons(sessionId, state, false).uploadDisabled;
    },
    get whyNoUpload() {
      return transferButtons(sessionId, state, false).uploadTitle;
    },
    get uploading() {
      return uploading;
    },
    // State `name` with `message`; `context`: the code of the server's refusal, if any
    // (`code`), and whether the terminal shows nothing yet (`blank`), for the banner.
    show(name, message, context = {}) {
      state = name;
      const spec = DISPLAY[name];
      ui.status.dataset.state = name;
      ui.label.textContent = spec.label;
      setMessage(message || "", name === "failed" || name === "refused");
      // "new session", "resumed session": news for a moment, then the session's lasting state.
      if (name === "connected") {
        const shown = ui.message.textContent;
        if (!shown) showIdle();
        else flashTimer = setTimeout(() => {
          if (ui.message.textContent === shown) showIdle();
        }, FLASH_MS);
      }
      ui.actionButton.hidden = !spec.action;
      ui.actionButton.textContent = spec.action || "";
      if (name !== "connected") delete ui.status.dataset.engine;
      if (name !== "reconnecting") stopCountdown();
      banner = bannerFor({ state: name, message: message || "", code: context.code || "",
        blank: Boolean(context.blank) });
      renderBanner();
      renderSession();
      onState(name);
    },
    error(message) {
      setMessage(message, true);
    },
    notice(message) {
      setMessage(message, false);
    },
    // A notice for a moment, then what the bar said when nothing else was to be said.
    flash(message) {
      setMessage(message, false);
      flashTimer = setTimeout(() => {
        if (ui.message.textContent === message) showIdle();
      }, FLASH_MS);
    },
    // What the message says when nothing else is to be said (`text`, `title` the longer form),
    // such as what closing the tab would do; "" for nothing.
    idle(text, title = "") {
      const showing = ui.message.dataset.idle === "true" || ui.message.textContent === "";
      idle = { text, title: title || text };
      if (showing && flashTimer === null && state === "connected") showIdle();
    },
    // The banner's longer sentence, shown over the terminal until the state changes (what
    // closing the tab would do, said when the browser asks whether to leave).
    say(title, message, hint = "") {
      banner = { title, message, hint, retry: false, action: "OK", dismiss: true };
      renderBanner();
    },
    // A longer sentence for the banner shown now (a kept session's dates, once known).
    explain(message) {
      if (banner === null || banner.dismiss) return;
      banner = { ...banner, message };
      renderBanner();
    },
    // Who is logged in (null: capsule has no users).
    user(name) {
      ui.user.textContent = name || "";
      ui.user.title = name ? `logged in as ${name}` : "";
      ui.user.hidden = !name;
    },
    // The Docker engine's state ("away"), or "" when it is back.
    engine(value) {
      if (value) ui.status.dataset.engine = value;
      else delete ui.status.dataset.engine;
    },
    // The next attempt, number `attempt`, at `retryAt` (null: now).
    countdown(retryAt, attempt) {
      countdown = { retryAt, attempt };
      renderCountdown();
      if (retryAt !== null && countdownTimer === null) countdownTimer = setInterval(renderCountdown, 250);
    },
    setSession(id) {
      sessionId = id;
      renderSession();
    },
    setUploading(value) {
      uploading = value;
      renderSession();
    },
  };
}
