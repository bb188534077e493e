// The connection's states, as one pure machine: step(model, input) gives the next model and
// the effects the page is to carry out (open a socket, wait, show a state, ...). Nothing here
// touches the DOM, a socket or a clock: time comes in with each input (input.now).
//
// The model: { state, attempt, outage }. An outage runs from losing the connection to the next
// `connected`: { since, restarting, failing } while the page reconnects, else null.

// Reconnecting: the first retry after RETRY_FIRST_MS, doubling up to RETRY_MAX_MS, for
// RETRY_FOR_MS after the connection was lost. That outlasts a restart of capsule within the
// session's grace period (60 s by default; the page cannot know it).
export const RETRY_FIRST_MS = 500;
export const RETRY_MAX_MS = 3000;
export const RETRY_FOR_MS = 120000;

export const STATES = Object.freeze([
  "connecting", // a socket is opening (the first, or one the user asked for)
  "connected", // the server said `connected`: the session is live
  "reconnecting", // the connection was lost: a retry is pending or under way
  "ended", // the shell ended; its container is gone
  "expired", // the session is gone (or was never known)
  "taken", // another tab or window took the session over
  "failed", // reconnecting gave up
  "refused", // the server refused what this page asked for: asking again is no use
  "kept", // the session is put away (its container stopped, its files kept): Resume offered
  "login", // the page is leaving (for the login page, or logged out): nothing matters any more
]);

export const INPUTS = Object.freeze([
  "connected", // the server's `connected` frame: { resumed, blank, resumedFrom }
  "shellEnded", // closed 1000: { exitCode }
  "expired", // closed 4400
  "unknown", // closed 4404: the session is not known (yet, right after a restart)
  "takenOver", // closed 4409
  "tooBig", // closed 1009
  "unavailable", // closed 4503 (capsule cannot start it now) or 4429 (too many): { message }
  "restarting", // closed 1001 or 4001: capsule restarts, the session lives on
  "lost", // closed otherwise (1006, anything unexpected)
  "refused", // closed after an `error` whose code is a refusal: { message }
  "kept", // closed after an `error` with code `session_kept`: { message }
  "silent", // no frame for the silence limit while connected
  "retryDue", // the wait before the next attempt is over
  "again", // the user's button: "New session", "Reconnect here", "Reconnect", "Try now"
  "loginExpired", // capsule answered 401: the login expired or ended elsewhere
  "loggedOut", // the user logged out: { url } to go to
]);

// `error` codes after which the page does not try again: the message says what to change.
export const REFUSALS = new Set(["unknown_profile"]);

// The `error` code of a session that is put away: the page offers to resume it.
export const SESSION_KEPT = "session_kept";

// The input that a socket's close code (and the code of the last `error` frame) means.
export function closeInput(code, errorCode) {
  if (REFUSALS.has(errorCode)) return "refused";
  if (errorCode === SESSION_KEPT) return "kept";
  switch (code) {
    case 1000: return "shellEnded";
    case 4400: return "expired";
    case 4404: return "unknown";
    case 4409: return "takenOver";
    case 1009: return "tooBig";
    case 4503:
    case 4429: return "unavailable";
    case 1001:
    case 4001: return "restarting";
    default: return "lost";
  }
}

// The wait before attempt number `attempt` (1, 2, ...).
export function retryDelay(attempt) {
  return Math.min(RETRY_FIRST_MS * 2 ** (attempt - 1), RETRY_MAX_MS);
}

export function initial() {
  return { state: "connecting", attempt: 0, outage: null };
}

// The states with a socket, whose closing and frames mean something.
const LINKED = new Set(["connecting", "connected", "reconnecting"]);

const show = (state, message = "") => ({ type: "show", state, message });

// { model, effects } after `input` ({ type, now, ... }) in `model`. An input a state does not
// expect (late news of a socket already let go) changes nothing.
export function step(model, input) {
  if (!STATES.includes(model.state)) throw new Error(`unknown state: ${model.state}`);
  const handler = HANDLERS[input.type];
  if (!handler) throw new Error(`unknown input: ${input.type}`);
  return handler(model, input) || { model, effects: [] };
}

const HANDLERS = {
  connected(model, input) {
    if (!LINKED.has(model.state)) return null;
    const effects = [];
    // Said in the terminal only when it is blank (a reload): a line in the middle of what it
    // shows would break the shell's prompt or a full-screen program's screen.
    // A kept session started again: its old screen is replayed above a marker, as history
    // (the marker says it: no "reconnected" over it).
    const restarted = input.resumedFrom !== null && input.resumedFrom !== undefined;
    if (input.resumed && input.blank && !restarted) {
      effects.push({ type: "notice", text: "reconnected" });
    }
    const news = restarted ? "resumed: the screen above is from before it was put away"
      : input.resumed ? "resumed session" : "new session";
    effects.push(show("connected", news));
    return { model: { state: "connected", attempt: 0, outage: null }, effects };
  },

  shellEnded(model, input) {
    if (!LINKED.has(model.state)) return null;
    // The shell ended and its container is gone: a reload starts fresh, Export has nothing.
    const text = input.exitCode === null || input.exitCode === undefined
      ? "session ended" : `session ended (exit code ${input.exitCode})`;
    return {
      model: { state: "ended", attempt: model.attempt, outage: null },
      effects: [{ type: "unstore" }, { type: "notice", text }, show("ended", text)],
    };
  },

  expired(model) {
    if (!LINKED.has(model.state)) return null;
    return expire(model);
  },

  unknown(model, input) {
    if (!LINKED.has(model.state)) return null;
    // Right after a restart of capsule (a 4001, or connections that failed), the session may
    // not be known yet: keep trying for as long as it could come back. Otherwise it is gone.
    const outage = model.outage;
    if (outage && (outage.restarting || outage.failing) && !exhausted(outage, input.now)) {
      return retry(model, input.now, "capsule is restarting");
    }
    return expire(model);
  },

  takenOver(model) {
    if (!LINKED.has(model.state)) return null;
    // Reconnecting on our own would start a tug of war.
    return {
      model: { state: "taken", attempt: model.attempt, outage: null },
      effects: [show("taken", "session taken over by another tab or window")],
    };
  },

  tooBig(model, input) {
    if (!LINKED.has(model.state)) return null;
    return retry(model, input.now, "message too big");
  },

  unavailable(model, input) {
    if (!LINKED.has(model.state)) return null;
    return retry(model, input.now, input.message || "server cannot start sessions");
  },

  restarting(model, input) {
    if (!LINKED.has(model.state)) return null;
    const outage = { ...(model.outage || fresh(input.now)), restarting: true };
    return retry({ ...model, outage }, input.now, "capsule is restarting");
  },

  lost(model, input) {
    if (!LINKED.has(model.state)) return null;
    if (model.state === "connected") return retry(model, input.now, "connection lost");
    // A connection that never got as far as `connected`: capsule is down or not ready yet.
    // A refused upgrade looks the same as capsule being down; its API tells them apart.
    const outage = { ...(model.outage || fresh(input.now)), failing: true };
    const next = retry({ ...model, outage }, input.now, "connection lost");
    return { model: next.model, effects: [{ type: "checkLogin" }, ...next.effects] };
  },

  refused(model, input) {
    if (!LINKED.has(model.state)) return null;
    return {
      model: { state: "refused", attempt: model.attempt, outage: null },
      effects: [show("refused", input.message || "")],
    };
  },

  kept(model, input) {
    // From "ended" too: a session that ended without an exit code turned out to be kept.
    if (!LINKED.has(model.state) && model.state !== "ended") return null;
    // Not resumed by itself: a kept session is started again when its owner asks (Resume).
    return {
      model: { state: "kept", attempt: model.attempt, outage: null },
      effects: [show("kept", input.message || "this session is put away")],
    };
  },

  silent(model, input) {
    if (model.state !== "connected") return null;
    // The connection is dead without the browser noticing: drop it and start again.
    const next = retry(model, input.now, "no reply from the server");
    return { model: next.model, effects: [{ type: "drop" }, ...next.effects] };
  },

  retryDue(model) {
    if (model.state !== "reconnecting") return null;
    return { model, effects: [{ type: "open" }] };
  },

  again(model) {
    // "Try now": the next attempt at once, not after the wait.
    if (model.state === "reconnecting") return { model, effects: [{ type: "open" }] };
    // "Resume": the kept session started again (a new shell; its old screen replayed, marked
    // as history, from the start: nothing of the page's terminal is kept).
    if (model.state === "kept") {
      return {
        model: initial(),
        effects: [{ type: "restart" }, show("connecting", "resuming the session"),
          { type: "open", resume: true }],
      };
    }
    const effects = [];
    if (model.state === "ended" || model.state === "expired") {
      effects.push({ type: "forget" }, { type: "clear" });
    } else if (model.state !== "taken" && model.state !== "failed") {
      return null; // no button in this state
    }
    effects.push(show("connecting"), { type: "open" });
    return { model: initial(), effects };
  },

  loginExpired(model) {
    if (model.state === "login") return null;
    return {
      model: { state: "login", attempt: model.attempt, outage: null },
      effects: [{ type: "drop" }, show("login", "login expired: going to the login page"),
        { type: "toLogin" }],
    };
  },

  loggedOut(model, input) {
    if (model.state === "login") return null;
    // Logged out on purpose: the next login here starts afresh.
    return {
      model: { state: "login", attempt: model.attempt, outage: null },
      effects: [{ type: "forget" }, { type: "go", url: input.url }],
    };
  },
};

function fresh(now) {
  return { since: now, restarting: false, failing: false };
}

function exhausted(outage, now) {
  return outage !== null && now - outage.since >= RETRY_FOR_MS;
}

function expire(model) {
  return {
    model: { state: "expired", attempt: model.attempt, outage: null },
    effects: [{ type: "forget" }, { type: "notice", text: "session expired" },
      show("expired", "session expired")],
  };
}

// The next attempt after `reason`, or giving up once the outage has lasted RETRY_FOR_MS.
function retry(model, now, reason) {
  const outage = model.outage || fresh(now);
  if (exhausted(outage, now)) {
    const seconds = Math.round((now - outage.since) / 1000);
    return {
      model: { state: "failed", attempt: model.attempt, outage: null },
      effects: [show("failed", `${reason}; gave up after ${model.attempt} attempts in ${seconds} s`)],
    };
  }
  const attempt = model.attempt + 1;
  const delay = retryDelay(attempt);
  // While capsule restarts, every failed attempt looks like a lost connection: say why.
  const message = outage.restarting && reason === "connection lost" ? "capsule is restarting" : reason;
  return {
    model: { state: "reconnecting", attempt, outage },
    effects: [show("reconnecting", message), { type: "wait", delay, until: now + delay }],
  };
}
