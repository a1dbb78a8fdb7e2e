import type { StreamGateClient } from "../client.js";
import { haltMedia, onRevoked } from "./common.js";

/** A Shaka request as its request filters see it. */
export interface ShakaRequest {
  uris: string[];
  headers: Record<string, string>;
}

/** A Shaka response as its response filters see it (header names in lower case). */
export interface ShakaResponse {
  headers: Record<string, string>;
}

/** The parts of a Shaka Player (4.x, 5.x) the adapter uses. */
export interface ShakaPlayerLike {
  getNetworkingEngine(): {
    registerRequestFilter(filter: (type: number, request: ShakaRequest) => void): void;
    unregisterRequestFilter(filter: (type: number, request: ShakaRequest) => void): void;
    registerResponseFilter?(filter: (type: number, response: ShakaResponse) => void): void;
    unregisterResponseFilter?(filter: (type: number, response: ShakaResponse) => void): void;
  } | null;
  getMediaElement(): HTMLMediaElement | null;
  addEventListener(type: string, listener: (event: Event) => void): void;
  removeEventListener(type: string, listener: (event: Event) => void): void;
  unload(initializeMediaSource?: boolean): Promise<void>;
}

/** Shaka's `BAD_HTTP_STATUS` error: data is [uri, status, responseText, headers, type]. */
const BAD_HTTP_STATUS = 1001;

/**
 * Puts `client`'s credential on every request `player` makes, takes the fresh token each answer
 * hands back, and stops playback the moment
 * the session is revoked: the video pauses and the player unloads, dropping its buffer. A
 * refused segment (Shaka treats 403 as critical and does not retry it) reports the sidecar's
 * reason. Returns a function that detaches the adapter.
 */
export function attachShaka(player: ShakaPlayerLike, client: StreamGateClient): () => void {
  const networking = player.getNetworkingEngine();
  if (!networking) {
    throw new Error("attachShaka: the player has no networking engine (was it destroyed?)");
  }
  const filter = (_type: number, request: ShakaRequest) => {
    request.uris = request.uris.map((uri) => client.authorize(uri));
    Object.assign(request.headers, client.authHeaders());
  };
  networking.registerRequestFilter(filter);
  // Every answer hands back a fresh token.
  const responseFilter = (_type: number, response: ShakaResponse) => {
    client.acceptMediaResponseHeaders((name) => response.headers?.[name.toLowerCase()]);
  };
  networking.registerResponseFilter?.(responseFilter);
  const onError = (event: Event) => {
    const error = (event as CustomEvent).detail as { code?: number; data?: unknown[] } | undefined;
    if (error?.code === BAD_HTTP_STATUS && Array.isArray(error.data)) {
      client.reportMediaResponse(Number(error.data[1]), error.data[2]);
    }
  };
  player.addEventListener("error", onError);
  const unsubscribe = onRevoked(client, () => {
    haltMedia(player.getMediaElement());
    void player.unload(false).catch(() => undefined);
  });
  return () => {
    unsubscribe();
    player.removeEventListener("error", onError);
    networking.unregisterRequestFilter(filter);
    networking.unregisterResponseFilter?.(responseFilter);
  };
}
