// Files in and out of the session's /workspace: uploads (the Upload button, or files and
// folders dropped on the page) packed as a tar, and the workspace exported as a .tar.gz.

import { pack } from "./tar.js";

// Files one upload may hold (a dropped folder is walked up to this many entries).
export const UPLOAD_MAX_ENTRIES = 10000;

export function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

// "2 files and 1 folder (1.5 KiB)" for what pack() gives.
export function describeUpload(packed) {
  const parts = [];
  if (packed.files > 0) parts.push(packed.files === 1 ? "1 file" : `${packed.files} files`);
  const folders = packed.directories;
  if (folders > 0) parts.push(folders === 1 ? "1 folder" : `${folders} folders`);
  return `${parts.join(" and ") || "nothing"} (${formatBytes(packed.bytes)})`;
}

// The sentence of capsule's JSON answer ({"error": ..., "code": ...}), or the status.
export function uploadError(status, text) {
  let message = null;
  try {
    const body = JSON.parse(text);
    message = typeof body.error === "string" ? body.error : body.message;
  } catch (e) {
    // not capsule's JSON
  }
  if (typeof message === "string" && message) return message.replace(/\s+/g, " ").slice(0, 300);
  return status === 413 ? "too large for capsule's upload limit" : `HTTP ${status}`;
}

// What an export's frame showed instead of downloading (null: nothing, capsule did not answer).
export function exportError(text) {
  if (text === null) return "export failed: capsule did not answer";
  try {
    const body = JSON.parse(text);
    const message = body.message || body.error;
    if (message) return message.startsWith("export failed") ? message : `export failed: ${message}`;
  } catch (e) {
    // not capsule's JSON
  }
  const brief = text.trim().replace(/\s+/g, " ").slice(0, 200);
  return brief ? `export failed: ${brief}` : "export failed";
}

// What was dropped, folders walked (FileSystemEntry, where the browser gives one). The entries
// must be taken from the DataTransfer during the drop event; they are read afterwards.
function droppedEntries(dataTransfer) {
  const items = Array.from(dataTransfer.items || []).filter((item) => item.kind === "file");
  const roots = items.map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  if (roots.length === 0 || roots.some((root) => !root)) {
    const files = Array.from(dataTransfer.files || []);
    return Promise.resolve(files.map((file) => ({ path: file.name, file })));
  }
  const out = [];
  return roots.reduce((done, root) => done.then(() => walkEntry(root, root.name, out)),
    Promise.resolve()).then(() => out);
}

function walkEntry(entry, path, out) {
  if (out.length >= UPLOAD_MAX_ENTRIES) {
    return Promise.reject(new Error(`more than ${UPLOAD_MAX_ENTRIES} files and folders`));
  }
  if (entry.isFile) {
    return new Promise((resolve, reject) => entry.file(resolve, reject))
      .then((file) => { out.push({ path, file }); });
  }
  if (!entry.isDirectory) return Promise.resolve();
  const reader = entry.createReader();
  const children = [];
  // readEntries answers in batches; an empty batch is the end.
  const readAll = () => new Promise((resolve, reject) => reader.readEntries(resolve, reject))
    .then((batch) => {
      if (batch.length === 0) return null;
      children.push(...batch);
      if (children.length > UPLOAD_MAX_ENTRIES) {
        throw new Error(`more than ${UPLOAD_MAX_ENTRIES} files and folders`);
      }
      return readAll();
    });
  return readAll().then(() => {
    out.push({ path, directory: true });
    return children.reduce((done, child) => done.then(() => walkEntry(child, `${path}/${child.name}`, out)),
      Promise.resolve());
  });
}

function carriesFiles(event) {
  return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
}

// The page's uploads and exports. `status`: the status bar; `sessionId()`: the session's id
// (null: none); `checkLogin()`: after a 401; `focus()`: back to the terminal; `worked()`: files
// go into the session (its work, lost if it ends).
export function setupTransfer(ui, { status, sessionId, checkLogin, focus, worked = () => {} }) {
  // Sends entries ([{path, file} | {path, directory: true}]) to the session's /workspace as
  // a tar.
  function upload(entries) {
    if (status.uploading) {
      status.error("an upload is already under way");
      return;
    }
    if (status.gone) {
      status.error(status.whyNoUpload);
      return;
    }
    if (entries.length === 0) {
      status.error("upload: nothing to upload");
      return;
    }
    let packed;
    try {
      packed = pack(entries);
    } catch (e) {
      status.error(`upload failed: ${e.message}`);
      return;
    }
    const what = describeUpload(packed);
    const id = sessionId();
    status.setUploading(true);
    worked();
    status.notice(`uploading ${what}\u2026`);
    // XMLHttpRequest, as fetch does not report an upload's progress. It carries the page's
    // Origin (index.html's referrer policy is same-origin: see there) and the login cookie.
    const request = new XMLHttpRequest();
    request.open("POST", `api/sessions/${encodeURIComponent(id)}/workspace`);
    request.setRequestHeader("Content-Type", "application/x-tar");
    request.setRequestHeader("Accept", "application/json");
    let shown = -1;
    request.upload.onprogress = (event) => {
      if (!event.lengthComputable || event.total <= 0) return;
      const percent = Math.floor((event.loaded * 100) / event.total);
      if (percent === shown) return;
      shown = percent;
      status.notice(`uploading ${what}: ${percent}%`);
    };
    request.onload = () => {
      if (request.status >= 200 && request.status < 300) {
        status.notice(`uploaded ${what} to /workspace`);
        return;
      }
      if (request.status === 401) checkLogin();
      status.error(`upload failed: ${uploadError(request.status, request.responseText)}`);
    };
    request.onerror = () => status.error("upload failed: capsule did not answer");
    request.onloadend = () => status.setUploading(false);
    request.send(packed.blob);
  }

  ui.uploadButton.addEventListener("click", () => {
    if (!ui.uploadButton.disabled) ui.uploadInput.click();
  });

  ui.uploadInput.addEventListener("change", () => {
    const files = Array.from(ui.uploadInput.files || []);
    ui.uploadInput.value = "";
    focus();
    // A folder picked (where a browser offers it) keeps its paths.
    if (files.length > 0) upload(files.map((file) => ({ path: file.webkitRelativePath || file.name, file })));
  });

  let dropHideTimer = null;
  function showDropZone() {
    ui.dropZone.hidden = false;
    clearTimeout(dropHideTimer);
    // dragover repeats while the pointer is over the page: its end hides the zone.
    dropHideTimer = setTimeout(() => { ui.dropZone.hidden = true; }, 300);
  }

  // Files dropped anywhere on the page go to /workspace (and never replace the page).
  window.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    const refused = status.gone || status.uploading;
    event.dataTransfer.dropEffect = refused ? "none" : "copy";
    if (!refused) showDropZone();
  });

  window.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    clearTimeout(dropHideTimer);
    ui.dropZone.hidden = true;
    droppedEntries(event.dataTransfer).then(upload, (e) => {
      status.error(`upload failed: ${e && e.message ? e.message : "the dropped files could not be read"}`);
    });
    focus();
  });

  function startExport(id) {
    downloadInFrame(`api/export/${encodeURIComponent(id)}`, (message) => status.error(message));
  }

  ui.exportButton.addEventListener("click", () => {
    const id = sessionId();
    if (!id || ui.exportButton.disabled) return;
    startExport(id);
    focus();
  });
}

// A download through a hidden frame, so that the browser streams it to disk however large it
// is: a download leaves the frame empty; a document in it is the server's error, told to
// `onError(message)`.
export function downloadInFrame(url, onError, doc = document) {
  const frame = doc.createElement("iframe");
  frame.hidden = true;
  frame.tabIndex = -1;
  frame.title = "workspace export";
  frame.setAttribute("aria-hidden", "true");
  frame.addEventListener("load", () => {
    let text;
    try {
      const inner = frame.contentDocument;
      if (inner && inner.URL === "about:blank") return;
      text = inner ? (inner.querySelector("pre") || inner.body || inner.documentElement).textContent
        : null;
    } catch (e) {
      text = null; // the browser's own error page: capsule did not answer
    }
    frame.remove();
    onError(exportError(text));
  });
  frame.src = url;
  doc.body.appendChild(frame);
}
