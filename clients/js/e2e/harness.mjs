// Real parts for the browser tests: the sidecar and demo origin built from this repository,
// the example page on its own origin, and Debian's Chromium driven over the DevTools protocol.
import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repo = join(here, "..", "..", "..");

/** Chromium from the distribution's packages; never a downloaded browser. */
export const CHROMIUM = process.env.STREAMGATE_CHROMIUM ?? "/usr/bin/chromium";

/** Builds the sidecar and the demo origin (a no-op when scripts/test built them) and returns their paths. */
export function buildBinaries() {
  const output = execFileSync(
    "cargo",
    [
      "build", "--locked", "--quiet", "--message-format=json",
      "-p", "streamgate-sidecar", "--bin", "streamgate-sidecar",
      "-p", "streamgate-demo-origin", "--bin", "streamgate-demo-origin",
    ],
    { cwd: repo, encoding: "utf8", maxBuffer: 256 << 20, stdio: ["ignore", "pipe", "inherit"] },
  );
  const binaries = {};
  for (const line of output.split("\n")) {
    if (!line.startsWith("{")) continue;
    const message = JSON.parse(line);
    if (message.reason === "compiler-artifact" && message.executable) {
      binaries[message.target.name] = message.executable;
    }
  }
  for (const name of ["streamgate-sidecar", "streamgate-demo-origin"]) {
    if (!binaries[name]) throw new Error(`cargo build did not report the ${name} binary`);
  }
  return binaries;
}

/**
 * Starts `command` and resolves once a line of its output matches `ready`, with the match; the
 * process is killed by `stop()`. Fails with the output so far if it exits first or takes 30 s.
 */
export function startProcess(command, args, ready, env = {}) {
  const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${command} did not become ready in 30 s:\n${output}`));
    }, 30_000);
    const onData = (chunk) => {
      output += chunk;
      const match = output.match(ready);
      if (match) {
        clearTimeout(timer);
        child.stdout.off("data", onData);
        child.stderr.off("data", onData);
        // Keep draining so the child never blocks on a full pipe.
        child.stdout.resume();
        child.stderr.resume();
        resolve({ match, stop: () => child.kill("SIGTERM"), output: () => output });
      }
    };
    child.stdout.setEncoding("utf8").on("data", onData);
    child.stderr.setEncoding("utf8").on("data", onData);
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${command} exited with ${code} before it was ready:\n${output}`));
    });
  });
}

/** Launches headless Chromium with a fresh profile; fails (never skips) when it is missing. */
export async function launchChromium() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium package (scripts/test does)`);
  }
  const profile = mkdtempSync(join(tmpdir(), "streamgate-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--autoplay-policy=no-user-gesture-required",
      // Several players play at once in one test; none of them counts as a background tab.
      "--disable-background-media-suspend",
      "--disable-renderer-backgrounding",
      "--disable-backgrounding-occluded-windows",
    ],
  });
  return {
    context,
    close: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Installs a sampler of the video's clock and decoded frames in `page` (every 50 ms). */
export async function sampleVideo(page) {
  await page.evaluate(() => {
    const video = document.getElementById("video");
    window.samples = [];
    setInterval(() => {
      const quality = video.getVideoPlaybackQuality?.();
      window.samples.push([Date.now(), video.currentTime, quality ? quality.totalVideoFrames : 0]);
    }, 50);
  });
}

/**
 * When the picture last advanced after `since` (epoch ms): the first time it stood still for
 * `stillMs`, or `capMs` after `since` if it never did. Returns { stoppedAfterMs, stopped }.
 */
export async function timeToStop(page, since, { stillMs = 2000, capMs = 40_000 } = {}) {
  for (;;) {
    const samples = await page.evaluate(() => window.samples);
    let lastAdvance = since;
    for (let i = 1; i < samples.length; i++) {
      const [t, time, frames] = samples[i];
      const [, previousTime, previousFrames] = samples[i - 1];
      if (t > since && (time > previousTime || frames > previousFrames)) lastAdvance = t;
    }
    const now = samples.length ? samples[samples.length - 1][0] : Date.now();
    if (now - lastAdvance >= stillMs) return { stoppedAfterMs: lastAdvance - since, stopped: true };
    if (now - since >= capMs) return { stoppedAfterMs: now - since, stopped: false };
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** How far the video's clock moved during the last `ms` of samples. */
export async function advancedDuring(page, from, to) {
  const samples = await page.evaluate(() => window.samples);
  const inside = samples.filter(([t]) => t >= from && t <= to);
  if (inside.length < 2) return 0;
  return inside[inside.length - 1][1] - inside[0][1];
}
