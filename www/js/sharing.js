// Read-only share links, the pure parts: a spectator's token and socket URL, what the page
// says of a link's expiry and of its watchers, and what a spectator's closed socket means.
// Nothing here touches the DOM or a socket.

// A share link's token: URL-safe base64 (capsule makes 43 characters).
const TOKEN = /^[A-Za-z0-9_-]{16,128}$/;

// The token of a spectator's page (/watch/#TOKEN): "" when the fragment is not one; null when
// the page is not a spectator's.
export function watchToken(loc) {
  if (!/\/watch\/$/.test(loc.pathname)) return null;
  const token = decodeURIComponent(loc.hash.replace(/^#/, ""));
  return TOKEN.test(token) ? token : "";
}

// /ws?watch=TOKEN beside the spectator's page (/watch/ is one level down).
export function watchSocketUrl(href, token) {
  const url = new URL("../ws", href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "?watch=" + encodeURIComponent(token);
  url.hash = "";
  return url.href;
}

// "59 min", "45 s", "2 h 5 min" of `seconds` left (0 or less: null).
export function durationText(seconds) {
  const s = Math.ceil(seconds);
  if (!(s > 0)) return null;
  if (s < 60) return `${s} s`;
  const minutes = Math.ceil(s / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  return rest ? `${hours} h ${rest} min` : `${hours} h`;
}

export function expiryText(seconds) {
  const left = durationText(seconds);
  return left === null ? "expired" : `expires in ${left}`;
}

// What the owner's Share button says with `count` spectators.
export function watchersText(count) {
  return Number.isSafeInteger(count) && count > 0 ? `${count} watching` : "";
}

// Lifetimes the owner may pick for a new link, in seconds.
export const LIFETIMES = Object.freeze([
  { seconds: 900, label: "15 min" },
  { seconds: 3600, label: "1 hour" },
  { seconds: 14400, label: "4 hours" },
]);

// What a spectator's socket closing with `code` (after an `error` frame of `errorCode` and
// `message`, if any) means: the state to show, its message, whether to try again by itself
// (`retry`: the connection was lost) and whether to offer "Watch again" (`again`).
export function watchEnd(code, errorCode, message) {
  switch (code) {
    case 4410:
      return { state: "expired", message: message || "this watch link no longer works",
        retry: false, again: false };
    case 4411:
      return { state: "failed", message: message || "this page fell behind the session",
        retry: false, again: true };
    case 4429:
      return { state: "refused", message: message || "too many people watch this session",
        retry: false, again: true };
    case 4400:
    case 1009:
      return { state: "refused", message: message || "capsule refused this page", retry: false,
        again: false };
    default:
      return { state: "reconnecting", message: message || "the connection was lost",
        retry: true, again: false };
  }
}
