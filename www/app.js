// capsule terminal page: xterm.js <-> the /ws JSON protocol (see PROTOCOL.md).
// A classic script with no build step; Terminal and FitAddon come from the UMD builds
// that index.html loads from node_modules/.
"use strict";

(function () {
  const STORAGE_KEY = "capsule.session_id";
  const PING_INTERVAL_MS = 20000;
  const SILENCE_LIMIT_MS = 45000;
  const RESIZE_DEBOUNCE_MS = 50;
  const MAX_ATTEMPTS = 20;
  // At most 3 UTF-8 bytes per UTF-16 unit, so a piece stays under 32 KiB on the wire, and
  // under the server's 256 KiB message limit even when JSON escapes every character.
  const INPUT_PIECE_CHARS = 10 * 1024;

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
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = sessionId ? "?session_id=" + encodeURIComponent(sessionId) : "";
    url.hash = "";
    const ws = new WebSocket(url);
    socket = ws;
    ws.onopen = () => {
      if (ws === socket) sendResize(true); // before anything else: a new session needs the size
    };
    ws.onmessage = (event) => {
      if (ws === socket) onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (ws === socket) onClose(event.code);
    };
  }

  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
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
      case "pong":
        break;
    }
  }

  function onClose(code) {
    socket = null;
    stopKeepalive();
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
      retry("no reply from the server");
    }, SILENCE_LIMIT_MS);
  }

  // --- terminal <-> socket --------------------------------------------------

  function decodeBase64(data) {
    const binary = atob(data);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes; // term.write() decodes UTF-8, also across chunk boundaries
  }

  function sendInput(data) {
    if (state !== "connected") return;
    for (let start = 0; start < data.length; ) {
      let end = Math.min(start + INPUT_PIECE_CHARS, data.length);
      const last = data.charCodeAt(end - 1);
      if (end < data.length && last >= 0xd800 && last <= 0xdbff) end -= 1; // keep surrogate pairs whole
      send({ type: "input", data: data.slice(start, end) });
      start = end;
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
  term.onBinary(sendInput);
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
