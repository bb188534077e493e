// The ports listening in the session, the pure parts: capsule's `ports` frame read as what it
// is (the session's user chooses which ports listen, and their number), what changed since
// the last one, and what the page says of them. Nothing here touches the DOM or a socket.

// The most ports a frame is believed to name (the keeper names 64 at most).
export const MAX_PORTS = 64;
// Rows the notice shows; the rest are counted.
export const ROWS = 3;

// An address the page may link to: http(s) or a path on this site. Anything else is dropped.
function address(url, base) {
  if (typeof url !== "string" || url.length > 2048) return null;
  try {
    const parsed = new URL(url, base);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch (e) {
    return null;
  }
}

// The ports of a `ports` frame, ascending, each { port, url (absolute), public }; entries that
// are not ports (or repeat one) are left out. `more`: how many more listen than are named.
export function readPorts(frame, base) {
  const ports = [];
  const seen = new Set();
  const entries = frame && Array.isArray(frame.ports) ? frame.ports.slice(0, MAX_PORTS) : [];
  for (const entry of entries) {
    if (!entry || typeof entry !== "object") continue;
    const { port } = entry;
    if (!Number.isInteger(port) || port < 1 || port > 65535 || seen.has(port)) continue;
    const url = address(entry.url, base);
    if (url === null) continue;
    seen.add(port);
    ports.push({ port, url, public: entry.public === true });
  }
  ports.sort((a, b) => a.port - b.port);
  const more = frame && Number.isSafeInteger(frame.more) && frame.more > 0 ? frame.more : 0;
  return { ports, more };
}

// Which ports opened and which closed between two lists (numbers, ascending).
export function portChanges(before, after) {
  const was = new Set(before.map((p) => p.port));
  const is = new Set(after.map((p) => p.port));
  return {
    opened: after.filter((p) => !was.has(p.port)).map((p) => p.port),
    closed: before.filter((p) => !is.has(p.port)).map((p) => p.port),
  };
}

export function openText(port) {
  return `port ${port} is open`;
}

// What the page announces (to a screen reader) for the ports that opened: "" for none.
export function announceText(opened) {
  if (opened.length === 0) return "";
  if (opened.length === 1) return openText(opened[0]);
  return `ports ${opened.slice(0, -1).join(", ")} and ${opened[opened.length - 1]} are open`;
}

// The rows to show, and what the notice says of the rest ("" when nothing is left out).
export function shownPorts(ports, more, rows = ROWS) {
  const shown = ports.slice(0, rows);
  const rest = ports.length - shown.length + more;
  return { shown, rest: rest > 0 ? `and ${rest} more` : "" };
}

// Whether capsule can make share links to a port: its API document names the route.
export function canSharePorts(openapi) {
  const paths = openapi && typeof openapi === "object" ? openapi.paths : null;
  const route = paths && paths["/api/sessions/{id}/ports/{port}/shares"];
  return Boolean(route && route.post);
}
