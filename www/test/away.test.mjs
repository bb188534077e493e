import assert from "node:assert/strict";
import { test } from "node:test";

import {
  DEFAULT_SPEED, MIN_AWAY_SECONDS, SPEEDS, awayDuration, awayOffer, failureText, nextSpeed, offerText,
  playbackTitle, playerOptions, recordingPath, sizeText,
} from "../js/away.js";

const SINCE = 1_790_000_000.5;

test("the offer comes from `connected`'s away, only when recorded, printed and long enough", () => {
  const away = { since: SINCE, seconds: 30, printed: 300, recorded: true };
  assert.deepEqual(awayOffer({ away }), { since: SINCE, seconds: 30, printed: 300 });
  assert.equal(MIN_AWAY_SECONDS, 10);
  assert.deepEqual(awayOffer({ away: { ...away, seconds: 10 } }),
    { since: SINCE, seconds: 10, printed: 300 });
  assert.equal(awayOffer({ away: { ...away, seconds: 9.9 } }), null);
  assert.equal(awayOffer({ away: { ...away, seconds: undefined } }), null);
  assert.equal(awayOffer({ away: { ...away, seconds: NaN } }), null);
  assert.equal(awayOffer({ away: { ...away, recorded: false } }), null);
  assert.equal(awayOffer({ away: { ...away, printed: 0 } }), null);
  assert.equal(awayOffer({ away: { ...away, printed: 1.5 } }), null);
  assert.equal(awayOffer({ away: { ...away, since: "x" } }), null);
  assert.equal(awayOffer({ away: { ...away, since: -1 } }), null);
  assert.equal(awayOffer({ away: { ...away, since: Infinity } }), null);
  assert.equal(awayOffer({ away: null }), null);
  assert.equal(awayOffer({}), null);
  assert.equal(awayOffer(null), null);
});

test("how long, and how much, in words", () => {
  assert.equal(awayDuration(-3), "0 s");
  assert.equal(awayDuration(40.2), "40 s");
  assert.equal(awayDuration(12 * 60 + 10), "12 min");
  assert.equal(awayDuration(3 * 3600 + 5 * 60), "3 h 5 min");
  assert.equal(awayDuration(2 * 3600), "2 h");
  assert.equal(awayDuration(3 * 86400), "3 days");
  assert.equal(sizeText(1), "1 byte");
  assert.equal(sizeText(512), "512 bytes");
  assert.equal(sizeText(3500), "3.4 KB");
  assert.equal(sizeText(12 * 1024 * 1024), "12 MB");
  assert.equal(offerText({ since: SINCE, seconds: 125, printed: 3500 }),
    "While you were away (2 min), this session printed 3.4 KB.");
  assert.equal(playbackTitle({ since: SINCE, printed: 600 }, "14:02"),
    "What happened since 14:02 · 600 bytes");
});

test("the recording is beside the page, since the moment the last client left", () => {
  assert.equal(recordingPath("0b5e2c9a-6a0e-4e4a-9d2a-3f1d2c3b4a5e", SINCE),
    "api/sessions/0b5e2c9a-6a0e-4e4a-9d2a-3f1d2c3b4a5e/recording?since=1790000000.500");
  assert.equal(recordingPath("a/b?c", 1), "api/sessions/a%2Fb%3Fc/recording?since=1.000");
});

test("the player plays at once, at speed, quiet limited, fitted; small on a phone", () => {
  const options = playerOptions();
  assert.equal(options.autoPlay, true);
  assert.equal(options.speed, DEFAULT_SPEED);
  assert.equal(DEFAULT_SPEED, 2);
  assert.ok(options.idleTimeLimit >= 1 && options.idleTimeLimit <= 2);
  assert.equal(options.fit, "both");
  assert.equal(options.controls, true);
  assert.equal(options.terminalFontSize, "medium");
  assert.equal("startAt" in options, false);
  const phone = playerOptions({ speed: 8, width: 390, startAt: 12.5 });
  assert.equal(phone.terminalFontSize, "small");
  assert.equal(phone.speed, 8);
  assert.equal(phone.startAt, 12.5);
});

test("the speed button cycles through the speeds", () => {
  assert.deepEqual(SPEEDS, [1, 2, 4, 8]);
  assert.equal(nextSpeed(2), 4);
  assert.equal(nextSpeed(8), 1);
  assert.equal(nextSpeed(3), 1);
});

test("what a failed read says", () => {
  assert.equal(failureText(404, { error: "x", code: "not_recorded" }),
    "Nothing of this session was recorded while you were away.");
  assert.equal(failureText(429, { error: "capsule reads 2 recordings already: try again shortly",
    code: "recording_busy" }),
  "The recording could not be read: capsule reads 2 recordings already: try again shortly");
  assert.equal(failureText(502, null), "The recording could not be read (capsule answered 502).");
  assert.equal(failureText(0, null), "capsule did not answer: the recording could not be read.");
});
