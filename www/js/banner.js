// The banner over the terminal: what the status bar has no room for. A refusal of capsule's
// (the server is full, too many sessions, a profile that does not exist, ...) is shown whole,
// with what the person can do and, while the page tries again by itself, a countdown to the
// next attempt and a button to try at once. Pure: status.js draws it.

// What each refusal's `code` (the `error` frame before the close) is called, and what the
// person can do about it. The page tries again by itself after all of these but a refusal
// (machine.js REFUSALS).
export const REFUSALS = Object.freeze({
  server_full: {
    title: "capsule is full",
    hint: "Its sessions have all it may give them. The page tries again by itself; a session "
      + "that ends makes room.",
  },
  quota_exceeded: {
    title: "you have as many sessions as capsule allows you",
    hint: "End one you do not need (type exit in it; a closed tab's session ends after the "
      + "grace period), or wait: the page tries again by itself.",
  },
  draining: {
    title: "capsule is stopping",
    hint: "It starts no new sessions now. The page tries again by itself; a capsule that comes "
      + "back takes it.",
  },
  docker_unavailable: {
    title: "capsule cannot start a session now",
    hint: "It cannot reach its Docker engine. The page tries again by itself; if this lasts, "
      + "tell capsule's operator.",
  },
  image_missing: {
    title: "capsule cannot start a session",
    hint: "The image this session needs is missing: tell capsule's operator. The page tries "
      + "again by itself.",
  },
  docker_error: {
    title: "capsule cannot start a session now",
    hint: "The page tries again by itself; if this lasts, tell capsule's operator.",
  },
  restarting: {
    title: "capsule is restarting",
    hint: "Your session lives on: the page reconnects by itself.",
  },
  unknown_profile: {
    title: "no such profile",
    hint: "Open capsule's address without ?profile= for a shell, or with one of the profiles "
      + "named above.",
  },
});

const TRIES_AGAIN = "The page tries again by itself.";

// The banner for connection state `state` with the bar's `message`, the `code` of the server's
// refusal ("" for none) and whether the terminal shows nothing yet (`blank`): null for none,
// else { title, message, hint, retry (a countdown and "Try now"), action (a button's label) }.
export function bannerFor({ state, message = "", code = "", blank = false }) {
  const known = Object.prototype.hasOwnProperty.call(REFUSALS, code) ? REFUSALS[code] : null;
  if (state === "refused") {
    return {
      title: known ? known.title : "capsule refused what this page asked for",
      message,
      hint: known ? known.hint : "Asking again gets the same answer: change the page's address.",
      retry: false,
      action: null,
    };
  }
  // A kept session: what it is, and Resume (never by itself: its owner may want it put away).
  if (state === "kept") {
    return {
      title: "This session is put away",
      message,
      hint: "Its files are kept; nothing runs in it. Resume starts it again: the same files, a"
        + " new shell, and its last screen shown above it as history. Sessions lists it with"
        + " your others (export, fork, delete).",
      retry: false,
      action: "Resume",
    };
  }
  if (state === "failed") {
    return {
      title: known ? `${known.title}: the page stopped trying` : "the page stopped trying",
      message,
      hint: "Reconnect tries again.",
      retry: false,
      action: "Reconnect",
    };
  }
  // A restart of capsule is short and the session lives on: the banner would hide it.
  if (state === "reconnecting" && (code && !(code === "restarting" && !blank) || blank)) {
    return {
      title: known ? known.title : code ? "capsule cannot give this page its session now"
        : "capsule does not answer",
      message,
      hint: known ? known.hint : TRIES_AGAIN,
      retry: true,
      action: null,
    };
  }
  return null;
}
