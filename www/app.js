// capsule terminal page: xterm.js <-> the /ws protocol (see the README's Protocol section). It
// asks for the binary protocol (raw output bytes with offsets, acknowledged for flow control, and
// resumed without duplicates or gaps) and speaks the JSON one if the server does not select it.
// A classic script with no build step; Terminal and its addons come from the UMD builds
// that index.html loads from node_modules/, CapsuleTar from tar.js.
"use strict";

(function () {
  const STORAGE_KEY = "capsule.session_id";
  const PING_INTERVAL_MS = 20000;
  const SILENCE_LIMIT_MS = 45000;
  const RESIZE_DEBOUNCE_MS = 50;
  const BINARY_PROTOCOL = "capsule.binary.v1";
  // Reconnecting: the first retry after RETRY_FIRST_MS, doubling up to RETRY_MAX_MS, for
  // RETRY_FOR_MS after the connection was lost. That outlasts a restart of capsule within the
  // session's grace period (60 s by default; the page cannot know it).
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 3000;
  const RETRY_FOR_MS = 120000;
  // At most 3 UTF-8 bytes per UTF-16 unit, so a piece stays under 32 KiB on the wire, and
  // under the server's 256 KiB message limit even when JSON escapes every character.
  const INPUT_PIECE_CHARS = 10 * 1024;
  // onBinary data is one byte per character.
  const INPUT_PIECE_BYTES = 32 * 1024;
  // Acknowledge processed output once this much (or window/8, if smaller) is unacknowledged,
  // and anything left unacknowledged at most ACK_DELAY_MS after it was processed.
  const ACK_BYTES = 64 * 1024;
  const ACK_DELAY_MS = 50;
  // A server that does not say how much of its output is replayed (no `replay` in `connected`)
  // sends the replay at once: output that follows a resumed `connected` without a pause of
  // REPLAY_QUIET_MS, within REPLAY_LIMIT_MS and before any input, is taken for replay.
  const REPLAY_QUIET_MS = 150;
  const REPLAY_LIMIT_MS = 1500;
  // "Your agent is waiting": while the tab is hidden, output that stopped this long ago.
  const WAIT_QUIET_MS = 10000;
  const NOTIFY_KEY = "capsule.notify";
  const WAITING_TITLE = "\u25cf capsule \u2014 your agent is waiting";
  // Files one upload may hold (a dropped folder is walked up to this many entries).
  const UPLOAD_MAX_ENTRIES = 10000;

  // Each state: its label in the status bar and the button it offers, if any.
  const STATES = {
    connecting: { label: "connecting" },
    connected: { label: "connected" },
    reconnecting: { label: "reconnecting" },
    ended: { label: "ended", action: "New session", gone: true },
    expired: { label: "ended", action: "New session", gone: true },
    taken: { label: "disconnected", action: "Reconnect here" },
    failed: { label: "error", action: "Reconnect" },
    // The server refused what this page asked for (an unknown profile): asking again is no use.
    refused: { label: "error" },
    // The login expired (or ended elsewhere): the page goes to the login page.
    login: { label: "logged out" },
  };

  // What the status bar says for a server notice (a control message, never terminal output).
  const NOTICES = {
    shell_restarted: { text: "the session's shell was restarted", line: true },
    engine_away: { text: "capsule is waiting for the Docker engine", engine: "away" },
    engine_back: { text: "the Docker engine is back", engine: "" },
    // The server's own sentence says how near the session is to its --disk limit.
    disk_limit: { line: true },
    // capsule is draining: this session goes on (until a deadline the message gives).
    draining: { line: true },
  };

  // Error codes after which the page does not try again: the message says what to change.
  const REFUSALS = new Set(["unknown_profile"]);

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
    terminal: $("terminal"),
  };

  const term = new Terminal({
    cursorBlink: true,
    fontFamily: getComputedStyle(document.body).getPropertyValue("--mono"),
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0d1117", foreground: "#c9d1d9", cursor: "#c9d1d9" },
    // term.unicode (the Unicode 11 widths) is a "proposed" API of xterm.js.
    allowProposedApi: true,
  });
  const fitAddon = new FitAddon.FitAddon();
  term.loadAddon(fitAddon);
  // Unicode 11 character widths: emoji take two cells, as in the programs that print them.
  term.loadAddon(new Unicode11Addon.Unicode11Addon());
  term.unicode.activeVersion = "11";
  ui.terminal.dataset.unicode = term.unicode.activeVersion;
  term.loadAddon(new WebLinksAddon.WebLinksAddon(openLink));
  term.open(ui.terminal);

  // A link in the terminal opens in a new tab that cannot reach back to this one.
  function openLink(event, uri) {
    let url;
    try {
      url = new URL(uri);
    } catch (e) {
      return;
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") return;
    window.open(url.href, "_blank", "noopener,noreferrer");
  }

  let state = null;
  let sessionId = loadSessionId();
  let socket = null;
  let exitCode = null; // from the `exit` frame that precedes a 1000 close
  let lastError = ""; // message of the latest `error` frame
  let lastErrorCode = ""; // and its code
  let sentSize = ""; // "COLSxROWS" last sent on this socket
  let pingTimer = null;
  let silenceTimer = null;

  // Reconnecting. An outage runs from losing the connection to the next `connected`.
  let attempt = 0; // reconnect attempts in this outage
  let outage = null; // { since, restarting, failing } or null while connected
  let retryAt = 0; // when the next attempt starts (Date.now() time)
  let retryTimer = null;
  let countdownTimer = null;
  let opened = false; // whether the current socket reached `connected`

  // Binary protocol. Every output byte has an offset in all the session ever produced.
  let binary = false; // whether the current socket speaks the binary protocol
  let link = 0; // counts sockets, so xterm callbacks for an old socket's output are ignored
  let received = 0; // offset just past the last output byte received
  let offsetKnown = true; // whether `received` says what this terminal holds (false after JSON)
  let processed = 0; // offset just past the last byte xterm has finished processing
  let acked = 0; // offset last acknowledged to the server
  let ackBytes = ACK_BYTES;
  let ackTimer = null;

  // Replayed output: what the shell printed before this connection, written again. xterm answers
  // the terminal queries it finds in what it parses (device attributes, cursor position, colours,
  // focus reports when focus reporting is switched on); answers to replayed queries are stale
  // and would reach the shell as typed input, so they are dropped (see fromTerminal).
  let replayLeft = 0; // bytes of replay still to come on this socket
  let replayGuess = false; // an older server: the replay ends at a pause in the output
  let replayGuessTimer = null;
  let replayGuessUntil = 0;
  let blank = true; // whether the terminal shows no output yet (a new page, or after reset)
  let replayWritten = false; // whether the last chunk given to xterm is replay
  let parsingReplay = false; // whether xterm is parsing replayed output (set by write callbacks)
  let held = []; // what xterm sent while it was parsing replay, until the end of the task

  // Users: whether capsule has them (null: not known yet), and whether the page is leaving for
  // the login page (nothing it does with sockets matters any more).
  let hasUsers = null;
  let leaving = false;

  // The profile a new session asks for (/?profile=claude); a resumed session keeps its own.
  const profile = new URLSearchParams(location.search).get("profile");

  let uploading = false;

  // --- status bar -------------------------------------------------------

  function setState(name, message) {
    state = name;
    const spec = STATES[name];
    ui.status.dataset.state = name;
    ui.label.textContent = spec.label;
    ui.message.textContent = message || "";
    ui.message.classList.toggle("is-error", name === "failed" || name === "refused");
    ui.actionButton.hidden = !spec.action;
    ui.actionButton.textContent = spec.action || "";
    if (name !== "connected") delete ui.status.dataset.engine;
    if (name !== "reconnecting") stopCountdown();
    renderSession();
  }

  function showError(message) {
    ui.message.textContent = message;
    ui.message.classList.add("is-error");
  }

  function showNotice(message) {
    ui.message.textContent = message;
    ui.message.classList.remove("is-error");
  }

  function renderSession() {
    ui.session.textContent = sessionId ? sessionId.slice(0, 8) : "";
    ui.session.title = sessionId || "";
    const gone = !sessionId || STATES[state].gone;
    ui.exportButton.disabled = gone;
    ui.exportButton.title = gone
      ? "Export is not available: the session has ended"
      : "Download /workspace as .tar.gz";
    ui.uploadButton.disabled = gone || uploading;
    ui.uploadButton.title = gone
      ? "Upload is not available: there is no session"
      : uploading ? "An upload is under way" : "Upload files to /workspace (or drop them on the terminal)";
  }

  // A line of capsule's own in the terminal: not session output, so not counted in offsets.
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

  function forgetSession() {
    sessionId = null;
    storeSessionId(null);
    forgetOffsets();
  }

  // --- the socket --------------------------------------------------------

  function connect() {
    resetLink();
    if (state === "reconnecting") renderCountdown();
    const ws = new WebSocket(socketUrl(), [BINARY_PROTOCOL]);
    ws.binaryType = "arraybuffer";
    attach(ws);
  }

  // What a new socket starts from.
  function resetLink() {
    clearTimeout(retryTimer);
    retryTimer = null;
    exitCode = null;
    lastError = "";
    lastErrorCode = "";
    sentSize = "";
    binary = false;
    opened = false;
    link += 1;
    stopAcks();
    endReplay();
  }

  // /ws, with the session to resume (or the profile of a new one). index.html's bootstrap
  // builds the first one the same way; see adoptBoot.
  function socketUrl() {
    const url = new URL("ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams();
    if (sessionId) {
      params.set("session_id", sessionId);
      // Resume just past the last byte this page has: after a dropped socket the server sends
      // exactly what was missed; after a reload (received 0) the recent screen again. The
      // server only reads it with the binary protocol.
      if (offsetKnown) params.set("offset", String(received));
    } else if (profile) {
      params.set("profile", profile);
    }
    const query = params.toString();
    url.search = query ? "?" + query : "";
    url.hash = "";
    return url.href;
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
    if (!binary) offsetKnown = false;
  }

  function receive(data) {
    if (typeof data === "string") onFrame(data);
    else onOutput(data);
  }

  // The socket index.html's bootstrap opened before the terminal's scripts had loaded, and what
  // it received meanwhile, taken over as if connect() had opened it: the bootstrap sent the
  // size it estimated (a resize follows if the terminal came out otherwise). A socket to any
  // other URL than connect() would open is closed, and connect() opens that one.
  function adoptBoot() {
    const boot = window.capsuleBoot;
    window.capsuleBoot = null;
    if (!boot || !boot.socket) return false;
    const ws = boot.socket;
    ws.onopen = ws.onmessage = ws.onclose = null;
    resetLink();
    if (boot.url !== socketUrl()) {
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
        onConnected(frame);
        break;
      case "output":
        onJsonOutput(decodeBase64(frame.data));
        break;
      case "notice":
        onNotice(frame.code, frame.message);
        break;
      case "error":
        lastError = frame.message || frame.code || "error";
        lastErrorCode = typeof frame.code === "string" ? frame.code : "";
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

  function onConnected(frame) {
    sessionId = frame.session_id;
    storeSessionId(sessionId);
    opened = true;
    outage = null;
    attempt = 0;
    if (binary) startAcks(frame.offset, frame.window);
    startReplay(frame);
    // Said in the terminal only when it is blank (a reload): a line in the middle of what it
    // shows would break the shell's prompt or a full-screen program's screen.
    if (frame.resumed && blank) notice("reconnected");
    setState("connected", frame.resumed ? "resumed session" : "new session");
    startKeepalive();
  }

  function onNotice(code, message) {
    const known = NOTICES[code] || {};
    const text = known.text || message || code || "notice";
    if ("engine" in known) {
      if (known.engine) ui.status.dataset.engine = known.engine;
      else delete ui.status.dataset.engine;
    }
    showNotice(text);
    if (known.line) notice(text);
  }

  function onClose(code) {
    socket = null;
    // Output that stops because the connection did is no agent waiting.
    clearTimeout(waitTimer);
    waitTimer = null;
    if (leaving) return;
    stopKeepalive();
    stopAcks();
    endReplay();
    // A connection that never got as far as `connected`: capsule is down or not ready yet.
    const failedAttempt = !opened;
    opened = false;
    if (REFUSALS.has(lastErrorCode)) {
      outage = null;
      setState("refused", lastError);
      return;
    }
    switch (code) {
      case 1000: {
        // The shell ended and its container is gone: a reload starts fresh, Export has nothing.
        storeSessionId(null);
        const ended = exitCode === null ? "session ended" : `session ended (exit code ${exitCode})`;
        notice(ended);
        setState("ended", ended);
        break;
      }
      case 4400:
        forgetSession();
        notice("session expired");
        setState("expired", "session expired");
        break;
      case 4404:
        // Right after a restart of capsule (a 4001, or connections that failed), the session may
        // not be known yet: keep trying for as long as it could come back. Otherwise it is gone.
        if (outage && (outage.restarting || outage.failing) && !retryExhausted()) {
          retry("capsule is restarting");
        } else {
          expire();
        }
        break;
      case 4409:
        // Another tab took the session over; reconnecting on our own would start a tug of war.
        outage = null;
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
        beginOutage().restarting = true;
        retry("capsule is restarting");
        break;
      default: // 1006 and anything unexpected
        if (failedAttempt) {
          beginOutage().failing = true;
          // A refused upgrade looks the same as capsule being down; its API tells them apart.
          if (hasUsers !== false) checkLogin();
        }
        retry("connection lost");
    }
  }

  function expire() {
    outage = null;
    forgetSession();
    notice("session expired");
    setState("expired", "session expired");
  }

  function beginOutage() {
    if (!outage) outage = { since: Date.now(), restarting: false, failing: false };
    return outage;
  }

  function retryExhausted() {
    return outage !== null && Date.now() - outage.since >= RETRY_FOR_MS;
  }

  function retry(reason) {
    beginOutage();
    if (retryExhausted()) {
      const seconds = Math.round((Date.now() - outage.since) / 1000);
      outage = null;
      setState("failed", `${reason}; gave up after ${attempt} attempts in ${seconds} s`);
      return;
    }
    attempt += 1;
    const delay = Math.min(RETRY_FIRST_MS * 2 ** (attempt - 1), RETRY_MAX_MS);
    retryAt = Date.now() + delay;
    // While capsule restarts, every failed attempt looks like a lost connection: say why.
    setState("reconnecting", outage.restarting && reason === "connection lost" ? "capsule is restarting" : reason);
    retryTimer = setTimeout(connect, delay);
    startCountdown();
  }

  function startCountdown() {
    renderCountdown();
    if (countdownTimer === null) countdownTimer = setInterval(renderCountdown, 250);
  }

  function stopCountdown() {
    clearInterval(countdownTimer);
    countdownTimer = null;
    ui.countdown.textContent = "";
  }

  function renderCountdown() {
    const seconds = Math.ceil((retryAt - Date.now()) / 1000);
    const text = retryTimer !== null && seconds > 0
      ? `next try in ${seconds} s (attempt ${attempt})`
      : `trying now (attempt ${attempt})`;
    if (ui.countdown.textContent !== text) ui.countdown.textContent = text;
  }

  // --- users: the login and logging out ------------------------------------------

  // GET api/sessions: 200 with the user ({"user": null} when capsule has no users), 401 without
  // a login. Resolves to the response, or null when capsule did not answer.
  function askSessions() {
    return fetch("api/sessions", {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    }).catch(() => null);
  }

  function checkLogin() {
    askSessions().then((response) => {
      if (response && response.status === 401 && !leaving) toLogin("login expired");
    });
  }

  // To the login page, which comes back here afterwards: this tab's sessionStorage keeps the
  // session id, so the same session resumes.
  function toLogin(reason) {
    leaving = true;
    clearTimeout(retryTimer);
    retryTimer = null;
    stopKeepalive();
    stopAcks();
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.close();
      socket = null;
    }
    outage = null;
    if (sessionId) storeSessionId(sessionId);
    setState("login", `${reason}: going to the login page`);
    const next = location.pathname + location.search;
    location.assign("login?next=" + encodeURIComponent(next));
  }

  function showLogout() {
    askSessions().then((response) => {
      if (!response || !response.ok) return;
      return response.json().then((body) => {
        hasUsers = typeof body.user === "string";
        ui.logoutButton.hidden = !hasUsers;
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
      // Logged out on purpose: the next login here starts afresh.
      leaving = true;
      forgetSession();
      location.assign(response.redirected ? response.url : "login");
    }).catch((e) => {
      ui.logoutButton.disabled = false;
      showError(`log out failed: ${e.message}`);
    });
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
      endReplay();
      opened = false;
      retry("no reply from the server");
    }, SILENCE_LIMIT_MS);
  }

  // --- replayed output ---------------------------------------------------------

  function startReplay(frame) {
    endReplay();
    if (Number.isSafeInteger(frame.replay) && frame.replay >= 0) {
      replayLeft = frame.replay;
    } else if (frame.resumed) {
      replayGuess = true;
      replayGuessUntil = Date.now() + REPLAY_LIMIT_MS;
      armReplayGuess();
    }
  }

  function armReplayGuess() {
    clearTimeout(replayGuessTimer);
    const wait = Math.min(REPLAY_QUIET_MS, replayGuessUntil - Date.now());
    replayGuessTimer = setTimeout(endReplay, Math.max(0, wait));
  }

  // How many of the next `length` output bytes are replay; they are taken off what is left.
  function takeReplay(length) {
    if (replayGuess) {
      armReplayGuess();
      return length;
    }
    const count = Math.min(length, replayLeft);
    replayLeft -= count;
    return count;
  }

  // Output from here on is live. xterm learns it in order: a marker write after the replay.
  function endReplay() {
    replayLeft = 0;
    replayGuess = false;
    clearTimeout(replayGuessTimer);
    replayGuessTimer = null;
    if (replayWritten) {
      replayWritten = false;
      term.write("", () => {
        parsingReplay = false;
      });
    }
  }

  // Writes output, its first `replayCount` bytes replayed; `done(bytesParsed)` after each part.
  function writeOutput(bytes, replayCount, done) {
    blank = false;
    if (replayCount > 0) {
      if (!replayWritten) {
        replayWritten = true;
        term.write("", () => {
          parsingReplay = true;
        });
      }
      term.write(bytes.subarray(0, replayCount), () => done(replayCount));
      if (replayLeft === 0 && !replayGuess) endReplay();
    }
    if (replayCount < bytes.length) {
      endReplay();
      term.write(bytes.subarray(replayCount), () => done(bytes.length));
      liveOutput();
    }
  }

  // Everything xterm sends to the shell passes here: keys, pastes, mouse reports, and xterm's
  // own answers to queries in what it parses. Answers to replayed queries are produced while
  // xterm parses replay, in the task that parses it; what comes while parsingReplay is set is
  // held, and dropped if that task turns out to be a parse (onWriteParsed fires at its end).
  // What is held in another task (a key pressed while a long replay is parsed piece by piece)
  // is sent at the end of that task, in order with what came after it.
  function fromTerminal(sendFn, data) {
    if (!parsingReplay && held.length === 0) {
      sendFn(data);
      return;
    }
    if (held.length === 0) queueMicrotask(releaseHeld);
    held.push({ sendFn, data, replay: parsingReplay });
  }

  function releaseHeld() {
    const items = held;
    held = [];
    for (const item of items) item.sendFn(item.data);
  }

  term.onWriteParsed(() => {
    if (held.length > 0) held = held.filter((item) => !item.replay);
  });

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
    const start = received;
    received += buffer.byteLength;
    const current = link;
    const bytes = new Uint8Array(buffer);
    writeOutput(bytes, takeReplay(bytes.length), (count) => onProcessed(current, start + count));
  }

  function onJsonOutput(bytes) {
    writeOutput(bytes, takeReplay(bytes.length), () => {});
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

  // Input, as the shell will see it: output that follows is an answer to it, not replay.
  function inputSent() {
    if (replayGuess) endReplay();
  }

  function sendInput(data) {
    if (state !== "connected") return;
    inputSent();
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
    inputSent();
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

  term.onData((data) => fromTerminal(sendInput, data));
  term.onBinary((data) => fromTerminal(sendBinaryInput, data));
  window.addEventListener("resize", scheduleFit);

  // --- attention: the bell, and an agent waiting for input ---------------------------

  // While the tab is hidden, the terminal's bell, or live output that stopped WAIT_QUIET_MS ago
  // (the agent, or the shell, waits for its user), changes the title and, when the user turned
  // notifications on, shows one. Both are undone when the tab is seen again.
  const baseTitle = document.title;
  let waitTimer = null;
  let notification = null;

  function liveOutput() {
    if (!document.hidden) return;
    clearTimeout(waitTimer);
    waitTimer = setTimeout(() => {
      waitTimer = null;
      attention("its output stopped " + WAIT_QUIET_MS / 1000 + " s ago");
    }, WAIT_QUIET_MS);
  }

  term.onBell(() => {
    // A bell in replayed output rang before this page saw it.
    if (!parsingReplay) attention("the terminal rang its bell");
  });

  function attention(reason) {
    if (!document.hidden || leaving) return;
    document.title = WAITING_TITLE;
    if (!notificationsOn()) return;
    try {
      if (notification) notification.close();
      const shown = new Notification("your agent is waiting", {
        body: `capsule ${sessionId ? sessionId.slice(0, 8) : ""}: ${reason}`,
        tag: "capsule-waiting",
        icon: "favicon.svg",
      });
      shown.onclick = () => {
        window.focus();
        shown.close();
      };
      notification = shown;
    } catch (e) {
      console.warn("capsule: a notification could not be shown", e);
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) return;
    clearTimeout(waitTimer);
    waitTimer = null;
    document.title = baseTitle;
    if (notification) {
      notification.close();
      notification = null;
    }
  });

  function notifyWanted() {
    try {
      return localStorage.getItem(NOTIFY_KEY) === "on";
    } catch (e) {
      return false;
    }
  }

  function setNotifyWanted(on) {
    try {
      localStorage.setItem(NOTIFY_KEY, on ? "on" : "off");
    } catch (e) {
      // Storage disabled: the choice lasts as long as the page.
    }
    notifyChoice = on;
    renderNotify();
  }

  let notifyChoice = notifyWanted();

  function notificationsOn() {
    return notifyChoice && "Notification" in window && Notification.permission === "granted";
  }

  function renderNotify() {
    const button = ui.notifyButton;
    if (!("Notification" in window)) {
      button.hidden = true;
      return;
    }
    const on = notificationsOn();
    button.dataset.on = on ? "true" : "false";
    button.setAttribute("aria-pressed", on ? "true" : "false");
    button.title = Notification.permission === "denied"
      ? "Notifications are blocked for this site (the browser's site settings allow them)"
      : on ? "Notify me when the agent is waiting: on"
        : "Notify me when the agent is waiting: off";
  }

  // Permission is asked for here only: on the user's click.
  ui.notifyButton.addEventListener("click", () => {
    term.focus();
    if (notificationsOn()) {
      setNotifyWanted(false);
      showNotice("notifications off");
      return;
    }
    if (Notification.permission === "denied") {
      showError("notifications are blocked for this site in the browser's settings");
      renderNotify();
      return;
    }
    const asked = Notification.permission === "granted"
      ? Promise.resolve("granted")
      : Notification.requestPermission();
    Promise.resolve(asked).then((permission) => {
      if (permission === "granted") {
        setNotifyWanted(true);
        showNotice("notifications on: you are told when the agent is waiting");
      } else {
        renderNotify();
        showError("notifications were not allowed");
      }
    }).catch(() => showError("notifications could not be turned on"));
  });

  // --- upload: files into /workspace ------------------------------------------------

  function formatBytes(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function describeUpload(packed) {
    const parts = [];
    if (packed.files > 0) parts.push(packed.files === 1 ? "1 file" : `${packed.files} files`);
    const folders = packed.directories;
    if (folders > 0) parts.push(folders === 1 ? "1 folder" : `${folders} folders`);
    return `${parts.join(" and ") || "nothing"} (${formatBytes(packed.bytes)})`;
  }

  // Sends entries ([{path, file} | {path, directory: true}]) to the session's /workspace as a tar.
  function upload(entries) {
    if (uploading) {
      showError("an upload is already under way");
      return;
    }
    if (!sessionId || STATES[state].gone) {
      showError("upload: there is no session to upload to");
      return;
    }
    if (entries.length === 0) {
      showError("upload: nothing to upload");
      return;
    }
    let packed;
    try {
      packed = CapsuleTar.pack(entries);
    } catch (e) {
      showError(`upload failed: ${e.message}`);
      return;
    }
    const what = describeUpload(packed);
    const id = sessionId;
    uploading = true;
    renderSession();
    showNotice(`uploading ${what}\u2026`);
    // XMLHttpRequest, as fetch does not report an upload's progress. It carries the page's
    // Origin (index.html's referrer policy is same-origin: see there) and the login cookie.
    const request = new XMLHttpRequest();
    request.open("POST", `api/sessions/${encodeURIComponent(id)}/workspace`);
    request.setRequestHeader("Content-Type", "application/x-tar");
    request.setRequestHeader("Accept", "application/json");
    let shown = -1;
    request.upload.onprogress = (event) => {
      if (!event.lengthComputable || event.total <= 0) return;
      const percent = Math.floor((event.loaded * 100) / event.total);
      if (percent === shown) return;
      shown = percent;
      showNotice(`uploading ${what}: ${percent}%`);
    };
    request.onload = () => {
      if (request.status >= 200 && request.status < 300) {
        showNotice(`uploaded ${what} to /workspace`);
        return;
      }
      if (request.status === 401) checkLogin();
      showError(`upload failed: ${uploadError(request.status, request.responseText)}`);
    };
    request.onerror = () => showError("upload failed: capsule did not answer");
    request.onloadend = () => {
      uploading = false;
      renderSession();
    };
    request.send(packed.blob);
  }

  // The sentence of capsule's JSON answer ({"error": ..., "code": ...}), or the status.
  function uploadError(status, text) {
    let message = null;
    try {
      const body = JSON.parse(text);
      message = typeof body.error === "string" ? body.error : body.message;
    } catch (e) {
      // not capsule's JSON
    }
    if (typeof message === "string" && message) return message.replace(/\s+/g, " ").slice(0, 300);
    return status === 413 ? "too large for capsule's upload limit" : `HTTP ${status}`;
  }

  ui.uploadButton.addEventListener("click", () => {
    if (!ui.uploadButton.disabled) ui.uploadInput.click();
  });

  ui.uploadInput.addEventListener("change", () => {
    const files = Array.from(ui.uploadInput.files || []);
    ui.uploadInput.value = "";
    term.focus();
    // A folder picked (where a browser offers it) keeps its paths.
    if (files.length > 0) upload(files.map((file) => ({ path: file.webkitRelativePath || file.name, file })));
  });

  // What was dropped, folders walked (FileSystemEntry, where the browser gives one). The entries
  // must be taken from the DataTransfer during the drop event; they are read afterwards.
  function droppedEntries(dataTransfer) {
    const items = Array.from(dataTransfer.items || []).filter((item) => item.kind === "file");
    const roots = items.map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
    if (roots.length === 0 || roots.some((root) => !root)) {
      const files = Array.from(dataTransfer.files || []);
      return Promise.resolve(files.map((file) => ({ path: file.name, file })));
    }
    const out = [];
    return roots.reduce((done, root) => done.then(() => walkEntry(root, root.name, out)),
      Promise.resolve()).then(() => out);
  }

  function walkEntry(entry, path, out) {
    if (out.length >= UPLOAD_MAX_ENTRIES) {
      return Promise.reject(new Error(`more than ${UPLOAD_MAX_ENTRIES} files and folders`));
    }
    if (entry.isFile) {
      return new Promise((resolve, reject) => entry.file(resolve, reject))
        .then((file) => { out.push({ path, file }); });
    }
    if (!entry.isDirectory) return Promise.resolve();
    const reader = entry.createReader();
    const children = [];
    // readEntries answers in batches; an empty batch is the end.
    const readAll = () => new Promise((resolve, reject) => reader.readEntries(resolve, reject))
      .then((batch) => {
        if (batch.length === 0) return null;
        children.push(...batch);
        if (children.length > UPLOAD_MAX_ENTRIES) {
          throw new Error(`more than ${UPLOAD_MAX_ENTRIES} files and folders`);
        }
        return readAll();
      });
    return readAll().then(() => {
      out.push({ path, directory: true });
      return children.reduce((done, child) => done.then(() => walkEntry(child, `${path}/${child.name}`, out)),
        Promise.resolve());
    });
  }

  function carriesFiles(event) {
    return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  }

  let dropHideTimer = null;
  function showDropZone() {
    ui.dropZone.hidden = false;
    clearTimeout(dropHideTimer);
    // dragover repeats while the pointer is over the page: its end hides the zone.
    dropHideTimer = setTimeout(() => { ui.dropZone.hidden = true; }, 300);
  }

  // Files dropped anywhere on the page go to /workspace (and never replace the page).
  window.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    const gone = !sessionId || STATES[state].gone;
    event.dataTransfer.dropEffect = gone || uploading ? "none" : "copy";
    if (!gone && !uploading) showDropZone();
  });

  window.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    clearTimeout(dropHideTimer);
    ui.dropZone.hidden = true;
    droppedEntries(event.dataTransfer).then(upload, (e) => {
      showError(`upload failed: ${e && e.message ? e.message : "the dropped files could not be read"}`);
    });
    term.focus();
  });

  // --- export -------------------------------------------------------------------

  // The archive downloads through a hidden frame, so the browser streams it to disk however
  // large it is. A download leaves the frame empty; a document in it is the server's error.
  function startExport() {
    const frame = document.createElement("iframe");
    frame.hidden = true;
    frame.tabIndex = -1;
    frame.title = "workspace export";
    frame.setAttribute("aria-hidden", "true");
    frame.addEventListener("load", () => {
      let text;
      try {
        const doc = frame.contentDocument;
        if (doc && doc.URL === "about:blank") return;
        text = doc ? (doc.querySelector("pre") || doc.body || doc.documentElement).textContent : null;
      } catch (e) {
        text = null; // the browser's own error page: capsule did not answer
      }
      frame.remove();
      showError(exportError(text));
    });
    frame.src = "api/export/" + encodeURIComponent(sessionId);
    document.body.appendChild(frame);
  }

  function exportError(text) {
    if (text === null) return "export failed: capsule did not answer";
    try {
      const body = JSON.parse(text);
      const message = body.message || body.error;
      if (message) return message.startsWith("export failed") ? message : `export failed: ${message}`;
    } catch (e) {
      // not capsule's JSON
    }
    const brief = text.trim().replace(/\s+/g, " ").slice(0, 200);
    return brief ? `export failed: ${brief}` : "export failed";
  }

  // --- buttons ----------------------------------------------------------------

  ui.exportButton.addEventListener("click", () => {
    if (!sessionId || ui.exportButton.disabled) return;
    startExport();
    term.focus();
  });

  ui.logoutButton.addEventListener("click", logOut);
  renderNotify();

  ui.actionButton.addEventListener("click", () => {
    if (state === "ended" || state === "expired") {
      forgetSession();
      term.reset();
      blank = true;
    }
    attempt = 0;
    outage = null;
    setState("connecting");
    connect();
    term.focus();
  });

  // --- start --------------------------------------------------------------------

  fitAddon.fit();
  setState("connecting");
  if (!adoptBoot()) connect();
  term.focus();
  // Whether to offer "Log out" (a request, and its answer's handling) is not on the way to the
  // first prompt: asked when the main thread is next idle (at most a second from now).
  if (window.requestIdleCallback) requestIdleCallback(showLogout, { timeout: 1000 });
  else setTimeout(showLogout, 100);
})();
