// The renderer: xterm.js's WebGL renderer (@xterm/addon-webgl) where the browser has WebGL2
// on a GPU, else xterm's own DOM renderer. When the WebGL context is lost (a GPU reset, too
// many contexts), the WebGL renderer is dropped and the DOM renderer draws again by itself.
// A software WebGL (SwiftShader, llvmpipe: a browser without a usable GPU) is slower than the
// DOM renderer, so "auto" leaves it alone; the options menu can ask for WebGL or the DOM
// (kept in localStorage). The element's data-renderer says which one draws ("webgl", "dom").

export const RENDERER_KEY = "capsule.renderer";
export const RENDERER_CHOICES = Object.freeze(["auto", "webgl", "dom"]);

// Whether a WebGL renderer's name is a software one.
export function softwareRenderer(name) {
  return /swiftshader|llvmpipe|softpipe|software|basic render/i.test(name || "");
}

// The renderer to use for a choice ("auto", "webgl", "dom") and what the browser has
// (`webgl`: a WebGL2 context, or null; `software`: its renderer is software).
export function pickRenderer(choice, { webgl, software }) {
  if (!webgl || choice === "dom") return "dom";
  if (choice === "webgl") return "webgl";
  return software ? "dom" : "webgl";
}

export function savedChoice(storage) {
  try {
    const choice = storage.getItem(RENDERER_KEY);
    return RENDERER_CHOICES.includes(choice) ? choice : "auto";
  } catch (e) {
    return "auto";
  }
}

// What WebGL2 the browser gives: { webgl, software, name }.
export function probeWebgl(doc) {
  try {
    const canvas = doc.createElement("canvas");
    const context = canvas.getContext("webgl2");
    if (!context) return { webgl: false, software: false, name: "" };
    const info = context.getExtension("WEBGL_debug_renderer_info");
    const name = String(context.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : context.RENDERER) || "");
    context.getExtension("WEBGL_lose_context")?.loseContext();
    return { webgl: true, software: softwareRenderer(name), name };
  } catch (e) {
    return { webgl: false, software: false, name: "" };
  }
}

// The renderer of `xterm` (drawn in `element`); `WebglAddon` is the addon's class (null when
// its script did not load). `use(choice)` switches; `name` is the renderer drawing.
export function createRenderer(xterm, element, WebglAddon, win) {
  const probe = probeWebgl(win.document);
  let addon = null;
  let choice = savedChoice(win.localStorage);

  function drop() {
    const old = addon;
    addon = null;
    element.dataset.renderer = "dom";
    if (old) {
      try {
        old.dispose(); // xterm's DOM renderer takes over
      } catch (e) {
        // already gone with its context
      }
    }
  }

  function apply() {
    const want = WebglAddon ? pickRenderer(choice, probe) : "dom";
    if (want === "dom") {
      drop();
      return;
    }
    if (addon) return;
    try {
      const made = new WebglAddon();
      made.onContextLoss(() => {
        if (addon !== made) return;
        element.dataset.rendererLost = "true";
        drop();
      });
      xterm.loadAddon(made);
      addon = made;
      element.dataset.renderer = "webgl";
    } catch (e) {
      drop();
    }
  }

  apply();
  return {
    get name() {
      return addon ? "webgl" : "dom";
    },
    get choice() {
      return choice;
    },
    get probe() {
      return probe;
    },
    use(next) {
      choice = RENDERER_CHOICES.includes(next) ? next : "auto";
      try {
        if (choice === "auto") win.localStorage.removeItem(RENDERER_KEY);
        else win.localStorage.setItem(RENDERER_KEY, choice);
      } catch (e) {
        // kept for this page only
      }
      apply();
    },
  };
}
