import type { StreamGateClient } from "../client.js";

import { haltMedia, onRevoked } from "./common.js";

/** The parts of an hls.js instance (1.x) the adapter uses. */
export interface HlsLike {
  config: {
    xhrSetup?: (xhr: XMLHttpRequest, url: string, context?: unknown) => void | Promise<void>;
    fetchSetup?: (context: { url: string }, init: RequestInit) => Request | Promise<Request>;
  };
  media: HTMLMediaElement | null;
  on(event: string, listener: (event: string, data: HlsErrorData) => void): void;
  off(event: string, listener: (event: string, data: HlsErrorData) => void): void;
  stopLoad(): void;
  detachMedia(): void;
}

/** What the adapter reads from hls.js's `hlsError` event. */
export interface HlsErrorData {
  response?: { code?: number; data?: unknown };
  networkDetails?: unknown;
}

/** `XMLHttpRequest.HEADERS_RECEIVED`. */
const HEADERS_RECEIVED = 2;

/** hls.js's error event name (`Hls.Events.ERROR`). */
const HLS_ERROR = "hlsError";

/**
 * Puts `client`'s credential on every request `hls` makes (playlists, segments, keys), takes
 * the fresh token each answer hands back (requests made with XMLHttpRequest, hls.js's default
 * loader), and stops
 * playback the moment the session is revoked, whether a heartbeat or a refused request says so:
 * loading stops, the video pauses and the media is detached, which drops the buffer, so the
 * picture cannot play out what was buffered. Call before `hls.loadSource()`. Returns a function
 * that detaches the adapter.
 */
export function attachHls(hls: HlsLike, client: StreamGateClient): () => void {
  const previousXhrSetup = hls.config.xhrSetup;
  const previousFetchSetup = hls.config.fetchSetup;
  hls.config.xhrSetup = async (xhr, url, context) => {
    if (previousXhrSetup) {
      await previousXhrSetup(xhr, url, context);
    }
    // hls.js opens the request itself unless xhrSetup already did: open it on the authorized URL.
    if (xhr.readyState === 0) {
      xhr.open("GET", client.authorize(url), true);
    }
    for (const [name, value] of Object.entries(client.authHeaders())) {
      xhr.setRequestHeader(name, value);
    }
    // The answer hands back a fresh token: take it once its headers are in.
    xhr.addEventListener?.("readystatechange", () => {
      if (xhr.readyState === HEADERS_RECEIVED) {
        client.acceptMediaResponseHeaders((name) => xhr.getResponseHeader(name));
      }
    });
  };
  hls.config.fetchSetup = async (context, init) => {
    const base = previousFetchSetup ? await previousFetchSetup(context, init) : new Request(context.url, init);
    const headers = new Headers(base.headers);
    for (const [name, value] of Object.entries(client.authHeaders())) {
      headers.set(name, value);
    }
    return new Request(client.authorize(base.url), { ...init, headers });
  };

  const onError = (_event: string, data: HlsErrorData) => {
    const status = data.response?.code;
    if (status === 403 || status === 410) {
      client.reportMediaResponse(status, responseBody(data));
    }
  };
  hls.on(HLS_ERROR, onError);
  const unsubscribe = onRevoked(client, () => {
    hls.stopLoad();
    haltMedia(hls.media);
    hls.detachMedia();
  });
  return () => {
    unsubscribe();
    hls.off(HLS_ERROR, onError);
    hls.config.xhrSetup = previousXhrSetup;
    hls.config.fetchSetup = previousFetchSetup;
  };
}

/** The refused request's body: from the XMLHttpRequest hls.js passes as networkDetails. */
function responseBody(data: HlsErrorData): unknown {
  if (data.response?.data !== undefined) {
    return data.response.data;
  }
  const xhr = data.networkDetails as Partial<XMLHttpRequest> | undefined;
  if (!xhr || typeof xhr !== "object") {
    return undefined;
  }
  try {
    if (xhr.responseType === "" || xhr.responseType === "text") {
      return xhr.responseText;
    }
    return xhr.response;
  } catch {
    return undefined;
  }
}

