// Attention: while the tab is hidden, the terminal's bell, or live output that stopped
// WAIT_QUIET_MS ago (the agent, or the shell, waits for its user), changes the title and, when
// the user turned notifications on, shows one. Both are undone when the tab is seen again.

export const WAIT_QUIET_MS = 10000;
const NOTIFY_KEY = "capsule.notify";
const WAITING_TITLE = "\u25cf capsule \u2014 your agent is waiting";

// The notify button's title for a permission and the user's choice.
export function notifyTitle(permission, on) {
  if (permission === "denied") {
    return "Notifications are blocked for this site (the browser's site settings allow them)";
  }
  return on ? "Notify me when the agent is waiting: on" : "Notify me when the agent is waiting: off";
}

// `button`: the notify button; `status`: the status bar; `sessionId()`: the session's id;
// `active()`: whether the page still cares (not leaving); `focus()`: back to the terminal.
export function createAttention({ button, status, sessionId, active, focus }) {
  // The title to come back to: the page's own (it names the session's profile once connected).
  let baseTitle = document.title;
  let waitTimer = null;
  let notification = null;
  let choice = notifyWanted();

  function notifyWanted() {
    try {
      return localStorage.getItem(NOTIFY_KEY) === "on";
    } catch (e) {
      return false;
    }
  }

  function setNotifyWanted(on) {
    try {
      localStorage.setItem(NOTIFY_KEY, on ? "on" : "off");
    } catch (e) {
      // Storage disabled: the choice lasts as long as the page.
    }
    choice = on;
    render();
  }

  function notificationsOn() {
    return choice && "Notification" in window && Notification.permission === "granted";
  }

  function render() {
    if (!("Notification" in window)) {
      button.hidden = true;
      return;
    }
    const on = notificationsOn();
    button.dataset.on = on ? "true" : "false";
    button.setAttribute("aria-pressed", on ? "true" : "false");
    button.title = notifyTitle(Notification.permission, on);
  }

  function attention(reason) {
    if (!document.hidden || !active()) return;
    if (document.title !== WAITING_TITLE) baseTitle = document.title;
    document.title = WAITING_TITLE;
    if (!notificationsOn()) return;
    try {
      if (notification) notification.close();
      const id = sessionId();
      const shown = new Notification("your agent is waiting", {
        body: `capsule ${id ? id.slice(0, 8) : ""}: ${reason}`,
        tag: "capsule-waiting",
        icon: "favicon.svg",
      });
      shown.onclick = () => {
        window.focus();
        shown.close();
      };
      notification = shown;
    } catch (e) {
      console.warn("capsule: a notification could not be shown", e);
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) return;
    clearTimeout(waitTimer);
    waitTimer = null;
    if (document.title === WAITING_TITLE) document.title = baseTitle;
    if (notification) {
      notification.close();
      notification = null;
    }
  });

  // Permission is asked for here only: on the user's click.
  button.addEventListener("click", () => {
    focus();
    if (notificationsOn()) {
      setNotifyWanted(false);
      status.notice("notifications off");
      return;
    }
    if (Notification.permission === "denied") {
      status.error("notifications are blocked for this site in the browser's settings");
      render();
      return;
    }
    const asked = Notification.permission === "granted"
      ? Promise.resolve("granted")
      : Notification.requestPermission();
    Promise.resolve(asked).then((permission) => {
      if (permission === "granted") {
        setNotifyWanted(true);
        status.notice("notifications on: you are told when the agent is waiting");
      } else {
        render();
        status.error("notifications were not allowed");
      }
    }).catch(() => status.error("notifications could not be turned on"));
  });

  render();

  return {
    // Live output came: while the tab is hidden, its stopping is news.
    liveOutput() {
      if (!document.hidden) return;
      clearTimeout(waitTimer);
      waitTimer = setTimeout(() => {
        waitTimer = null;
        attention("its output stopped " + WAIT_QUIET_MS / 1000 + " s ago");
      }, WAIT_QUIET_MS);
    },
    // Output that stops because the connection did is no agent waiting.
    connectionGone() {
      clearTimeout(waitTimer);
      waitTimer = null;
    },
    bell() {
      attention("the terminal rang its bell");
    },
  };
}
