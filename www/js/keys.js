// What the page's own keys send, as pure functions (no DOM): the key bar's keys, the sticky
// Ctrl of the key bar applied to the next key typed, the copy/paste/search shortcuts of each
// platform, and the clipboard writes programs ask for with OSC 52.

// The key bar, in its order. `send` is the key's bytes; arrows depend on the terminal's
// cursor-key mode (see keyBytes); Ctrl is a sticky modifier; Paste reads the clipboard.
export const KEY_BAR = Object.freeze([
  { id: "esc", label: "Esc", title: "Escape" },
  { id: "tab", label: "Tab", title: "Tab" },
  { id: "backtab", label: "⇧Tab", title: "Shift+Tab (Claude Code: switch modes)" },
  { id: "ctrl", label: "Ctrl", title: "Ctrl: the next key typed is sent with Ctrl", sticky: true },
  { id: "left", label: "←", title: "Left" },
  { id: "up", label: "↑", title: "Up" },
  { id: "down", label: "↓", title: "Down" },
  { id: "right", label: "→", title: "Right" },
  { id: "paste", label: "Paste", title: "Paste from the clipboard" },
]);

const ARROWS = { up: "A", down: "B", right: "C", left: "D" };

// The bytes of a key bar key (null for Ctrl and Paste, which send nothing by themselves).
// `ctrl`: the sticky Ctrl is on; `appCursor`: the terminal is in application cursor-key mode
// (DECCKM, as vim and less set it), where arrows are ESC O x rather than ESC [ x.
export function keyBytes(id, { ctrl = false, appCursor = false } = {}) {
  if (id === "esc") return "\x1b";
  if (id === "tab") return "\t";
  if (id === "backtab") return "\x1b[Z";
  if (id in ARROWS) {
    if (ctrl) return `\x1b[1;5${ARROWS[id]}`;
    return (appCursor ? "\x1bO" : "\x1b[") + ARROWS[id];
  }
  return null;
}

// The control character of a key typed with Ctrl, as xterm and the VT220 make them: letters
// and @[\]^_ to 0x00-0x1f, space and 2 to NUL, 3-7 to ESC..US, 8 and ? to DEL; null for a key
// that has none (it is sent as it is).
export function ctrlChar(ch) {
  if (typeof ch !== "string" || ch.length !== 1) return null;
  const code = ch.charCodeAt(0);
  if (code >= 0x61 && code <= 0x7a) return String.fromCharCode(code - 0x60); // a-z
  if (code >= 0x40 && code <= 0x5f) return String.fromCharCode(code - 0x40); // @A-Z[\]^_
  if (ch === " " || ch === "2") return "\x00";
  if (ch >= "3" && ch <= "7") return String.fromCharCode(code - 0x33 + 0x1b);
  if (ch === "8" || ch === "?") return "\x7f";
  if (ch === "/") return "\x1f";
  return null;
}

// What goes to the shell for `data` from the terminal while the sticky Ctrl is on:
// `{ data, used }`, where `used` says whether the Ctrl was spent (a key was typed). A single
// character becomes its control character (kept as it is when it has none); longer data (a
// paste, a mouse report, an answer of the terminal's) passes unchanged and leaves Ctrl on.
export function applyCtrl(data) {
  if (typeof data !== "string" || [...data].length !== 1) return { data, used: false };
  return { data: ctrlChar(data) ?? data, used: true };
}

// The platform's shortcut for a key event: "copy", "paste", "search", or null (the key is the
// terminal's). `mac` picks Cmd+C/V/F; elsewhere Ctrl+Shift+C/V/F. Ctrl+Insert and
// Shift+Insert everywhere. Ctrl+C copies only when there is a selection (else it is ^C);
// Ctrl+V stays the terminal's (^V, literal next). `event` needs key, ctrlKey, shiftKey,
// altKey and metaKey.
export function shortcut(event, { mac = false, selection = false } = {}) {
  const key = (event.key || "").toLowerCase();
  const { ctrlKey: ctrl, shiftKey: shift, altKey: alt, metaKey: meta } = event;
  if (alt) return null;
  if (key === "insert" && ctrl && !shift && !meta) return "copy";
  if (key === "insert" && shift && !ctrl && !meta) return "paste";
  if (mac) {
    if (!meta || ctrl) return null;
    if (key === "c" && !shift) return "copy";
    if (key === "v" && !shift) return "paste";
    if (key === "f" && !shift) return "search";
    return null;
  }
  if (!ctrl || meta) return null;
  if (shift && key === "c") return "copy";
  if (shift && key === "v") return "paste";
  if (shift && key === "f") return "search";
  if (!shift && key === "c" && selection) return "copy";
  return null;
}

// Whether the platform is Apple's (Cmd for the shortcuts).
export function isMac(platform) {
  return /^(mac|iphone|ipad|ipod)/i.test(platform || "");
}

// Largest clipboard write a program may make with OSC 52: 1 MiB of text.
export const OSC52_MAX_BYTES = 1024 * 1024;

// What an OSC 52 sequence (its payload after "52;": "Pc;Pd") asks: { write: text } to put
// text on the clipboard, or { ignore: reason }. A query ("?": a program asking to read the
// clipboard) is never answered; nor is an empty write (clearing), nor more than `max` bytes,
// nor what is not base64 of UTF-8.
export function parseOsc52(payload, max = OSC52_MAX_BYTES) {
  const semicolon = payload.indexOf(";");
  if (semicolon < 0) return { ignore: "malformed" };
  const selection = payload.slice(0, semicolon);
  const data = payload.slice(semicolon + 1);
  if (!/^[cpqs0-7]*$/.test(selection)) return { ignore: "malformed" };
  if (data === "?") return { ignore: "read" };
  if (data === "") return { ignore: "empty" };
  // Base64 of `max` bytes is at most 4 * ceil(max / 3) characters.
  if (data.length > 4 * Math.ceil(max / 3)) return { ignore: "too large" };
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(data) || data.length % 4 === 1) return { ignore: "malformed" };
  let bytes;
  try {
    const binary = atob(data);
    bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  } catch (e) {
    return { ignore: "malformed" };
  }
  if (bytes.length > max) return { ignore: "too large" };
  try {
    return { write: new TextDecoder("utf-8", { fatal: true }).decode(bytes) };
  } catch (e) {
    return { ignore: "malformed" };
  }
}

// Touch scrolling (xterm.js 6 has none): a finger drawn `dy` pixels (down: positive, back in
// the scrollback) over rows `cellHeight` pixels high scrolls `lines` lines (negative: back);
// `rest` is the part of a row not yet scrolled, carried to the next move.
export function swipeLines(dy, cellHeight) {
  if (!(cellHeight > 0)) return { lines: 0, rest: 0 };
  const rows = Math.trunc(dy / cellHeight);
  return { lines: rows === 0 ? 0 : -rows, rest: dy - rows * cellHeight };
}
