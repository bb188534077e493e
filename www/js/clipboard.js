// The clipboard: programs in the session copy to it with OSC 52 (tmux's set-clipboard, vim's
// and agents' copy), never read it; the selection is copied with the platform's shortcut (see
// js/keys.js) or, as an option, as soon as it is made; pastes go through xterm.js, which
// brackets them when the program asked for it.
//
// The browser decides what a page may write: Chromium lets a focused page write, other
// browsers only just after a key or click. When it refuses, a short notice offers the text
// with a Copy button (a click is a user gesture, which every browser accepts).

import { parseOsc52 } from "./keys.js";

export const COPY_ON_SELECT_KEY = "capsule.copyOnSelect";

// Whether copy on selection is on (off by default), as kept in `storage`.
export function copyOnSelectSaved(storage) {
  try {
    return storage.getItem(COPY_ON_SELECT_KEY) === "on";
  } catch (e) {
    return false;
  }
}

export function saveCopyOnSelect(storage, on) {
  try {
    if (on) storage.setItem(COPY_ON_SELECT_KEY, "on");
    else storage.removeItem(COPY_ON_SELECT_KEY);
  } catch (e) {
    // private browsing without storage: the option lasts as long as the page
  }
}

// What the notice says of `text` a program copied.
export function copiedText(text) {
  const chars = [...text].length;
  return `a program in the session copied ${chars} character${chars === 1 ? "" : "s"}`;
}

// `term` is the page's terminal (js/terminal.js); `notice` the notice element's maker (below).
// `programs`: whether programs in the session may write the clipboard (not a spectator's).
export function setupClipboard(term, win, notice, { programs = true } = {}) {
  const xterm = term.xterm;
  const clipboard = win.navigator.clipboard;
  let copyOnSelect = copyOnSelectSaved(win.localStorage);

  // Write `text` to the system clipboard; on refusal, offer it in a notice.
  function write(text, what) {
    const refused = () => notice.offer(text, what);
    if (!clipboard || !clipboard.writeText) {
      if (!execCopy(win.document, text)) refused();
      return;
    }
    clipboard.writeText(text).then(() => notice.copied(what), () => {
      if (!execCopy(win.document, text)) refused();
    });
  }

  // OSC 52 from the session: writes only, at most OSC52_MAX_BYTES, and not from replayed
  // output (a copy made before this page saw it). Always handled: xterm never answers it.
  xterm.parser.registerOscHandler(52, (payload) => {
    if (term.replaying || !programs) return true;
    const asked = parseOsc52(payload);
    if (asked.write !== undefined) write(asked.write, copiedText(asked.write));
    else if (asked.ignore === "too large") notice.say("a program's copy was too large for the clipboard (over 1 MiB)");
    return true;
  });

  xterm.onSelectionChange(() => {
    if (!copyOnSelect || !xterm.hasSelection()) return;
    const text = xterm.getSelection();
    if (text) write(text, null);
  });

  return {
    get copyOnSelect() {
      return copyOnSelect;
    },
    set copyOnSelect(on) {
      copyOnSelect = on;
      saveCopyOnSelect(win.localStorage, on);
    },
    // The selection to the clipboard (a shortcut): whether there was one.
    copySelection() {
      const text = xterm.getSelection();
      if (!text) return false;
      write(text, null);
      return true;
    },
    // The clipboard into the terminal (the key bar's Paste): xterm brackets it if asked.
    paste() {
      if (!clipboard || !clipboard.readText) {
        notice.say("this browser does not let the page read the clipboard: use its own paste");
        return;
      }
      clipboard.readText().then((text) => {
        if (text) xterm.paste(text);
      }, () => notice.say("the browser did not let the page read the clipboard"));
    },
  };
}

// The old way to copy, for a browser without navigator.clipboard or that refused it: works
// during a user gesture in most browsers. Whether it copied.
function execCopy(doc, text) {
  if (!doc.execCommand) return false;
  const area = doc.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  const active = doc.activeElement;
  doc.body.append(area);
  area.select();
  let done = false;
  try {
    done = doc.execCommand("copy");
  } catch (e) {
    done = false;
  }
  area.remove();
  if (active && active.focus) active.focus();
  return done;
}

const NOTICE_MS = 4000;
const OFFER_MS = 30000;

// A short notice over the terminal's top right: what was copied, or the text the browser
// did not let the page copy with a Copy button.
export function createNotice(doc, focusTerminal) {
  const box = doc.createElement("div");
  box.className = "notice";
  box.hidden = true;
  box.setAttribute("role", "status");
  const text = doc.createElement("span");
  const copy = doc.createElement("button");
  copy.type = "button";
  copy.textContent = "Copy";
  const close = doc.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.title = "Dismiss";
  box.append(text, copy, close);
  doc.body.append(box);

  let timer = null;
  let pending = null;

  function show(message, ms, offer) {
    clearTimeout(timer);
    text.textContent = message;
    copy.hidden = !offer;
    box.hidden = false;
    box.dataset.kind = offer ? "offer" : "note";
    timer = setTimeout(hide, ms);
  }

  function hide() {
    clearTimeout(timer);
    box.hidden = true;
    pending = null;
  }

  copy.addEventListener("click", () => {
    const value = pending;
    hide();
    if (value === null) return;
    const done = () => show("copied", NOTICE_MS, false);
    const failed = () => show(execCopy(doc, value) ? "copied" : "the browser did not allow copying", NOTICE_MS, false);
    const clipboard = doc.defaultView.navigator.clipboard;
    if (clipboard && clipboard.writeText) clipboard.writeText(value).then(done, failed);
    else failed();
    focusTerminal();
  });
  close.addEventListener("click", () => {
    hide();
    focusTerminal();
  });

  return {
    element: box,
    say(message) {
      pending = null;
      show(message, NOTICE_MS, false);
    },
    copied(what) {
      if (what) {
        pending = null;
        show(`${what} to the clipboard`, NOTICE_MS, false);
      }
    },
    offer(value, what) {
      pending = value;
      show(`${what || "the selection"}: the browser did not let the page copy it`, OFFER_MS, true);
    },
  };
}
