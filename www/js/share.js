// The owner's Share menu: read-only links to the session (the session API's
// /api/sessions/{id}/shares), made, copied and revoked here; the button says how many watch
// (the server's `watchers` frames, see setWatchers). A link's token is told once, when it is
// made: this page keeps the ones it made, for Copy, while it lives.

import { LIFETIMES, expiryText, watchersText } from "./sharing.js";

const REFRESH_MS = 15000;

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

// ui: { shareButton, shareCount, shareMenu, status (the status element) }; `sessionId()`: the
// session's id (null: none); `status`: the status bar (status.js).
export function setupShare(ui, { sessionId, status }) {
  const urls = new Map(); // share id -> its link, for the links this page made
  let shares = [];
  let watchers = 0;
  let refreshTimer = null;
  let busy = false;

  const lifetime = element("select", { id: "share-ttl", title: "How long the link works" },
    LIFETIMES.map((l) => element("option", { value: String(l.seconds), textContent: l.label,
      selected: l.seconds === 3600 })));
  const create = element("button", { type: "button", id: "share-create", textContent: "Create link" });
  const list = element("ul", { id: "share-list", className: "share-list" });
  const error = element("p", { className: "share-error", role: "alert" });
  ui.shareMenu.append(
    element("h2", { textContent: "Watch-only link" }),
    element("p", { className: "share-about", textContent: "Anyone with the link sees this " +
      "terminal live, scrollback included, without logging in, and cannot type. It stops " +
      "working when it expires, when you revoke it, or when the session ends." }),
    element("div", { className: "share-new" }, [
      element("label", { htmlFor: "share-ttl", textContent: "Works for" }), lifetime, create]),
    error, list);

  function api(path = "", options = {}) {
    const id = sessionId();
    return fetch(`api/sessions/${encodeURIComponent(id)}/shares${path}`, {
      credentials: "same-origin",
      cache: "no-store",
      referrerPolicy: "same-origin",
      headers: { Accept: "application/json", ...(options.body ? { "Content-Type": "application/json" } : {}) },
      ...options,
    }).then((response) => response.json().catch(() => ({})).then((body) => {
      if (!response.ok) throw new Error(body.error || `capsule answered ${response.status}`);
      return body;
    }));
  }

  function renderButton() {
    const text = watchersText(watchers);
    ui.shareCount.textContent = text ? ` · ${text}` : "";
    ui.shareButton.classList.toggle("is-watched", watchers > 0);
    ui.shareButton.title = text
      ? `${text} through a read-only link: share or revoke links`
      : "Let others watch this terminal through a read-only link";
  }

  function renderList() {
    list.replaceChildren();
    if (shares.length === 0) {
      list.append(element("li", { className: "share-none", textContent: "No live links." }));
      return;
    }
    for (const share of shares) {
      const url = urls.get(share.id);
      const row = element("li", { className: "share-row" });
      if (url) {
        const field = element("input", { type: "text", readOnly: true, value: url,
          className: "share-url", ariaLabel: "the watch-only link" });
        field.addEventListener("focus", () => field.select());
        const copy = element("button", { type: "button", textContent: "Copy" });
        copy.addEventListener("click", () => copyLink(field, copy));
        row.append(element("div", { className: "share-line" }, [field, copy]));
      } else {
        row.append(element("div", { className: "share-line share-hidden",
          textContent: "a link made elsewhere (its token is shown only once)" }));
      }
      const count = watchersText(share.watchers) || "nobody watching";
      const revoke = element("button", { type: "button", textContent: "Revoke", className: "danger" });
      revoke.addEventListener("click", () => revokeShare(share.id, revoke));
      row.append(element("div", { className: "share-line share-meta" }, [
        element("span", { textContent: `${expiryText(share.expires_in)} · ${count}` }), revoke]));
      list.append(row);
    }
  }

  function say(message) {
    error.textContent = message || "";
  }

  function refresh() {
    if (!sessionId()) return Promise.resolve();
    return api().then((body) => {
      shares = Array.isArray(body.shares) ? body.shares : [];
      if (Number.isSafeInteger(body.watchers)) watchers = body.watchers;
      renderButton();
      renderList();
    }).catch((e) => say(`the links could not be listed: ${e.message}`));
  }

  function copyLink(field, button) {
    const done = () => {
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    };
    const fallback = () => {
      field.focus();
      field.select();
      if (document.execCommand && document.execCommand("copy")) done();
      else say("select the link and copy it (the browser did not let this page copy)");
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, fallback);
    } else fallback();
  }

  function createShare() {
    if (busy) return;
    busy = true;
    create.disabled = true;
    say("");
    api("", { method: "POST", body: JSON.stringify({ ttl: Number(lifetime.value) }) })
      .then((share) => {
        urls.set(share.id, new URL(share.url, location.href).href);
        return refresh();
      })
      .then(() => {
        const field = list.querySelector(".share-url");
        if (field) field.focus();
      })
      .catch((e) => say(`no link was made: ${e.message}`))
      .finally(() => {
        busy = false;
        create.disabled = false;
      });
  }

  function revokeShare(id, button) {
    button.disabled = true;
    api(`/${encodeURIComponent(id)}`, { method: "DELETE" })
      .then(() => {
        urls.delete(id);
        return refresh();
      })
      .catch((e) => {
        button.disabled = false;
        say(`the link was not revoked: ${e.message}`);
      });
  }

  function setOpen(open) {
    ui.shareMenu.hidden = !open;
    ui.shareButton.setAttribute("aria-expanded", String(open));
    clearInterval(refreshTimer);
    refreshTimer = null;
    if (open) {
      say("");
      refresh();
      refreshTimer = setInterval(refresh, REFRESH_MS);
    }
  }

  create.addEventListener("click", createShare);
  ui.shareButton.addEventListener("click", () => setOpen(ui.shareMenu.hidden));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !ui.shareMenu.hidden) {
      setOpen(false);
      ui.shareButton.focus();
    }
  });
  document.addEventListener("pointerdown", (event) => {
    if (!ui.shareMenu.hidden && !ui.shareMenu.contains(event.target) &&
        !ui.shareButton.contains(event.target)) setOpen(false);
  });

  // Offered while the session is live: the status bar's state says so.
  function follow() {
    const live = ui.status.dataset.state === "connected" && !status.gone;
    ui.shareButton.disabled = !live;
    if (!live) {
      if (!ui.shareMenu.hidden) setOpen(false);
      if (ui.status.dataset.state !== "reconnecting") {
        watchers = 0;
        urls.clear();
        renderButton();
      }
    }
  }
  new MutationObserver(follow).observe(ui.status, { attributes: true, attributeFilter: ["data-state"] });
  follow();
  renderButton();

  return {
    // The server's count of spectators (pushed over the owner's WebSocket).
    setWatchers(count) {
      watchers = Number.isSafeInteger(count) && count >= 0 ? count : 0;
      renderButton();
      if (!ui.shareMenu.hidden) refresh();
    },
  };
}
