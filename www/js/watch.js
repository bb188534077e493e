// A spectator's connection: the page at /watch/#TOKEN watches a session through a read-only
// share link. It opens /ws?watch=TOKEN, writes the replay and then the live output, follows
// the session's terminal size, acknowledges what it processed (binary protocol), and never
// sends input or a size: the server would refuse them. It has the connection's interface
// (js/connection.js) so that the page wires either the same way.

import { BINARY_PROTOCOL, Offsets, ACK_DELAY_MS, encodeFrame, parseFrame, splitReplay } from "./protocol.js";
import { watchEnd, watchSocketUrl } from "./sharing.js";

const RETRY_DELAYS_MS = [500, 1000, 2000, 3000];
// As the owner's page: a ping now and then, and a connection that says nothing for the silence
// limit is taken for lost (and opened again).
const PING_INTERVAL_MS = 20000;
const SILENCE_LIMIT_MS = 45000;
const RETRIES = 40; // about two minutes of a lost connection (a restart of capsule)
const READ_ONLY_HINT = "read-only: what you type is not sent (this is a watch link)";

// `term`: the terminal (terminal.js, read-only); `status`: the status bar (status.js);
// `action`: the state's button; `token`: the link's; `onExpiry(at)`: the link's expiry
// (Date.now() time), once known; `onEnd()`: watching is over (the link or the session).
export function createWatch({ term, status, action, token, onExpiry, onEnd = () => {} }) {
  const offsets = new Offsets();
  let socket = null;
  let link = 0;
  let replayLeft = 0;
  let lastError = "";
  let lastCode = "";
  let attempts = 0;
  let retryTimer = null;
  let ackTimer = null;
  let ended = false;
  let hinted = false;
  let pingTimer = null;
  let silenceTimer = null;

  function heard() {
    clearTimeout(silenceTimer);
    const ws = socket;
    silenceTimer = setTimeout(() => {
      if (ws === socket && ws !== null) ws.close();
    }, SILENCE_LIMIT_MS);
  }

  function stopKeepalive() {
    clearInterval(pingTimer);
    clearTimeout(silenceTimer);
    pingTimer = silenceTimer = null;
  }

  function show(state, message) {
    status.show(state, message);
    // status.js offers "New session" for a session gone: a spectator has no session of its own.
    action.hidden = true;
  }

  function open() {
    clearTimeout(retryTimer);
    retryTimer = null;
    link += 1;
    lastError = lastCode = "";
    replayLeft = 0;
    stopAcks();
    if (!token) {
      finish(watchEnd(4410, "", "this watch link is not complete: copy the whole link, with" +
        " what follows its #"));
      return;
    }
    const ws = new WebSocket(watchSocketUrl(location.href, token), [BINARY_PROTOCOL]);
    ws.binaryType = "arraybuffer";
    socket = ws;
    const mine = link;
    ws.onmessage = (event) => {
      if (ws === socket) receive(event.data, mine);
    };
    ws.onclose = (event) => {
      if (ws === socket) closed(event.code);
    };
  }

  function receive(data, mine) {
    if (pingTimer !== null) heard();
    if (typeof data !== "string") {
      output(new Uint8Array(data), mine);
      return;
    }
    const frame = parseFrame(data);
    if (frame === null) return;
    switch (frame.type) {
      case "connected":
        attempts = 0;
        term.clear();
        offsets.start(frame.offset, frame.window);
        replayLeft = Number.isSafeInteger(frame.replay) && frame.replay >= 0 ? frame.replay : 0;
        resize(frame.cols, frame.rows);
        if (typeof frame.expires_in === "number") onExpiry(Date.now() + frame.expires_in * 1000);
        show("connected", "");
        stopKeepalive();
        pingTimer = setInterval(() => {
          if (socket !== null && socket.readyState === WebSocket.OPEN) {
            socket.send(encodeFrame({ type: "ping" }));
          }
        }, PING_INTERVAL_MS);
        heard();
        break;
      case "size":
        resize(frame.cols, frame.rows);
        break;
      case "error":
        lastError = typeof frame.message === "string" ? frame.message : "";
        lastCode = typeof frame.code === "string" ? frame.code : "";
        if (lastCode === "read_only") status.notice(lastError);
        else status.error(lastError);
        break;
      case "notice":
        if (typeof frame.message === "string") status.notice(frame.message);
        break;
      case "dropped":
        offsets.skipTo(frame.offset);
        break;
    }
  }

  function resize(cols, rows) {
    if (Number.isSafeInteger(cols) && Number.isSafeInteger(rows) && cols > 0 && rows > 0) {
      term.resizeTo(cols, rows);
    }
  }

  function output(bytes, mine) {
    const start = offsets.receive(bytes.length);
    const done = (count) => processed(mine, start + count);
    let count;
    [count, replayLeft] = splitReplay(bytes.length, replayLeft);
    if (count > 0) {
      term.writeReplay(bytes.subarray(0, count), () => done(count));
      if (replayLeft === 0) term.endReplay();
    }
    if (count < bytes.length) term.writeLive(bytes.subarray(count), () => done(bytes.length));
  }

  function processed(mine, end) {
    if (mine !== link) return;
    const due = offsets.process(end);
    if (due === "now") sendAck();
    else if (due === "later" && ackTimer === null) {
      ackTimer = setTimeout(() => {
        ackTimer = null;
        if (mine === link) sendAck();
      }, ACK_DELAY_MS);
    }
  }

  function sendAck() {
    stopAcks();
    if (socket === null || socket.readyState !== WebSocket.OPEN) return;
    const offset = offsets.takeAck();
    if (offset !== null) socket.send(encodeFrame({ type: "ack", offset }));
  }

  function stopAcks() {
    clearTimeout(ackTimer);
    ackTimer = null;
  }

  function closed(code) {
    socket = null;
    stopAcks();
    stopKeepalive();
    term.endReplay();
    const end = watchEnd(code, lastCode, lastError);
    if (end.retry && attempts < RETRIES) {
      attempts += 1;
      show("reconnecting", end.message);
      const delay = RETRY_DELAYS_MS[Math.min(attempts, RETRY_DELAYS_MS.length) - 1];
      status.countdown(Date.now() + delay, attempts);
      retryTimer = setTimeout(open, delay);
      return;
    }
    finish(end);
  }

  function finish(end) {
    ended = true;
    show(end.retry ? "failed" : end.state, end.message);
    // Said whole in the terminal too: the bar cuts a long reason on a narrow screen.
    term.notice(end.message);
    onEnd();
    if (end.again || end.retry) {
      action.textContent = "Watch again";
      action.hidden = false;
    }
  }

  // Typing on a spectator's page: said once in the bar, never sent.
  function typed() {
    if (hinted || ended) return;
    hinted = true;
    status.notice(READ_ONLY_HINT);
  }

  return {
    get sessionId() {
      return null;
    },
    get leaving() {
      return false;
    },
    start() {
      status.setSession(null);
      show("connecting", "opening a watch link");
      open();
    },
    again() {
      ended = false;
      attempts = 0;
      open();
    },
    loginExpired() {},
    loggedOut() {},
    input: typed,
    binaryInput: typed,
    resized() {},
    typed,
  };
}
