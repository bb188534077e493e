// A search box over the terminal's scrollback (@xterm/addon-search): Ctrl+Shift+F (Cmd+F on
// macOS) opens it, Enter finds the next match upwards (older), Shift+Enter the previous
// (newer), Esc closes it and gives the keys back to the terminal.

// What the box says about the matches: "3 of 10", "no match", or "" with nothing to find.
export function resultText(index, count, query) {
  if (!query) return "";
  if (count === 0) return "no match";
  if (index < 0) return `${count} found`;
  return `${index + 1} of ${count}`;
}

const DECORATIONS = {
  matchBackground: "#3a3d1d",
  matchBorder: "#6e7681",
  matchOverviewRuler: "#d29922",
  activeMatchBackground: "#9e6a03",
  activeMatchBorder: "#d29922",
  activeMatchColorOverviewRuler: "#f0b72f",
};

// The search box, made in `doc` and shown over the terminal; `SearchAddon` is the addon's
// class. `focusTerminal()` gives the keys back.
export function createSearch(xterm, doc, SearchAddon, focusTerminal) {
  const addon = new SearchAddon({ highlightLimit: 1000 });
  xterm.loadAddon(addon);

  const box = doc.createElement("form");
  box.className = "search-box";
  box.hidden = true;
  box.setAttribute("role", "search");
  box.innerHTML = `<input type="search" aria-label="Search the scrollback" placeholder="search"
    autocomplete="off" spellcheck="false" enterkeyhint="search">
    <span class="search-count" aria-live="polite"></span>
    <button type="button" data-go="previous" title="Previous match, newer (Shift+Enter)">↓</button>
    <button type="button" data-go="next" title="Next match, older (Enter)">↑</button>
    <button type="button" data-go="close" title="Close (Esc)">×</button>`;
  doc.body.append(box);
  const input = box.querySelector("input");
  const count = box.querySelector(".search-count");

  addon.onDidChangeResults(({ resultIndex, resultCount }) => {
    count.textContent = resultText(resultIndex, resultCount, input.value);
    box.dataset.found = String(resultCount);
  });

  const options = (incremental) => ({ incremental, decorations: DECORATIONS });

  // Upwards through the scrollback, as a terminal's search usually goes.
  function find(direction, incremental = false) {
    const query = input.value;
    if (!query) {
      addon.clearDecorations();
      count.textContent = "";
      return false;
    }
    return direction === "next"
      ? addon.findPrevious(query, options(incremental))
      : addon.findNext(query, options(incremental));
  }

  function open() {
    box.hidden = false;
    const selected = xterm.getSelection();
    if (selected && !selected.includes("\n") && selected.length <= 200) input.value = selected;
    input.focus();
    input.select();
    if (input.value) find("next", true);
  }

  function close() {
    box.hidden = true;
    addon.clearDecorations();
    xterm.clearSelection();
    focusTerminal();
  }

  input.addEventListener("input", () => find("next", true));
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      find(event.shiftKey ? "previous" : "next");
    } else if (event.key === "Escape") {
      event.preventDefault();
      close();
    }
  });
  box.addEventListener("submit", (event) => event.preventDefault());
  box.addEventListener("click", (event) => {
    const go = event.target.closest("button")?.dataset.go;
    if (go === "close") close();
    else if (go) find(go);
  });

  return {
    open,
    close,
    get isOpen() {
      return !box.hidden;
    },
  };
}
