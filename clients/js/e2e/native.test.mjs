// A native HLS player (hls.js given the playlist URL with the playback token once, nothing else:
// no adapter, no heartbeat, no headers) in real Chromium, against a sidecar that requires
// playback tokens: it plays on the tokens the proxy writes into the playlist for far longer
// than a token's usual lifetime, and the proxy still refuses its media as soon as the session
// is kicked.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { get } from "node:http";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { startPageServer } from "../../../examples/web/serve.mjs";
import { advancedDuring, buildBinaries, launchChromium, sampleVideo, startProcess, timeToStop } from "./harness.mjs";

/**
 * Heartbeat interval: a token's usual lifetime is two of them (6 s: a busy machine's stall of a
 * few seconds between two media answers does not outlast a fresh token).
 */
const HEARTBEAT_S = 3;
const TOKEN_LIFETIME_S = 2 * HEARTBEAT_S;
/** How long the player plays without a heartbeat: five usual token lifetimes. */
const PLAY_MS = 5 * TOKEN_LIFETIME_S * 1000;
/**
 * Seconds the picture must move meanwhile: well over three token lifetimes, with room for a
 * busy machine's stalls.
 */
const MIN_PLAYED_S = 3.5 * TOKEN_LIFETIME_S;
/** How far ahead the player buffers, in seconds: it keeps fetching segments as it plays. */
const MAX_BUFFER_S = 4;
const POLICY = `apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: default}
spec: {maxStreamsPerAccount: 1, sessionTTLSeconds: 9, heartbeatIntervalSeconds: ${HEARTBEAT_S}}
`;

let origin, sidecar, pages, browser, sidecarUrl, adminUrl;
const results = {};

before(async () => {
  const bin = buildBinaries();
  origin = await startProcess(bin["streamgate-demo-origin"], ["127.0.0.1:0"], /demo origin on (http:\/\/[\d.]+:\d+)/);
  pages = await startPageServer(0);
  const dir = mkdtempSync(join(tmpdir(), "streamgate-e2e-native-"));
  writeFileSync(join(dir, "policy.yaml"), POLICY);
  sidecar = await startProcess(
    bin["streamgate-sidecar"],
    [
      "--listen", "127.0.0.1:0",
      "--admin-listen", "127.0.0.1:0",
      "--metrics-listen", "127.0.0.1:0",
      "--upstream", origin.match[1],
      "--policy-file", join(dir, "policy.yaml"),
      "--cors-allowed-origins", pages.origin,
      "--require-playback-token", "true",
      "--log-format", "json",
    ],
    /"serving the admin API","listen":"([\d.]+:\d+)"/,
    { RUST_LOG: "info" },
  );
  sidecarUrl = `http://${sidecar.output().match(/"serving the session API","listen":"([\d.]+:\d+)"/)[1]}`;
  adminUrl = `http://${sidecar.match[1]}`;
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  sidecar?.stop();
  origin?.stop();
  await pages?.close();
  mkdirSync(new URL("./out", import.meta.url), { recursive: true });
  writeFileSync(new URL("./out/native.json", import.meta.url), JSON.stringify(results, null, 2));
  console.log(JSON.stringify(results, null, 2));
});

/** The playback token in `url`'s `sg` parameter and its expiry (seconds since the epoch). */
function tokenOf(url) {
  const token = new URL(url).searchParams.get("sg");
  assert.ok(token, `no token in ${url}`);
  const payload = JSON.parse(Buffer.from(token.split(".")[2], "base64url").toString("utf8"));
  return { token, expiresAt: payload.exp };
}

/** GET `url` from the local address `from`; resolves to { status, body }. */
function getFrom(url, from) {
  return new Promise((resolve, reject) => {
    get(url, { localAddress: from }, (response) => {
      let body = "";
      response.setEncoding("utf8").on("data", (chunk) => (body += chunk));
      response.on("end", () => resolve({ status: response.statusCode, body: body ? JSON.parse(body) : null }));
    }).on("error", reject);
  });
}

test("a native HLS player plays a VOD on the playlist's tokens for five token lifetimes without a heartbeat, and is refused within a second of a kick", async () => {
  const page = await browser.context.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  const query = new URLSearchParams({
    endpoint: sidecarUrl,
    account: "native",
    streamId: "tv",
    player: "native-hls",
    src: "/hls/index.m3u8",
    maxBuffer: String(MAX_BUFFER_S),
    // The page's heartbeat timers never fire: only the media requests keep the session.
    hiddenTab: "1",
  });
  const openedAt = Date.now();
  await page.goto(`${pages.origin}/?${query}`);
  await sampleVideo(page);
  await page
    .waitForFunction(() => document.getElementById("video").getVideoPlaybackQuality().totalVideoFrames > 30, null, {
      timeout: 30_000,
    })
    .catch(async (error) => {
      const state = await page.evaluate(() => JSON.stringify({ ...window.streamgate, client: undefined, hls: undefined }));
      throw new Error(`the native player did not play: ${state} ${errors.join("; ")}: ${error}`);
    });
  const sessionId = await page.evaluate(() => window.streamgate.sessionId);
  const openToken = await page.evaluate(() => window.streamgate.client.session.playbackToken);

  // Play well past the open answer's token's expiry.
  const from = Date.now();
  await new Promise((r) => setTimeout(r, PLAY_MS));
  const to = Date.now();
  const state = await page.evaluate(() => ({
    heartbeats: window.streamgate.heartbeats,
    fragments: window.streamgate.fragments,
    mediaErrors: window.streamgate.mediaErrors,
  }));
  const moved = await advancedDuring(page, from, to);
  const diagnosis = JSON.stringify({ moved, heartbeats: state.heartbeats, mediaErrors: state.mediaErrors, errors });
  assert.equal(state.heartbeats, 0, `the page sent heartbeats: ${diagnosis}`);
  assert.deepEqual(state.mediaErrors, [], `media requests were refused: ${diagnosis}`);
  assert.ok(moved > MIN_PLAYED_S, `the picture moved ${moved} s in ${(to - from) / 1000} s: ${diagnosis}`);
  // The player kept fetching segments, long after the open answer's token expired, with the
  // token the proxy wrote into the playlist (the same one throughout: the playlist was
  // loaded once).
  const openExpiry = tokenOf(`http://x/?sg=${openToken}`).expiresAt * 1000;
  const late = state.fragments.filter((f) => f.loadedAt !== null && f.requestedAt > openedAt + 3 * TOKEN_LIFETIME_S * 1000);
  assert.ok(late.length >= 3, `segments loaded after three token lifetimes: ${late.length} of ${state.fragments.length}`);
  assert.ok(late.every((f) => f.requestedAt > openExpiry));
  const playlistTokens = new Set(state.fragments.map((f) => tokenOf(f.url).token));
  assert.equal(playlistTokens.size, 1, "one playlist, one token");
  const session = await (await fetch(`${adminUrl}/v1/sessions/${sessionId}`)).json();
  assert.equal(session.state, "active", JSON.stringify(session));

  // The playlist's long-lived token, from another network: refused. (127.0.1.1 is another
  // /24 of loopback.)
  const lateUrl = late[late.length - 1].url;
  const elsewhere = await getFrom(lateUrl, "127.0.1.1");
  assert.equal(elsewhere.status, 403, JSON.stringify(elsewhere.body));
  assert.match(elsewhere.body.message, /network/);

  // Kick the session: the same long-lived token is refused at once, and the player's next
  // segment request fails.
  const kickedAt = Date.now();
  const kicked = await fetch(`${adminUrl}/v1/sessions/${sessionId}`, { method: "DELETE" });
  assert.equal(kicked.status, 204);
  const refused = await getFrom(lateUrl, "127.0.0.1");
  const refusedAfterMs = Date.now() - kickedAt;
  assert.equal(refused.status, 403, JSON.stringify(refused.body));
  assert.equal(refused.body.reason, "kicked");
  assert.ok(refusedAfterMs < 1000, `refused ${refusedAfterMs} ms after the kick`);

  await page.waitForFunction(() => window.streamgate.mediaErrors.some((e) => e.status === 403), null, { timeout: 20_000 });
  const stop = await timeToStop(page, kickedAt, { capMs: 20_000 });
  const after = await page.evaluate(() => ({ fragments: window.streamgate.fragments, mediaErrors: window.streamgate.mediaErrors }));
  const firstRefusal = after.mediaErrors.find((e) => e.status === 403);
  // Nothing requested more than a second after the kick was delivered.
  const deliveredLate = after.fragments.filter((f) => f.requestedAt > kickedAt + 1000 && f.loadedAt !== null);
  assert.deepEqual(deliveredLate, [], "segments delivered after the kick");
  // The player plays out what it had buffered (at most MAX_BUFFER_S ahead), then stops.
  assert.ok(stop.stopped, `the picture still moved ${stop.stoppedAfterMs} ms after the kick`);
  assert.ok(stop.stoppedAfterMs < (2 * MAX_BUFFER_S + 4) * 1000, `the picture stopped ${stop.stoppedAfterMs} ms after the kick`);
  results.native = {
    playedSecondsWithoutHeartbeat: moved,
    tokenLifetimeSeconds: TOKEN_LIFETIME_S,
    segmentsLoadedAfterThreeLifetimes: late.length,
    playlistTokenLifetimeSeconds: tokenOf(lateUrl).expiresAt - Math.floor(openedAt / 1000),
    longLivedTokenRefusedAfterKickMs: refusedAfterMs,
    playerRefusedAfterKickMs: firstRefusal.at - kickedAt,
    pictureStoppedAfterKickMs: stop.stoppedAfterMs,
  };
  await page.close();
});

test("with tokens required, the hls.js adapter in a tab whose heartbeats never fire plays live on the fresh tokens media answers hand back", async () => {
  const page = await browser.context.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  page.on("console", (message) => message.type() === "error" && errors.push(message.text()));
  const query = new URLSearchParams({
    endpoint: sidecarUrl,
    account: "adapter-hidden",
    streamId: "tv",
    player: "hls",
    src: "/hls/live.m3u8",
    hiddenTab: "1",
  });
  await page.goto(`${pages.origin}/?${query}`);
  await sampleVideo(page);
  await page.waitForFunction(() => document.getElementById("video").getVideoPlaybackQuality().totalVideoFrames > 30, null, {
    timeout: 30_000,
  });
  const openToken = await page.evaluate(() => window.streamgate.client.session.playbackToken);
  const from = Date.now();
  await new Promise((r) => setTimeout(r, PLAY_MS));
  const to = Date.now();
  const state = await page.evaluate(() => ({
    heartbeats: window.streamgate.heartbeats,
    mediaErrors: window.streamgate.mediaErrors,
    token: window.streamgate.client.session.playbackToken,
    clientState: window.streamgate.state,
  }));
  const moved = await advancedDuring(page, from, to);
  const diagnosis = JSON.stringify({ moved, ...state, errors });
  assert.equal(state.heartbeats, 0, `the page sent heartbeats: ${diagnosis}`);
  assert.deepEqual(state.mediaErrors, [], `media requests were refused: ${diagnosis}`);
  assert.equal(state.clientState, "active", diagnosis);
  // The client holds a token it took from a media answer (the page can read the header:
  // CORS exposes it), valid well after the open answer's expired.
  assert.notEqual(state.token, openToken);
  assert.ok(
    tokenOf(`http://x/?sg=${state.token}`).expiresAt > tokenOf(`http://x/?sg=${openToken}`).expiresAt + 3 * TOKEN_LIFETIME_S,
    diagnosis,
  );
  assert.ok(moved > MIN_PLAYED_S, `the picture moved ${moved} s in ${(to - from) / 1000} s: ${diagnosis}`);
  results.adapterHiddenTab = { playedSecondsWithoutHeartbeat: moved, tokenLifetimeSeconds: TOKEN_LIFETIME_S };
  await page.close();
});
