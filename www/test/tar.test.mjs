// The upload's tar writer (js/tar.js): archives read back block by block here, and by
// Python's tarfile where python3 is on the machine.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { test } from "node:test";

import { cleanPath, pack } from "../js/tar.js";

const MTIME = 1_700_000_000;

function file(text, lastModified = MTIME * 1000) {
  return Object.assign(new Blob([text]), { lastModified });
}

function field(block, offset, length) {
  const bytes = block.subarray(offset, offset + length);
  const end = bytes.indexOf(0);
  return new TextDecoder().decode(end === -1 ? bytes : bytes.subarray(0, end));
}

function octal(block, offset, length) {
  return parseInt(field(block, offset, length).trim(), 8);
}

// The archive's members: { name, type, mode, size, mtime, data, pax }, pax headers applied.
async function read(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  assert.equal(bytes.length % 512, 0, "whole blocks");
  const members = [];
  let pax = null;
  let at = 0;
  for (;;) {
    const block = bytes.subarray(at, at + 512);
    assert.equal(block.length, 512, "the end of the archive is two empty blocks");
    if (block.every((b) => b === 0)) {
      assert.ok(bytes.subarray(at + 512, at + 1024).every((b) => b === 0));
      assert.equal(at + 1024, bytes.length);
      return members;
    }
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i];
    assert.equal(octal(block, 148, 8), sum, "checksum");
    assert.equal(field(block, 257, 6), "ustar");
    assert.equal(field(block, 263, 2), "00");
    const prefix = field(block, 345, 155);
    const name = (prefix ? prefix + "/" : "") + field(block, 0, 100);
    const size = octal(block, 124, 12);
    const type = String.fromCharCode(block[156]);
    const data = bytes.subarray(at + 512, at + 512 + size);
    at += 512 + Math.ceil(size / 512) * 512;
    if (type === "x") {
      // Records "LEN key=value\n", LEN in bytes.
      pax = {};
      for (let i = 0; i < data.length;) {
        const space = data.indexOf(0x20, i);
        const length = Number(new TextDecoder().decode(data.subarray(i, space)));
        assert.equal(data[i + length - 1], 0x0a);
        const record = new TextDecoder().decode(data.subarray(space + 1, i + length - 1));
        const eq = record.indexOf("=");
        pax[record.slice(0, eq)] = record.slice(eq + 1);
        i += length;
      }
      continue;
    }
    members.push({
      name: pax && pax.path ? pax.path : name,
      fallback: name,
      type,
      mode: octal(block, 100, 8),
      size: pax && pax.size ? Number(pax.size) : size,
      mtime: octal(block, 136, 12),
      data: new TextDecoder().decode(data),
    });
    pax = null;
  }
}

test("files and their parent folders, each folder once and first", async () => {
  const packed = pack([
    { path: "src/app/main.py", file: file("print('hi')\n") },
    { path: "src/app/util.py", file: file("") },
    { path: "README", file: file("read me") },
    { path: "empty", directory: true },
  ]);
  assert.deepEqual([packed.files, packed.directories, packed.bytes], [3, 3, 19]);
  assert.equal(packed.blob.type, "application/x-tar");
  const members = await read(packed.blob);
  assert.deepEqual(members.map((m) => [m.name, m.type, m.mode, m.size]), [
    ["src/", "5", 0o755, 0],
    ["src/app/", "5", 0o755, 0],
    ["src/app/main.py", "0", 0o644, 12],
    ["src/app/util.py", "0", 0o644, 0],
    ["README", "0", 0o644, 7],
    ["empty/", "5", 0o755, 0],
  ]);
  assert.equal(members[2].data, "print('hi')\n");
  assert.equal(members[2].mtime, MTIME);
  assert.equal(members[4].data, "read me");
});

test("names are cleaned, and nothing reaches outside the folder", () => {
  assert.equal(cleanPath("a//b/./c"), "a/b/c");
  assert.equal(cleanPath("/etc/passwd"), "etc/passwd");
  assert.throws(() => cleanPath("a/../../b"), /may not contain "\.\."/);
  assert.throws(() => cleanPath("a\0b"), /NUL/);
  assert.throws(() => cleanPath("./"), /not a file name/);
  assert.throws(() => pack([{ path: "../x", file: file("x") }]), /\.\./);
  assert.throws(() => pack([{ path: "x", file: file("1") }, { path: "./x", file: file("2") }]),
    /x is named twice/);
});

test("long names: a ustar prefix, then a pax header", async () => {
  const folder = "d".repeat(120);
  const split = `${folder}/${"f".repeat(90)}`;
  const long = `${"e".repeat(200)}/${"g".repeat(150)}`;
  const members = await read(pack([
    { path: split, file: file("1") },
    { path: long, file: file("2") },
  ]).blob);
  const byName = Object.fromEntries(members.map((m) => [m.name, m]));
  assert.equal(byName[split].fallback, split);
  assert.equal(byName[split].data, "1");
  assert.equal(byName[long].data, "2");
  // A reader without pax support still gets a name that fits.
  assert.ok(byName[long].fallback.length <= 100);
});

test("names that are not ASCII go in a pax header", async () => {
  const name = "donn\u00e9es/\u65e5\u672c.txt";
  const members = await read(pack([{ path: name, file: file("x") }]).blob);
  assert.deepEqual(members.map((m) => m.name), ["donn\u00e9es/", name]);
  assert.match(members[1].fallback, /^[\x20-\x7e]+$/);
});

test("a file without a modification time gets the time of packing", async () => {
  const before = Math.floor(Date.now() / 1000);
  const members = await read(pack([{ path: "x", file: new Blob(["x"]) }]).blob);
  assert.ok(members[0].mtime >= before && members[0].mtime <= before + 5);
});

test("Python's tarfile reads the archive", { skip: !hasPython() && "no python3" }, async () => {
  const packed = pack([
    { path: "a/b.txt", file: file("hello") },
    { path: `${"n".repeat(130)}/\u00e9.txt`, file: file("pax") },
    { path: "c", directory: true },
  ]);
  const bytes = Buffer.from(await packed.blob.arrayBuffer());
  const script = "import sys, tarfile, io, json\n"
    + "t = tarfile.open(fileobj=io.BytesIO(sys.stdin.buffer.read()))\n"
    + "print(json.dumps([[m.name, m.type.decode(), m.size,"
    + " t.extractfile(m).read().decode() if m.isfile() else None] for m in t]))\n";
  const run = spawnSync("python3", ["-c", script], { input: bytes });
  assert.equal(run.status, 0, String(run.stderr));
  assert.deepEqual(JSON.parse(String(run.stdout)), [
    ["a", "5", 0, null],
    ["a/b.txt", "0", 5, "hello"],
    ["n".repeat(130), "5", 0, null],
    [`${"n".repeat(130)}/\u00e9.txt`, "0", 3, "pax"],
    ["c", "5", 0, null],
  ]);
});

function hasPython() {
  return spawnSync("python3", ["--version"]).status === 0;
}
