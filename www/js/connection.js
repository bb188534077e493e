// The connection: the page's WebSocket to /ws and the session it speaks for. It asks for the
// binary protocol (raw output bytes with offsets, acknowledged for flow control, and resumed
// without duplicates or gaps) and speaks the JSON one if the server does not select it. What
// happens when a socket ends is decided by the state machine (machine.js); this module feeds
// it inputs and carries out its effects.

import { SESSION_KEPT, closeInput, initial, step } from "./machine.js";
import {
  ACK_DELAY_MS, BINARY_PROTOCOL, Offsets, bytePieces, decodeBase64, describeNotice,
  encodeFrame, inputPieces, parseFrame, socketUrl, splitReplay,
} from "./protocol.js";

const STORAGE_KEY = "capsule.session_id";
const PING_INTERVAL_MS = 20000;
const SILENCE_LIMIT_MS = 45000;
// After a session ended without an exit code: when the API is asked again whether it is kept.
const KEPT_CHECKS_MS = [500, 1000, 2000, 4000];

// --- session id: ?session_id= in the URL, else this tab's sessionStorage ---

function loadSessionId() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get("session_id");
  if (fromUrl) {
    storeSessionId(fromUrl);
    // sessionStorage remembers it from now on; a stale URL must not win after "New session".
    params.delete("session_id");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
    return fromUrl;
  }
  try {
    return sessionStorage.getItem(STORAGE_KEY);
  } catch (e) {
    return null;
  }
}

function storeSessionId(id) {
  try {
    if (id) sessionStorage.setItem(STORAGE_KEY, id);
    else sessionStorage.removeItem(STORAGE_KEY);
  } catch (e) {
    // Storage disabled: the session then lasts as long as the page.
  }
}

// `term`: the terminal (terminal.js); `status`: the status bar (status.js); `attention`:
// attention.js; `profile`: what a new session asks for (/?profile=claude; a resumed session
// keeps its own); `checkLogin()`: asks capsule whether the login expired, after a connection
// that failed; `onAttached(frame)`: capsule's `connected` frame (what becomes of the session
// once the page is gone: its `on_close`); `onWatchers(count)`: how many watch the session
// through read-only links; `onPorts(frame)`: capsule's `ports` frame (the ports that listen in
// the session now); `onKept(id, details)`: the session is put away (kept), and the page offers
// to resume it (`details`: { message, kept_at, kept_until } as capsule said them);
// `findKept(id)`: resolves to the session as the API describes it if it is kept, else null.
export function createConnection({ term, status, attention, profile, checkLogin,
  onAttached = () => {}, onWatchers = () => {}, onPorts = () => {}, onKept = () => {},
  findKept = () => Promise.resolve(null) }) {
  let model = initial();
  let sessionId = loadSessionId();
  const offsets = new Offsets();
  const encoder = new TextEncoder();

  let socket = null;
  let link = 0; // counts sockets, so xterm callbacks for an old socket's output are ignored
  let binary = false; // whether the current socket speaks the binary protocol
  let exitCode = null; // from the `exit` frame that precedes a 1000 close
  let exitMessage = ""; // and its message
  let keptFrame = null; // the `error` frame that said the session is kept
  let lastError = ""; // message of the latest `error` frame
  let lastErrorCode = ""; // and its code
  let sentSize = ""; // "COLSxROWS" last sent on this socket
  let replayLeft = 0; // bytes of replay still to come on this socket
  let pingTimer = null;
  let silenceTimer = null;
  let retryTimer = null;
  let ackTimer = null;
  let resuming = false; // the sockets opened ask to resume the kept session (&resume=1)

  // --- the machine -----------------------------------------------------------

  function feed(type, details) {
    const result = step(model, { type, now: Date.now(), ...details });
    model = result.model;
    // Asking to resume lasts until the session is attached, or the page stops trying.
    if (model.state !== "connecting" && model.state !== "reconnecting") resuming = false;
    for (const effect of result.effects) perform(effect);
    if (model.state === "kept" && type === "kept") {
      const frame = keptFrame || {};
      onKept(sessionId, { message: details.message, kept_at: frame.kept_at,
        kept_until: frame.kept_until });
    }
  }

  function perform(effect) {
    switch (effect.type) {
      case "show":
        // The banner shows a refusal whole: the code of the server's `error`, if any.
        status.show(effect.state, effect.message, { code: lastErrorCode, blank: term.blank });
        break;
      case "notice":
        term.notice(effect.text);
        break;
      case "open":
        if (effect.resume) resuming = true;
        open();
        break;
      case "wait":
        retryTimer = setTimeout(() => {
          retryTimer = null;
          feed("retryDue");
        }, effect.delay);
        status.countdown(effect.until, model.attempt);
        break;
      case "forget":
        setSession(null);
        storeSessionId(null);
        offsets.forget();
        break;
      case "unstore":
        storeSessionId(null);
        break;
      case "clear":
        term.clear();
        break;
      case "restart":
        // A resumed session's output starts again at 0, with its old screen.
        term.clear();
        offsets.forget();
        break;
      case "drop":
        drop();
        break;
      case "checkLogin":
        checkLogin();
        break;
      case "toLogin": {
        // The login page comes back here afterwards: this tab's sessionStorage keeps the
        // session id, so the same session resumes.
        if (sessionId) storeSessionId(sessionId);
        const next = location.pathname + location.search;
        location.assign("login?next=" + encodeURIComponent(next));
        break;
      }
      case "go":
        location.assign(effect.url);
        break;
      default:
        throw new Error(`unknown effect: ${effect.type}`);
    }
  }

  function setSession(id) {
    sessionId = id;
    status.setSession(id);
  }

  // --- the socket --------------------------------------------------------------

  function open() {
    resetLink();
    if (model.state === "reconnecting") status.countdown(null, model.attempt);
    const ws = new WebSocket(url(), [BINARY_PROTOCOL]);
    ws.binaryType = "arraybuffer";
    attach(ws);
  }

  // Resume just past the last byte this page has: after a dropped socket the server sends
  // exactly what was missed; after a reload (0) the recent screen again. The server only
  // reads the offset with the binary protocol.
  function url() {
    return socketUrl(location.href, { sessionId, offset: offsets.resumeFrom(), profile,
      resume: resuming });
  }

  // What a new socket starts from.
  function resetLink() {
    clearTimeout(retryTimer);
    retryTimer = null;
    exitCode = null;
    exitMessage = "";
    keptFrame = null;
    lastError = "";
    lastErrorCode = "";
    sentSize = "";
    binary = false;
    link += 1;
    stopAcks();
    endReplay();
  }

  function attach(ws) {
    socket = ws;
    ws.onopen = () => {
      if (ws !== socket) return;
      opening(ws);
      sendResize(true); // before anything else: a new session needs the size
    };
    ws.onmessage = (event) => {
      if (ws === socket) receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws === socket) onClose(event.code);
    };
  }

  function opening(ws) {
    binary = ws.protocol === BINARY_PROTOCOL;
    // A JSON socket carries no offsets: the next resume leaves it to the server.
    if (!binary) offsets.known = false;
  }

  // The current socket let go of, and everything that runs for it stopped.
  function drop() {
    const ws = socket;
    socket = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.close();
    }
    clearTimeout(retryTimer);
    retryTimer = null;
    stopKeepalive();
    stopAcks();
    endReplay();
  }

  function socketOpen() {
    return socket !== null && socket.readyState === WebSocket.OPEN;
  }

  function send(message) {
    if (socketOpen()) socket.send(encodeFrame(message));
  }

  function sendBytes(bytes) {
    if (socketOpen()) socket.send(bytes);
  }

  function receive(data) {
    if (typeof data === "string") onFrame(data);
    else onOutput(data);
  }

  // The socket index.html's bootstrap opened before the terminal's scripts had loaded, and what
  // it received meanwhile, taken over as if open() had opened it: the bootstrap sent the size
  // it estimated (a resize follows if the terminal came out otherwise). A socket to any other
  // URL than open() would open is closed, and open() opens that one.
  function adoptBoot() {
    const boot = window.capsuleBoot;
    window.capsuleBoot = null;
    if (!boot || !boot.socket) return false;
    const ws = boot.socket;
    ws.onopen = ws.onmessage = ws.onclose = null;
    resetLink();
    if (boot.url !== url()) {
      console.warn("capsule: the bootstrap's socket is not the one this page would open");
      ws.close();
      return false;
    }
    attach(ws);
    if (boot.size !== null) {
      opening(ws);
      sentSize = boot.size;
    }
    const frames = boot.frames;
    boot.frames = [];
    for (const data of frames) {
      if (ws !== socket) return true;
      receive(data);
    }
    if (ws !== socket) return true;
    if (boot.closed !== null) onClose(boot.closed);
    else if (boot.size !== null) sendResize(false);
    return true;
  }

  function onFrame(text) {
    const frame = parseFrame(text);
    if (frame === null) {
      console.warn("capsule: ignoring a frame that is not a JSON object");
      return;
    }
    if (model.state === "connected") armSilenceTimer();
    switch (frame.type) {
      case "connected":
        onConnected(frame);
        break;
      case "output":
        writeOutput(decodeBase64(frame.data), () => {});
        break;
      case "notice": {
        const notice = describeNotice(frame.code, frame.message);
        if (notice.engine !== undefined) status.engine(notice.engine);
        status.notice(notice.text);
        if (notice.line) term.notice(notice.text);
        break;
      }
      case "error":
        lastError = frame.message || frame.code || "error";
        lastErrorCode = typeof frame.code === "string" ? frame.code : "";
        if (lastErrorCode === SESSION_KEPT) keptFrame = frame;
        else status.error(lastError);
        break;
      case "exit":
        exitCode = frame.exit_code;
        exitMessage = typeof frame.message === "string" ? frame.message : "";
        break;
      case "dropped":
        if (binary) onDropped(frame.bytes, frame.offset);
        break;
      case "pong":
        break;
      case "watchers":
        onWatchers(frame.count);
        break;
      case "ports":
        onPorts(frame);
        break;
    }
  }

  function onConnected(frame) {
    setSession(frame.session_id);
    storeSessionId(sessionId);
    if (binary) offsets.start(frame.offset, frame.window);
    // Replayed output: what the shell printed before this connection, written again; the
    // server says how much of what follows it is.
    endReplay();
    replayLeft = Number.isSafeInteger(frame.replay) && frame.replay >= 0 ? frame.replay : 0;
    onAttached(frame);
    feed("connected", { resumed: Boolean(frame.resumed), blank: term.blank,
      resumedFrom: typeof frame.resumed_from === "number" ? frame.resumed_from : null });
    startKeepalive();
  }

  function onClose(code) {
    socket = null;
    attention.connectionGone();
    if (model.state === "login") return;
    stopKeepalive();
    stopAcks();
    endReplay();
    const input = closeInput(code, lastErrorCode);
    const id = sessionId;
    const message = exitMessage;
    feed(input, { exitCode, message: lastError });
    // A session that ended without its shell's exit code may have been put away (by its owner
    // elsewhere, by the idle limit): kept, it is offered to be resumed rather than forgotten.
    if (model.state === "ended" && (exitCode === null || exitCode === undefined) && id) {
      watchKept(id, message);
    }
  }

  // Whether session `id`, which ended without an exit code, was put away: asked of the API a few
  // times (a session being put away is listed as kept once its container has stopped). Kept,
  // the page offers to resume it.
  function watchKept(id, message) {
    let attempt = 0;
    const ask = () => {
      if (model.state !== "ended" || id !== sessionId) return;
      findKept(id).catch(() => null).then((kept) => {
        if (model.state !== "ended" || id !== sessionId) return;
        if (kept) {
          keptFrame = kept;
          feed("kept", { message: message || "" });
        } else if (attempt < KEPT_CHECKS_MS.length) {
          setTimeout(ask, KEPT_CHECKS_MS[attempt++]);
        }
      });
    };
    ask();
  }

  // --- keepalive ------------------------------------------------------------------

  function startKeepalive() {
    stopKeepalive();
    pingTimer = setInterval(() => send({ type: "ping" }), PING_INTERVAL_MS);
    armSilenceTimer();
  }

  function stopKeepalive() {
    clearInterval(pingTimer);
    clearTimeout(silenceTimer);
  }

  function armSilenceTimer() {
    clearTimeout(silenceTimer);
    silenceTimer = setTimeout(() => feed("silent"), SILENCE_LIMIT_MS);
  }

  // --- output, replay and acknowledgements ---------------------------------------------

  function endReplay() {
    replayLeft = 0;
    term.endReplay();
  }

  // Writes output, replay first; `done(bytesParsed)` after each part.
  function writeOutput(bytes, done) {
    let count;
    [count, replayLeft] = splitReplay(bytes.length, replayLeft);
    if (count > 0) {
      term.writeReplay(bytes.subarray(0, count), () => done(count));
      if (replayLeft === 0) term.endReplay();
    }
    if (count < bytes.length) {
      term.writeLive(bytes.subarray(count), () => done(bytes.length));
      attention.liveOutput();
    }
  }

  function onOutput(buffer) {
    if (model.state === "connected") armSilenceTimer();
    if (!binary) return; // binary frames are not part of the JSON protocol
    const start = offsets.receive(buffer.byteLength);
    const current = link;
    writeOutput(new Uint8Array(buffer), (count) => onProcessed(current, start + count));
  }

  function onDropped(bytes, offset) {
    // Output before `offset` is gone for good: continue from there.
    const end = offsets.skipTo(offset);
    const current = link;
    term.writeText(`\x1b[2m[capsule: ${bytes} bytes of older output were dropped]\x1b[0m\r\n`,
      () => onProcessed(current, end));
  }

  function onProcessed(from, end) {
    if (from !== link || !binary) return; // an older socket's output
    const due = offsets.process(end);
    if (due === "now") sendAck();
    else if (due === "later" && ackTimer === null) {
      ackTimer = setTimeout(() => {
        ackTimer = null;
        if (from === link) sendAck();
      }, ACK_DELAY_MS);
    }
  }

  function sendAck() {
    stopAcks();
    if (!socketOpen()) return;
    const offset = offsets.takeAck();
    if (offset !== null) send({ type: "ack", offset });
  }

  function stopAcks() {
    clearTimeout(ackTimer);
    ackTimer = null;
  }

  // --- input and size -------------------------------------------------------------

  function sendInput(data) {
    if (model.state !== "connected") return;
    for (const piece of inputPieces(data)) {
      if (binary) sendBytes(encoder.encode(piece));
      else send({ type: "input", data: piece });
    }
  }

  // Raw bytes (one per character, 0-255), such as some mouse reports.
  function sendBinaryInput(data) {
    if (!binary) {
      sendInput(data);
      return;
    }
    if (model.state !== "connected") return;
    for (const piece of bytePieces(data)) sendBytes(piece);
  }

  function sendResize(always) {
    const { cols, rows } = term.size();
    const size = `${cols}x${rows}`;
    if (!always && size === sentSize) return;
    if (!socketOpen()) return;
    sentSize = size;
    send({ type: "resize", cols, rows });
  }

  return {
    get sessionId() {
      return sessionId;
    },
    // Whether the page is leaving: nothing it does with sockets matters any more.
    get leaving() {
      return model.state === "login";
    },
    // The first socket: the bootstrap's, else a new one.
    start() {
      status.setSession(sessionId);
      status.show(model.state);
      if (!adoptBoot()) open();
    },
    // The state's button: a new session, or this one again.
    again() {
      feed("again");
    },
    loginExpired() {
      feed("loginExpired");
    },
    loggedOut(to) {
      feed("loggedOut", { url: to });
    },
    input: sendInput,
    binaryInput: sendBinaryInput,
    resized() {
      sendResize(false);
    },
  };
}
