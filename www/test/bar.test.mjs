// The banner's choice of what to show, and what closing the tab would do (pure parts).

import assert from "node:assert/strict";
import { test } from "node:test";

import { REFUSALS, bannerFor } from "../js/banner.js";
import { REFUSALS as FINAL } from "../js/machine.js";
import { createLeaving, formatSeconds, leavingText } from "../js/leaving.js";

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
  assert.deepEqual(leavingText({ grace: 60, kept: false }), {
    short: "closing this tab ends the session 60 s later",
    long: "Closing this tab ends this session 60 s later (capsule's grace period), and its "
      + "/workspace is lost with it: Export first what you want to keep.",
  });
  assert.match(leavingText({ grace: 300, kept: false }).short, /5 min later/);
  // Kept past the grace period, or not said (an older capsule): nothing to warn of.
  assert.equal(leavingText({ grace: 60, kept: true }), null);
  assert.equal(leavingText({ grace: undefined, kept: undefined }), null);
  assert.equal(leavingText({ grace: "60", kept: false }), null);
});

function fakes() {
  const listeners = new Set();
  const target = {
    addEventListener: (type, f) => { assert.equal(type, "beforeunload"); listeners.add(f); },
    removeEventListener: (type, f) => listeners.delete(f),
  };
  const said = [];
  const status = { idle: (text, title) => said.push(["idle", text, title]),
    say: (title, text) => said.push(["say", title, text]) };
  return { listeners, target, said, status };
}

test("the page asks before closing only while attached to a session with work in it", () => {
  const { listeners, target, said, status } = fakes();
  const leaving = createLeaving({ status, target });
  leaving.state("connected");
  leaving.attached({ grace: 60, kept: false, resumed: false });
  assert.equal(listeners.size, 0, "a new session with nothing in it");
  assert.deepEqual(said.at(-1), ["idle", "", ""]);
  leaving.worked();
  assert.equal(listeners.size, 1);
  assert.equal(leaving.asking, true);
  assert.equal(said.at(-1)[1], "closing this tab ends the session 60 s later");
  // Asked: the browser's generic question, and the truth in the page.
  const event = { prevented: false, preventDefault() { this.prevented = true; } };
  [...listeners][0](event);
  assert.equal(event.prevented, true);
  assert.deepEqual(said.at(-1).slice(0, 2), ["say", "Leaving this page?"]);
  assert.match(said.at(-1)[2], /60 s later .*\/workspace is lost/);
  // Still at risk while the page reconnects; not once the session ended.
  leaving.state("reconnecting");
  assert.equal(listeners.size, 1);
  leaving.state("ended");
  assert.equal(listeners.size, 0);
  assert.deepEqual(said.at(-1), ["idle", "", ""]);
});

test("a resumed session counts as work; a kept one is not warned of", () => {
  const { listeners, target, status } = fakes();
  const leaving = createLeaving({ status, target });
  leaving.attached({ grace: 30, kept: false, resumed: true });
  leaving.state("connected");
  assert.equal(listeners.size, 1);
  leaving.attached({ grace: 30, kept: true, resumed: true });
  assert.equal(listeners.size, 0);
});
