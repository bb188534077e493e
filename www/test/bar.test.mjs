// The banner's choice of what to show, and what closing the tab would do (pure parts).

import assert from "node:assert/strict";
import { test } from "node:test";

import { REFUSALS, bannerFor } from "../js/banner.js";
import { REFUSALS as FINAL } from "../js/machine.js";
import { closingText } from "../js/keeping.js";
import { createLeaving, formatSeconds } from "../js/leaving.js";

const FULL = "the server is full (its memory is promised to other sessions): try again later";

test("a refusal while the page tries again: whole, what to do, a countdown and Try now", () => {
  const banner = bannerFor({ state: "reconnecting", message: FULL, code: "server_full" });
  assert.deepEqual(banner, { title: "capsule is full", message: FULL,
    hint: REFUSALS.server_full.hint, retry: true, action: null });
  const quota = bannerFor({ state: "reconnecting", message: "too many", code: "quota_exceeded" });
  assert.match(quota.hint, /End one you do not need/);
  assert.equal(quota.retry, true);
  // A code the page does not know yet is shown all the same.
  const other = bannerFor({ state: "reconnecting", message: "no room", code: "a_new_code" });
  assert.equal(other.message, "no room");
  assert.equal(other.retry, true);
});

test("a blank terminal says why it is blank; a terminal with output keeps it for a blip", () => {
  assert.equal(bannerFor({ state: "reconnecting", message: "connection lost", blank: true }).title,
    "capsule does not answer");
  assert.equal(bannerFor({ state: "reconnecting", message: "connection lost", blank: false }), null);
  // A restart of capsule: the session lives on, its screen stays in sight.
  assert.equal(bannerFor({ state: "reconnecting", message: "x", code: "restarting" }), null);
  assert.equal(bannerFor({ state: "reconnecting", message: "x", code: "restarting", blank: true })
    .title, "capsule is restarting");
  for (const state of ["connecting", "connected", "ended", "expired", "taken", "login"]) {
    assert.equal(bannerFor({ state, message: FULL, code: "server_full", blank: true }), null, state);
  }
});

test("a final refusal has no countdown; giving up offers Reconnect", () => {
  for (const code of FINAL) assert.ok(REFUSALS[code], `a title and a hint for ${code}`);
  const refused = bannerFor({ state: "refused", message: "no such profile: x", code: "unknown_profile" });
  assert.equal(refused.retry, false);
  assert.equal(refused.action, null);
  assert.match(refused.hint, /without \?profile=/);
  const failed = bannerFor({ state: "failed", message: "gave up", code: "server_full" });
  assert.equal(failed.action, "Reconnect");
  assert.equal(failed.retry, false);
  assert.equal(failed.title, "capsule is full: the page stopped trying");
});

test("the grace period in words", () => {
  assert.equal(formatSeconds(0), "0 s");
  assert.equal(formatSeconds(60), "60 s");
  assert.equal(formatSeconds(90.4), "90 s");
  assert.equal(formatSeconds(300), "5 min");
  assert.equal(formatSeconds(3600), "1 h");
  assert.equal(formatSeconds(5400), "90 min");
  assert.equal(formatSeconds(301), "301 s");
});

test("what closing the tab does comes from what capsule said", () => {
  // From a capsule that says `on_close`: see keeping.test.mjs; from an older one, its grace.
  const NOW = new Date(2026, 11, 7, 9, 0).getTime() / 1000;
  assert.deepEqual(closingText({ grace: 60, kept: false }, NOW), {
    outcome: "removed",
    short: "Closing this tab removes this session and its files 60 s later",
    long: "Closing this tab removes this session 60 s later (capsule's grace period), and its "
      + "/workspace is lost with it: Export first what you want to keep.",
    lost: true,
  });
  assert.match(closingText({ grace: 300, kept: false }, NOW).short, /5 min later/);
  // Kept past the grace period without saying until when, or not said: nothing to tell.
  assert.equal(closingText({ grace: 60, kept: true }, NOW), null);
  assert.equal(closingText({ grace: undefined, kept: undefined }, NOW), null);
  assert.equal(closingText({ grace: "60", kept: false }, NOW), null);
});

// A #leave-note element's stand-in.
function note() {
  return { textContent: "", title: "", hidden: true, dataset: {} };
}

function fakes() {
  const listeners = new Set();
  const target = {
    addEventListener: (type, f) => { assert.equal(type, "beforeunload"); listeners.add(f); },
    removeEventListener: (type, f) => listeners.delete(f),
  };
  const said = [];
  const status = { say: (title, text) => said.push(["say", title, text]) };
  return { listeners, target, said, status, note: note() };
}

const NOW = new Date(2026, 11, 7, 9, 0).getTime() / 1000;
const UNTIL = new Date(2026, 11, 14, 9, 1).getTime() / 1000;
const now = () => NOW;

test("the page asks before closing only while attached to a session with work it would lose", () => {
  const { listeners, target, said, status, note } = fakes();
  const leaving = createLeaving({ status, note, target, now });
  leaving.state("connected");
  leaving.attached({ grace: 60, kept: false, on_close: { outcome: "removed", after: 60 } });
  assert.equal(listeners.size, 0, "a new session with nothing in it");
  // The bar says it all the same.
  assert.equal(note.hidden, false);
  assert.equal(note.textContent, "Closing this tab removes this session and its files 60 s later");
  assert.equal(note.dataset.outcome, "removed");
  leaving.worked();
  assert.equal(listeners.size, 1);
  assert.equal(leaving.asking, true);
  // Asked: the browser's generic question, and the truth in the page.
  const event = { prevented: false, preventDefault() { this.prevented = true; } };
  [...listeners][0](event);
  assert.equal(event.prevented, true);
  assert.deepEqual(said.at(-1).slice(0, 2), ["say", "Leaving this page?"]);
  assert.match(said.at(-1)[2], /60 s later .*\/workspace is lost/);
  // Still at risk while the page reconnects; not once the session ended.
  leaving.state("reconnecting");
  assert.equal(listeners.size, 1);
  assert.equal(note.hidden, false);
  leaving.state("ended");
  assert.equal(listeners.size, 0);
  assert.equal(note.hidden, true);
  assert.equal(note.textContent, "");
});

test("a kept session is told, never asked about", () => {
  const { listeners, target, status, note } = fakes();
  const leaving = createLeaving({ status, note, target, now });
  leaving.state("connected");
  leaving.attached({ grace: 60, kept: true,
    on_close: { outcome: "kept", after: 60, until: UNTIL } });
  leaving.worked();
  assert.equal(listeners.size, 0);
  assert.equal(leaving.asking, false);
  assert.equal(note.textContent, "Closing this tab keeps your work until Mon 14 Dec");
  assert.match(note.title, /60 s later it is put away .* until Mon 14 Dec 09:01/);
  assert.equal(note.dataset.outcome, "kept");
  assert.equal(leaving.closing.outcome, "kept");
});

test("a resumed session counts as work; a kept one is not warned of", () => {
  const { listeners, target, status, note } = fakes();
  const leaving = createLeaving({ status, note, target, now });
  leaving.attached({ grace: 30, kept: false, resumed: true });
  leaving.state("connected");
  assert.equal(listeners.size, 1);
  leaving.attached({ grace: 30, kept: true, resumed: true });
  assert.equal(listeners.size, 0);
  // A kept session started again (resumed_from) holds work too.
  const second = fakes();
  const again = createLeaving({ status: second.status, note: second.note, target: second.target, now });
  again.state("connected");
  again.attached({ on_close: { outcome: "removed", after: 60 }, resumed_from: NOW - 60 });
  assert.equal(second.listeners.size, 1);
});
