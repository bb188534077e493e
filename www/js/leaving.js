// Closing the tab: capsule's `connected` frame says what becomes of the session once its last
// tab has closed (its `on_close`: kept until a date, or removed with its files some seconds
// later; from an older capsule, its `grace` and `kept`). The bar says it, always, in
// `#leave-note` (the longer sentence in its title). While this page holds a session with the
// person's work in it (typed in, uploaded to, or resumed) that closing the tab would remove,
// the page asks the browser to confirm before leaving (the browser shows its own generic
// text), and says the truth itself in the banner when the browser asks. A session that is
// kept is not asked about: nothing is lost.

import { closingText, formatSeconds } from "./keeping.js";

export { formatSeconds };

// The states in which the session lives and this page speaks for it.
const ATTACHED = new Set(["connected", "reconnecting"]);

// `status`: the status bar (status.js); `note`: the bar's #leave-note element (null: none);
// `target`: where beforeunload is listened for; `now()`: the time in seconds.
export function createLeaving({ status, note = null, target = window,
  now = () => Date.now() / 1000 }) {
  let closing = null; // closingText of the attached session
  let work = false; // whether the session holds the person's work
  let attached = false;
  let asking = false; // whether the beforeunload handler is registered

  function onBeforeUnload(event) {
    if (closing) status.say("Leaving this page?", closing.long);
    event.preventDefault();
    event.returnValue = ""; // older browsers want it set
  }

  function update() {
    const shown = attached && closing !== null;
    const ask = shown && work && closing.lost;
    if (ask !== asking) {
      asking = ask;
      if (ask) target.addEventListener("beforeunload", onBeforeUnload);
      else target.removeEventListener("beforeunload", onBeforeUnload);
    }
    if (note) {
      note.textContent = shown ? closing.short : "";
      note.title = shown ? closing.long : "";
      note.hidden = !shown;
      if (shown) note.dataset.outcome = closing.outcome;
      else delete note.dataset.outcome;
    }
  }

  return {
    // Whether the page asks before it is closed.
    get asking() {
      return asking;
    },
    // What closing the tab does now (closingText), or null.
    get closing() {
      return attached ? closing : null;
    },
    // capsule's `connected` frame: { on_close, grace, kept, resumed, resumed_from }.
    attached(frame) {
      closing = closingText(frame, now());
      // A resumed session was used before this page saw it.
      if (frame.resumed || frame.resumed_from !== undefined) work = true;
      update();
    },
    // The person typed in the session or uploaded to it.
    worked() {
      if (work) return;
      work = true;
      update();
    },
    // The connection's state (status.js onState).
    state(name) {
      attached = ATTACHED.has(name);
      if (!attached && name !== "connecting") {
        // The session ended, or is another's now: nothing of it is this page's to lose.
        work = false;
        closing = null;
      }
      update();
    },
  };
}
