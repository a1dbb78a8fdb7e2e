import { test } from "node:test";
import assert from "node:assert/strict";

import { StreamGateClient, attachDash, attachHls, attachShaka, attachVideoJs } from "../dist/index.js";
import { FakePage, FakeTimers, answer, fakeSidecar, sessionBody } from "./fakes.mjs";

const SID = "a".repeat(40);

async function openClient(extra = {}) {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    GET: [() => answer(410, { error: "session_gone", reason: "evicted", message: "another device" })],
  });
  const client = new StreamGateClient({
    endpoint: "https://edge.test",
    account: "acct",
    streamId: "tv",
    fetch: sidecar.fetch,
    timers,
    random: () => 0.5,
    page: new FakePage(),
    ...extra,
  });
  await client.open();
  return { client, timers, sidecar };
}

function fakeMedia(log) {
  return { pause: () => log.push("pause") };
}

class FakeHls {
  constructor(log) {
    this.log = log;
    this.config = {};
    this.media = fakeMedia(log);
    this.listeners = new Map();
  }
  on(event, fn) {
    this.listeners.set(event, fn);
  }
  off(event) {
    this.listeners.delete(event);
  }
  emit(event, data) {
    this.listeners.get(event)?.(event, data);
  }
  stopLoad() {
    this.log.push("stopLoad");
  }
  detachMedia() {
    this.log.push("detachMedia");
    this.media = null;
  }
}

class FakeXhr {
  constructor() {
    this.readyState = 0;
    this.headers = {};
  }
  open(method, url) {
    this.readyState = 1;
    this.opened = [method, url];
  }
  setRequestHeader(name, value) {
    this.headers[name] = value;
  }
}

test("hls.js: every request carries the credential; a refused segment stops playback at once", async () => {
  const { client } = await openClient();
  const log = [];
  const hls = new FakeHls(log);
  attachHls(hls, client);
  const xhr = new FakeXhr();
  await hls.config.xhrSetup(xhr, "https://edge.test/hls/segment3.ts");
  assert.deepEqual(xhr.opened, ["GET", `https://edge.test/hls/segment3.ts?session=${SID}`]);
  const request = await hls.config.fetchSetup({ url: "https://edge.test/hls/index.m3u8" }, { method: "GET" });
  assert.equal(request.url, `https://edge.test/hls/index.m3u8?session=${SID}`);

  const revoked = [];
  client.on("revoked", (e) => revoked.push(e));
  // hls.js loads segments as arraybuffers; the XHR it reports carries the JSON body.
  const body = new TextEncoder().encode(JSON.stringify({ error: "session_gone", reason: "evicted", message: "gone" }));
  hls.emit("hlsError", {
    response: { code: 403, text: "Forbidden" },
    networkDetails: { responseType: "arraybuffer", response: body.buffer },
  });
  assert.deepEqual(log, ["stopLoad", "pause", "detachMedia"]);
  assert.deepEqual(revoked.map((e) => [e.reason, e.source]), [["evicted", "media"]]);
  // A second refusal changes nothing.
  hls.emit("hlsError", { response: { code: 403 }, networkDetails: null });
  assert.equal(log.length, 3);
  client.dispose();
});

test("hls.js: a header placement sets headers on the XHR, keeping the player's own xhrSetup", async () => {
  const { client } = await openClient({ credentialPlacement: "header" });
  const hls = new FakeHls([]);
  const seen = [];
  hls.config.xhrSetup = (xhr, url) => seen.push(url);
  const detach = attachHls(hls, client);
  const xhr = new FakeXhr();
  await hls.config.xhrSetup(xhr, "https://edge.test/hls/segment0.ts");
  assert.deepEqual(seen, ["https://edge.test/hls/segment0.ts"]);
  assert.deepEqual(xhr.opened, ["GET", "https://edge.test/hls/segment0.ts"]);
  assert.deepEqual(xhr.headers, { "X-StreamGate-Session": SID });
  detach();
  assert.equal(hls.config.xhrSetup.length, 2, "the player's own xhrSetup is back");
  client.dispose();
});

test("hls.js: revocation learned from a heartbeat stops playback", async () => {
  const { client, timers } = await openClient();
  const log = [];
  attachHls(new FakeHls(log), client);
  await timers.advance(9500);
  assert.deepEqual(log, ["stopLoad", "pause", "detachMedia"]);
  client.dispose();
});

test("Shaka: the request filter authorizes every URI; a BAD_HTTP_STATUS 403 unloads the player", async () => {
  const { client } = await openClient();
  const log = [];
  const filters = [];
  const listeners = new Map();
  const player = {
    getNetworkingEngine: () => ({
      registerRequestFilter: (f) => filters.push(f),
      unregisterRequestFilter: (f) => filters.splice(filters.indexOf(f), 1),
    }),
    getMediaElement: () => fakeMedia(log),
    addEventListener: (t, f) => listeners.set(t, f),
    removeEventListener: (t) => listeners.delete(t),
    unload: async () => log.push("unload"),
  };
  const detach = attachShaka(player, client);
  const request = { uris: ["https://edge.test/hls/live7.ts", "https://mirror.test/live7.ts?a=b"], headers: {} };
  filters[0](1, request);
  assert.deepEqual(request.uris, [
    `https://edge.test/hls/live7.ts?session=${SID}`,
    `https://mirror.test/live7.ts?a=b&session=${SID}`,
  ]);
  const error = new Event("error");
  error.detail = {
    code: 1001,
    data: ["https://edge.test/hls/live8.ts", 403, JSON.stringify({ error: "session_gone", reason: "kicked", message: "k" })],
  };
  listeners.get("error")(error);
  assert.deepEqual(log, ["pause", "unload"]);
  assert.equal(client.revocation.reason, "kicked");
  detach();
  assert.equal(filters.length, 0);
  client.dispose();
});

test("dash.js: the request interceptor authorizes requests; revocation resets the player", async () => {
  const { client, timers } = await openClient({ credentialPlacement: "header" });
  const log = [];
  const interceptors = [];
  const player = {
    addRequestInterceptor: (f) => interceptors.push(f),
    removeRequestInterceptor: (f) => interceptors.splice(interceptors.indexOf(f), 1),
    on: () => undefined,
    off: () => undefined,
    getVideoElement: () => fakeMedia(log),
    reset: () => log.push("reset"),
  };
  attachDash(player, client);
  const request = await interceptors[0]({ url: "https://edge.test/dash/seg.m4s", headers: { a: "b" } });
  assert.deepEqual(request.headers, { a: "b", "X-StreamGate-Session": SID });
  await timers.advance(9500);
  assert.deepEqual(log, ["pause", "reset"]);
  client.dispose();
});

test("video.js: VHS onRequest hooks authorize requests; a 403 response resets the player", async () => {
  const { client } = await openClient();
  const log = [];
  const hooks = { request: [], response: [] };
  const xhr = {
    onRequest: (f) => hooks.request.push(f),
    offRequest: () => undefined,
    onResponse: (f) => hooks.response.push(f),
    offResponse: () => undefined,
  };
  const player = {
    tech: () => ({ vhs: { xhr } }),
    on: () => undefined,
    off: () => undefined,
    pause: () => log.push("pause"),
    reset: () => log.push("reset"),
  };
  attachVideoJs(player, client);
  const options = hooks.request[0]({ uri: "https://edge.test/hls/segment1.ts" });
  assert.equal(options.uri, `https://edge.test/hls/segment1.ts?session=${SID}`);
  hooks.response[0]({}, null, { statusCode: 403, body: JSON.stringify({ error: "session_gone", reason: "evicted", message: "e" }) });
  assert.deepEqual(log, ["pause", "reset"]);
  client.dispose();
});

test("an adapter attached after revocation stops the player immediately", async () => {
  const { client, timers } = await openClient();
  await timers.advance(9500);
  assert.equal(client.state, "revoked");
  const log = [];
  attachHls(new FakeHls(log), client);
  assert.deepEqual(log, ["stopLoad", "pause", "detachMedia"]);
  client.dispose();
});
