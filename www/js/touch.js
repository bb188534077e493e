// Scrolling by touch: xterm.js 6 reacts to the mouse wheel and its scroll bar only. A finger
// drawn up or down the terminal scrolls the scrollback a row per row of movement; in the
// alternate screen (vim, less, top: no scrollback), it goes to the program: arrow keys, or,
// when the program asked for the mouse, wheel events that xterm reports to it.
// A tap (no movement) stays a tap: it focuses the terminal and opens the on-screen keyboard.

import { keyBytes, swipeLines } from "./keys.js";

const MOVED_PX = 8; // movement under this is still a tap

// `send(data)` sends input to the session.
export function setupTouchScroll(xterm, send) {
  const element = xterm.element;
  const screen = element.querySelector(".xterm-screen") || element;
  let lastY = null;
  let startY = null;
  let rest = 0;
  let scrolling = false;

  const rowHeight = () => screen.clientHeight / xterm.rows;

  function scroll(lines) {
    if (xterm.buffer.active.type === "normal") {
      xterm.scrollLines(lines);
      return;
    }
    if (xterm.modes.mouseTrackingMode === "none") {
      // What xterm does with the wheel there: arrow keys, a line each.
      const key = keyBytes(lines < 0 ? "up" : "down", { appCursor: xterm.modes.applicationCursorKeysMode });
      send(key.repeat(Math.abs(lines)));
      return;
    }
    const rect = screen.getBoundingClientRect();
    screen.dispatchEvent(new WheelEvent("wheel", {
      deltaY: lines,
      deltaMode: WheelEvent.DOM_DELTA_LINE,
      clientX: rect.left + rect.width / 2,
      clientY: rect.top + rect.height / 2,
      bubbles: true,
      cancelable: true,
    }));
  }

  element.addEventListener("touchstart", (event) => {
    if (event.touches.length !== 1) {
      lastY = null;
      return;
    }
    lastY = startY = event.touches[0].clientY;
    rest = 0;
    scrolling = false;
  }, { passive: true });

  element.addEventListener("touchmove", (event) => {
    if (lastY === null || event.touches.length !== 1) return;
    const y = event.touches[0].clientY;
    if (!scrolling && Math.abs(y - startY) < MOVED_PX) return;
    scrolling = true;
    // The page itself does not move (no pull-to-refresh, no rubber band).
    if (event.cancelable) event.preventDefault();
    const { lines, rest: left } = swipeLines(rest + y - lastY, rowHeight());
    rest = left;
    lastY = y;
    if (lines !== 0) scroll(lines);
  }, { passive: false });

  const end = () => {
    lastY = null;
  };
  element.addEventListener("touchend", end, { passive: true });
  element.addEventListener("touchcancel", end, { passive: true });
}
