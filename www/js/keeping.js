// Kept sessions in words, and what the Sessions list offers (pure: no DOM, no network). A
// session whose last tab closed, whose owner put it away or that was idle is kept where its
// profile keeps work: its container stopped, its files kept until a date; it can be resumed,
// exported, forked or deleted (docs/keeping.md). js/sessions.js draws the list; js/leaving.js
// says what closing the tab does; the connection offers Resume on a kept session.

const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
  "Dec"];

const finite = (value) => typeof value === "number" && Number.isFinite(value);
const two = (n) => String(n).padStart(2, "0");

// A day, as a person reads it in the page's time zone: "Mon 14 Dec", with its year when it is
// not this year's ("Thu 14 Jan 2027"). `at` and `now` in seconds since the epoch.
export function dayText(at, now) {
  const date = new Date(at * 1000);
  const text = `${DAYS[date.getDay()]} ${date.getDate()} ${MONTHS[date.getMonth()]}`;
  return date.getFullYear() === new Date(now * 1000).getFullYear()
    ? text : `${text} ${date.getFullYear()}`;
}

// A moment: "today 09:10", "yesterday 18:02", "tomorrow 09:10", else "Mon 7 Dec 09:10".
export function momentText(at, now) {
  const date = new Date(at * 1000);
  const time = `${two(date.getHours())}:${two(date.getMinutes())}`;
  const day = (d) => new Date(d.getFullYear(), d.getMonth(), d.getDate()).getTime();
  const days = Math.round((day(date) - day(new Date(now * 1000))) / 86400000);
  if (days === 0) return `today ${time}`;
  if (days === -1) return `yesterday ${time}`;
  if (days === 1) return `tomorrow ${time}`;
  return `${dayText(at, now)} ${time}`;
}

// A period: "45 s", "5 min", "1 h", "90 min".
export function formatSeconds(seconds) {
  const s = Math.round(seconds);
  if (s < 120) return `${s} s`;
  if (s % 3600 === 0) return `${s / 3600} h`;
  if (s % 60 === 0) return `${s / 60} min`;
  return `${s} s`;
}

// How long ago, roughly: "40 s", "12 min", "5 h", "3 days".
export function ageText(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 2 * 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} days`;
}

// A size in human units: "0 B", "812 B", "4.2 MB", "1.3 GB" (powers of 1000, as disks are sold
// and `docker system df` counts).
export function sizeText(bytes) {
  if (!finite(bytes) || bytes < 0) return "";
  if (bytes < 1000) return `${Math.round(bytes)} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

// What closing this tab does to the session, from the `connected` frame: its `on_close`
// ({"outcome": "kept", "after": 60, "until": unix} or {"outcome": "removed", "after": 60}),
// else, from a capsule that does not say it, its `grace` and `kept`. `now` in seconds. null
// when nothing is known, else { outcome, short (the bar's `#leave-note`), long (its title,
// and the banner when the browser asks), lost (whether work is lost: the page then asks before
// the tab closes) }.
export function closingText(frame, now) {
  const onClose = frame && typeof frame.on_close === "object" ? frame.on_close : null;
  if (onClose && onClose.outcome === "kept" && finite(onClose.until)) {
    const after = finite(onClose.after) && onClose.after >= 0 ? onClose.after : null;
    return {
      outcome: "kept",
      short: `Closing this tab keeps your work until ${dayText(onClose.until, now)}`,
      long: `Closing this tab keeps this session: ${after === null ? "once its grace period"
        + " ends" : `${formatSeconds(after)} later`} it is put away (its container stopped, its`
        + ` files kept) until ${momentText(onClose.until, now)}. Resume it from Sessions, or`
        + " open this page again.",
      lost: false,
    };
  }
  const removed = onClose && onClose.outcome === "removed"
    ? onClose.after : frame && frame.kept === false && !onClose ? frame.grace : undefined;
  if (finite(removed) && removed >= 0) {
    const after = formatSeconds(removed);
    return {
      outcome: "removed",
      short: `Closing this tab removes this session and its files ${after} later`,
      long: `Closing this tab removes this session ${after} later (capsule's grace period),`
        + " and its /workspace is lost with it: Export first what you want to keep.",
      lost: true,
    };
  }
  return null;
}

// Why a session is kept and until when, for the page opened on one: from the session as
// GET /api/sessions/{id} describes it (`kept`, may be null) else the server's sentence.
export function keptText(kept, message, now) {
  if (kept && finite(kept.kept_at) && finite(kept.kept_until)) {
    const why = typeof kept.reason_text === "string" && kept.reason_text
      ? ` (${kept.reason_text})` : "";
    return `This session was put away ${momentText(kept.kept_at, now)}${why}. It is kept until`
      + ` ${momentText(kept.kept_until, now)}.`;
  }
  return message || "This session was put away.";
}

// What a session of GET /api/sessions is, for the list: its state's word, a line of details,
// and the actions offered (in their order). `current`: the id this page holds.
export function describeSession(session, current, now) {
  const kept = session.state === "kept";
  const details = [];
  if (typeof session.profile === "string" && session.profile) details.push(session.profile);
  if (kept) {
    if (finite(session.kept_at)) details.push(`put away ${momentText(session.kept_at, now)}`);
    if (finite(session.kept_until)) details.push(`kept until ${dayText(session.kept_until, now)}`);
    const size = sizeText(session.size);
    if (size) details.push(size);
  } else if (finite(session.created)) {
    details.push(`started ${ageText(now - session.created)} ago`);
  }
  if (kept && finite(session.created)) details.push(`${ageText(now - session.created)} old`);
  const isCurrent = session.id === current;
  const actions = kept
    ? ["resume", "export", "fork", "delete"]
    : [...(isCurrent ? [] : ["open"]), "export", "fork", "put-away", "delete"];
  return {
    id: session.id,
    state: kept ? "kept" : session.client_attached === false ? "detached" : session.state,
    stateText: kept ? "kept" : isCurrent ? "this tab"
      : session.client_attached === false ? "detached" : String(session.state || "running"),
    details: details.join(" · "),
    command: typeof session.command === "string" ? session.command : "",
    reason: kept && typeof session.reason_text === "string" ? session.reason_text : "",
    current: isCurrent,
    actions,
  };
}

// The list's rows from GET /api/sessions's body: this page's session first, then live ones,
// then kept ones, newest first within each.
export function sessionRows(body, current, now) {
  const sessions = body && Array.isArray(body.sessions) ? body.sessions : [];
  const rank = (s) => (s.id === current ? 0 : s.state === "kept" ? 2 : 1);
  const when = (s) => (finite(s.kept_at) ? s.kept_at : finite(s.created) ? s.created : 0);
  return sessions
    .filter((s) => s && typeof s === "object" && typeof s.id === "string" && s.id)
    .sort((a, b) => rank(a) - rank(b) || when(b) - when(a))
    .map((s) => describeSession(s, current, now));
}

// The actions' labels, and the question asked before the ones that cannot be undone.
export const ACTIONS = Object.freeze({
  open: { label: "Open", title: "Open this session in this tab" },
  resume: { label: "Resume", title: "Start it again: its files as they were, a new shell, its"
    + " last screen shown as history" },
  export: { label: "Export", title: "Download its /workspace as .tar.gz" },
  fork: { label: "Fork", title: "A new session from a copy of its files" },
  "put-away": { label: "Put away", title: "Stop it and keep its files: resume it later" },
  delete: { label: "Delete", title: "Remove it and its files", danger: true },
});

export function confirmText(action, id) {
  if (action === "delete") {
    return `Delete session ${id} and all its files? This cannot be undone.`;
  }
  return null;
}

// The page's address for a session (the API's `url`, else ?session_id=).
export function sessionPage(href, id, url) {
  const target = new URL(typeof url === "string" && url ? url : "./", href);
  if (!target.searchParams.get("session_id")) target.searchParams.set("session_id", id);
  target.hash = "";
  return target.href;
}

// A failed request's error, whole: capsule's sentence and code, else the status.
export function apiError(status, body) {
  if (body && typeof body.error === "string" && body.error) {
    return typeof body.code === "string" && body.code ? `${body.error} (${body.code})` : body.error;
  }
  return `capsule answered ${status}`;
}
