// The terminal: xterm.js and its addons (UMD globals that index.html loads before the page's
// modules), its size, and output written with replay kept apart from live output.
//
// Replayed output: what the shell printed before this connection, written again. xterm answers
// the terminal queries it finds in what it parses (device attributes, cursor position, colours,
// focus reports when focus reporting is switched on); answers to replayed queries are stale
// and would reach the shell as typed input, so they are dropped (see fromTerminal).

const RESIZE_DEBOUNCE_MS = 50;

// Rows a little taller than the font's box: DejaVu Sans Mono's underscore lies below its
// descent, and at 14 px with a device pixel ratio of 1 a row of exactly the box (16 px) cut
// it off (`a_b` showed as `a b`). With 1.125 the row has a pixel to spare below the glyphs at
// ratios 1 and 2 (18 px, 18.5 px); index.html's bootstrap sizes the rows with the same factor.
export const FONT_SIZE = 14;
export const LINE_HEIGHT = 1.125;

// Where a link in the terminal may go: http(s) only, else null.
export function linkTarget(uri) {
  let url;
  try {
    url = new URL(uri);
  } catch (e) {
    return null;
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

// The terminal in `element`. `onInput(data)` and `onBinaryInput(data)` get what xterm sends to
// the shell (keys, pastes, mouse reports, xterm's answers), replayed answers left out;
// `onResize()` follows a change of size; `onBell()` a bell in live output. A `readOnly` terminal
// (a spectator's) takes no input and keeps the session's size (resizeTo), not the window's.
export function createTerminal(element, { onInput, onBinaryInput, onResize, onBell, readOnly = false }) {
  const term = new Terminal({
    cursorBlink: !readOnly,
    disableStdin: readOnly,
    fontFamily: getComputedStyle(document.body).getPropertyValue("--mono"),
    fontSize: FONT_SIZE,
    lineHeight: LINE_HEIGHT,
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
  element.dataset.unicode = term.unicode.activeVersion;
  // A link in the terminal opens in a new tab that cannot reach back to this one.
  term.loadAddon(new WebLinksAddon.WebLinksAddon((event, uri) => {
    const href = linkTarget(uri);
    if (href) window.open(href, "_blank", "noopener,noreferrer");
  }));
  term.open(element);

  let blank = true; // whether the terminal shows no output yet (a new page, or after clear)
  let replayWritten = false; // whether the last chunk given to xterm is replay
  let parsingReplay = false; // whether xterm is parsing replayed output (set by write callbacks)
  let held = []; // what xterm sent while it was parsing replay, until the end of the task

  // Everything xterm sends to the shell passes here. Answers to replayed queries are produced
  // while xterm parses replay, in the task that parses it; what comes while parsingReplay is
  // set is held, and dropped if that task turns out to be a parse (onWriteParsed fires at its
  // end). What is held in another task (a key pressed while a long replay is parsed piece by
  // piece) is sent at the end of that task, in order with what came after it.
  function fromTerminal(send, data) {
    if (!parsingReplay && held.length === 0) {
      send(data);
      return;
    }
    if (held.length === 0) queueMicrotask(releaseHeld);
    held.push({ send, data, replay: parsingReplay });
  }

  function releaseHeld() {
    const items = held;
    held = [];
    for (const item of items) item.send(item.data);
  }

  term.onWriteParsed(() => {
    if (held.length > 0) held = held.filter((item) => !item.replay);
  });
  term.onData((data) => fromTerminal(onInput, data));
  term.onBinary((data) => fromTerminal(onBinaryInput, data));
  term.onBell(() => {
    // A bell in replayed output rang before this page saw it.
    if (!parsingReplay) onBell();
  });

  let fitTimer = null;
  window.addEventListener("resize", () => {
    if (readOnly) return;
    clearTimeout(fitTimer);
    fitTimer = setTimeout(() => {
      fitAddon.fit();
      onResize();
    }, RESIZE_DEBOUNCE_MS);
  });

  return {
    get blank() {
      return blank;
    },
    // xterm.js's Terminal itself, for the add-ons loaded after the first prompt (js/extras.js).
    get xterm() {
      return term;
    },
    // Whether xterm is parsing replayed output (what a program did before this page saw it).
    get replaying() {
      return parsingReplay;
    },
    size() {
      return { cols: term.cols, rows: term.rows };
    },
    fit() {
      fitAddon.fit();
    },
    // The session's size (a spectator's terminal shows the owner's screen as it is).
    resizeTo(cols, rows) {
      if (cols !== term.cols || rows !== term.rows) term.resize(cols, rows);
    },
    focus() {
      term.focus();
    },
    // `done()` in the animation frame in which xterm draws what was written so far (its
    // renderer draws in the first frame after parsing; this frame callback is asked for after
    // that one).
    whenDrawn(done) {
      term.write("", () => requestAnimationFrame(done));
    },
    // Empty again, for a new session.
    clear() {
      term.reset();
      blank = true;
    },
    // A line of capsule's own: not session output, so not counted in offsets.
    notice(text) {
      term.write(`\r\n\x1b[2m[capsule] ${text}\x1b[0m\r\n`);
    },
    // Text of capsule's own; `done()` once it is processed.
    writeText(text, done) {
      term.write(text, done);
    },
    // Replayed output; `done()` once xterm has processed it. xterm learns where replay begins
    // in order: a marker write before it.
    writeReplay(bytes, done) {
      blank = false;
      if (!replayWritten) {
        replayWritten = true;
        term.write("", () => {
          parsingReplay = true;
        });
      }
      term.write(bytes, done);
    },
    // Output from here on is live: a marker write after the replay.
    endReplay() {
      if (!replayWritten) return;
      replayWritten = false;
      term.write("", () => {
        parsingReplay = false;
      });
    },
    writeLive(bytes, done) {
      blank = false;
      this.endReplay();
      term.write(bytes, done);
    },
  };
}
