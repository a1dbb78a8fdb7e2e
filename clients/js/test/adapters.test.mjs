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

/** A client holding playback token `t0`, valid 20 s. */
async function openTokenClient() {
  const timers = new FakeTimers();
  const expires = (ms) => new Date(timers.now() + ms).toISOString();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers, { playbackToken: "t0", playbackTokenExpiresAt: expires(20_000) }))],
    GET: [() => answer(200, sessionBody(timers, { playbackToken: "t-heartbeat", playbackTokenExpiresAt: expires(20_000) }))],
  });
  const client = new StreamGateClient({
    endpoint: "https://edge.test",
    account: "acct",
    streamId: "tv",
    fetch: sidecar.fetch,
    timers,
    random: () => 0.5,
    page: new FakePage(),
  });
  await client.open();
  return { client, timers, expires };
}

test("the client takes a fresh token from a media answer, never an older one, never once the session is over", async () => {
  const { client, expires } = await openTokenClient();
  const headers = (token, expiresAt) => (name) =>
    ({ "X-StreamGate-Token": token, "X-StreamGate-Token-Expires-At": expiresAt })[name];
  assert.equal(client.authorize("https://edge.test/s.ts"), "https://edge.test/s.ts?sg=t0");
  assert.equal(client.acceptMediaResponseHeaders(headers("t1", expires(25_000))), true);
  assert.equal(client.authorize("https://edge.test/s.ts"), "https://edge.test/s.ts?sg=t1");
  // Answers arrive out of order: an older token does not replace a newer one.
  assert.equal(client.acceptMediaResponseHeaders(headers("t-old", expires(21_000))), false);
  assert.equal(client.acceptMediaResponseHeaders(headers("t-bad", "not a date")), false);
  assert.equal(client.acceptMediaResponseHeaders(() => null), false);
  assert.equal(client.session.playbackToken, "t1");
  await client.end();
  assert.equal(client.acceptMediaResponseHeaders(headers("t9", expires(60_000))), false);
  client.dispose();
});

test("every adapter hands the fresh token of each media answer to the client", async () => {
  const fresh = async (attach) => {
    const { client, expires } = await openTokenClient();
    const headers = { "x-streamgate-token": "t-fresh", "x-streamgate-token-expires-at": expires(30_000) };
    await attach(client, headers);
    const token = client.session.playbackToken;
    client.dispose();
    return token;
  };
  // hls.js: read from the XMLHttpRequest once its headers are in.
  const hlsToken = await fresh(async (client, headers) => {
    const hls = new FakeHls([]);
    attachHls(hls, client);
    const xhr = new FakeXhr();
    const listeners = [];
    xhr.addEventListener = (type, f) => type === "readystatechange" && listeners.push(f);
    xhr.getResponseHeader = (name) => headers[name.toLowerCase()] ?? null;
    await hls.config.xhrSetup(xhr, "https://edge.test/hls/segment3.ts");
    xhr.readyState = 2;
    for (const f of listeners) f();
  });
  // Shaka: a response filter.
  const shakaToken = await fresh(async (client, headers) => {
    const responseFilters = [];
    attachShaka(
      {
        getNetworkingEngine: () => ({
          registerRequestFilter: () => undefined,
          unregisterRequestFilter: () => undefined,
          registerResponseFilter: (f) => responseFilters.push(f),
          unregisterResponseFilter: () => undefined,
        }),
        getMediaElement: () => null,
        addEventListener: () => undefined,
        removeEventListener: () => undefined,
        unload: async () => undefined,
      },
      client,
    );
    responseFilters[0](1, { headers });
  });
  // dash.js 5: a response interceptor (header names as the server wrote them).
  const dashToken = await fresh(async (client, headers) => {
    const interceptors = [];
    attachDash(
      {
        addRequestInterceptor: () => undefined,
        addResponseInterceptor: (f) => interceptors.push(f),
        on: () => undefined,
        off: () => undefined,
        reset: () => undefined,
      },
      client,
    );
    await interceptors[0]({
      headers: { "X-StreamGate-Token": headers["x-streamgate-token"], "X-StreamGate-Token-Expires-At": headers["x-streamgate-token-expires-at"] },
    });
  });
  // video.js: VHS onResponse.
  const videoJsToken = await fresh(async (client, headers) => {
    const hooks = [];
    attachVideoJs(
      {
        tech: () => ({ vhs: { xhr: { onRequest: () => undefined, onResponse: (f) => hooks.push(f) } } }),
        on: () => undefined,
        off: () => undefined,
        pause: () => undefined,
        reset: () => undefined,
      },
      client,
    );
    hooks[0]({}, null, { statusCode: 200, headers });
  });
  assert.deepEqual([hlsToken, shakaToken, dashToken, videoJsToken], ["t-fresh", "t-fresh", "t-fresh", "t-fresh"]);
});
