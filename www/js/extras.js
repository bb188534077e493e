// What the first prompt does not need, loaded by app.js once the page is idle after it: the
// key bar (js/keybar.js), scrolling by touch (js/touch.js), the clipboard and its shortcuts
// (js/clipboard.js, js/keys.js), the search box (js/search.js, @xterm/addon-search), the
// WebGL renderer (js/render.js, @xterm/addon-webgl) and the options menu that switches them.

import { createNotice, setupClipboard } from "./clipboard.js";
import { createKeyBar } from "./keybar.js";
import { isMac, shortcut } from "./keys.js";
import { createRenderer } from "./render.js";
import { createSearch } from "./search.js";
import { setupTouchScroll } from "./touch.js";

// The addons' scripts: index.html names them in <meta name="capsule-addon"> so that capsule
// versions their URLs (cached for good); the plain path else.
function addonUrl(doc, name) {
  const meta = doc.querySelector(`meta[name="capsule-addon"][content*="/${name}.js"]`);
  return meta ? meta.content : `node_modules/@xterm/${name}/lib/${name}.js`;
}

// A UMD script of node_modules, loaded once: resolves to its global (null if it failed).
function loadScript(doc, name, global) {
  if (window[global]) return Promise.resolve(window[global]);
  return new Promise((resolve) => {
    const script = doc.createElement("script");
    script.src = addonUrl(doc, name);
    script.onload = () => resolve(window[global] || null);
    script.onerror = () => resolve(null);
    doc.head.append(script);
  });
}

// A spectator's page has no key bar: it types nothing.
const NO_KEY_BAR = Object.freeze({ shown: false, input: (data) => data });

// `term`: the page's terminal (js/terminal.js); `send(data)`: input for the session, as is;
// `refit()`: fit the terminal again and tell the session; `readOnly`: a spectator's page (no
// key bar, no pastes, and programs in the session do not write its clipboard). Returns
// `input(data)`, the filter all of the terminal's input goes through (the key bar's sticky
// Ctrl).
export function setupExtras(term, { send, refit, readOnly = false, win = window }) {
  const doc = win.document;
  const xterm = term.xterm;
  const focus = () => term.focus();
  const notice = createNotice(doc, focus);
  const clipboard = setupClipboard(term, win, notice, { programs: !readOnly });
  const keybar = readOnly ? NO_KEY_BAR
    : createKeyBar(term, win, { send, paste: () => clipboard.paste(), refit });
  setupTouchScroll(xterm, readOnly ? () => {} : send);
  const mac = isMac(win.navigator.userAgentData?.platform || win.navigator.platform);

  let search = null;
  const searchReady = loadScript(doc, "addon-search", "SearchAddon").then((module) => {
    if (module) search = createSearch(xterm, doc, module.SearchAddon, focus);
    return search;
  });
  const openSearch = () => searchReady.then((box) => box && box.open());

  const renderer = loadScript(doc, "addon-webgl", "WebglAddon").then(
    (module) => createRenderer(xterm, xterm.element.parentElement, module && module.WebglAddon, win));

  // The platform's shortcuts (js/keys.js): copy, paste (the browser's own paste, which xterm
  // takes), search. Everything else is the terminal's.
  xterm.attachCustomKeyEventHandler((event) => {
    const action = shortcut(event, { mac, selection: xterm.hasSelection() });
    if (!action || (readOnly && action === "paste")) return true;
    if (event.type === "keydown") {
      if (action === "copy") {
        event.preventDefault();
        clipboard.copySelection();
        // After Ctrl+C copied, the next Ctrl+C is ^C again (as in Windows Terminal).
        if (!mac && event.ctrlKey && !event.shiftKey && event.key.toLowerCase() === "c") {
          xterm.clearSelection();
        }
      } else if (action === "search") {
        event.preventDefault();
        openSearch();
      }
      // paste: the browser's paste event follows the key, and xterm pastes it.
    }
    return false;
  });

  createMenu(doc, { keybar, clipboard, openSearch, renderer, readOnly });

  return {
    input: (data) => keybar.input(data),
    search: openSearch,
    renderer,
  };
}

// The options menu: a button at the end of the bar and its panel.
function createMenu(doc, { keybar, clipboard, openSearch, renderer, readOnly }) {
  const bar = doc.querySelector("header.bar");
  if (!bar) return;
  const button = doc.createElement("button");
  button.type = "button";
  button.id = "options";
  button.className = "icon";
  button.title = "Options";
  button.setAttribute("aria-label", "Options");
  button.setAttribute("aria-expanded", "false");
  button.textContent = "⋯";
  bar.append(button);

  const panel = doc.createElement("div");
  panel.className = "options";
  panel.id = "options-panel";
  panel.hidden = true;
  panel.innerHTML = `<button type="button" data-do="search">Search the scrollback</button>
    <label><input type="checkbox" data-option="copyOnSelect"> Copy on selection</label>
    <label><input type="checkbox" data-option="keybar"> Key bar</label>
    <label>Renderer <select data-option="renderer">
      <option value="auto">auto</option><option value="webgl">WebGL</option><option value="dom">DOM</option>
    </select> <span class="renderer-now"></span></label>`;
  doc.body.append(panel);
  const copyBox = panel.querySelector('[data-option="copyOnSelect"]');
  const keyBox = panel.querySelector('[data-option="keybar"]');
  if (readOnly) keyBox.closest("label").hidden = true;
  const rendererBox = panel.querySelector('[data-option="renderer"]');
  const rendererNow = panel.querySelector(".renderer-now");
  const showRenderer = (r) => {
    rendererBox.value = r.choice;
    rendererNow.textContent = `(drawing: ${r.name === "webgl" ? "WebGL" : "DOM"})`;
  };
  renderer.then((r) => {
    showRenderer(r);
    rendererBox.addEventListener("change", () => {
      r.use(rendererBox.value);
      showRenderer(r);
    });
  });

  function toggle(open) {
    panel.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    copyBox.checked = clipboard.copyOnSelect;
    keyBox.checked = keybar.shown;
    if (open) renderer.then(showRenderer);
  }

  button.addEventListener("click", () => toggle(panel.hidden));
  copyBox.addEventListener("change", () => {
    clipboard.copyOnSelect = copyBox.checked;
  });
  keyBox.addEventListener("change", () => {
    if (!readOnly) keybar.shown = keyBox.checked;
  });
  panel.querySelector('[data-do="search"]').addEventListener("click", () => {
    toggle(false);
    openSearch();
  });
  doc.addEventListener("pointerdown", (event) => {
    if (!panel.hidden && !panel.contains(event.target) && event.target !== button) toggle(false);
  });
  doc.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) toggle(false);
  });
}
