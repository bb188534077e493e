// Closing the tab: while this page is attached to a session that holds the person's work
// (they typed in it or uploaded to it, or it was resumed) and nothing keeps the session past
// its grace period, closing the tab ends it that long after, and its /workspace goes with it.
// The page then asks the browser to confirm before leaving (the browser shows its own
// generic text), and says the truth itself: in the status bar, and in the banner when the
// browser asks. What becomes of the session is what capsule said in `connected` (its `grace`
// and `kept`), so that a session kept longer says so.

// "45 s", "5 min", "1 h", "90 min".
export function formatSeconds(seconds) {
  const s = Math.round(seconds);
  if (s < 120) return `${s} s`;
  if (s % 3600 === 0) return `${s / 3600} h`;
  if (s % 60 === 0) return `${s / 60} min`;
  return `${s} s`;
}

// What closing the tab would do to a session of which capsule said `grace` and `kept`: null
// when nothing is lost (it is kept) or capsule did not say, else { short, long }.
export function leavingText({ grace, kept }) {
  if (kept !== false || typeof grace !== "number" || !Number.isFinite(grace) || grace < 0) {
    return null;
  }
  const after = formatSeconds(grace);
  return {
    short: `closing this tab ends the session ${after} later`,
    long: `Closing this tab ends this session ${after} later (capsule's grace period), and its `
      + "/workspace is lost with it: Export first what you want to keep.",
  };
}

// The states in which the session lives and this page speaks for it.
const ATTACHED = new Set(["connected", "reconnecting"]);

// `status`: the status bar (status.js). `target`: where beforeunload is listened for.
export function createLeaving({ status, target = window }) {
  let lifetime = null; // { grace, kept } of the attached session
  let work = false; // whether the session holds the person's work
  let attached = false;
  let asking = false; // whether the beforeunload handler is registered

  function onBeforeUnload(event) {
    const text = leavingText(lifetime);
    if (text) status.say("Leaving this page?", text.long);
    event.preventDefault();
    event.returnValue = ""; // older browsers want it set
  }

  function update() {
    const text = attached && work && lifetime ? leavingText(lifetime) : null;
    const ask = text !== null;
    if (ask !== asking) {
      asking = ask;
      if (ask) target.addEventListener("beforeunload", onBeforeUnload);
      else target.removeEventListener("beforeunload", onBeforeUnload);
    }
    status.idle(text ? text.short : "", text ? text.long : "");
  }

  return {
    // Whether the page asks before it is closed.
    get asking() {
      return asking;
    },
    // capsule's `connected` frame: { grace, kept, resumed }.
    attached(frame) {
      lifetime = { grace: frame.grace, kept: frame.kept };
      // A resumed session was used before this page saw it.
      if (frame.resumed) work = true;
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
        lifetime = null;
      }
      update();
    },
  };
}
