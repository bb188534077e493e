// capsule terminal page: xterm.js <-> the /ws protocol (see PROTOCOL.md). It asks for the
// binary protocol (raw output bytes with offsets, acknowledged for flow control, and resumed
// without duplicates or gaps) and speaks the JSON one if the server does not select it.
// A classic script with no build step; Terminal and FitAddon come from the UMD builds
// that index.html loads from node_modules/.
"use strict";

(function () {
  const STORAGE_KEY = "capsule.session_id";
  const PING_INTERVAL_MS = 20000;
  const SILENCE_LIMIT_MS = 45000;
  const RESIZE_DEBOUNCE_MS = 50;
  const MAX_ATTEMPTS = 20;
  const BINARY_PROTOCOL = "capsule.binary.v1";
  // At most 3 UTF-8 bytes per UTF-16 unit, so a piece stays under 32 KiB on the wire, and
  // under the server's 256 KiB message limit even when JSON escapes every character.
  const INPUT_PIECE_CHARS = 10 * 1024;
  // onBinary data is one byte per character.
  const INPUT_PIECE_BYTES = 32 * 1024;
  // Acknowledge processed output once this much (or window/8, if smaller) is unacknowledged,
  // and anything left unacknowledged at most ACK_DELAY_MS after it was processed.
  const ACK_BYTES = 64 * 1024;
  const ACK_DELAY_MS = 50;

  // Each state: its label in the status bar and the button it offers, if any.
  const STATES = {
    connecting: { label: "connecting" },
    connected: { label: "connected" },
    reconnecting: { label: "reconnecting" },
    ended: { label: "ended", action: "New session" },
    expired: { label: "ended", action: "New session" },
    taken: { label: "disconnected", action: "Reconnect here" },
    failed: { label: "error", action: "Reconnect" },
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    label: $("status-label"),
    message: $("status-message"),
    session: $("session"),
    exportButton: $("export"),
    actionButton: $("action"),
    terminal: $("terminal"),
  };

  const term = new Terminal({
    cursorBlink: true,
    fontFamily: getComputedStyle(document.body).getPropertyValue("--mono"),
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0d1117", foreground: "#c9d1d9", cursor: "#c9d1d9" },
  });
  const fitAddon = new FitAddon.FitAddon();
  term.loadAddon(fitAddon);
  term.open(ui.terminal);

  let state = null;
  let sessionId = loadSessionId();
  let socket = null;
  let attempt = 0; // reconnect attempts since the last `connected`
  let exitCode = null; // from the `exit` frame that precedes a 1000 close
  let lastError = ""; // message of the latest `error` frame
  let sentSize = ""; // "COLSxROWS" last sent on this socket
  let retryTimer = null;
  let pingTimer = null;
  let silenceTimer = null;

  // Binary protocol. Every output byte has an offset in all the session ever produced.
  let binary = false; // whether the current socket speaks the binary protocol
  let link = 0; // counts sockets, so xterm callbacks for an old socket's output are ignored
  let received = 0; // offset just past the last output byte received
  let offsetKnown = true; // whether `received` says what this terminal holds (false after JSON)
  let processed = 0; // offset just past the last byte xterm has finished processing
  let acked = 0; // offset last acknowledged to the server
  let ackBytes = ACK_BYTES;
  let ackTimer = null;

  // --- status bar -------------------------------------------------------

  function setState(name, message) {
    state = name;
    const spec = STATES[name];
    ui.status.dataset.state = name;
    ui.label.textContent = name === "reconnecting" ? `reconnecting (attempt ${attempt})` : spec.label;
    ui.message.textContent = message || "";
    ui.message.classList.toggle("is-error", name === "failed");
    ui.actionButton.hidden = !spec.action;
    ui.actionButton.textContent = spec.action || "";
    renderSession();
  }

  function showError(message) {
    ui.message.textContent = message;
    ui.message.classList.add("is-error");
  }

  function renderSession() {
    ui.session.textContent = sessionId ? sessionId.slice(0, 8) : "";
    ui.session.title = sessionId || "";
    ui.exportButton.disabled = !sessionId;
  }

  function notice(text) {
    term.write(`\r\n\x1b[2m[capsule] ${text}\x1b[0m\r\n`);
  }

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

  // --- the socket --------------------------------------------------------

  function connect() {
    clearTimeout(retryTimer);
    exitCode = null;
    lastError = "";
    sentSize = "";
    binary = false;
    link += 1;
    stopAcks();
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams();
    if (sessionId) {
      params.set("session_id", sessionId);
      // Resume just past the last byte this page has: after a dropped socket the server sends
      // exactly what was missed; after a reload (received 0) the recent screen again. The
      // server only reads it with the binary protocol.
      if (offsetKnown) params.set("offset", String(received));
    }
    const query = params.toString();
    url.search = query ? "?" + query : "";
    url.hash = "";
    const ws = new WebSocket(url, [BINARY_PROTOCOL]);
    ws.binaryType = "arraybuffer";
    socket = ws;
    ws.onopen = () => {
      if (ws !== socket) return;
      binary = ws.protocol === BINARY_PROTOCOL;
      // A JSON socket carries no offsets: the next resume leaves it to the server.
      if (!binary) offsetKnown = false;
      sendResize(true); // before anything else: a new session needs the size
    };
    ws.onmessage = (event) => {
      if (ws !== socket) return;
      if (typeof event.data === "string") onFrame(event.data);
      else onOutput(event.data);
    };
    ws.onclose = (event) => {
      if (ws === socket) onClose(event.code);
    };
  }

  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  }

  function sendBytes(bytes) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(bytes);
  }

  function onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (e) {
      console.warn("capsule: ignoring a frame that is not JSON", e);
      return;
    }
    if (state === "connected") armSilenceTimer();
    switch (frame.type) {
      case "connected":
        sessionId = frame.session_id;
        storeSessionId(sessionId);
        attempt = 0;
        if (binary) startAcks(frame.offset, frame.window);
        if (frame.resumed) notice("reconnected");
        setState("connected", frame.resumed ? "resumed session" : "new session");
        startKeepalive();
        break;
      case "output":
        term.write(decodeBase64(frame.data));
        break;
      case "error":
        lastError = frame.message || frame.code || "error";
        showError(lastError);
        break;
      case "exit":
        exitCode = frame.exit_code;
        break;
      case "dropped":
        if (binary) onDropped(frame.bytes, frame.offset);
        break;
      case "pong":
        break;
    }
  }

  function onClose(code) {
    socket = null;
    stopKeepalive();
    stopAcks();
    switch (code) {
      case 1000: {
        // The shell ended. Keep the id in memory so Export still works, but a reload starts fresh.
        storeSessionId(null);
        const ended = exitCode === null ? "session ended" : `session ended (exit code ${exitCode})`;
        notice(ended);
        setState("ended", ended);
        break;
      }
      case 4400:
      case 4404:
        sessionId = null;
        storeSessionId(null);
        forgetOffsets();
        notice("session expired");
        setState("expired", "session expired");
        break;
      case 4409:
        // Another tab took the session over; reconnecting on our own would start a tug of war.
        setState("taken", "session taken over by another tab or window");
        break;
      case 1009:
        retry("message too big");
        break;
      case 4503:
        retry(lastError || "server cannot start sessions");
        break;
      case 1001:
      case 4001: // capsule restarts; the session lives on in its container
        retry("server restarting");
        break;
      default: // 1006 and anything unexpected
        retry("connection lost");
    }
  }

  function retry(reason) {
    if (attempt >= MAX_ATTEMPTS) {
      setState("failed", `${reason}; gave up after ${attempt} attempts`);
      return;
    }
    attempt += 1;
    setState("reconnecting", reason);
    retryTimer = setTimeout(connect, Math.min(500 * 2 ** (attempt - 1), 10000));
  }

  // --- keepalive ------------------------------------------------------------

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
    silenceTimer = setTimeout(() => {
      // The connection is dead without the browser noticing: drop it and start again.
      const ws = socket;
      socket = null;
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.close();
      stopKeepalive();
      stopAcks();
      retry("no reply from the server");
    }, SILENCE_LIMIT_MS);
  }

  // --- output and acknowledgements (binary protocol) -----------------------------

  function startAcks(offset, windowBytes) {
    received = processed = acked = Number.isSafeInteger(offset) && offset >= 0 ? offset : 0;
    offsetKnown = true;
    ackBytes = windowBytes > 0 ? Math.min(ACK_BYTES, Math.max(1, Math.floor(windowBytes / 8))) : ACK_BYTES;
  }

  function stopAcks() {
    clearTimeout(ackTimer);
    ackTimer = null;
  }

  // The terminal is empty again (or its session is gone): a resume starts from the beginning.
  function forgetOffsets() {
    received = processed = acked = 0;
    offsetKnown = true;
  }

  function onOutput(buffer) {
    if (state === "connected") armSilenceTimer();
    if (!binary) return; // binary frames are not part of the JSON protocol
    received += buffer.byteLength;
    const end = received;
    const current = link;
    term.write(new Uint8Array(buffer), () => onProcessed(current, end));
  }

  function onDropped(bytes, offset) {
    // Output before `offset` is gone for good: continue from there.
    if (typeof offset === "number" && offset > received) received = offset;
    const end = received;
    const current = link;
    term.write(`\x1b[2m[capsule: ${bytes} bytes of older output were dropped]\x1b[0m\r\n`,
      () => onProcessed(current, end));
  }

  function onProcessed(from, end) {
    if (from !== link || !binary) return; // an older socket's output
    processed = Math.max(processed, Math.min(end, received));
    if (processed - acked >= ackBytes) sendAck();
    else if (processed > acked && ackTimer === null) {
      ackTimer = setTimeout(() => {
        ackTimer = null;
        if (from === link) sendAck();
      }, ACK_DELAY_MS);
    }
  }

  function sendAck() {
    clearTimeout(ackTimer);
    ackTimer = null;
    const offset = Math.min(processed, received);
    if (offset <= acked || !socket || socket.readyState !== WebSocket.OPEN) return;
    acked = offset;
    send({ type: "ack", offset });
  }

  // --- terminal <-> socket --------------------------------------------------

  function decodeBase64(data) {
    const binary = atob(data);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes; // term.write() decodes UTF-8, also across chunk boundaries
  }

  const encoder = new TextEncoder();

  function sendInput(data) {
    if (state !== "connected") return;
    for (let start = 0; start < data.length; ) {
      let end = Math.min(start + INPUT_PIECE_CHARS, data.length);
      const last = data.charCodeAt(end - 1);
      if (end < data.length && last >= 0xd800 && last <= 0xdbff) end -= 1; // keep surrogate pairs whole
      const piece = data.slice(start, end);
      if (binary) sendBytes(encoder.encode(piece));
      else send({ type: "input", data: piece });
      start = end;
    }
  }

  // Raw bytes (one per character, 0-255), such as some mouse reports.
  function sendBinaryInput(data) {
    if (!binary) {
      sendInput(data);
      return;
    }
    if (state !== "connected") return;
    for (let start = 0; start < data.length; start += INPUT_PIECE_BYTES) {
      const piece = data.slice(start, start + INPUT_PIECE_BYTES);
      sendBytes(Uint8Array.from(piece, (c) => c.charCodeAt(0) & 0xff));
    }
  }

  function sendResize(always) {
    const size = `${term.cols}x${term.rows}`;
    if (!always && size === sentSize) return;
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    sentSize = size;
    send({ type: "resize", cols: term.cols, rows: term.rows });
  }

  let fitTimer = null;
  function scheduleFit() {
    clearTimeout(fitTimer);
    fitTimer = setTimeout(() => {
      fitAddon.fit();
      sendResize(false);
    }, RESIZE_DEBOUNCE_MS);
  }

  term.onData(sendInput);
  term.onBinary(sendBinaryInput);
  window.addEventListener("resize", scheduleFit);

  // --- buttons ----------------------------------------------------------------

  ui.exportButton.addEventListener("click", () => {
    if (!sessionId) return;
    const link = document.createElement("a");
    link.href = "api/export/" + encodeURIComponent(sessionId);
    link.download = "";
    link.click();
    term.focus();
  });

  ui.actionButton.addEventListener("click", () => {
    if (state === "ended" || state === "expired") {
      sessionId = null;
      storeSessionId(null);
      term.reset();
      forgetOffsets();
    }
    attempt = 0;
    setState("connecting");
    connect();
    term.focus();
  });

  // --- start --------------------------------------------------------------------

  fitAddon.fit();
  setState("connecting");
  connect();
  term.focus();
})();
