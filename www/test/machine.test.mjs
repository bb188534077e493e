// The connection's state machine (js/machine.js), driven directly: every (state, input) pair
// is in TABLE with the model it leads to and the effects it asks for, so a state or an input
// added without its row fails here. Rows whose outcome depends on the outage (how long, and
// why) are repeated for each case below the table.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  INPUTS, RETRY_FOR_MS, STATES, closeInput, initial, retryDelay, step,
} from "../js/machine.js";

const NOW = 1_000_000;
const SINCE = NOW - 1000;

// The model each state is entered with in the table.
const MODELS = {
  connecting: { state: "connecting", attempt: 0, outage: null },
  connected: { state: "connected", attempt: 0, outage: null },
  // After two attempts that failed.
  reconnecting: {
    state: "reconnecting", attempt: 2, outage: { since: SINCE, restarting: false, failing: true },
  },
  ended: { state: "ended", attempt: 0, outage: null },
  expired: { state: "expired", attempt: 0, outage: null },
  taken: { state: "taken", attempt: 0, outage: null },
  failed: { state: "failed", attempt: 5, outage: null },
  refused: { state: "refused", attempt: 0, outage: null },
  kept: { state: "kept", attempt: 0, outage: null },
  login: { state: "login", attempt: 0, outage: null },
};

// What each input carries besides its time.
const DETAILS = {
  connected: { resumed: true, blank: false },
  shellEnded: { exitCode: 3 },
  unavailable: { message: "capsule is full" },
  refused: { message: "no such profile: x" },
  kept: { message: "this session was put away on 7 Dec and is kept until 14 Dec: resume it" },
  loggedOut: { url: "login" },
};

const show = (state, message = "") => ({ type: "show", state, message });
const wait = (delay) => ({ type: "wait", delay, until: NOW + delay });
const notice = (text) => ({ type: "notice", text });
const FORGET = { type: "forget" };
const OPEN = { type: "open" };
const DROP = { type: "drop" };
const CHECK_LOGIN = { type: "checkLogin" };

const model = (state, attempt = 0, outage = null) => ({ state, attempt, outage });
const fresh = (flags = {}) => ({ since: NOW, restarting: false, failing: false, ...flags });
const outage = (flags = {}) => ({ since: SINCE, restarting: false, failing: true, ...flags });

// Nothing changes, nothing is done.
const SAME = "same";

const ENDED = "session ended (exit code 3)";
const EXPIRE = [FORGET, notice("session expired"), show("expired", "session expired")];
const TAKEN = [show("taken", "session taken over by another tab or window")];
const TO_LOGIN = [DROP, show("login", "login expired: going to the login page"), { type: "toLogin" }];
const LOGGED_OUT = [FORGET, { type: "go", url: "login" }];
const KEPT = [show("kept", DETAILS.kept.message)];

// From connecting or connected (a socket, no outage yet).
function linked(attempt) {
  return {
    connected: [model("connected"), [show("connected", "resumed session")]],
    shellEnded: [model("ended", attempt), [{ type: "unstore" }, notice(ENDED), show("ended", ENDED)]],
    expired: [model("expired", attempt), EXPIRE],
    unknown: [model("expired", attempt), EXPIRE],
    takenOver: [model("taken", attempt), TAKEN],
    tooBig: [model("reconnecting", 1, fresh()), [show("reconnecting", "message too big"), wait(500)]],
    unavailable: [model("reconnecting", 1, fresh()),
      [show("reconnecting", "capsule is full"), wait(500)]],
    restarting: [model("reconnecting", 1, fresh({ restarting: true })),
      [show("reconnecting", "capsule is restarting"), wait(500)]],
    refused: [model("refused", attempt), [show("refused", "no such profile: x")]],
    kept: [model("kept", attempt), KEPT],
    retryDue: SAME,
    again: SAME,
    loginExpired: [model("login", attempt), TO_LOGIN],
    loggedOut: [model("login", attempt), LOGGED_OUT],
  };
}

// A state without a socket: only the user (its button, logging out) or capsule's login moves it.
function unlinked(state, again) {
  const row = Object.fromEntries(INPUTS.map((input) => [input, SAME]));
  const attempt = MODELS[state].attempt;
  if (again) row.again = [initial(), [...again, show("connecting"), OPEN]];
  row.loginExpired = [model("login", attempt), TO_LOGIN];
  row.loggedOut = [model("login", attempt), LOGGED_OUT];
  return row;
}

const TABLE = {
  connecting: {
    ...linked(0),
    // Never connected: capsule is down or not ready, or the upgrade was refused.
    lost: [model("reconnecting", 1, fresh({ failing: true })),
      [CHECK_LOGIN, show("reconnecting", "connection lost"), wait(500)]],
    silent: SAME,
  },
  connected: {
    ...linked(0),
    lost: [model("reconnecting", 1, fresh()), [show("reconnecting", "connection lost"), wait(500)]],
    silent: [model("reconnecting", 1, fresh()),
      [DROP, show("reconnecting", "no reply from the server"), wait(500)]],
  },
  reconnecting: {
    connected: [model("connected"), [show("connected", "resumed session")]],
    shellEnded: [model("ended", 2), [{ type: "unstore" }, notice(ENDED), show("ended", ENDED)]],
    expired: [model("expired", 2), EXPIRE],
    // After a failed attempt the session may not be known yet: tried again.
    unknown: [model("reconnecting", 3, outage()),
      [show("reconnecting", "capsule is restarting"), wait(2000)]],
    takenOver: [model("taken", 2), TAKEN],
    tooBig: [model("reconnecting", 3, outage()), [show("reconnecting", "message too big"), wait(2000)]],
    unavailable: [model("reconnecting", 3, outage()),
      [show("reconnecting", "capsule is full"), wait(2000)]],
    restarting: [model("reconnecting", 3, outage({ restarting: true })),
      [show("reconnecting", "capsule is restarting"), wait(2000)]],
    lost: [model("reconnecting", 3, outage()),
      [CHECK_LOGIN, show("reconnecting", "connection lost"), wait(2000)]],
    refused: [model("refused", 2), [show("refused", "no such profile: x")]],
    // Put away while the page was away (another tab, the idle limit): offered, not resumed.
    kept: [model("kept", 2), KEPT],
    silent: SAME,
    retryDue: [MODELS.reconnecting, [OPEN]],
    // "Try now".
    again: [MODELS.reconnecting, [OPEN]],
    loginExpired: [model("login", 2), TO_LOGIN],
    loggedOut: [model("login", 2), LOGGED_OUT],
  },
  ended: {
    ...unlinked("ended", [FORGET, { type: "clear" }]),
    // Ended without an exit code, then found kept (put away elsewhere): Resume is offered.
    kept: [model("kept", 0), KEPT],
  },
  expired: unlinked("expired", [FORGET, { type: "clear" }]),
  taken: unlinked("taken", []),
  failed: unlinked("failed", []),
  refused: unlinked("refused", null),
  // Resume: the terminal starts afresh (the old screen comes back from the session, marked),
  // and the socket asks for the session to be started again.
  kept: {
    ...unlinked("kept", null),
    again: [initial(), [{ type: "restart" }, show("connecting", "resuming the session"),
      { type: "open", resume: true }]],
  },
  login: Object.fromEntries(INPUTS.map((input) => [input, SAME])),
};

function feed(from, type, details = {}) {
  return step(from, { type, now: NOW, ...(DETAILS[type] || {}), ...details });
}

test("every state and every input has a row", () => {
  assert.deepEqual(Object.keys(TABLE).sort(), [...STATES].sort());
  assert.deepEqual(Object.keys(MODELS).sort(), [...STATES].sort());
  for (const state of STATES) {
    assert.deepEqual(Object.keys(TABLE[state]).sort(), [...INPUTS].sort(), `the row of ${state}`);
  }
});

for (const state of STATES) {
  for (const input of INPUTS) {
    test(`${state} x ${input}`, () => {
      const from = structuredClone(MODELS[state]);
      const result = feed(from, input);
      const expected = TABLE[state][input];
      if (expected === SAME) {
        assert.deepEqual(result, { model: MODELS[state], effects: [] });
      } else {
        assert.deepEqual(result, { model: expected[0], effects: expected[1] });
      }
      // The model given is never changed in place.
      assert.deepEqual(from, MODELS[state]);
    });
  }
}

test("an unknown state or input is refused", () => {
  assert.throws(() => feed(model("dreaming"), "connected"), /unknown state: dreaming/);
  assert.throws(() => feed(initial(), "ring"), /unknown input: ring/);
});

test("the page starts connecting, with no outage", () => {
  assert.deepEqual(initial(), model("connecting"));
});

// --- rows whose outcome depends on what the input says or how long the outage lasted ---

test("connected: a new session, and a resumed one on a blank terminal", () => {
  assert.deepEqual(feed(model("connecting"), "connected", { resumed: false, blank: true }).effects,
    [show("connected", "new session")]);
  // Said in the terminal only when it is blank: a reload.
  assert.deepEqual(feed(model("connecting"), "connected", { resumed: true, blank: true }).effects,
    [notice("reconnected"), show("connected", "resumed session")]);
});

test("a shell that ended without an exit frame", () => {
  const { effects } = feed(model("connected"), "shellEnded", { exitCode: null });
  assert.deepEqual(effects, [{ type: "unstore" }, notice("session ended"), show("ended", "session ended")]);
});

test("unavailable without a message of the server's", () => {
  const { effects } = feed(model("connected"), "unavailable", { message: "" });
  assert.deepEqual(effects[0], show("reconnecting", "server cannot start sessions"));
});

test("an unknown session after a restart is waited for; otherwise it expired", () => {
  const restarting = model("reconnecting", 1, outage({ restarting: true, failing: false }));
  assert.equal(feed(restarting, "unknown").model.state, "reconnecting");
  // An outage of messages too big: nothing says capsule restarted.
  const plain = model("reconnecting", 1, outage({ failing: false }));
  assert.deepEqual(feed(plain, "unknown"), { model: model("expired", 1), effects: EXPIRE });
  // Waited for long enough.
  const long = model("reconnecting", 1, outage({ since: NOW - RETRY_FOR_MS }));
  assert.deepEqual(feed(long, "unknown"), { model: model("expired", 1), effects: EXPIRE });
});

test("while capsule restarts, a lost connection says so", () => {
  const restarting = model("reconnecting", 1, outage({ restarting: true }));
  assert.deepEqual(feed(restarting, "lost").effects,
    [CHECK_LOGIN, show("reconnecting", "capsule is restarting"), wait(1000)]);
});

test("reconnecting gives up once the outage lasted RETRY_FOR_MS", () => {
  const since = NOW - RETRY_FOR_MS;
  for (const [input, reason] of [["lost", "connection lost"], ["tooBig", "message too big"],
    ["restarting", "capsule is restarting"], ["unavailable", "capsule is full"]]) {
    const { model: next, effects } = feed(model("reconnecting", 7, outage({ since })), input);
    assert.deepEqual(next, model("failed", 7));
    assert.deepEqual(effects.filter((e) => e.type !== "checkLogin"),
      [show("failed", `${reason}; gave up after 7 attempts in 120 s`)]);
  }
  // Just before: one more attempt.
  const almost = model("reconnecting", 7, outage({ since: since + 1 }));
  assert.equal(feed(almost, "lost").model.state, "reconnecting");
});

test("attempts wait twice as long each time, up to RETRY_MAX_MS", () => {
  assert.deepEqual([1, 2, 3, 4, 5, 10].map(retryDelay), [500, 1000, 2000, 3000, 3000, 3000]);
  let current = model("connected");
  const waits = [];
  for (let i = 0; i < 5; i++) {
    const result = feed(current, "lost");
    waits.push(result.effects.find((e) => e.type === "wait").delay);
    current = result.model;
  }
  assert.deepEqual(waits, [500, 1000, 2000, 3000, 3000]);
  assert.equal(current.attempt, 5);
  // The outage began with the first loss: it was connected then, so no attempt failed yet.
  assert.deepEqual(current.outage, { since: NOW, restarting: false, failing: true });
});

test("a connection back ends the outage and counts attempts afresh", () => {
  assert.deepEqual(feed(MODELS.reconnecting, "connected").model, model("connected"));
});

test("close codes, and the error that came before the close", () => {
  const codes = [[1000, "shellEnded"], [4400, "expired"], [4404, "unknown"], [4409, "takenOver"],
    [1009, "tooBig"], [4503, "unavailable"], [4429, "unavailable"], [1001, "restarting"], [4001, "restarting"],
    [1006, "lost"], [1011, "lost"], [4000, "lost"], [undefined, "lost"]];
  for (const [code, input] of codes) {
    assert.equal(closeInput(code, ""), input, `code ${code}`);
    assert.ok(INPUTS.includes(input));
  }
  // A refusal: asking again is no use, whatever the close.
  assert.equal(closeInput(1000, "unknown_profile"), "refused");
  assert.equal(closeInput(1006, "unknown_profile"), "refused");
  assert.equal(closeInput(4503, "server_full"), "unavailable");
  // A kept session: whatever the close, the page offers to resume it.
  assert.equal(closeInput(4404, "session_kept"), "kept");
  assert.equal(closeInput(4400, "session_kept"), "kept");
});

test("a resumed kept session says so; its resume is asked for only once the owner asks", () => {
  const resumed = feed(initial(), "connected", { resumed: true, blank: true, resumedFrom: NOW - 3600 });
  assert.deepEqual(resumed.effects,
    [show("connected", "resumed: the screen above is from before it was put away")]);
  // The page opened on a kept session does nothing by itself.
  const kept = feed(initial(), "kept");
  assert.deepEqual(kept.effects.filter((e) => e.type === "open"), []);
  assert.equal(feed(kept.model, "retryDue").effects.length, 0);
});
