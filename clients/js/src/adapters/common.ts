import type { RevokedEvent, StreamGateClient } from "../client.js";

/** Stops playback in one place, once, when the client reports the session revoked. */
export function onRevoked(
  client: StreamGateClient,
  stop: (event: RevokedEvent) => void,
): () => void {
  let stopped = false;
  const run = (event: RevokedEvent) => {
    if (stopped) {
      return;
    }
    stopped = true;
    stop(event);
  };
  const unsubscribe = client.on("revoked", run);
  // Revoked before the adapter was attached: stop now.
  if (client.state === "revoked" && client.revocation) {
    run(client.revocation);
  }
  return unsubscribe;
}

/** Pauses a media element and drops what it buffered, so the picture stops at once. */
export function haltMedia(media: HTMLMediaElement | null | undefined): void {
  if (!media) {
    return;
  }
  try {
    media.pause();
  } catch {
    // A detached or errored element may refuse; the loader is stopped anyway.
  }
}
