// The key bar's bytes, the sticky Ctrl, the shortcuts of each platform and OSC 52 writes.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  KEY_BAR, OSC52_MAX_BYTES, applyCtrl, ctrlChar, isMac, keyBytes, parseOsc52, shortcut, swipeLines,
} from "../js/keys.js";

test("the key bar has what on-screen keyboards lack", () => {
  assert.deepEqual(KEY_BAR.map((k) => k.id),
    ["esc", "tab", "backtab", "ctrl", "left", "up", "down", "right", "paste"]);
  assert.deepEqual(KEY_BAR.filter((k) => k.sticky).map((k) => k.id), ["ctrl"]);
});

test("each key's bytes", () => {
  assert.equal(keyBytes("esc"), "\x1b");
  assert.equal(keyBytes("tab"), "\t");
  assert.equal(keyBytes("backtab"), "\x1b[Z");
  assert.equal(keyBytes("up"), "\x1b[A");
  assert.equal(keyBytes("down"), "\x1b[B");
  assert.equal(keyBytes("right"), "\x1b[C");
  assert.equal(keyBytes("left"), "\x1b[D");
  // vim and less switch the cursor keys to application mode.
  assert.equal(keyBytes("up", { appCursor: true }), "\x1bOA");
  assert.equal(keyBytes("left", { appCursor: true }), "\x1bOD");
  assert.equal(keyBytes("right", { ctrl: true }), "\x1b[1;5C");
  assert.equal(keyBytes("right", { ctrl: true, appCursor: true }), "\x1b[1;5C");
  assert.equal(keyBytes("ctrl"), null);
  assert.equal(keyBytes("paste"), null);
});

test("control characters", () => {
  assert.equal(ctrlChar("c"), "\x03");
  assert.equal(ctrlChar("C"), "\x03");
  assert.equal(ctrlChar("a"), "\x01");
  assert.equal(ctrlChar("z"), "\x1a");
  assert.equal(ctrlChar("d"), "\x04");
  assert.equal(ctrlChar("["), "\x1b");
  assert.equal(ctrlChar("\\"), "\x1c");
  assert.equal(ctrlChar("]"), "\x1d");
  assert.equal(ctrlChar("@"), "\x00");
  assert.equal(ctrlChar(" "), "\x00");
  assert.equal(ctrlChar("_"), "\x1f");
  assert.equal(ctrlChar("?"), "\x7f");
  assert.equal(ctrlChar("3"), "\x1b");
  assert.equal(ctrlChar("7"), "\x1f");
  assert.equal(ctrlChar("8"), "\x7f");
  for (const ch of ["1", "9", "é", "\x03", "ab", "", "😀"]) assert.equal(ctrlChar(ch), null, ch);
});

test("the sticky Ctrl turns the next key typed into its control character", () => {
  assert.deepEqual(applyCtrl("c"), { data: "\x03", used: true });
  assert.deepEqual(applyCtrl("C"), { data: "\x03", used: true });
  // A key without a control character is sent as it is, and spends the Ctrl.
  assert.deepEqual(applyCtrl("é"), { data: "é", used: true });
  assert.deepEqual(applyCtrl("😀"), { data: "😀", used: true });
  // A paste, or what the terminal answers or reports, is no key: Ctrl stays on.
  assert.deepEqual(applyCtrl("hello"), { data: "hello", used: false });
  assert.deepEqual(applyCtrl("\x1b[<0;3;4M"), { data: "\x1b[<0;3;4M", used: false });
});

const key = (k, mods = {}) => ({ key: k, ctrlKey: false, shiftKey: false, altKey: false, metaKey: false, ...mods });

test("the shortcuts on Linux and Windows", () => {
  assert.equal(shortcut(key("C", { ctrlKey: true, shiftKey: true })), "copy");
  assert.equal(shortcut(key("V", { ctrlKey: true, shiftKey: true })), "paste");
  assert.equal(shortcut(key("F", { ctrlKey: true, shiftKey: true })), "search");
  assert.equal(shortcut(key("Insert", { ctrlKey: true })), "copy");
  assert.equal(shortcut(key("Insert", { shiftKey: true })), "paste");
  // Ctrl+C is ^C, unless there is a selection to copy.
  assert.equal(shortcut(key("c", { ctrlKey: true })), null);
  assert.equal(shortcut(key("c", { ctrlKey: true }), { selection: true }), "copy");
  // Ctrl+V is the terminal's (literal next); Ctrl+F too (forward a character).
  assert.equal(shortcut(key("v", { ctrlKey: true })), null);
  assert.equal(shortcut(key("f", { ctrlKey: true })), null);
  assert.equal(shortcut(key("c", { metaKey: true })), null);
  assert.equal(shortcut(key("c")), null);
  assert.equal(shortcut(key("C", { ctrlKey: true, shiftKey: true, altKey: true })), null);
});

test("the shortcuts on macOS", () => {
  const mac = { mac: true };
  assert.equal(shortcut(key("c", { metaKey: true }), mac), "copy");
  assert.equal(shortcut(key("v", { metaKey: true }), mac), "paste");
  assert.equal(shortcut(key("f", { metaKey: true }), mac), "search");
  // Ctrl+C is always ^C there.
  assert.equal(shortcut(key("c", { ctrlKey: true }), { mac: true, selection: true }), null);
  assert.equal(shortcut(key("C", { ctrlKey: true, shiftKey: true }), mac), null);
  assert.equal(shortcut(key("Insert", { shiftKey: true }), mac), "paste");
  assert.ok(isMac("MacIntel"));
  assert.ok(isMac("iPhone"));
  assert.ok(!isMac("Linux x86_64"));
  assert.ok(!isMac("Win32"));
  assert.ok(!isMac(undefined));
});

const b64 = (text) => Buffer.from(text, "utf8").toString("base64");

test("OSC 52: writes only", () => {
  assert.deepEqual(parseOsc52(`c;${b64("hello")}`), { write: "hello" });
  assert.deepEqual(parseOsc52(`;${b64("x")}`), { write: "x" });
  assert.deepEqual(parseOsc52(`pc;${b64("日本語 😀")}`), { write: "日本語 😀" });
  // A program asking to read the clipboard gets nothing.
  assert.deepEqual(parseOsc52("c;?"), { ignore: "read" });
  assert.deepEqual(parseOsc52("c;"), { ignore: "empty" });
  assert.deepEqual(parseOsc52("hello"), { ignore: "malformed" });
  assert.deepEqual(parseOsc52("c;not base64!"), { ignore: "malformed" });
  assert.deepEqual(parseOsc52("zz;aGk="), { ignore: "malformed" });
  assert.deepEqual(parseOsc52(`c;${Buffer.from([0xff, 0xfe]).toString("base64")}`), { ignore: "malformed" });
});

test("OSC 52: a size limit", () => {
  assert.equal(OSC52_MAX_BYTES, 1024 * 1024);
  assert.deepEqual(parseOsc52(`c;${b64("a".repeat(10))}`, 10), { write: "a".repeat(10) });
  assert.deepEqual(parseOsc52(`c;${b64("a".repeat(11))}`, 10), { ignore: "too large" });
  assert.deepEqual(parseOsc52(`c;${"QUFB".repeat(1_000_000)}`), { ignore: "too large" });
  assert.equal(parseOsc52(`c;${b64("a".repeat(OSC52_MAX_BYTES))}`).write.length, OSC52_MAX_BYTES);
});

test("the key bar shows on touch-first devices unless switched", async () => {
  const { keyBarShown } = await import("../js/keybar.js");
  assert.equal(keyBarShown(null, true), true);
  assert.equal(keyBarShown(null, false), false);
  assert.equal(keyBarShown("off", true), false);
  assert.equal(keyBarShown("on", false), true);
});

test("copy on selection is off until switched on, and kept", async () => {
  const { COPY_ON_SELECT_KEY, copiedText, copyOnSelectSaved, saveCopyOnSelect } = await import("../js/clipboard.js");
  const items = new Map();
  const storage = {
    getItem: (k) => (items.has(k) ? items.get(k) : null),
    setItem: (k, v) => items.set(k, String(v)),
    removeItem: (k) => items.delete(k),
  };
  assert.equal(copyOnSelectSaved(storage), false);
  saveCopyOnSelect(storage, true);
  assert.equal(items.get(COPY_ON_SELECT_KEY), "on");
  assert.equal(copyOnSelectSaved(storage), true);
  saveCopyOnSelect(storage, false);
  assert.equal(copyOnSelectSaved(storage), false);
  const broken = { getItem() { throw new Error("no storage"); }, setItem() { throw new Error("no"); } };
  assert.equal(copyOnSelectSaved(broken), false);
  saveCopyOnSelect(broken, true);
  assert.equal(copiedText("héllo"), "a program in the session copied 5 characters");
  assert.equal(copiedText("😀"), "a program in the session copied 1 character");
});

test("what the search box says", async () => {
  const { resultText } = await import("../js/search.js");
  assert.equal(resultText(2, 10, "x"), "3 of 10");
  assert.equal(resultText(-1, 0, "x"), "no match");
  assert.equal(resultText(-1, 4, "x"), "4 found");
  assert.equal(resultText(-1, 0, ""), "");
});

test("the renderer: WebGL on a GPU, the DOM else, unless asked", async () => {
  const { pickRenderer, savedChoice, softwareRenderer } = await import("../js/render.js");
  assert.ok(softwareRenderer("ANGLE (Google, Vulkan 1.3.0 (SwiftShader Device (Subzero)), SwiftShader driver)"));
  assert.ok(softwareRenderer("llvmpipe (LLVM 15.0.6, 256 bits)"));
  assert.ok(!softwareRenderer("ANGLE (Intel, Mesa Intel(R) UHD Graphics 620 (KBL GT2), OpenGL 4.6)"));
  assert.ok(!softwareRenderer("Apple M1"));
  const gpu = { webgl: true, software: false };
  const cpu = { webgl: true, software: true };
  const none = { webgl: false, software: false };
  assert.equal(pickRenderer("auto", gpu), "webgl");
  assert.equal(pickRenderer("auto", cpu), "dom");
  assert.equal(pickRenderer("auto", none), "dom");
  assert.equal(pickRenderer("webgl", cpu), "webgl");
  assert.equal(pickRenderer("webgl", none), "dom");
  assert.equal(pickRenderer("dom", gpu), "dom");
  assert.equal(savedChoice({ getItem: () => "webgl" }), "webgl");
  assert.equal(savedChoice({ getItem: () => "canvas" }), "auto");
  assert.equal(savedChoice({ getItem: () => null }), "auto");
});

test("a finger drawn over the terminal scrolls it a row at a time", () => {
  assert.deepEqual(swipeLines(0, 17), { lines: 0, rest: 0 });
  assert.deepEqual(swipeLines(16, 17), { lines: 0, rest: 16 });
  assert.deepEqual(swipeLines(35, 17), { lines: -2, rest: 1 });
  assert.deepEqual(swipeLines(-35, 17), { lines: 2, rest: -1 });
  assert.deepEqual(swipeLines(40, 0), { lines: 0, rest: 0 });
});

test("the terminal's fonts cover CJK and emoji, in an order that keeps digits monospace", () => {
  const css = readFileSync(new URL("../style.css", import.meta.url), "utf8");
  const stack = /--mono:\s*([^;]+);/.exec(css)[1].split(",").map((f) => f.trim().replace(/^"|"$/g, ""));
  const at = (name) => stack.indexOf(name);
  for (const name of ["DejaVu Sans Mono", "Noto Sans Mono CJK SC", "Noto Color Emoji", "monospace"]) {
    assert.ok(at(name) >= 0, name);
  }
  assert.ok(at("DejaVu Sans Mono") < at("Noto Sans Mono CJK SC"));
  assert.ok(at("Noto Sans Mono CJK SC") < at("Noto Color Emoji"));
  assert.equal(stack.at(-1), "monospace");
});
