/**
 * StreamGate's browser client: a viewer session that opens, heartbeats, retries, reopens and
 * reports revocation, plus adapters that carry its credential on every media request of hls.js,
 * Shaka Player, dash.js or video.js and stop playback the moment the session is revoked.
 *
 * @packageDocumentation
 */
export {
  MEDIA_TOKEN_EXPIRES_HEADER,
  MEDIA_TOKEN_HEADER,
  StreamGateClient,
  StreamGateError,
  parseErrorBody,
} from "./client.js";
export type {
  ErrorBody,
  PageEvents,
  RevocationSource,
  RevokedEvent,
  Session,
  SessionState,
  StreamGateEvents,
  StreamGateOptions,
  Timers,
} from "./client.js";
export { CREDENTIAL_NAMES, placeCredential, withQueryParameter } from "./credential.js";
export type { Credential, CredentialPlacement, PlacedCredential } from "./credential.js";
export {
  DEFAULT_BACKOFF,
  DEFAULT_JITTER,
  backoffDelayMs,
  heartbeatDelayMs,
  retryAfterMs,
  retryFitsTtl,
} from "./schedule.js";
export type { BackoffOptions } from "./schedule.js";
export { attachHls } from "./adapters/hlsjs.js";
export type { HlsErrorData, HlsLike } from "./adapters/hlsjs.js";
export { attachShaka } from "./adapters/shaka.js";
export type { ShakaPlayerLike, ShakaRequest, ShakaResponse } from "./adapters/shaka.js";
export { attachDash } from "./adapters/dashjs.js";
export type { DashErrorEvent, DashPlayerLike, DashRequest, DashResponse } from "./adapters/dashjs.js";
export { attachVideoJs } from "./adapters/videojs.js";
export type { VhsRequestOptions, VhsResponse, VhsXhrLike, VideoJsPlayerLike } from "./adapters/videojs.js";
