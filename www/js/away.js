// "While you were away", the pure parts: whether capsule's `connected` frame says the session
// printed while no client was attached (and capsule recorded it), what the offer says, where
// the recording since then is (GET api/sessions/{id}/recording?since=T, asciicast v2), and the
// player's options. Nothing here touches the DOM; js/awayplayer.js shows it.

// The playback speeds offered; the first playback's.
export const SPEEDS = Object.freeze([1, 2, 4, 8]);
export const DEFAULT_SPEED = 2;
// Seconds of quiet kept between two outputs in the playback (the rest is skipped).
export const IDLE_TIME_LIMIT = 1.5;
// Below this width (CSS pixels) the player's font is small (a phone).
const NARROW = 600;

// Away for less than this (a reload, a network blip: the terminal's replay shows it all), no
// playback is offered.
export const MIN_AWAY_SECONDS = 10;

// What `connected` says of the time away: { since (Unix seconds), seconds (how long, by
// capsule's clock), printed (bytes) } when the session printed while no client was attached
// for MIN_AWAY_SECONDS or more, and capsule recorded it; else null.
export function awayOffer(frame) {
  const away = frame && frame.away;
  if (!away || typeof away !== "object" || away.recorded !== true) return null;
  const { since, seconds, printed } = away;
  if (typeof since !== "number" || !Number.isFinite(since) || since <= 0) return null;
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < MIN_AWAY_SECONDS) {
    return null;
  }
  if (!Number.isInteger(printed) || printed <= 0) return null;
  return { since, seconds, printed };
}

// "40 s", "12 min", "3 h 5 min", "2 days".
export function awayDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const minutes = Math.round(s / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return minutes % 60 ? `${hours} h ${minutes % 60} min` : `${hours} h`;
  return `${Math.round(hours / 24)} days`;
}

// "512 bytes", "3.4 KB", "12 MB" (powers of 1024, as the rest of the page counts).
export function sizeText(bytes) {
  if (bytes < 1024) return `${bytes} byte${bytes === 1 ? "" : "s"}`;
  const units = ["KB", "MB", "GB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

// The offer's sentence.
export function offerText(offer) {
  const away = awayDuration(offer.seconds);
  return `While you were away (${away}), this session printed ${sizeText(offer.printed)}.`;
}

// The overlay's title line: since when, as the person's clock says it.
export function playbackTitle(offer, timeText) {
  return `What happened since ${timeText} · ${sizeText(offer.printed)}`;
}

// The recording's URL beside the page.
export function recordingPath(sessionId, since) {
  return `api/sessions/${encodeURIComponent(sessionId)}/recording?since=${since.toFixed(3)}`;
}

// asciinema-player's options: playing at once at `speed`, quiet limited, the terminal fitted
// to the overlay, from `startAt` seconds (a speed change starts again where it was).
export function playerOptions({ speed = DEFAULT_SPEED, width = 1000, startAt = 0 } = {}) {
  const options = {
    autoPlay: true,
    speed,
    idleTimeLimit: IDLE_TIME_LIMIT,
    fit: "both",
    controls: true,
    terminalFontSize: width < NARROW ? "small" : "medium",
    terminalFontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
  };
  if (startAt > 0) options.startAt = startAt;
  return options;
}

// The next speed of SPEEDS after `speed` (the speed button cycles), and its label.
export function nextSpeed(speed) {
  const index = SPEEDS.indexOf(speed);
  return SPEEDS[(index + 1) % SPEEDS.length];
}

export function speedLabel(speed) {
  return `${speed}×`;
}

// What the page says when the recording could not be had: from capsule's JSON error
// ({error, code}) where it answered one, else from the status.
export function failureText(status, body) {
  if (body && typeof body.error === "string" && body.error) {
    if (body.code === "not_recorded") return "Nothing of this session was recorded while you were away.";
    return `The recording could not be read: ${body.error}`;
  }
  if (status === 0) return "capsule did not answer: the recording could not be read.";
  return `The recording could not be read (capsule answered ${status}).`;
}
