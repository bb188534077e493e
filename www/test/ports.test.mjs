import assert from "node:assert/strict";
import { test } from "node:test";

import {
  MAX_PORTS, announceText, canSharePorts, openText, portChanges, readPorts, shownPorts,
} from "../js/portlist.js";

const BASE = "https://capsule.example/";
const SID = "0b1c2d3e-0000-4000-8000-000000000000";

test("a ports frame is read into absolute links, ascending", () => {
  const frame = { type: "ports", more: 0, ports: [
    { port: 8080, url: `/preview/${SID}/8080/`, public: false },
    { port: 3000, url: `https://3000-${SID}.preview.example/`, public: true },
  ] };
  assert.deepEqual(readPorts(frame, BASE), { more: 0, ports: [
    { port: 3000, url: `https://3000-${SID}.preview.example/`, public: true },
    { port: 8080, url: `https://capsule.example/preview/${SID}/8080/`, public: false },
  ] });
});

test("what is not a port, or not a web address, is left out", () => {
  const frame = { ports: [
    { port: 0, url: "/a/" }, { port: 70000, url: "/b/" }, { port: "3000", url: "/c/" },
    { port: 3.5, url: "/d/" }, null, "x", { port: 22, url: "javascript:alert(1)" },
    { port: 23, url: "data:text/html,x" }, { port: 24 }, { port: 25, url: "/e/" },
    { port: 25, url: "/f/" },
  ], more: -3 };
  assert.deepEqual(readPorts(frame, BASE), { more: 0, ports: [
    { port: 25, url: "https://capsule.example/e/", public: false }] });
  assert.deepEqual(readPorts(null, BASE), { ports: [], more: 0 });
  assert.deepEqual(readPorts({ ports: "3000" }, BASE), { ports: [], more: 0 });
  const many = { ports: Array.from({ length: 500 }, (_, i) => ({ port: i + 1, url: "/p/" })) };
  assert.equal(readPorts(many, BASE).ports.length, MAX_PORTS);
});

test("what opened and what closed", () => {
  const list = (...ports) => ports.map((port) => ({ port }));
  assert.deepEqual(portChanges(list(), list(3000)), { opened: [3000], closed: [] });
  assert.deepEqual(portChanges(list(3000, 5173), list(5173, 8080)),
    { opened: [8080], closed: [3000] });
  assert.deepEqual(portChanges(list(3000), list(3000)), { opened: [], closed: [] });
});

test("the notice's words", () => {
  assert.equal(openText(3000), "port 3000 is open");
  assert.equal(announceText([]), "");
  assert.equal(announceText([3000]), "port 3000 is open");
  assert.equal(announceText([3000, 5173, 8080]), "ports 3000, 5173 and 8080 are open");
  const ports = [1, 2, 3, 4, 5].map((port) => ({ port }));
  assert.deepEqual(shownPorts(ports, 0).rest, "and 2 more");
  assert.equal(shownPorts(ports, 0).shown.length, 3);
  assert.equal(shownPorts(ports.slice(0, 2), 0).rest, "");
  assert.equal(shownPorts(ports.slice(0, 2), 4).rest, "and 4 more");
});

test("share is offered only where capsule's API has the route", () => {
  assert.equal(canSharePorts({ paths: { "/api/sessions/{id}/ports/{port}/shares": {
    post: {} } } }), true);
  assert.equal(canSharePorts({ paths: { "/api/sessions/{id}/ports": { get: {} } } }), false);
  assert.equal(canSharePorts(null), false);
  assert.equal(canSharePorts({}), false);
});
