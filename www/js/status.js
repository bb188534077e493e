// The status bar: the connection's state, a message, the countdown to the next attempt, the
// session's id, and which of Upload, Export and the state's button are offered.

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
  login: { label: "logged out" },
});

// What the countdown says: the next attempt at `retryAt` (null: under way now).
export function countdownText(retryAt, now, attempt) {
  const seconds = retryAt === null ? 0 : Math.ceil((retryAt - now) / 1000);
  return seconds > 0 ? `next try in ${seconds} s (attempt ${attempt})` : `trying now (attempt ${attempt})`;
}

// The Upload and Export buttons' state for a session (null: none), whether it is gone, and
// whether an upload is under way.
export function transferButtons(sessionId, gone, uploading) {
  const none = !sessionId || gone;
  return {
    exportDisabled: none,
    exportTitle: none ? "Export is not available: the session has ended" : "Download /workspace as .tar.gz",
    uploadDisabled: none || uploading,
    uploadTitle: none
      ? "Upload is not available: there is no session"
      : uploading ? "An upload is under way" : "Upload files to /workspace (or drop them on the terminal)",
  };
}

export function createStatusBar(ui) {
  let state = "connecting";
  let sessionId = null;
  let uploading = false;
  let countdown = null; // { retryAt, attempt } while reconnecting
  let countdownTimer = null;

  function renderSession() {
    ui.session.textContent = sessionId ? sessionId.slice(0, 8) : "";
    ui.session.title = sessionId || "";
    const buttons = transferButtons(sessionId, DISPLAY[state].gone, uploading);
    ui.exportButton.disabled = buttons.exportDisabled;
    ui.exportButton.title = buttons.exportTitle;
    ui.uploadButton.disabled = buttons.uploadDisabled;
    ui.uploadButton.title = buttons.uploadTitle;
  }

  function renderCountdown() {
    if (countdown === null) return;
    const text = countdownText(countdown.retryAt, Date.now(), countdown.attempt);
    if (ui.countdown.textContent !== text) ui.countdown.textContent = text;
  }

  function stopCountdown() {
    clearInterval(countdownTimer);
    countdownTimer = null;
    countdown = null;
    ui.countdown.textContent = "";
  }

  return {
    get state() {
      return state;
    },
    // Whether the session can take uploads and exports.
    get gone() {
      return !sessionId || Boolean(DISPLAY[state].gone);
    },
    get uploading() {
      return uploading;
    },
    show(name, message) {
      state = name;
      const spec = DISPLAY[name];
      ui.status.dataset.state = name;
      ui.label.textContent = spec.label;
      ui.message.textContent = message || "";
      ui.message.classList.toggle("is-error", name === "failed" || name === "refused");
      ui.actionButton.hidden = !spec.action;
      ui.actionButton.textContent = spec.action || "";
      if (name !== "connected") delete ui.status.dataset.engine;
      if (name !== "reconnecting") stopCountdown();
      renderSession();
    },
    error(message) {
      ui.message.textContent = message;
      ui.message.classList.add("is-error");
    },
    notice(message) {
      ui.message.textContent = message;
      ui.message.classList.remove("is-error");
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
