import type { StreamGateClient } from "../client.js";
import { haltMedia, onRevoked } from "./common.js";

/** A dash.js (5.x) request as its request interceptors see it. */
export interface DashRequest {
  url: string;
  headers?: Record<string, string>;
}

/** A dash.js (5.x) response as its response interceptors see it. */
export interface DashResponse {
  headers?: Record<string, string>;
}

/** The parts of a dash.js MediaPlayer the adapter uses (5.x interceptors, or 4.x RequestModifier). */
export interface DashPlayerLike {
  addRequestInterceptor?(interceptor: (request: DashRequest) => Promise<DashRequest>): void;
  removeRequestInterceptor?(interceptor: (request: DashRequest) => Promise<DashRequest>): void;
  addResponseInterceptor?(interceptor: (response: DashResponse) => Promise<DashResponse>): void;
  removeResponseInterceptor?(interceptor: (response: DashResponse) => Promise<DashResponse>): void;
  extend?(name: string, child: unknown, override: boolean): void;
  on(type: string, listener: (event: DashErrorEvent) => void): void;
  off(type: string, listener: (event: DashErrorEvent) => void): void;
  getVideoElement?(): HTMLMediaElement | null;
  reset(): void;
}

/** What the adapter reads from dash.js's `error` event. */
export interface DashErrorEvent {
  error?: { code?: number; message?: string; data?: { response?: { status?: number; data?: unknown }; status?: number; responseText?: string } };
}

/**
 * Puts `client`'s credential on every request `player` makes, and stops playback the moment the
 * session is revoked (pause, then `reset()`, which drops the source and its buffer). Call before
 * `player.initialize()`/`attachSource()`. Returns a function that detaches the adapter.
 */
export function attachDash(player: DashPlayerLike, client: StreamGateClient): () => void {
  const interceptor = async (request: DashRequest) => {
    request.url = client.authorize(request.url);
    request.headers = { ...(request.headers ?? {}), ...client.authHeaders() };
    return request;
  };
  // Every answer hands back a fresh token (dash.js 5.x; 4.x has no response hook).
  const responseInterceptor = async (response: DashResponse) => {
    const headers = response.headers ?? {};
    const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
    client.acceptMediaResponseHeaders((name) => lower[name.toLowerCase()]);
    return response;
  };
  player.addResponseInterceptor?.(responseInterceptor);
  if (player.addRequestInterceptor) {
    player.addRequestInterceptor(interceptor);
  } else if (player.extend) {
    player.extend(
      "RequestModifier",
      () => ({
        modifyRequestURL: (url: string) => client.authorize(url),
        modifyRequestHeader: (xhr: XMLHttpRequest) => {
          for (const [name, value] of Object.entries(client.authHeaders())) {
            xhr.setRequestHeader(name, value);
          }
          return xhr;
        },
      }),
      true,
    );
  } else {
    throw new Error("attachDash: this dash.js has neither addRequestInterceptor nor extend");
  }
  const onError = (event: DashErrorEvent) => {
    const data = event.error?.data;
    const status = data?.response?.status ?? data?.status;
    if (status !== undefined) {
      client.reportMediaResponse(status, data?.response?.data ?? data?.responseText);
    }
  };
  player.on("error", onError);
  const unsubscribe = onRevoked(client, () => {
    haltMedia(player.getVideoElement?.());
    player.reset();
  });
  return () => {
    unsubscribe();
    player.off("error", onError);
    player.removeRequestInterceptor?.(interceptor);
    player.removeResponseInterceptor?.(responseInterceptor);
  };
}
