// Real players in real Chromium, playing the demo origin's H.264 HLS through the enforcing
// proxy, with the page on another origin than the sidecar.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { startPageServer } from "../../../examples/web/serve.mjs";
import { advancedDuring, buildBinaries, launchChromium, sampleVideo, startProcess, timeToStop } from "./harness.mjs";

/** Generous: far above the ~2 s the adapter needs, far below the 30 s a raw player plays on. */
const STOP_BOUND_MS = 6000;
const POLICY = `apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: default}
spec: {maxStreamsPerAccount: 1, onLimitExceeded: EvictOldest, sessionTTLSeconds: 6, heartbeatIntervalSeconds: 3}
`;

let origin, sidecar, pages, browser, sidecarUrl, adminUrl;
const results = {};

before(async () => {
  const bin = buildBinaries();
  origin = await startProcess(bin["streamgate-demo-origin"], ["127.0.0.1:0"], /demo origin on (http:\/\/[\d.]+:\d+)/);
  pages = await startPageServer(0);
  const dir = mkdtempSync(join(tmpdir(), "streamgate-e2e-"));
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
      "--log-format", "json",
    ],
    // Ready once the admin listener is up (it starts after the viewer port).
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
  writeFileSync(new URL("./out/players.json", import.meta.url), JSON.stringify(results, null, 2));
  console.log(JSON.stringify(results, null, 2));
});

/** Opens the example page playing `src` with `player` for `account`; waits until it plays. */
async function watch(player, account, { src = "/hls/index.m3u8", streamId = "tv", extra = "" } = {}) {
  const page = await browser.context.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  const query = new URLSearchParams({ endpoint: sidecarUrl, account, streamId, player, src });
  await page.goto(`${pages.origin}/?${query}${extra}`);
  await sampleVideo(page);
  try {
    // Decoded frames, not the clock: a live player's clock starts near the live edge.
    await page.waitForFunction(
      () => document.getElementById("video").getVideoPlaybackQuality().totalVideoFrames > 30,
      null,
      { timeout: 30_000 },
    );
  } catch (error) {
    const state = await page.evaluate(() => JSON.stringify({ ...window.streamgate, client: undefined }));
    throw new Error(`${player} for ${account} did not play: ${state} ${errors.join("; ")}`);
  }
  return page;
}

/** Another device of `account` opens a session: under EvictOldest with limit 1 it evicts. */
async function secondDevice(account) {
  const response = await fetch(`${sidecarUrl}/streaming?account=${account}&streamId=phone`, { method: "PUT" });
  assert.equal(response.status, 201);
}

const endedText = (page) => page.evaluate(() => document.getElementById("ended").textContent);

test("hls.js and Shaka play the real stream through the proxy from another origin", async () => {
  const hls = await watch("hls", "play-hls");
  const shaka = await watch("shaka", "play-shaka", { src: "/hls/live.m3u8" });
  const picture = (page) =>
    page.evaluate(() => {
      const video = document.getElementById("video");
      return [video.currentTime, video.getVideoPlaybackQuality().totalVideoFrames];
    });
  for (const [name, page] of [["hls.js", hls], ["Shaka", shaka]]) {
    const [time, frames] = await picture(page);
    await new Promise((r) => setTimeout(r, 2000));
    const [laterTime, laterFrames] = await picture(page);
    // 25 frames a second: two seconds of real playback, with room for a busy machine.
    assert.ok(laterTime - time > 1, `${name}: the clock moved ${laterTime - time} s in 2 s`);
    assert.ok(laterFrames - frames > 25, `${name}: ${laterFrames - frames} frames decoded in 2 s`);
    assert.equal(await page.evaluate(() => window.streamgate.state), "active");
    await page.close();
  }
});

test("eviction stops the evicted picture at once with the adapter; a raw hls.js plays on; another account's viewer keeps playing", async () => {
  const adapted = {
    hls: await watch("hls", "evict-hls"),
    shaka: await watch("shaka", "evict-shaka"),
  };
  const raw = {
    vod: await watch("raw-hls", "evict-raw-vod"),
    live: await watch("raw-hls", "evict-raw-live", { src: "/hls/live.m3u8" }),
  };
  const control = await watch("hls", "control");
  // Let the players fill their buffers as they would after a while of playing.
  await new Promise((r) => setTimeout(r, 3000));

  const evictedAt = Date.now();
  await Promise.all(["evict-hls", "evict-shaka", "evict-raw-vod", "evict-raw-live"].map(secondDevice));
  const [hls, shaka, rawVod, rawLive] = await Promise.all([
    timeToStop(adapted.hls, evictedAt, { capMs: 15_000 }),
    timeToStop(adapted.shaka, evictedAt, { capMs: 15_000 }),
    timeToStop(raw.vod, evictedAt, { capMs: 45_000 }),
    timeToStop(raw.live, evictedAt, { capMs: 45_000 }),
  ]);
  results.eviction = {
    adapterHlsJsVodMs: hls.stoppedAfterMs,
    adapterShakaVodMs: shaka.stoppedAfterMs,
    rawHlsJsVodMs: rawVod.stoppedAfterMs,
    rawHlsJsVodStopped: rawVod.stopped,
    rawHlsJsLiveMs: rawLive.stoppedAfterMs,
    rawHlsJsLiveStopped: rawLive.stopped,
  };
  for (const [name, outcome] of [["hls.js", hls], ["Shaka", shaka]]) {
    assert.ok(outcome.stopped && outcome.stoppedAfterMs < STOP_BOUND_MS, `${name} picture moved ${outcome.stoppedAfterMs} ms after eviction`);
  }
  for (const page of Object.values(adapted)) {
    assert.match(await endedText(page), /^evicted: /);
  }
  // The raw player plays out its buffer: what the adapter exists for.
  assert.ok(rawVod.stoppedAfterMs > hls.stoppedAfterMs, JSON.stringify(results.eviction));
  // The control viewer, of another account, played on the whole time.
  const moved = await advancedDuring(control, evictedAt, Date.now());
  assert.ok(moved > (Date.now() - evictedAt) / 1000 - 4, `the control viewer moved ${moved} s`);
  assert.equal(await endedText(control), "");
  for (const page of [...Object.values(adapted), ...Object.values(raw), control]) await page.close();
});

test("a kick stops the kicked picture and shows why", async () => {
  const page = await watch("hls", "kick-hls");
  const sessionId = await page.evaluate(() => window.streamgate.sessionId);
  const kickedAt = Date.now();
  const response = await fetch(`${adminUrl}/v1/sessions/${sessionId}`, { method: "DELETE" });
  assert.equal(response.status, 204);
  const outcome = await timeToStop(page, kickedAt, { capMs: 15_000 });
  results.kick = { adapterHlsJsMs: outcome.stoppedAfterMs };
  assert.ok(outcome.stopped && outcome.stoppedAfterMs < STOP_BOUND_MS, `moved ${outcome.stoppedAfterMs} ms after the kick`);
  assert.match(await endedText(page), /^kicked: /);
  await page.close();
});

test("a hidden tab whose heartbeat timers never fire stays alive through its media requests", async () => {
  const page = await watch("hls", "hidden-tab", { src: "/hls/live.m3u8", extra: "&hiddenTab=1" });
  const sessionId = await page.evaluate(() => window.streamgate.sessionId);
  const from = Date.now();
  // Two TTLs (6 s) without a single heartbeat.
  await new Promise((r) => setTimeout(r, 13_000));
  const to = Date.now();
  assert.equal(await page.evaluate(() => window.streamgate.heartbeats), 0, "the page sent heartbeats");
  const session = await (await fetch(`${adminUrl}/v1/sessions/${sessionId}`)).json();
  assert.equal(session.state, "active", JSON.stringify(session));
  const moved = await advancedDuring(page, from, to);
  assert.ok(moved > 9, `the hidden tab's picture moved ${moved} s in ${(to - from) / 1000} s`);
  assert.equal(await endedText(page), "");
  results.hiddenTab = { playedSeconds: moved, heartbeats: 0 };
  await page.close();
});
