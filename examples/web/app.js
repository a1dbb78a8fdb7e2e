// Plays the demo origin through a StreamGate sidecar with @streamgate/client, showing the
// session's state and why the stream ended. Settings come from the query string (the form
// writes them there): endpoint, account, streamId, player (hls | shaka | raw-hls | native-hls),
// src. `native-hls` plays as a native HLS player does (Safari's): hls.js is given the playlist
// URL with the playback token once and nothing else, so it plays on the tokens the proxy writes
// into the playlists; `maxBuffer` (seconds) sets how far ahead it buffers.
// `hiddenTab=1` stands in for a hidden tab whose timers the browser throttles: the client's
// heartbeat timers never fire, so only the media requests keep the session alive.
import { StreamGateClient, attachHls, attachShaka } from "/lib/index.js";
import Hls from "/vendor/hls.mjs";

const params = new URLSearchParams(location.search);
const settings = {
  endpoint: params.get("endpoint") ?? "http://127.0.0.1:8080",
  account: params.get("account") ?? "42",
  streamId: params.get("streamId") ?? "web",
  player: params.get("player") ?? "hls",
  src: params.get("src") ?? "/hls/index.m3u8",
};
const form = document.getElementById("settings");
for (const [name, value] of Object.entries(settings)) form.elements[name].value = value;

const video = document.getElementById("video");
const show = (id, text) => (document.getElementById(id).textContent = text);

// What the browser tests read.
window.streamgate = { state: "idle", revoked: null, heartbeats: 0, error: null };

const throttledTimers = {
  now: () => Date.now(),
  setTimeout: () => 0,
  clearTimeout: () => undefined,
};

const countingFetch = (input, init) => {
  if ((init?.method ?? "GET") === "GET") window.streamgate.heartbeats++;
  return fetch(input, init);
};

/** What the browser tests read: every segment load and every error of `hls`, with the time. */
function record(hls) {
  window.streamgate.hls = hls;
  window.streamgate.fragments = [];
  window.streamgate.mediaErrors = [];
  hls.on(Hls.Events.FRAG_LOADING, (_, { frag }) =>
    window.streamgate.fragments.push({ url: frag.url, requestedAt: Date.now(), loadedAt: null }),
  );
  hls.on(Hls.Events.FRAG_LOADED, (_, { frag }) => {
    const entry = window.streamgate.fragments.findLast((f) => f.url === frag.url && f.loadedAt === null);
    if (entry) entry.loadedAt = Date.now();
  });
  hls.on(Hls.Events.ERROR, (_, data) =>
    window.streamgate.mediaErrors.push({ at: Date.now(), details: data.details, fatal: data.fatal, status: data.response?.code ?? null }),
  );
}

async function play() {
  if (!settings.endpoint) return;
  const client = new StreamGateClient({
    endpoint: settings.endpoint,
    account: settings.account,
    streamId: settings.streamId,
    fetch: countingFetch,
    ...(params.get("hiddenTab") === "1" ? { timers: throttledTimers } : {}),
  });
  window.streamgate.client = client;
  client.on("state", (state) => {
    window.streamgate.state = state;
    show("state", state);
  });
  client.on("session", (session) => {
    window.streamgate.sessionId = session.sessionId;
    show("session", session.sessionId);
    show("expires", new Date(session.expiresAt).toLocaleTimeString());
  });
  client.on("revoked", (event) => {
    window.streamgate.revoked = { ...event, at: Date.now() };
    show("ended", `${event.reason}: ${event.message}`);
  });
  try {
    await client.open();
  } catch (error) {
    window.streamgate.error = `${error.code}: ${error.message}`;
    show("ended", window.streamgate.error);
    return;
  }
  const source = new URL(settings.src, settings.endpoint).toString();
  if (settings.player === "shaka") {
    shaka.polyfill.installAll();
    const player = new shaka.Player();
    await player.attach(video);
    attachShaka(player, client);
    await player.load(source);
  } else if (settings.player === "native-hls") {
    const maxBuffer = Number(params.get("maxBuffer") ?? 30);
    const hls = new Hls({ debug: params.has("debug"), maxBufferLength: maxBuffer, maxMaxBufferLength: 2 * maxBuffer });
    record(hls);
    hls.attachMedia(video);
    hls.loadSource(client.authorize(source));
  } else {
    const hls = new Hls({
      debug: params.has("debug"),
      ...(settings.player === "raw-hls"
        ? // hls.js as it comes, only told how to carry the credential: no stop on revocation.
          { xhrSetup: (xhr, url) => xhr.open("GET", client.authorize(url), true) }
        : {}),
    });
    record(hls);
    if (settings.player !== "raw-hls") attachHls(hls, client);
    hls.attachMedia(video);
    hls.loadSource(source);
  }
  await video.play().catch(() => undefined);
}

play();
