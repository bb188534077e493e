// The pure parts of the status bar, uploads and exports, links and notifications; and that
// every module of the page loads without a DOM (so none touches one before it is asked to).

import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";

import { notifyTitle } from "../js/attention.js";
import { STATES } from "../js/machine.js";
import { DISPLAY, countdownText, transferButtons } from "../js/status.js";
import { linkTarget } from "../js/terminal.js";
import { describeUpload, exportError, formatBytes, uploadError } from "../js/transfer.js";

test("every state of the connection has its look in the status bar", () => {
  assert.deepEqual(Object.keys(DISPLAY).sort(), [...STATES].sort());
  assert.equal(DISPLAY.ended.action, "New session");
  assert.equal(DISPLAY.taken.action, "Reconnect here");
  assert.equal(DISPLAY.failed.action, "Reconnect");
  // Asking again is no use after a refusal: no button.
  assert.equal(DISPLAY.refused.action, undefined);
  const gone = STATES.filter((state) => DISPLAY[state].gone);
  assert.deepEqual(gone, ["ended", "expired"]);
});

test("the countdown to the next attempt", () => {
  assert.equal(countdownText(10_000, 7_500, 2), "next try in 3 s (attempt 2)");
  assert.equal(countdownText(10_000, 9_001, 2), "next try in 1 s (attempt 2)");
  assert.equal(countdownText(10_000, 10_000, 2), "trying now (attempt 2)");
  assert.equal(countdownText(null, 0, 4), "trying now (attempt 4)");
});

test("Upload and Export need a session that is not gone, and the page connected to it", () => {
  assert.deepEqual(transferButtons("abc", "connected", false), {
    exportDisabled: false, exportTitle: "Download /workspace as .tar.gz",
    uploadDisabled: false, uploadTitle: "Upload files to /workspace (or drop them on the terminal)",
  });
  assert.deepEqual(transferButtons("abc", "connected", true).uploadDisabled, true);
  assert.deepEqual(transferButtons("abc", "connected", true).uploadTitle, "An upload is under way");
  assert.deepEqual(transferButtons("abc", "connected", true).exportDisabled, false);
  for (const [id, state] of [[null, "connected"], ["abc", "ended"], ["abc", "expired"]]) {
    const buttons = transferButtons(id, state, false);
    assert.equal(buttons.exportDisabled, true);
    assert.equal(buttons.uploadDisabled, true);
    assert.equal(buttons.exportTitle, "Export is not available: the session has ended");
    assert.equal(buttons.uploadTitle, "Upload is not available: there is no session");
  }
  // Disconnected: the session may live, but the page cannot reach it; the title says why.
  for (const state of ["connecting", "reconnecting", "taken", "failed", "refused", "login"]) {
    const buttons = transferButtons("abc", state, false);
    assert.equal(buttons.exportDisabled, true, state);
    assert.equal(buttons.uploadDisabled, true, state);
    assert.match(buttons.exportTitle, /^Export is not available: .*(connected|another tab|logged out)/);
    assert.match(buttons.uploadTitle, /^Upload is not available: /);
  }
  assert.equal(transferButtons("abc", "reconnecting", false).uploadTitle,
    "Upload is not available: the page is disconnected from the session (reconnecting)");
});

test("sizes and what an upload holds", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(1023), "1023 B");
  assert.equal(formatBytes(1536), "1.5 KiB");
  assert.equal(formatBytes(5 * 1024 ** 3), "5.0 GiB");
  assert.equal(formatBytes(3 * 1024 ** 5), "3072.0 TiB");
  assert.equal(describeUpload({ files: 1, directories: 0, bytes: 10 }), "1 file (10 B)");
  assert.equal(describeUpload({ files: 2, directories: 1, bytes: 2048 }), "2 files and 1 folder (2.0 KiB)");
  assert.equal(describeUpload({ files: 0, directories: 3, bytes: 0 }), "3 folders (0 B)");
  assert.equal(describeUpload({ files: 0, directories: 0, bytes: 0 }), "nothing (0 B)");
});

test("an upload's failure in capsule's words, else the status", () => {
  assert.equal(uploadError(409, '{"error": "the session  has\\nended", "code": "gone"}'),
    "the session has ended");
  assert.equal(uploadError(400, '{"message": "bad tar"}'), "bad tar");
  assert.equal(uploadError(413, "<html>too big</html>"), "too large for capsule's upload limit");
  assert.equal(uploadError(502, ""), "HTTP 502");
  assert.equal(uploadError(500, JSON.stringify({ error: "x".repeat(500) })).length, 300);
});

test("an export's failure, from what its frame showed", () => {
  assert.equal(exportError(null), "export failed: capsule did not answer");
  assert.equal(exportError('{"error": "no such session"}'), "export failed: no such session");
  assert.equal(exportError('{"message": "export failed: the disk is full"}'),
    "export failed: the disk is full");
  assert.equal(exportError("  Service \n Unavailable "), "export failed: Service Unavailable");
  assert.equal(exportError(""), "export failed");
});

test("links in the terminal open only on the web", () => {
  assert.equal(linkTarget("https://example.com/a?b#c"), "https://example.com/a?b#c");
  assert.equal(linkTarget("http://localhost:8000"), "http://localhost:8000/");
  for (const uri of ["javascript:alert(1)", "file:///etc/passwd", "data:text/html,x", "not a url"]) {
    assert.equal(linkTarget(uri), null, uri);
  }
});

test("the notify button says what it does", () => {
  assert.equal(notifyTitle("granted", true), "Notify me when the agent is waiting: on");
  assert.equal(notifyTitle("default", false), "Notify me when the agent is waiting: off");
  assert.match(notifyTitle("denied", false), /blocked/);
});

test("every module loads without a DOM", async () => {
  const modules = readdirSync(new URL("../js/", import.meta.url)).filter((n) => n.endsWith(".js"));
  assert.ok(modules.length >= 8, String(modules));
  for (const name of modules) {
    const loaded = await import(new URL(`../js/${name}`, import.meta.url));
    assert.ok(Object.keys(loaded).length > 0, name);
  }
});

// The modules app.js imports, and theirs: paths under www/. With `dynamic`, those loaded later
// with import("...") too (add-ons loaded after the first prompt, not preloaded).
function moduleGraph(entry, dynamic = false) {
  const seen = new Set();
  const visit = (path) => {
    if (seen.has(path)) return;
    seen.add(path);
    const text = readFileSync(new URL(`../${path}`, import.meta.url), "utf8");
    for (const [, spec] of text.matchAll(/^\s*(?:import|export)\b[^"';]*?\bfrom\s*["']([^"']+)["']/gm)) {
      visit(new URL(spec, `http://page/${path}`).pathname.slice(1));
    }
    for (const [, spec] of text.matchAll(/^\s*import\s*["']([^"']+)["']/gm)) {
      visit(new URL(spec, `http://page/${path}`).pathname.slice(1));
    }
    if (dynamic) {
      for (const [, spec] of text.matchAll(/\bimport\(\s*["']([^"']+)["']\s*\)/g)) {
        visit(new URL(spec, `http://page/${path}`).pathname.slice(1));
      }
    }
  };
  visit(entry);
  return seen;
}

test("index.html preloads the whole module graph, and nothing else", () => {
  const page = readFileSync(new URL("../index.html", import.meta.url), "utf8");
  const preloaded = [...page.matchAll(/<link rel="modulepreload" href="([^"]+)">/g)].map((m) => m[1]);
  const graph = moduleGraph("app.js");
  assert.deepEqual([...preloaded].sort(), [...graph].sort());
  assert.equal(new Set(preloaded).size, preloaded.length);
  // No script element loads anything: the bootstrap runs xterm.js's scripts, then app.js, once
  // the first screen is drawn; each of them is preloaded, in the same order.
  assert.doesNotMatch(page, /<script[^>]*\bsrc=/);
  assert.match(page, /var ENTRY = "app\.js";/);
  const scripts = [...page.match(/var SCRIPTS = \[([^\]]*)\]/)[1].matchAll(/"([^"]+)"/g)].map((m) => m[1]);
  const preloadedScripts = [...page.matchAll(/<link rel="preload" as="script" href="([^"]+)">/g)]
    .map((m) => m[1]);
  assert.deepEqual(preloadedScripts, scripts);
  assert.equal(scripts.length, 4);
  // Every module of js/ is in the graph, or loaded later with import(): none is left unused.
  const modules = readdirSync(new URL("../js/", import.meta.url)).map((n) => `js/${n}`);
  const reached = moduleGraph("app.js", true);
  assert.deepEqual(modules.filter((m) => !reached.has(m)), []);
  // The add-ons (js/extras.js and what it imports) come after the first prompt: not preloaded.
  assert.ok(reached.has("js/extras.js") && !graph.has("js/extras.js"));
  const later = moduleGraph("js/extras.js");
  assert.deepEqual([...later].filter((m) => graph.has(m)), []);
});
