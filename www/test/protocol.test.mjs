// The /ws protocol's pure parts (js/protocol.js): the socket's URL, frames, input pieces, and
// the binary protocol's offsets and acknowledgements.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  ACK_BYTES, BINARY_PROTOCOL, INPUT_PIECE_BYTES, INPUT_PIECE_CHARS, Offsets, ackThreshold,
  bytePieces, decodeBase64, describeNotice, encodeFrame, inputPieces, parseFrame, socketUrl,
  splitReplay,
} from "../js/protocol.js";

const ID = "2f1c7a8e-5b7d-4c4e-9f55-0c6d3b9e1a42";

test("the subprotocol the page asks for", () => {
  assert.equal(BINARY_PROTOCOL, "capsule.binary.v1");
});

test("the socket's URL: ws beside the page, with the session and its offset", () => {
  assert.equal(socketUrl("http://host:3001/"), "ws://host:3001/ws");
  assert.equal(socketUrl("https://host/capsule/?profile=claude#top"), "wss://host/capsule/ws");
  assert.equal(socketUrl("http://host/", { sessionId: ID, offset: 0 }),
    `ws://host/ws?session_id=${ID}&offset=0`);
  assert.equal(socketUrl("http://host/", { sessionId: ID, offset: 1234, profile: "claude" }),
    `ws://host/ws?session_id=${ID}&offset=1234`);
  // No offset known (after a JSON socket): the server decides.
  assert.equal(socketUrl("http://host/", { sessionId: ID, offset: null }),
    `ws://host/ws?session_id=${ID}`);
  // A new session asks for its profile; a resumed one keeps its own.
  assert.equal(socketUrl("http://host/a/b", { profile: "claude code" }),
    "ws://host/a/ws?profile=claude+code");
});

test("control frames are JSON objects", () => {
  assert.deepEqual(parseFrame('{"type":"pong"}'), { type: "pong" });
  for (const text of ["", "nope", "[1]", "null", "3", '"connected"']) {
    assert.equal(parseFrame(text), null, text);
  }
  const resize = { type: "resize", cols: 80, rows: 24 };
  assert.deepEqual(JSON.parse(encodeFrame(resize)), resize);
});

test("notices: the known ones say their own sentence", () => {
  assert.deepEqual(describeNotice("shell_restarted", "x"),
    { text: "the session's shell was restarted", line: true, engine: undefined });
  assert.deepEqual(describeNotice("engine_away", "x"),
    { text: "capsule is waiting for the Docker engine", line: false, engine: "away" });
  assert.deepEqual(describeNotice("engine_back"),
    { text: "the Docker engine is back", line: false, engine: "" });
  assert.deepEqual(describeNotice("disk_limit", "90% of the disk"),
    { text: "90% of the disk", line: true, engine: undefined });
  assert.deepEqual(describeNotice("draining", "capsule stops at 12:00"),
    { text: "capsule stops at 12:00", line: true, engine: undefined });
  assert.deepEqual(describeNotice("egress_refused", "capsule: egress to example.com refused"),
                   { text: "capsule: egress to example.com refused", line: true, engine: undefined });
  assert.deepEqual(describeNotice("new_thing", "news"), { text: "news", line: false, engine: undefined });
  assert.equal(describeNotice("new_thing").text, "new_thing");
  assert.equal(describeNotice().text, "notice");
});

test("input in pieces that keep surrogate pairs whole", () => {
  assert.deepEqual(inputPieces(""), []);
  assert.deepEqual(inputPieces("ls\r"), ["ls\r"]);
  const long = "a".repeat(INPUT_PIECE_CHARS * 2 + 5);
  assert.deepEqual(inputPieces(long).map((p) => p.length), [INPUT_PIECE_CHARS, INPUT_PIECE_CHARS, 5]);
  // A pair across the end of a piece goes whole into the next one.
  const emoji = "a".repeat(INPUT_PIECE_CHARS - 1) + "\u{1F600}" + "b";
  const pieces = inputPieces(emoji);
  assert.deepEqual(pieces.map((p) => p.length), [INPUT_PIECE_CHARS - 1, 3]);
  assert.equal(pieces.join(""), emoji);
  assert.equal(pieces[1], "\u{1F600}b");
  // Small pieces still move on.
  assert.deepEqual(inputPieces("\u{1F600}\u{1F600}", 1), ["\ud83d", "\ude00", "\ud83d", "\ude00"]);
  // At most 3 bytes a unit: a piece is under 32 KiB on the wire.
  const wide = "\u20ac".repeat(INPUT_PIECE_CHARS * 3);
  for (const piece of inputPieces(wide)) assert.ok(new TextEncoder().encode(piece).length <= 32 * 1024);
});

test("raw input bytes, in pieces", () => {
  assert.deepEqual(bytePieces("\x1b[M\xff\x80"), [Uint8Array.of(0x1b, 0x5b, 0x4d, 0xff, 0x80)]);
  const pieces = bytePieces("x".repeat(INPUT_PIECE_BYTES + 1));
  assert.deepEqual(pieces.map((p) => p.length), [INPUT_PIECE_BYTES, 1]);
  assert.deepEqual(bytePieces(""), []);
});

test("a JSON output frame's data", () => {
  const bytes = new TextEncoder().encode("h\u00e9llo \u{1F600}");
  assert.deepEqual(decodeBase64(Buffer.from(bytes).toString("base64")), bytes);
  assert.deepEqual(decodeBase64(""), new Uint8Array(0));
});

test("an ack is due at once past a share of the window", () => {
  assert.equal(ackThreshold(undefined), ACK_BYTES);
  assert.equal(ackThreshold(0), ACK_BYTES);
  assert.equal(ackThreshold(1024 * 1024), ACK_BYTES);
  assert.equal(ackThreshold(80 * 1024), 10 * 1024);
  assert.equal(ackThreshold(3), 1);
});

test("offsets: what was received, processed and acknowledged", () => {
  const offsets = new Offsets();
  assert.equal(offsets.resumeFrom(), 0);
  offsets.start(5000, 80 * 1024);
  assert.equal(offsets.resumeFrom(), 5000);
  assert.equal(offsets.receive(100), 5000);
  assert.equal(offsets.receive(50), 5100);
  assert.equal(offsets.resumeFrom(), 5150);
  // Nothing processed: nothing to acknowledge.
  assert.equal(offsets.process(5000), null);
  assert.equal(offsets.takeAck(), null);
  // Some processed: an ack later.
  assert.equal(offsets.process(5100), "later");
  assert.equal(offsets.takeAck(), 5100);
  assert.equal(offsets.takeAck(), null);
  // Never past what was received, never backwards.
  assert.equal(offsets.process(9999), "later");
  assert.equal(offsets.processed, 5150);
  assert.equal(offsets.process(5000), "later");
  assert.equal(offsets.takeAck(), 5150);
  // A window's share unacknowledged: at once.
  offsets.receive(10 * 1024);
  assert.equal(offsets.process(5150 + 10 * 1024), "now");
  assert.equal(offsets.takeAck(), 5150 + 10 * 1024);
});

test("offsets: dropped output, a JSON socket, and a terminal emptied", () => {
  const offsets = new Offsets();
  offsets.start(10, 0);
  offsets.receive(5);
  assert.equal(offsets.skipTo(100), 100);
  assert.equal(offsets.skipTo(50), 100);
  assert.equal(offsets.skipTo(undefined), 100);
  assert.equal(offsets.process(100), "later");
  // A JSON socket carries no offsets: the next resume leaves it to the server.
  offsets.known = false;
  assert.equal(offsets.resumeFrom(), null);
  offsets.forget();
  assert.equal(offsets.resumeFrom(), 0);
  assert.deepEqual([offsets.received, offsets.processed, offsets.acked], [0, 0, 0]);
  // A `connected` with no usable offset starts from 0.
  for (const bad of [undefined, -1, 1.5, "7", Number.MAX_VALUE]) {
    offsets.start(bad, 0);
    assert.equal(offsets.resumeFrom(), 0, String(bad));
  }
});

test("replayed bytes come first, the rest is live", () => {
  assert.deepEqual(splitReplay(10, 0), [0, 0]);
  assert.deepEqual(splitReplay(10, 4), [4, 0]);
  assert.deepEqual(splitReplay(10, 25), [10, 15]);
  assert.deepEqual(splitReplay(0, 3), [0, 3]);
});
