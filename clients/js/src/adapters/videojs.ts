import type { StreamGateClient } from "../client.js";
import { onRevoked } from "./common.js";

/** A VHS request's options as `onRequest` hooks see them. */
export interface VhsRequestOptions {
  uri: string;
  headers?: Record<string, string>;
}

/** A VHS response as `onResponse` hooks see it (header names in lower case). */
export interface VhsResponse {
  statusCode?: number;
  body?: unknown;
  headers?: Record<string, string>;
}

/** The parts of VHS's xhr (video.js 8) the adapter uses. */
export interface VhsXhrLike {
  onRequest?(hook: (options: VhsRequestOptions) => VhsRequestOptions): void;
  offRequest?(hook: (options: VhsRequestOptions) => VhsRequestOptions): void;
  onResponse?(hook: (request: unknown, error: unknown, response: VhsResponse) => void): void;
  offResponse?(hook: (request: unknown, error: unknown, response: VhsResponse) => void): void;
  beforeRequest?: (options: VhsRequestOptions) => VhsRequestOptions;
}

/** The parts of a video.js player the adapter uses. */
export interface VideoJsPlayerLike {
  tech(options?: { IWillNotUseThisInPlugins: boolean }): { vhs?: { xhr: VhsXhrLike } } | undefined;
  on(type: string, listener: () => void): void;
  off(type: string, listener: () => void): void;
  pause(): void;
  reset(): void;
}

/**
 * Puts `client`'s credential on every request video.js's HLS/DASH engine (VHS) makes, and stops
 * playback the moment the session is revoked (pause, then `reset()`, which drops the source).
 * VHS exists once a source is set, so hooks are (re)installed on every `loadstart`. Returns a
 * function that detaches the adapter.
 */
export function attachVideoJs(player: VideoJsPlayerLike, client: StreamGateClient): () => void {
  const onRequest = (options: VhsRequestOptions) => {
    options.uri = client.authorize(options.uri);
    options.headers = { ...(options.headers ?? {}), ...client.authHeaders() };
    return options;
  };
  const onResponse = (_request: unknown, _error: unknown, response: VhsResponse) => {
    if (response?.statusCode !== undefined) {
      client.reportMediaResponse(response.statusCode, response.body);
    }
    // Every answer hands back a fresh token.
    const headers = response?.headers;
    if (headers) {
      client.acceptMediaResponseHeaders((name) => headers[name.toLowerCase()]);
    }
  };
  let hooked: VhsXhrLike | undefined;
  const install = () => {
    const xhr = player.tech({ IWillNotUseThisInPlugins: true })?.vhs?.xhr;
    if (!xhr || xhr === hooked) {
      return;
    }
    uninstall();
    if (xhr.onRequest) {
      xhr.onRequest(onRequest);
      xhr.onResponse?.(onResponse);
    } else {
      xhr.beforeRequest = onRequest;
    }
    hooked = xhr;
  };
  const uninstall = () => {
    if (!hooked) {
      return;
    }
    if (hooked.offRequest) {
      hooked.offRequest(onRequest);
      hooked.offResponse?.(onResponse);
    } else if (hooked.beforeRequest === onRequest) {
      hooked.beforeRequest = undefined;
    }
    hooked = undefined;
  };
  install();
  player.on("loadstart", install);
  const unsubscribe = onRevoked(client, () => {
    player.pause();
    player.reset();
  });
  return () => {
    unsubscribe();
    player.off("loadstart", install);
    uninstall();
  };
}
