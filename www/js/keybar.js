// The key bar: the keys on-screen keyboards lack (js/keys.js says what each sends), under the
// terminal on touch-first devices; the options menu shows or hides it (kept in localStorage).
// On those devices the page also follows the visual viewport, so that the terminal and the
// bar stay above the on-screen keyboard.

import { KEY_BAR, applyCtrl, keyBytes } from "./keys.js";

export const KEY_BAR_KEY = "capsule.keybar";

// Whether the key bar shows: the saved choice ("on"/"off"), else whether the device is
// touch-first.
export function keyBarShown(saved, touchFirst) {
  if (saved === "on") return true;
  if (saved === "off") return false;
  return touchFirst;
}

// `term` is the page's terminal (js/terminal.js); `send(data)` sends to the session;
// `paste()` pastes the clipboard; `refit()` fits the terminal to its element and tells the
// session. Returns the input filter (the sticky Ctrl) and the show/hide switch.
export function createKeyBar(term, win, { send, paste, refit }) {
  const doc = win.document;
  const xterm = term.xterm;
  const touchFirst = win.matchMedia("(pointer: coarse)").matches;
  let ctrl = false;

  const bar = doc.createElement("nav");
  bar.className = "keybar";
  bar.setAttribute("aria-label", "Keys");
  const buttons = {};
  for (const key of KEY_BAR) {
    const button = doc.createElement("button");
    button.type = "button";
    button.tabIndex = -1;
    button.textContent = key.label;
    button.title = key.title;
    button.dataset.key = key.id;
    if (key.sticky) button.setAttribute("aria-pressed", "false");
    buttons[key.id] = button;
    bar.append(button);
  }
  doc.body.append(bar);

  function setCtrl(on) {
    ctrl = on;
    buttons.ctrl.setAttribute("aria-pressed", String(on));
  }

  // A tap must not take the focus from the terminal (which would close the on-screen
  // keyboard): the press is kept from focusing the button.
  bar.addEventListener("mousedown", (event) => event.preventDefault());
  bar.addEventListener("pointerdown", (event) => {
    if (event.target.closest("button")) event.preventDefault();
  });
  bar.addEventListener("click", (event) => {
    const id = event.target.closest("button")?.dataset.key;
    if (!id) return;
    if (id === "ctrl") {
      setCtrl(!ctrl);
      return;
    }
    if (id === "paste") {
      paste();
      return;
    }
    const bytes = keyBytes(id, { ctrl, appCursor: xterm.modes.applicationCursorKeysMode });
    setCtrl(false);
    xterm.scrollToBottom();
    send(bytes);
  });

  function show(on) {
    bar.hidden = !on;
    if (!on) setCtrl(false);
    refit();
  }

  let saved = null;
  try {
    saved = win.localStorage.getItem(KEY_BAR_KEY);
  } catch (e) {
    saved = null;
  }
  bar.hidden = !keyBarShown(saved, touchFirst);

  // The on-screen keyboard shrinks the visual viewport, not the layout one: the page takes
  // the visual viewport's height, and the terminal fits it again.
  const viewport = win.visualViewport;
  if (touchFirst && viewport) {
    let last = null;
    const follow = () => {
      const height = Math.round(viewport.height);
      if (height === last) return;
      last = height;
      doc.documentElement.style.setProperty("--page-height", `${height}px`);
      win.scrollTo(0, 0);
      refit();
    };
    viewport.addEventListener("resize", follow);
    follow();
  } else if (!bar.hidden) {
    refit();
  }

  return {
    element: bar,
    get shown() {
      return !bar.hidden;
    },
    set shown(on) {
      try {
        win.localStorage.setItem(KEY_BAR_KEY, on ? "on" : "off");
      } catch (e) {
        // kept for this page only
      }
      show(on);
    },
    // What the terminal sends passes here: with Ctrl on, the next key typed becomes its
    // control character.
    input(data) {
      if (!ctrl) return data;
      const out = applyCtrl(data);
      if (out.used) setCtrl(false);
      return out.data;
    },
  };
}
