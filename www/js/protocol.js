// The /ws protocol's pure parts (see the docs' Protocol section): the socket's URL, control
// frames, input cut into pieces, and the offsets of the binary protocol's output with their
// acknowledgements. Nothing here touches a socket or the DOM.

export const BINARY_PROTOCOL = "capsule.binary.v1";

// At most 3 UTF-8 bytes per UTF-16 unit, so a piece stays under 32 KiB on the wire, and
// under the server's 256 KiB message limit even when JSON escapes every character.
export const INPUT_PIECE_CHARS = 10 * 1024;
// onBinary data is one byte per character.
export const INPUT_PIECE_BYTES = 32 * 1024;
// Acknowledge processed output once this much (or window/8, if smaller) is unacknowledged,
// and anything left unacknowledged at most ACK_DELAY_MS after it was processed.
export const ACK_BYTES = 64 * 1024;
export const ACK_DELAY_MS = 50;

// What the status bar says for a server notice (a control message, never terminal output):
// `line`: said in the terminal too; `engine`: the engine's state for the status bar.
const NOTICES = {
  shell_restarted: { text: "the session's shell was restarted", line: true },
  engine_away: { text: "capsule is waiting for the Docker engine", engine: "away" },
  engine_back: { text: "the Docker engine is back", engine: "" },
  // The server's own sentence says how near the session is to its --disk limit.
  disk_limit: { line: true },
  // capsule is draining: this session goes on (until a deadline the message gives).
  draining: { line: true },
  // The egress proxy refused a connection: the server's sentence names the host and the
  // profile setting that allows it.
  egress_refused: { line: true },
  // A kept session started again: its old screen above is history (the keeper marks it).
  resumed: {},
};

// /ws under the page's address (`href`), with the session to resume from `offset` (null: the
// server decides) or the profile of a new one; `resume`: start the session again if it is
// kept (put away). index.html's bootstrap builds the first one the same way.
export function socketUrl(href, { sessionId = null, offset = null, profile = null,
  resume = false } = {}) {
  const url = new URL("ws", href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const params = new URLSearchParams();
  if (sessionId) {
    params.set("session_id", sessionId);
    if (offset !== null) params.set("offset", String(offset));
    if (resume) params.set("resume", "1");
  } else if (profile) {
    params.set("profile", profile);
  }
  const query = params.toString();
  url.search = query ? "?" + query : "";
  url.hash = "";
  return url.href;
}

// A control frame's object, or null when the text is not a JSON object.
export function parseFrame(text) {
  let frame;
  try {
    frame = JSON.parse(text);
  } catch (e) {
    return null;
  }
  return frame !== null && typeof frame === "object" && !Array.isArray(frame) ? frame : null;
}

export function encodeFrame(message) {
  return JSON.stringify(message);
}

// What a `notice` frame shows: { text, line, engine } (engine: undefined when it says nothing
// of the engine, "" when the engine is back).
export function describeNotice(code, message) {
  const known = NOTICES[code] || {};
  return {
    text: known.text || message || code || "notice",
    line: Boolean(known.line),
    engine: "engine" in known ? known.engine : undefined,
  };
}

// Typed text in pieces of at most INPUT_PIECE_CHARS, never splitting a surrogate pair.
export function inputPieces(data, size = INPUT_PIECE_CHARS) {
  const pieces = [];
  for (let start = 0; start < data.length;) {
    let end = Math.min(start + size, data.length);
    const last = data.charCodeAt(end - 1);
    if (end < data.length && end - start > 1 && last >= 0xd800 && last <= 0xdbff) end -= 1;
    pieces.push(data.slice(start, end));
    start = end;
  }
  return pieces;
}

// Raw bytes given as characters 0-255 (some mouse reports), in pieces of INPUT_PIECE_BYTES.
export function bytePieces(data, size = INPUT_PIECE_BYTES) {
  const pieces = [];
  for (let start = 0; start < data.length; start += size) {
    const piece = data.slice(start, start + size);
    pieces.push(Uint8Array.from(piece, (c) => c.charCodeAt(0) & 0xff));
  }
  return pieces;
}

// A JSON `output` frame's base64 data as bytes (term.write() decodes UTF-8, also across chunk
// boundaries).
export function decodeBase64(data) {
  const text = atob(data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

// How much unacknowledged output calls for an ack at once, for the server's flow window.
export function ackThreshold(windowBytes) {
  return windowBytes > 0 ? Math.min(ACK_BYTES, Math.max(1, Math.floor(windowBytes / 8))) : ACK_BYTES;
}

// The binary protocol's offsets. Every output byte has an offset in all the session ever
// produced: `received` is just past the last byte received, `processed` past the last one the
// terminal has finished with, `acked` the offset last acknowledged. `known`: whether
// `received` says what the terminal holds (not after a JSON socket, which has no offsets).
export class Offsets {
  constructor() {
    this.forget();
  }

  // The terminal is empty again (or its session is gone): a resume starts from the beginning.
  forget() {
    this.received = this.processed = this.acked = 0;
    this.known = true;
    this.threshold = ACK_BYTES;
  }

  // `connected` on a binary socket: output continues at `offset`.
  start(offset, windowBytes) {
    this.received = this.processed = this.acked =
      Number.isSafeInteger(offset) && offset >= 0 ? offset : 0;
    this.known = true;
    this.threshold = ackThreshold(windowBytes);
  }

  // The offset to resume from, or null when it is not known.
  resumeFrom() {
    return this.known ? this.received : null;
  }

  // `length` bytes of output came: the offset of their first.
  receive(length) {
    const start = this.received;
    this.received += length;
    return start;
  }

  // Output before `offset` is gone for good (`dropped`): continue from there.
  skipTo(offset) {
    if (typeof offset === "number" && offset > this.received) this.received = offset;
    return this.received;
  }

  // The terminal has processed output up to `end`: "now" when an ack is due at once, "later"
  // when something waits to be acknowledged, else null.
  process(end) {
    this.processed = Math.max(this.processed, Math.min(end, this.received));
    if (this.processed - this.acked >= this.threshold) return "now";
    return this.processed > this.acked ? "later" : null;
  }

  // The offset to acknowledge now, or null; taken as acknowledged.
  takeAck() {
    const offset = Math.min(this.processed, this.received);
    if (offset <= this.acked) return null;
    this.acked = offset;
    return offset;
  }
}

// How many of `length` output bytes are replay when `left` bytes of replay are still to
// come: [replayed, left afterwards].
export function splitReplay(length, left) {
  const count = Math.min(length, left);
  return [count, left - count];
}
