// The bootstrap's first screen (index.html's capsuleScreen): the part of a terminal it draws,
// and where it gives up and leaves the screen to xterm.js. The function is read from the page
// itself and run as the page runs it.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import vm from "node:vm";

const page = readFileSync(new URL("../index.html", import.meta.url), "utf8");
const source = [...page.matchAll(/<script>([\s\S]*?)<\/script>/g)]
  .map((m) => m[1]).find((text) => text.includes("window.capsuleScreen ="));
const context = { window: {}, TextDecoder };
vm.runInNewContext(source, context);
const capsuleScreen = context.window.capsuleScreen;

const bytes = (text) => new TextEncoder().encode(text);
// The screen's lines as text, trailing blanks cut, trailing empty lines left out.
function text(screen) {
  const lines = Array.from(screen.lines, (line) => Array.from(line, (cell) => (cell ? cell.ch : " ")).join("").trimEnd());
  while (lines.length && lines[lines.length - 1] === "") lines.pop();
  return lines;
}

const PROMPT = "\x1b]0;developer@capsule: /workspace\x07\x1b[1;32mdeveloper@capsule\x1b[0m:" +
  "\x1b[1;34m/workspace\x1b[0m$ ";

test("a bash prompt, its title skipped, its colours bold and bright", () => {
  const screen = capsuleScreen(80, 24);
  assert.equal(screen.write(bytes("\x1b[?2004h" + PROMPT)), true);
  assert.deepEqual(text(screen), ["developer@capsule:/workspace$"]);
  assert.deepEqual([screen.x, screen.y], [30, 0]);
  const [d, colon, slash] = [0, 17, 18].map((x) => screen.lines[0][x]);
  assert.deepEqual([d.fg, d.bold], [10, true]); // bold green drawn bright, as xterm.js does
  assert.deepEqual([colon.fg, colon.bold], [-1, false]);
  assert.deepEqual([slash.fg, slash.bold], [12, true]);
});

test("lines, carriage returns, backspaces, tabs, wrapping and scrolling", () => {
  const screen = capsuleScreen(10, 3);
  screen.write(bytes("abc\bX\r\n1\t2\r\n0123456789wrap"));
  assert.deepEqual(text(screen), ["1       2", "0123456789", "wrap"]);
  assert.deepEqual([screen.x, screen.y], [4, 2]);
  // The last column: the cursor stays on it until the next character.
  const edge = capsuleScreen(4, 2);
  edge.write(bytes("abcd"));
  assert.deepEqual([edge.x, edge.y, text(edge)], [3, 0, ["abcd"]]);
  edge.write(bytes("\r\nx"));
  assert.deepEqual(text(edge), ["abcd", "x"]);
});

test("erasing and moving the cursor, as readline and clear do", () => {
  const screen = capsuleScreen(20, 4);
  screen.write(bytes("hello world\x1b[5D\x1b[K"));
  assert.deepEqual(text(screen), ["hello"]);
  screen.write(bytes("\x1b[H\x1b[2J\x1b[3J$ "));
  assert.deepEqual(text(screen), ["$"]);
  assert.deepEqual([screen.x, screen.y], [2, 0]);
  screen.write(bytes("abcdef\x1b[3D\x1b[2P"));
  assert.deepEqual(text(screen), ["$ abcf"]);
  screen.write(bytes("\x1b[2;3Hxy"));
  assert.deepEqual(text(screen), ["$ abcf", "  xy"]);
});

test("UTF-8 split between frames", () => {
  const screen = capsuleScreen(20, 2);
  const all = bytes("café ┌─┐");
  screen.write(all.subarray(0, 4));
  screen.write(all.subarray(4));
  assert.deepEqual(text(screen), ["café ┌─┐"]);
});

test("it gives up on what it does not draw as xterm.js would", () => {
  for (const output of [
    "vim\x1b[?1049h\x1b[H", // another screen
    "\x1b7saved", // saving the cursor
    "wide 中文", // two cells each
    "emoji 🙂",
    "\x1b[1 q", // an intermediate byte
    "\x1b(0lqk", // line drawing characters
    "\x1b[4h", // insert mode
  ]) {
    const screen = capsuleScreen(80, 24);
    assert.equal(screen.write(bytes(output)), false, JSON.stringify(output));
    assert.equal(screen.ok, false);
    assert.equal(screen.write(bytes("more")), false);
  }
  const big = capsuleScreen(80, 24);
  assert.equal(big.write(new Uint8Array(200 * 1024).fill(0x61)), true);
  assert.equal(big.write(new Uint8Array(100 * 1024).fill(0x61)), false);
  const title = capsuleScreen(80, 24);
  assert.equal(title.write(bytes("\x1b]0;" + "t".repeat(5000))), false);
});
