import { test } from "node:test";
import assert from "node:assert/strict";

import {
  StreamGateClient,
  StreamGateError,
  backoffDelayMs,
  heartbeatDelayMs,
  DEFAULT_BACKOFF,
} from "../dist/index.js";
import { FakePage, FakeTimers, answer, fakeSidecar, sessionBody, settle } from "./fakes.mjs";

const ENDPOINT = "https://edge.example.test";

function client(timers, sidecar, extra = {}) {
  return new StreamGateClient({
    endpoint: ENDPOINT,
    account: "acct",
    streamId: "tv",
    fetch: sidecar.fetch,
    timers,
    random: () => 0.5,
    page: new FakePage(),
    ...extra,
  });
}

const methods = (calls) => calls.map((c) => c.method);

test("heartbeats follow the advertised interval, shortened by the jitter, never later", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    GET: [() => answer(200, sessionBody(timers, { heartbeatIntervalSeconds: 4 }))],
  });
  const viewer = client(timers, sidecar);
  await viewer.open();
  assert.equal(viewer.state, "active");
  assert.deepEqual(timers.pending(), [9500], "10 s less half of the 10% jitter");
  await timers.advance(9499);
  assert.deepEqual(methods(sidecar.calls), ["PUT"]);
  await timers.advance(1);
  assert.deepEqual(methods(sidecar.calls), ["PUT", "GET"]);
  // The answer advertised 4 s: the next heartbeat follows that.
  assert.deepEqual(timers.pending(), [3800]);
  await timers.advance(3800 * 3);
  assert.deepEqual(methods(sidecar.calls), ["PUT", "GET", "GET", "GET", "GET"]);
  const url = new URL(sidecar.calls[1].url);
  assert.equal(url.pathname, "/streaming");
  assert.equal(url.searchParams.get("account"), "acct");
  assert.equal(url.searchParams.get("streamId"), "tv");
  viewer.dispose();
});

test("jitter spreads heartbeats within [interval * (1 - jitter), interval]", () => {
  assert.equal(heartbeatDelayMs(30, 0.1, () => 0), 30_000);
  assert.equal(heartbeatDelayMs(30, 0.1, () => 0.999999), 27_000);
  assert.equal(heartbeatDelayMs(30, 0, () => 0.7), 30_000);
  // An absurd jitter is capped so a heartbeat never comes at once.
  assert.equal(heartbeatDelayMs(30, 5, () => 0.999999), 15_000);
});

test("backoff doubles up to its cap with equal jitter", () => {
  const low = [0, 1, 2, 3, 4, 5, 6].map((n) => backoffDelayMs(n, DEFAULT_BACKOFF, () => 0));
  const high = [0, 1, 2, 3, 4, 5, 6].map((n) => backoffDelayMs(n, DEFAULT_BACKOFF, () => 1));
  assert.deepEqual(low, [250, 500, 1000, 2000, 4000, 4000, 4000]);
  assert.deepEqual(high, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
});

test("a 503 heartbeat is retried with backoff, and Retry-After wins", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    GET: [
      () => answer(503, { error: "store_unavailable", message: "down" }),
      () => answer(503, { error: "store_unavailable", message: "down" }),
      () => answer(503, { error: "store_unavailable", message: "down" }, { "retry-after": "7" }),
      () => answer(200, sessionBody(timers)),
    ],
  });
  const viewer = client(timers, sidecar);
  const retries = [];
  const states = [];
  viewer.on("retry", (r) => retries.push(r.delayMs));
  viewer.on("state", (s) => states.push(s));
  await viewer.open();
  await timers.advance(9500);
  assert.equal(viewer.state, "retrying");
  await timers.advance(375 + 750 + 7000);
  assert.deepEqual(retries, [375, 750, 7000]);
  assert.deepEqual(methods(sidecar.calls), ["PUT", "GET", "GET", "GET", "GET"]);
  assert.equal(viewer.state, "active");
  assert.deepEqual(states, ["opening", "active", "retrying", "active"]);
  // Back to the normal schedule.
  assert.deepEqual(timers.pending(), [9500]);
  viewer.dispose();
});

test("retries stop at the TTL: the session is then reported expired", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers, { ttlMs: 20_000 }))],
    GET: [() => new TypeError("connection refused")],
  });
  const viewer = client(timers, sidecar);
  const revoked = [];
  viewer.on("revoked", (e) => revoked.push(e));
  await viewer.open();
  const expiresAt = Date.parse(viewer.session.expiresAt);
  await timers.advance(60_000);
  assert.equal(viewer.state, "revoked");
  assert.equal(revoked.length, 1);
  assert.equal(revoked[0].reason, "expired");
  assert.equal(revoked[0].source, "heartbeat");
  assert.equal(revoked[0].status, 0);
  assert.ok(sidecar.calls.length > 3, "it retried before giving up");
  assert.deepEqual(timers.pending(), [], "nothing scheduled after the end");
  assert.ok(timers.now() >= expiresAt);
  viewer.dispose();
});

test("a 404 heartbeat reopens the session, and media requests use the new one", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [
      () => answer(201, sessionBody(timers, { sessionId: "1".repeat(40) })),
      () => answer(201, sessionBody(timers, { sessionId: "2".repeat(40) })),
    ],
    GET: [() => answer(404, { error: "not_found", message: "no session" })],
  });
  const viewer = client(timers, sidecar);
  const sessions = [];
  viewer.on("session", (s) => sessions.push(s.sessionId));
  await viewer.open();
  assert.equal(viewer.authorize("https://edge.example.test/hls/a.ts"), `https://edge.example.test/hls/a.ts?session=${"1".repeat(40)}`);
  await timers.advance(9500);
  assert.deepEqual(methods(sidecar.calls), ["PUT", "GET", "PUT"]);
  assert.equal(viewer.state, "active");
  assert.deepEqual(sessions, ["1".repeat(40), "2".repeat(40)]);
  assert.equal(viewer.authorize("https://edge.example.test/hls/a.ts"), `https://edge.example.test/hls/a.ts?session=${"2".repeat(40)}`);
  viewer.dispose();
});

test("a reopen refused at the limit revokes with the refusal's code", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [
      () => answer(201, sessionBody(timers)),
      () => answer(429, { error: "limit_exceeded", message: "account at its limit" }),
    ],
    GET: [() => answer(404, { error: "not_found", message: "no session" })],
  });
  const viewer = client(timers, sidecar);
  const revoked = [];
  viewer.on("revoked", (e) => revoked.push(e));
  await viewer.open();
  await timers.advance(9500);
  assert.deepEqual(revoked, [
    { reason: "limit_exceeded", message: "account at its limit", status: 429, source: "open" },
  ]);
  assert.equal(viewer.state, "revoked");
  viewer.dispose();
});

for (const [status, label] of [[410, "410 Gone"], [403, "403 session_gone"]]) {
  test(`a ${label} heartbeat emits revoked with the reason and message, then stops`, async () => {
    const timers = new FakeTimers();
    const sidecar = fakeSidecar({
      PUT: [() => answer(201, sessionBody(timers))],
      GET: [() => answer(status, { error: "session_gone", reason: "evicted", message: "another device took the slot" })],
    });
    const viewer = client(timers, sidecar);
    const revoked = [];
    viewer.on("revoked", (e) => revoked.push(e));
    await viewer.open();
    await timers.advance(9500);
    assert.deepEqual(revoked, [
      { reason: "evicted", message: "another device took the slot", status, source: "heartbeat" },
    ]);
    assert.equal(viewer.state, "revoked");
    assert.deepEqual(viewer.revocation, revoked[0]);
    await timers.advance(120_000);
    assert.deepEqual(methods(sidecar.calls), ["PUT", "GET"], "no heartbeat after revocation");
    viewer.dispose();
  });
}

test("a refused media request revokes at once with its reason; an unreadable one triggers a heartbeat", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    GET: [() => answer(410, { error: "session_gone", reason: "kicked", message: "kicked by an admin" })],
  });
  const viewer = client(timers, sidecar);
  const revoked = [];
  viewer.on("revoked", (e) => revoked.push(e));
  await viewer.open();
  assert.equal(viewer.reportMediaResponse(200), false);
  assert.equal(viewer.reportMediaResponse(403, "not json"), false);
  await settle();
  assert.deepEqual(methods(sidecar.calls), ["PUT", "GET"], "the heartbeat went out at once");
  assert.deepEqual(revoked.map((e) => [e.reason, e.source]), [["kicked", "heartbeat"]]);

  const other = client(timers, fakeSidecar({ PUT: [() => answer(201, sessionBody(timers))] }));
  const seen = [];
  other.on("revoked", (e) => seen.push(e));
  await other.open();
  const body = new TextEncoder().encode(JSON.stringify({ error: "session_gone", reason: "evicted", message: "m" }));
  assert.equal(other.reportMediaResponse(403, body.buffer), true);
  assert.deepEqual(seen, [{ reason: "evicted", message: "m", status: 403, source: "media" }]);
  assert.deepEqual(timers.pending().length, 0);
  viewer.dispose();
  other.dispose();
});

test("the playback token from each answer replaces the last one on media requests", async () => {
  const timers = new FakeTimers();
  let n = 0;
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers, { playbackToken: `tok${n++}` }))],
    GET: [() => answer(200, sessionBody(timers, { playbackToken: `tok${n++}` }))],
  });
  const query = client(timers, sidecar);
  await query.open();
  assert.equal(query.authorize("https://e.test/s.ts?x=1#f"), "https://e.test/s.ts?x=1&sg=tok0#f");
  await timers.advance(9500);
  assert.equal(query.authorize("https://e.test/s.ts?sg=old"), "https://e.test/s.ts?sg=tok1");
  assert.deepEqual(query.authHeaders(), {});
  query.dispose();

  const header = client(timers, sidecar, { credentialPlacement: "header" });
  await header.open();
  assert.deepEqual(header.authHeaders(), { "X-StreamGate-Token": "tok2" });
  assert.equal(header.authorize("https://e.test/s.ts"), "https://e.test/s.ts");
  header.dispose();

  const custom = client(timers, sidecar, {
    credentialPlacement: (credential, url) => ({ url: `${url}/${credential.kind}/${credential.value}`, headers: {} }),
  });
  await custom.open();
  assert.equal(custom.authorize("https://e.test/s.ts"), "https://e.test/s.ts/token/tok3");
  custom.dispose();
});

test("without a playback token the session id is the credential", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({ PUT: [() => answer(201, sessionBody(timers))] });
  const viewer = client(timers, sidecar, { credentialPlacement: "header" });
  assert.deepEqual(viewer.authHeaders(), {}, "nothing before a session exists");
  await viewer.open();
  assert.deepEqual(viewer.authHeaders(), { "X-StreamGate-Session": "a".repeat(40) });
  viewer.dispose();
});

test("the identity token is sent on open and heartbeats, fresh from a function each time", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    GET: [() => answer(200, sessionBody(timers))],
  });
  let n = 0;
  const viewer = client(timers, sidecar, { identityToken: () => `jwt${n++}` });
  await viewer.open();
  await timers.advance(9500);
  assert.deepEqual(
    sidecar.calls.map((c) => c.init.headers.Authorization),
    ["Bearer jwt0", "Bearer jwt1"],
  );
  viewer.dispose();
});

test("open rejects a refusal with the sidecar's code, and retries an unavailable sidecar", async () => {
  const timers = new FakeTimers();
  const refused = fakeSidecar({
    PUT: [() => answer(429, { error: "limit_exceeded", message: "at limit", limit: 1, active: 1 })],
  });
  const viewer = client(timers, refused);
  await assert.rejects(viewer.open(), (error) => {
    assert.ok(error instanceof StreamGateError);
    assert.equal(error.status, 429);
    assert.equal(error.code, "limit_exceeded");
    assert.equal(error.body.limit, 1);
    return true;
  });
  assert.equal(viewer.state, "idle");

  const flaky = fakeSidecar({
    PUT: [() => answer(503, { error: "store_unavailable", message: "down" }), () => answer(201, sessionBody(timers))],
  });
  const second = client(timers, flaky);
  const opened = second.open();
  await timers.advance(375);
  const session = await opened;
  assert.equal(session.sessionId, "a".repeat(40));
  assert.deepEqual(methods(flaky.calls), ["PUT", "PUT"]);
  viewer.dispose();
  second.dispose();
});

test("pagehide ends the session with a keepalive DELETE and stops heartbeating", async () => {
  const timers = new FakeTimers();
  const page = new FakePage();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    DELETE: [() => answer(204)],
  });
  const viewer = client(timers, sidecar, { page, identityToken: "jwt" });
  await viewer.open();
  page.fire("pagehide", { persisted: false });
  assert.equal(viewer.state, "ended");
  const del = sidecar.calls.at(-1);
  assert.equal(del.method, "DELETE");
  assert.equal(del.init.keepalive, true);
  assert.equal(del.init.headers.Authorization, "Bearer jwt");
  assert.equal(new URL(del.url).searchParams.get("streamId"), "tv");
  await timers.advance(120_000);
  assert.deepEqual(methods(sidecar.calls), ["PUT", "DELETE"]);
  // Restored from the back/forward cache: a new session is opened.
  page.fire("pageshow", { persisted: true });
  await settle();
  assert.deepEqual(methods(sidecar.calls), ["PUT", "DELETE", "PUT"]);
  assert.equal(viewer.state, "active");
  viewer.dispose();
  // Once disposed, page events no longer reach it.
  page.fire("pagehide", { persisted: false });
  assert.equal(viewer.state, "active");
});

test("end() deletes the session once; a revoked session is not deleted", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    GET: [() => answer(410, { error: "session_gone", reason: "evicted", message: "m" })],
    DELETE: [() => answer(204)],
  });
  const viewer = client(timers, sidecar);
  await viewer.open();
  await viewer.end();
  await viewer.end();
  assert.deepEqual(methods(sidecar.calls), ["PUT", "DELETE"]);
  await viewer.open();
  await timers.advance(9500);
  await viewer.end();
  assert.deepEqual(methods(sidecar.calls), ["PUT", "DELETE", "PUT", "GET"]);
  viewer.dispose();
});

test("a 200 that is not a session (a gateway's page) is retried, not taken as a session", async () => {
  const timers = new FakeTimers();
  const sidecar = fakeSidecar({
    PUT: [() => answer(201, sessionBody(timers))],
    GET: [() => new Response("<html>maintenance</html>", { status: 200 }), () => answer(200, sessionBody(timers))],
  });
  const viewer = client(timers, sidecar);
  const retries = [];
  viewer.on("retry", (r) => retries.push([r.status, r.delayMs]));
  await viewer.open();
  await timers.advance(9500);
  assert.deepEqual(retries, [[0, 375]]);
  assert.equal(viewer.state, "retrying");
  await timers.advance(375);
  assert.equal(viewer.state, "active");
  assert.equal(viewer.session.sessionId, "a".repeat(40));
  viewer.dispose();
});
