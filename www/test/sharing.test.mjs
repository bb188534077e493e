import assert from "node:assert/strict";
import { test } from "node:test";

import {
  durationText, expiryText, watchEnd, watchSocketUrl, watchToken, watchersText,
} from "../js/sharing.js";

const TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-abcde";

test("a spectator's page is /watch/ with the token after #", () => {
  assert.equal(watchToken({ pathname: "/watch/", hash: "#" + TOKEN }), TOKEN);
  assert.equal(watchToken({ pathname: "/capsule/watch/", hash: "#" + TOKEN }), TOKEN);
  assert.equal(watchToken({ pathname: "/", hash: "#" + TOKEN }), null);
  assert.equal(watchToken({ pathname: "/watch/", hash: "" }), "");
  assert.equal(watchToken({ pathname: "/watch/", hash: "#<script>" }), "");
  assert.equal(watchToken({ pathname: "/watch/", hash: "#short" }), "");
});

test("the spectator's socket is /ws beside the page, the token in its query", () => {
  assert.equal(watchSocketUrl("https://h.example/watch/#" + TOKEN, TOKEN),
    "wss://h.example/ws?watch=" + TOKEN);
  assert.equal(watchSocketUrl("http://127.0.0.1:3001/pre/watch/", TOKEN),
    "ws://127.0.0.1:3001/pre/ws?watch=" + TOKEN);
});

test("expiry and watchers are said in words", () => {
  assert.equal(durationText(0), null);
  assert.equal(durationText(44.2), "45 s");
  assert.equal(durationText(3599), "1 h");
  assert.equal(durationText(3500), "59 min");
  assert.equal(durationText(3600), "1 h");
  assert.equal(durationText(3601), "1 h 1 min");
  assert.equal(durationText(7200), "2 h");
  assert.equal(expiryText(-1), "expired");
  assert.equal(expiryText(90), "expires in 2 min");
  assert.equal(watchersText(0), "");
  assert.equal(watchersText(1), "1 watching");
  assert.equal(watchersText(3), "3 watching");
  assert.equal(watchersText("3"), "");
});

test("a spectator's close says why, and whether to try again", () => {
  assert.deepEqual(watchEnd(4410, "share_not_found", "the owner revoked this watch link"),
    { state: "expired", message: "the owner revoked this watch link", retry: false, again: false });
  assert.equal(watchEnd(4411, "too_slow", "").again, true);
  assert.equal(watchEnd(4429, "too_many_watchers", "full").state, "refused");
  assert.equal(watchEnd(1006, "", "").retry, true);
  assert.equal(watchEnd(4001, "restarting", "capsule restarts").retry, true);
});
