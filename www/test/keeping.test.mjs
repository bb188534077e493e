// Kept sessions in words and the Sessions list's rows (js/keeping.js), and the banner of a page
// opened on a kept session. Dates are built in the local time zone, as the page shows them.

import assert from "node:assert/strict";
import { test } from "node:test";

import { bannerFor } from "../js/banner.js";
import {
  ACTIONS, ageText, apiError, closingText, confirmText, dayText, keptText, momentText,
  sessionPage, sessionRows, sizeText,
} from "../js/keeping.js";
import { socketUrl } from "../js/protocol.js";
import { DISPLAY, transferButtons } from "../js/status.js";

const at = (...parts) => new Date(...parts).getTime() / 1000;
const NOW = at(2026, 11, 7, 9, 30); // Mon 7 Dec 2026, 09:30

test("days and moments as a person reads them", () => {
  assert.equal(dayText(at(2026, 11, 14, 9, 1), NOW), "Mon 14 Dec");
  assert.equal(dayText(at(2027, 0, 14, 9, 1), NOW), "Thu 14 Jan 2027");
  assert.equal(momentText(at(2026, 11, 7, 8, 5), NOW), "today 08:05");
  assert.equal(momentText(at(2026, 11, 6, 23, 59), NOW), "yesterday 23:59");
  assert.equal(momentText(at(2026, 11, 8, 0, 0), NOW), "tomorrow 00:00");
  assert.equal(momentText(at(2026, 11, 14, 9, 1), NOW), "Mon 14 Dec 09:01");
  assert.equal(ageText(-5), "0 s");
  assert.equal(ageText(59.9), "59 s");
  assert.equal(ageText(600), "10 min");
  assert.equal(ageText(5 * 3600 + 5), "5 h");
  assert.equal(ageText(47 * 3600), "47 h");
  assert.equal(ageText(3 * 86400), "3 days");
});

test("sizes in human units", () => {
  assert.equal(sizeText(0), "0 B");
  assert.equal(sizeText(999), "999 B");
  assert.equal(sizeText(4200), "4.2 kB");
  assert.equal(sizeText(1_300_000_000), "1.3 GB");
  assert.equal(sizeText(250_000_000), "250 MB");
  assert.equal(sizeText(7e15), "7000 TB");
  for (const bad of [null, undefined, -1, NaN, "12"]) assert.equal(sizeText(bad), "", String(bad));
});

test("what closing the tab does, from on_close", () => {
  const until = at(2026, 11, 14, 9, 31);
  const kept = closingText({ on_close: { outcome: "kept", after: 60, until } }, NOW);
  assert.equal(kept.short, "Closing this tab keeps your work until Mon 14 Dec");
  assert.equal(kept.outcome, "kept");
  assert.equal(kept.lost, false);
  assert.match(kept.long, /60 s later it is put away .*files kept\) until Mon 14 Dec 09:31/);
  const removed = closingText({ on_close: { outcome: "removed", after: 60 }, kept: true }, NOW);
  assert.equal(removed.short, "Closing this tab removes this session and its files 60 s later");
  assert.equal(removed.lost, true);
  assert.match(closingText({ on_close: { outcome: "removed", after: 300 } }, NOW).short,
    /5 min later$/);
  // on_close wins over grace/kept; what is not understood says nothing rather than a guess.
  assert.equal(closingText({ on_close: { outcome: "kept" }, grace: 60, kept: false }, NOW), null);
  assert.equal(closingText({ on_close: { outcome: "removed", after: -1 } }, NOW), null);
  assert.equal(closingText({ on_close: { outcome: "eaten" } }, NOW), null);
  assert.equal(closingText(null, NOW), null);
});

test("the page opened on a kept session says what it is", () => {
  const kept = { state: "kept", kept_at: at(2026, 11, 6, 18, 2), kept_until: at(2026, 11, 13, 18, 2),
    reason_text: "its last tab closed and the grace period ended" };
  assert.equal(keptText(kept, "server sentence", NOW), "This session was put away yesterday"
    + " 18:02 (its last tab closed and the grace period ended). It is kept until Sun 13 Dec 18:02.");
  assert.equal(keptText(null, "put away on 6 Dec, kept until 13 Dec: resume it", NOW),
    "put away on 6 Dec, kept until 13 Dec: resume it");
  assert.equal(keptText({ state: "kept" }, "", NOW), "This session was put away.");
  const banner = bannerFor({ state: "kept", message: "put away on 6 Dec", code: "session_kept" });
  assert.equal(banner.action, "Resume");
  assert.equal(banner.retry, false);
  assert.equal(banner.message, "put away on 6 Dec");
  assert.match(banner.hint, /new shell, and its last screen shown above it as history/);
  assert.equal(DISPLAY.kept.action, "Resume");
  assert.equal(DISPLAY.kept.label, "put away");
  assert.equal(transferButtons("abc", "kept", false).uploadDisabled, true);
  assert.match(transferButtons("abc", "kept", false).uploadTitle, /put away: resume it first/);
});

test("resuming asks for it in the socket's URL", () => {
  assert.equal(socketUrl("https://h/x/", { sessionId: "abc", offset: 0, resume: true }),
    "wss://h/x/ws?session_id=abc&offset=0&resume=1");
  assert.equal(socketUrl("http://h/", { sessionId: "abc", offset: 5 }),
    "ws://h/ws?session_id=abc&offset=5");
  // A new session has nothing to resume.
  assert.equal(socketUrl("http://h/", { profile: "claude", resume: true }), "ws://h/ws?profile=claude");
});

const BODY = {
  user: null,
  sessions: [
    { id: "old-kept", state: "kept", profile: "shell", created: NOW - 3 * 86400,
      kept_at: NOW - 2 * 86400, kept_until: at(2026, 11, 12, 9, 0), size: 4_200_000,
      command: "bash", reason: "grace", reason_text: "its last tab closed and the grace period ended" },
    { id: "here", state: "running", profile: "claude", created: NOW - 600, client_attached: true,
      url: "/?session_id=here" },
    { id: "new-kept", state: "kept", profile: "claude", created: NOW - 86400, kept_at: NOW - 3600,
      kept_until: at(2026, 11, 14, 8, 30), size: 1_300_000_000, command: "claude",
      reason_text: "put away by its owner" },
    { id: "other", state: "detached", profile: "shell", created: NOW - 120, client_attached: false },
    { state: "kept" }, null, "junk",
  ],
};

test("the Sessions list: this tab's first, then live ones, then kept ones, newest first", () => {
  const rows = sessionRows(BODY, "here", NOW);
  assert.deepEqual(rows.map((r) => r.id), ["here", "other", "new-kept", "old-kept"]);
  const [here, other, kept, old] = rows;
  assert.equal(here.stateText, "this tab");
  assert.equal(here.current, true);
  assert.deepEqual(here.actions, ["export", "fork", "put-away", "delete"]);
  assert.equal(here.details, "claude · started 10 min ago");
  assert.equal(other.stateText, "detached");
  assert.deepEqual(other.actions, ["open", "export", "fork", "put-away", "delete"]);
  assert.equal(kept.stateText, "kept");
  assert.deepEqual(kept.actions, ["resume", "export", "fork", "delete"]);
  assert.equal(kept.details, "claude · put away today 08:30 · kept until Mon 14 Dec · 1.3 GB · 24 h old");
  assert.equal(kept.command, "claude");
  assert.equal(kept.reason, "put away by its owner");
  assert.equal(old.details, "shell · put away Sat 5 Dec 09:30 · kept until Sat 12 Dec · 4.2 MB · 3 days old");
  for (const action of new Set(rows.flatMap((r) => r.actions))) assert.ok(ACTIONS[action], action);
  assert.deepEqual(sessionRows({}, null, NOW), []);
  assert.deepEqual(sessionRows(null, null, NOW), []);
});

test("what the list's actions ask, open and tell", () => {
  assert.match(confirmText("delete", "abc"), /^Delete session abc and all its files\? This cannot be undone\.$/);
  assert.equal(confirmText("fork", "abc"), null);
  assert.equal(sessionPage("https://h/capsule/?session_id=here", "x", "/?session_id=x"),
    "https://h/?session_id=x");
  assert.equal(sessionPage("https://h/capsule/?session_id=here#a", "x", null),
    "https://h/capsule/?session_id=x");
  assert.equal(sessionPage("https://h/", "a b", ""), "https://h/?session_id=a+b");
  assert.equal(apiError(409, { error: "you keep 20 sessions already", code: "kept_limit" }),
    "you keep 20 sessions already (kept_limit)");
  assert.equal(apiError(500, {}), "capsule answered 500");
  assert.equal(apiError(404, null), "capsule answered 404");
});
