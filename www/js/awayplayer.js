// "While you were away": when the page attaches to a session that printed while no client was
// attached (capsule's `connected` frame has `away`, and capsule records sessions), a small
// offer floats over the terminal's top right: "Play what happened". It never plays by itself.
// Played, an overlay covers the terminal with asciinema-player (npm's, loaded only then; its
// files are named in index.html's <meta name="capsule-away"> so that capsule versions their
// URLs), fed with the session's recording since the last client left (js/away.js says where),
// at 2x with quiet limited to 1.5 s; a button changes the speed, "Jump to now" (or Escape)
// closes it and gives the live terminal its keys back.

import {
  DEFAULT_SPEED, awayOffer, failureText, nextSpeed, offerText, playbackTitle, playerOptions,
  recordingPath, speedLabel,
} from "./away.js";

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

// The player's file named in index.html (versioned), else its plain path.
function assetUrl(doc, suffix) {
  const meta = doc.querySelector(`meta[name="capsule-away"][content$="${suffix}"]`);
  return meta ? meta.content : `node_modules/asciinema-player/dist/bundle/${suffix}`;
}

let loading = null;
// asciinema-player's bundle and its style sheet, loaded once: resolves to its global.
function loadPlayer(doc) {
  if (window.AsciinemaPlayer) return Promise.resolve(window.AsciinemaPlayer);
  if (loading) return loading;
  loading = new Promise((resolve, reject) => {
    const style = element("link", { rel: "stylesheet", href: assetUrl(doc, "asciinema-player.css") });
    doc.head.append(style);
    const script = element("script", { src: assetUrl(doc, "asciinema-player.min.js") });
    script.onload = () => (window.AsciinemaPlayer ? resolve(window.AsciinemaPlayer)
      : reject(new Error("the player did not load")));
    script.onerror = () => reject(new Error("the player did not load"));
    doc.head.append(script);
  }).catch((e) => {
    loading = null;
    throw e;
  });
  return loading;
}

// `sessionId()`: the attached session's id; `focus()`: give the terminal its keys back.
export function setupAway({ sessionId, focus, doc = document }) {
  let offer = null; // what `connected` said, while offered
  let overlay = null; // the open playback: { root, player, data, speed, ... }

  const text = element("span", { className: "away-text" });
  const play = element("button", { type: "button", className: "away-play", textContent: "Play what happened" });
  const dismiss = element("button", {
    type: "button", className: "away-dismiss", textContent: "×", title: "Dismiss",
  });
  dismiss.setAttribute("aria-label", "Dismiss: do not play what happened");
  const box = element("div", { id: "away", className: "away", hidden: true }, [text, play, dismiss]);
  box.setAttribute("role", "region");
  box.setAttribute("aria-label", "While you were away");
  doc.body.append(box);

  play.addEventListener("click", () => open());
  dismiss.addEventListener("click", () => {
    hideOffer();
    focus();
  });

  function hideOffer() {
    box.hidden = true;
  }

  // capsule's `connected` frame: offer, or stop offering.
  function attached(frame) {
    const found = awayOffer(frame);
    if (overlay) return; // a playback is open: it goes on
    offer = found;
    if (!offer) {
      hideOffer();
      return;
    }
    text.textContent = offerText(offer);
    box.hidden = false;
  }

  function open() {
    const id = sessionId();
    if (!offer || !id || overlay) return;
    const shown = offer;
    hideOffer();
    const title = element("h2", {
      className: "away-title",
      textContent: playbackTitle(shown, new Date(shown.since * 1000).toLocaleTimeString([], {
        hour: "2-digit", minute: "2-digit" })),
    });
    const speed = element("button", { type: "button", className: "away-speed" });
    const now = element("button", { type: "button", className: "away-now", textContent: "Jump to now" });
    const stage = element("div", { className: "away-stage" });
    const note = element("p", { className: "away-note", textContent: "Loading the recording…" });
    note.setAttribute("role", "status");
    stage.append(note);
    const root = element("div", { className: "away-overlay" }, [
      element("div", { className: "away-head" }, [title, speed, now]), stage]);
    root.setAttribute("role", "dialog");
    root.setAttribute("aria-modal", "true");
    root.setAttribute("aria-label", "What happened while you were away");
    doc.body.append(root);
    overlay = { root, stage, note, speedButton: speed, speed: DEFAULT_SPEED, player: null, data: null };
    const current = overlay;
    showSpeed();
    now.addEventListener("click", close);
    speed.addEventListener("click", () => {
      current.speed = nextSpeed(current.speed);
      showSpeed();
      if (current.data !== null) start(current, current.player ? current.player.getCurrentTime() : 0);
    });
    root.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        close();
      } else if (event.key === "Tab") trapFocus(event, root);
    });
    now.focus();

    const recording = fetch(recordingPath(id, shown.since), {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/x-asciicast, application/json" },
    }).then((response) => {
      if (response.ok) return response.text();
      return response.json().catch(() => null).then((body) => {
        throw new Error(failureText(response.status, body));
      });
    }, () => {
      throw new Error(failureText(0, null));
    });
    Promise.all([recording, loadPlayer(doc)]).then(([data]) => {
      if (overlay !== current) return;
      current.data = data;
      start(current, 0);
    }).catch((e) => {
      if (overlay !== current) return;
      note.textContent = e.message || String(e);
    });
  }

  function showSpeed() {
    overlay.speedButton.textContent = speedLabel(overlay.speed);
    overlay.speedButton.title = `Playback speed: ${speedLabel(overlay.speed)} (click for faster)`;
    overlay.speedButton.setAttribute("aria-label", `Playback speed ${overlay.speed} times: change`);
  }

  // A player at the overlay's speed, from `at` seconds (the player takes its speed once).
  function start(current, at) {
    if (current.player) current.player.dispose();
    current.stage.replaceChildren();
    const holder = element("div", { className: "away-player" });
    current.stage.append(holder);
    const options = playerOptions({ speed: current.speed, width: doc.documentElement.clientWidth, startAt: at });
    current.player = window.AsciinemaPlayer.create({ data: current.data }, holder, options);
  }

  function close() {
    const current = overlay;
    if (!current) return;
    overlay = null;
    if (current.player) current.player.dispose();
    current.root.remove();
    offer = null;
    focus();
  }

  return {
    attached,
    // Whether a playback covers the terminal (tests and the page's keys ask).
    get playing() {
      return overlay !== null;
    },
    close,
  };
}

// Tab and Shift+Tab stay within the overlay.
function trapFocus(event, root) {
  const focusable = [...root.querySelectorAll("button, [tabindex]:not([tabindex='-1']), select, a[href]")]
    .filter((node) => !node.disabled && node.offsetParent !== null);
  if (focusable.length === 0) return;
  const first = focusable[0];
  const last = focusable[focusable.length - 1];
  if (event.shiftKey && document.activeElement === first) {
    event.preventDefault();
    last.focus();
  } else if (!event.shiftKey && document.activeElement === last) {
    event.preventDefault();
    first.focus();
  }
}
