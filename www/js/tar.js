// capsule's tar writer: files and directories as a POSIX (ustar, with pax headers where ustar
// cannot say it) archive, built as a Blob whose parts are the Files themselves, so the browser
// streams them from disk when the Blob is sent and nothing is read into memory here.
// A module: pack(entries) -> { blob, files, directories, bytes }.

const BLOCK = 512;
// ustar's size and mtime fields hold 11 octal digits.
const OCTAL11_MAX = 0o77777777777;
const encoder = new TextEncoder();

// "a//b/./c" -> "a/b/c"; an absolute path is made relative. ".." is refused: an archive from
// this page never reaches outside the directory it is unpacked in.
export function cleanPath(path) {
  const parts = [];
  for (const part of String(path).split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") throw new Error(`a name may not contain "..": ${path}`);
    if (part.includes("\0")) throw new Error("a name may not contain a NUL character");
    parts.push(part);
  }
  if (parts.length === 0) throw new Error(`not a file name: ${JSON.stringify(String(path))}`);
  return parts.join("/");
}

function isAscii(text) {
  return /^[\x20-\x7e]*$/.test(text);
}

// ustar keeps a name of up to 255 bytes as prefix (155) "/" name (100), split at a slash.
function splitName(bytes) {
  if (bytes.length <= 100) return { prefix: new Uint8Array(0), name: bytes };
  for (let i = Math.min(bytes.length - 2, 155); i > 0; i--) {
    if (bytes[i] === 0x2f && bytes.length - i - 1 <= 100) {
      return { prefix: bytes.subarray(0, i), name: bytes.subarray(i + 1) };
    }
  }
  return null;
}

function putBytes(block, offset, length, bytes) {
  block.set(bytes.subarray(0, length), offset);
}

function putOctal(block, offset, length, value) {
  const digits = Math.floor(value).toString(8).padStart(length - 1, "0");
  putBytes(block, offset, length, encoder.encode(digits));
}

function header({ name, prefix, mode, size, mtime, type }) {
  const block = new Uint8Array(BLOCK);
  putBytes(block, 0, 100, name);
  putOctal(block, 100, 8, mode);
  putOctal(block, 108, 8, 0); // uid
  putOctal(block, 116, 8, 0); // gid
  putOctal(block, 124, 12, size);
  putOctal(block, 136, 12, mtime);
  block.fill(0x20, 148, 156); // the checksum counts its own field as spaces
  block[156] = type.charCodeAt(0);
  putBytes(block, 257, 6, encoder.encode("ustar\0"));
  putBytes(block, 263, 2, encoder.encode("00"));
  putBytes(block, 345, 155, prefix);
  let sum = 0;
  for (const byte of block) sum += byte;
  putBytes(block, 148, 8, encoder.encode(sum.toString(8).padStart(6, "0") + "\0 "));
  return block;
}

// A pax record: "LEN key=value\n", LEN counting the whole record, its own digits included.
function paxRecord(key, value) {
  const body = encoder.encode(` ${key}=${value}\n`);
  let length = body.length + 1;
  while (String(length).length + body.length > length) length += 1;
  return encoder.encode(String(length) + ` ${key}=${value}\n`);
}

function padding(size) {
  const rest = size % BLOCK;
  return rest === 0 ? null : new Uint8Array(BLOCK - rest);
}

// The blocks of one entry: a pax header first when ustar cannot hold its name or size.
function entryParts(path, type, mode, size, mtime) {
  const full = type === "5" ? path + "/" : path;
  const bytes = encoder.encode(full);
  const split = isAscii(full) ? splitName(bytes) : null;
  const records = [];
  if (split === null) records.push(paxRecord("path", full));
  if (size > OCTAL11_MAX) records.push(paxRecord("size", String(size)));
  const parts = [];
  if (records.length > 0) {
    const length = records.reduce((n, r) => n + r.length, 0);
    const data = new Uint8Array(length);
    let at = 0;
    for (const record of records) {
      data.set(record, at);
      at += record.length;
    }
    parts.push(header({
      name: encoder.encode("PaxHeader/" + full.replace(/[^\x20-\x7e]/g, "_").slice(-80)),
      prefix: new Uint8Array(0), mode: 0o644, size: length, mtime, type: "x",
    }), data);
    const pad = padding(length);
    if (pad) parts.push(pad);
  }
  // What a reader without pax support sees: a name that fits, made of ASCII.
  const fallback = split || {
    prefix: new Uint8Array(0),
    name: encoder.encode(full.replace(/[^\x20-\x7e]/g, "_").slice(-100)),
  };
  parts.push(header({
    name: fallback.name, prefix: fallback.prefix, mode,
    size: size > OCTAL11_MAX ? 0 : size, mtime, type,
  }));
  return parts;
}

// entries: [{ path: "dir/name.txt", file: File }, { path: "empty-dir", directory: true }].
// Each file's parent directories are added before it, once, and in the order first named.
// Returns { blob, files, directories, bytes } (bytes: the files' total size).
export function pack(entries) {
  const parts = [];
  const seen = new Set();
  let files = 0;
  let directories = 0;
  let bytes = 0;
  const now = Math.floor(Date.now() / 1000);

  function addDirectory(path) {
    if (seen.has(path)) return;
    seen.add(path);
    directories += 1;
    parts.push(...entryParts(path, "5", 0o755, 0, now));
  }

  function addParents(path) {
    const names = path.split("/");
    for (let i = 1; i < names.length; i++) addDirectory(names.slice(0, i).join("/"));
  }

  for (const entry of entries) {
    const path = cleanPath(entry.path);
    addParents(path);
    if (entry.directory) {
      addDirectory(path);
      continue;
    }
    if (seen.has(path)) throw new Error(`${path} is named twice`);
    seen.add(path);
    const file = entry.file;
    const mtime = Number.isFinite(file.lastModified) ? Math.floor(file.lastModified / 1000) : now;
    parts.push(...entryParts(path, "0", 0o644, file.size, Math.max(0, mtime)), file);
    const pad = padding(file.size);
    if (pad) parts.push(pad);
    files += 1;
    bytes += file.size;
  }
  parts.push(new Uint8Array(2 * BLOCK)); // the end of the archive
  return { blob: new Blob(parts, { type: "application/x-tar" }), files, directories, bytes };
}
