import {
  BackoffOptions,
  DEFAULT_BACKOFF,
  DEFAULT_JITTER,
  backoffDelayMs,
  heartbeatDelayMs,
  retryAfterMs,
  retryFitsTtl,
} from "./schedule.js";
import { Credential, CredentialPlacement, placeCredential } from "./credential.js";

/** Response header of a media answer carrying a fresh playback token. */
export const MEDIA_TOKEN_HEADER = "X-StreamGate-Token";
/** Response header: when that fresh token expires (RFC 3339). */
export const MEDIA_TOKEN_EXPIRES_HEADER = "X-StreamGate-Token-Expires-At";

/** A viewer session as the sidecar returns it. */
export interface Session {
  sessionId: string;
  account: string;
  streamId: string;
  state: "active" | "revoked" | "expired";
  reason?: string;
  createdAt: string;
  expiresAt: string;
  heartbeatIntervalSeconds: number;
  limit?: number;
  activeSessions?: number;
  /** Short-lived token for media requests, when the sidecar issues one. */
  playbackToken?: string;
  /** When `playbackToken` stops working (RFC 3339): two heartbeat intervals after issue. */
  playbackTokenExpiresAt?: string;
}

/** The sidecar's JSON error body. */
export interface ErrorBody {
  error: string;
  message: string;
  reason?: string;
  [key: string]: unknown;
}

/** Where the client is in a session's life. */
export type SessionState =
  | "idle"
  | "opening"
  | "active"
  | "retrying"
  | "revoked"
  | "ended";

/** Where the client learned that its session is over. */
export type RevocationSource = "heartbeat" | "media" | "open";

/** A session cut by the sidecar (evicted, kicked, expired, denied, shared) or refused on reopen. */
export interface RevokedEvent {
  /** `evicted`, `kicked`, `expired`, `denied`, `shared`, or the error code of a refusal. */
  reason: string;
  /** The sidecar's message, for people. */
  message: string;
  /** HTTP status of the answer that said so (0 when the sidecar could not be reached). */
  status: number;
  source: RevocationSource;
}

/** An answer the client could not turn into a session. */
export class StreamGateError extends Error {
  constructor(
    /** HTTP status (0 when the sidecar could not be reached). */
    readonly status: number,
    /** The sidecar's error code (`limit_exceeded`, `store_unavailable`, ...) or `unreachable`. */
    readonly code: string,
    message: string,
    /** The sidecar's whole error body, when there was one. */
    readonly body?: ErrorBody,
  ) {
    super(message);
    this.name = "StreamGateError";
  }
}

/** Timers and clock, injectable so the schedule is tested without waiting. */
export interface Timers {
  now(): number;
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** The page events the client listens to (a `Window` in a browser). */
export interface PageEvents {
  addEventListener(type: string, listener: (event: Event) => void): void;
  removeEventListener(type: string, listener: (event: Event) => void): void;
}

/** Options of {@link StreamGateClient}. */
export interface StreamGateOptions {
  /** Base URL of the sidecar, e.g. `https://edge.example.com` (no trailing path needed). */
  endpoint: string;
  /** The viewer's account (with viewer authentication the token decides; still sent). */
  account: string;
  /** This device's stream id: one per player, stable across reloads. */
  streamId: string;
  /** Identity token (JWT) sent as `Authorization: Bearer`, or a function returning a fresh one. */
  identityToken?: string | (() => string | Promise<string>);
  /** How media requests carry the credential (default: query parameter, which needs no preflight). */
  credentialPlacement?: CredentialPlacement;
  /** Spread of heartbeats, as a fraction of the interval (default 0.1). */
  jitter?: number;
  /** Retry backoff on an unavailable sidecar. */
  backoff?: Partial<BackoffOptions>;
  /** How long `open()` keeps retrying an unavailable sidecar (default 30 s). */
  openRetryMs?: number;
  /** Ends the session on `pagehide` (default true). */
  endOnPageHide?: boolean;
  /** Where `pagehide`/`pageshow` come from (default `globalThis` when it has events). */
  page?: PageEvents;
  /** `fetch` to use (default the global one). */
  fetch?: typeof fetch;
  /** Timers and clock (default the global ones). */
  timers?: Timers;
  /** Random source in [0, 1) (default `Math.random`). */
  random?: () => number;
}

type Listener<T> = (value: T) => void;

/** Events of {@link StreamGateClient} and their payloads. */
export interface StreamGateEvents {
  /** The state changed. */
  state: SessionState;
  /** A session was opened, renewed or reopened; its credential may be new. */
  session: Session;
  /** The session is over: stop playback now. */
  revoked: RevokedEvent;
  /** A heartbeat failed and will be retried (the session may still be alive). */
  retry: { status: number; delayMs: number; attempt: number };
}

const defaultTimers: Timers = {
  now: () => Date.now(),
  setTimeout: (callback, ms) => globalThis.setTimeout(callback, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/**
 * A viewer's StreamGate session: opens it, heartbeats at the advertised interval, retries an
 * unavailable sidecar within the TTL, reopens a session the store lost, reports revocation, and
 * ends it when the page goes away. Player adapters use {@link authorize} and
 * {@link authHeaders} for every media request and {@link reportMediaResponse} for refusals.
 */
export class StreamGateClient {
  private readonly options: StreamGateOptions;
  private readonly fetchImpl: typeof fetch;
  private readonly timers: Timers;
  private readonly random: () => number;
  private readonly backoff: BackoffOptions;
  private readonly listeners = new Map<keyof StreamGateEvents, Set<Listener<never>>>();
  private current: Session | undefined;
  private currentState: SessionState = "idle";
  private lastRevocation: RevokedEvent | undefined;
  private timer: unknown;
  private attempt = 0;
  /** Bumped whenever the loop is restarted or stopped, so stale answers are ignored. */
  private generation = 0;
  private readonly onPageHide = () => this.endOnUnload();
  private readonly onPageShow = (event: Event) => {
    // Back from the back/forward cache: the session was ended on pagehide; open a new one.
    if ((event as PageTransitionEvent).persisted && this.currentState === "ended") {
      this.open().catch(() => undefined);
    }
  };
  private readonly page: PageEvents | undefined;

  constructor(options: StreamGateOptions) {
    this.options = options;
    const fetchImpl = options.fetch ?? globalThis.fetch;
    if (typeof fetchImpl !== "function") {
      throw new TypeError("StreamGateClient: no fetch available; pass options.fetch");
    }
    this.fetchImpl = fetchImpl.bind(globalThis);
    this.timers = options.timers ?? defaultTimers;
    this.random = options.random ?? Math.random;
    this.backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    const page =
      options.page ??
      (typeof (globalThis as { addEventListener?: unknown }).addEventListener === "function"
        ? (globalThis as unknown as PageEvents)
        : undefined);
    this.page = options.endOnPageHide === false ? undefined : page;
    this.page?.addEventListener("pagehide", this.onPageHide);
    this.page?.addEventListener("pageshow", this.onPageShow);
  }

  /** The current state. */
  get state(): SessionState {
    return this.currentState;
  }

  /** The last session the sidecar returned. */
  get session(): Session | undefined {
    return this.current;
  }

  /** Why the session ended, once revoked. */
  get revocation(): RevokedEvent | undefined {
    return this.lastRevocation;
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof StreamGateEvents>(event: K, listener: Listener<StreamGateEvents[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  private emit<K extends keyof StreamGateEvents>(event: K, value: StreamGateEvents[K]): void {
    for (const listener of [...(this.listeners.get(event) ?? [])]) {
      try {
        (listener as Listener<StreamGateEvents[K]>)(value);
      } catch (error) {
        // A listener's bug must not stop the heartbeat loop or other listeners.
        console.error("StreamGateClient: listener failed", error);
      }
    }
  }

  private setState(state: SessionState): void {
    if (this.currentState !== state) {
      this.currentState = state;
      this.emit("state", state);
    }
  }

  /** The credential media requests carry now: the playback token if issued, else the session id. */
  credential(): Credential | undefined {
    if (!this.current) {
      return undefined;
    }
    return this.current.playbackToken
      ? { kind: "token", value: this.current.playbackToken }
      : { kind: "session", value: this.current.sessionId };
  }

  /** `url` with the credential in its query, when the placement says so. */
  authorize(url: string): string {
    return placeCredential(this.options.credentialPlacement ?? "query", this.credential(), url).url;
  }

  /** Headers a media request carries, when the placement says so. */
  authHeaders(): Record<string, string> {
    return placeCredential(this.options.credentialPlacement ?? "query", this.credential(), "")
      .headers;
  }

  private streamingUrl(): string {
    const base = this.options.endpoint.replace(/\/+$/, "");
    const query = new URLSearchParams({
      account: this.options.account,
      streamId: this.options.streamId,
    });
    return `${base}/streaming?${query}`;
  }

  private async apiHeaders(): Promise<Record<string, string>> {
    const token = this.options.identityToken;
    if (token === undefined) {
      return {};
    }
    const value = typeof token === "function" ? await token() : token;
    return { Authorization: `Bearer ${value}` };
  }

  private async call(method: "PUT" | "GET" | "DELETE", keepalive = false): Promise<Response> {
    return this.fetchImpl(this.streamingUrl(), {
      method,
      headers: await this.apiHeaders(),
      cache: "no-store",
      keepalive,
    });
  }

  /**
   * Opens the session (or renews it when this stream already has one) and starts heartbeating.
   * Retries an unavailable sidecar for up to `openRetryMs`; rejects with a
   * {@link StreamGateError} when refused (`limit_exceeded`, `unauthenticated`, ...).
   */
  async open(): Promise<Session> {
    const generation = ++this.generation;
    this.clearTimer();
    this.lastRevocation = undefined;
    this.setState("opening");
    const deadline = this.timers.now() + (this.options.openRetryMs ?? 30_000);
    for (let attempt = 0; ; attempt++) {
      let response: Response | undefined;
      try {
        response = await this.call("PUT");
      } catch {
        response = undefined;
      }
      if (generation !== this.generation) {
        throw new StreamGateError(0, "superseded", "the client was reopened or ended meanwhile");
      }
      const session = response && response.ok ? await readSession(response) : undefined;
      if (generation !== this.generation) {
        throw new StreamGateError(0, "superseded", "the client was reopened or ended meanwhile");
      }
      if (session) {
        this.accept(session);
        this.attempt = 0;
        this.setState("active");
        this.scheduleHeartbeat(generation);
        return session;
      }
      // A 2xx without a session body (a proxy's error page) counts as an unavailable sidecar.
      const status = response && !response.ok ? response.status : 0;
      const body = response ? await readError(response) : undefined;
      if (isRetryable(status)) {
        const delay =
          retryAfterMs(response?.headers.get("retry-after"), this.timers.now()) ??
          backoffDelayMs(attempt, this.backoff, this.random);
        if (this.timers.now() + delay < deadline) {
          this.emit("retry", { status, delayMs: delay, attempt });
          await this.sleep(delay);
          if (generation !== this.generation) {
            throw new StreamGateError(0, "superseded", "the client was reopened or ended meanwhile");
          }
          continue;
        }
      }
      this.setState("idle");
      throw new StreamGateError(
        status,
        body?.error ?? (status === 0 ? "unreachable" : `http_${status}`),
        body?.message ?? `opening the session failed with status ${status}`,
        body,
      );
    }
  }

  /** Ends the session (DELETE) and stops heartbeating. */
  async end(): Promise<void> {
    const wasLive = this.isLive();
    this.stopLoop();
    this.setState("ended");
    if (wasLive) {
      await this.call("DELETE").catch(() => undefined);
    }
  }

  /** Stops heartbeating and forgets page events, without ending the session. */
  dispose(): void {
    this.stopLoop();
    this.page?.removeEventListener("pagehide", this.onPageHide);
    this.page?.removeEventListener("pageshow", this.onPageShow);
  }

  /** Sends a heartbeat now (e.g. after a refused media request, to learn why). */
  heartbeatNow(): Promise<void> {
    if (!this.isLive()) {
      return Promise.resolve();
    }
    this.clearTimer();
    return this.heartbeat(this.generation);
  }

  /**
   * Tells the client how the proxy answered a media request. A 403/410 `session_gone` revokes
   * at once with its reason; another refusal (an unreadable body, `not_found`) triggers an
   * immediate heartbeat to learn what happened. Returns true when the session is now revoked.
   */
  reportMediaResponse(status: number, body?: unknown): boolean {
    if (status !== 403 && status !== 410) {
      return false;
    }
    if (!this.isLive()) {
      return this.currentState === "revoked";
    }
    const error = parseErrorBody(body);
    if (error?.error === "session_gone") {
      this.revoke({
        reason: error.reason ?? "gone",
        message: error.message,
        status,
        source: "media",
      });
      return true;
    }
    void this.heartbeatNow();
    return false;
  }

  /**
   * Takes the fresh playback token a media response hands back (`X-StreamGate-Token`, with
   * `X-StreamGate-Token-Expires-At`): a media request renews the session, so a player that only
   * plays (a hidden tab whose heartbeat timers do not fire) keeps a token that works. `header`
   * reads a response header by name (`(name) => xhr.getResponseHeader(name)`, or
   * `(name) => response.headers.get(name)`). A token expiring no later than the one held, or
   * one arriving while the session is not live, is ignored. Returns whether it was taken.
   * Adapters call this for every media response.
   */
  acceptMediaResponseHeaders(header: (name: string) => string | null | undefined): boolean {
    const session = this.current;
    if (!session || !this.isLive()) {
      return false;
    }
    const token = header(MEDIA_TOKEN_HEADER);
    const expiresAt = header(MEDIA_TOKEN_EXPIRES_HEADER);
    if (!token || !expiresAt) {
      return false;
    }
    const expiresMs = Date.parse(expiresAt);
    const heldMs = session.playbackTokenExpiresAt ? Date.parse(session.playbackTokenExpiresAt) : NaN;
    if (Number.isNaN(expiresMs) || (!Number.isNaN(heldMs) && expiresMs <= heldMs)) {
      return false;
    }
    this.current = { ...session, playbackToken: token, playbackTokenExpiresAt: expiresAt };
    return true;
  }

  private isLive(): boolean {
    return this.currentState === "active" || this.currentState === "retrying";
  }

  private accept(session: Session): void {
    this.current = session;
    this.emit("session", session);
  }

  private revoke(event: RevokedEvent): void {
    this.stopLoop();
    this.lastRevocation = event;
    this.setState("revoked");
    this.emit("revoked", event);
  }

  private stopLoop(): void {
    this.generation++;
    this.clearTimer();
  }

  private clearTimer(): void {
    if (this.timer !== undefined) {
      this.timers.clearTimeout(this.timer);
      this.timer = undefined;
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.timer = this.timers.setTimeout(() => {
        this.timer = undefined;
        resolve();
      }, ms);
    });
  }

  private scheduleHeartbeat(generation: number): void {
    const interval = this.current?.heartbeatIntervalSeconds ?? 30;
    this.schedule(generation, heartbeatDelayMs(interval, this.options.jitter ?? DEFAULT_JITTER, this.random));
  }

  private schedule(generation: number, delayMs: number): void {
    this.clearTimer();
    this.timer = this.timers.setTimeout(() => {
      this.timer = undefined;
      void this.heartbeat(generation);
    }, delayMs);
  }

  private async heartbeat(generation: number): Promise<void> {
    let response: Response | undefined;
    try {
      response = await this.call("GET");
    } catch {
      response = undefined;
    }
    if (generation !== this.generation) {
      return;
    }
    const session = response && response.ok ? await readSession(response) : undefined;
    if (generation !== this.generation) {
      return;
    }
    // A 2xx without a session body counts as no answer: retried like an unavailable sidecar.
    const status = response && !response.ok ? response.status : 0;
    if (session) {
      this.accept(session);
      if (generation !== this.generation) {
        return; // a listener ended or reopened the session
      }
      this.attempt = 0;
      this.setState("active");
      this.scheduleHeartbeat(generation);
      return;
    }
    const body = response ? await readError(response) : undefined;
    if (generation !== this.generation) {
      return;
    }
    if (status === 404) {
      // The store no longer knows the session (it lost it, or it was ended elsewhere): reopen.
      try {
        await this.open();
      } catch (error) {
        if (error instanceof StreamGateError && error.code !== "superseded") {
          this.revoke({ reason: error.code, message: error.message, status: error.status, source: "open" });
        }
      }
      return;
    }
    if (isRetryable(status)) {
      const delay =
        retryAfterMs(response?.headers.get("retry-after"), this.timers.now()) ??
        backoffDelayMs(this.attempt, this.backoff, this.random);
      const expiresAt = Date.parse(this.current?.expiresAt ?? "");
      if (Number.isNaN(expiresAt) || retryFitsTtl(this.timers.now(), delay, expiresAt)) {
        this.emit("retry", { status, delayMs: delay, attempt: this.attempt });
        this.attempt++;
        this.setState("retrying");
        this.schedule(generation, delay);
        return;
      }
      this.revoke({
        reason: "expired",
        message: "the sidecar did not renew the session before its TTL ran out",
        status,
        source: "heartbeat",
      });
      return;
    }
    this.revoke({
      reason: body?.reason ?? body?.error ?? `http_${status}`,
      message: body?.message ?? `the heartbeat was refused with status ${status}`,
      status,
      source: "heartbeat",
    });
  }

  private endOnUnload(): void {
    if (!this.isLive()) {
      return;
    }
    this.stopLoop();
    this.setState("ended");
    // keepalive lets the request outlive the page; the identity token must be at hand
    // synchronously, so a token function's last value is not awaited here.
    const token = this.options.identityToken;
    const headers: Record<string, string> =
      typeof token === "string" ? { Authorization: `Bearer ${token}` } : {};
    void this.fetchImpl(this.streamingUrl(), { method: "DELETE", headers, keepalive: true }).catch(
      () => undefined,
    );
  }
}

/** 503 (store or auth unavailable), 502/504 in front of the sidecar, 429 with Retry-After from a
 * gateway, and no answer at all are worth retrying; anything else is an answer. */
function isRetryable(status: number): boolean {
  return status === 0 || status === 502 || status === 503 || status === 504;
}

async function readSession(response: Response): Promise<Session | undefined> {
  try {
    const body = (await response.json()) as Session;
    return body && typeof body.sessionId === "string" ? body : undefined;
  } catch {
    return undefined;
  }
}

async function readError(response: Response): Promise<ErrorBody | undefined> {
  try {
    return parseErrorBody(await response.text());
  } catch {
    return undefined;
  }
}

/** The sidecar's error body from a parsed object, a JSON string or JSON bytes. */
export function parseErrorBody(body: unknown): ErrorBody | undefined {
  let value = body;
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    try {
      value = new TextDecoder().decode(value as ArrayBuffer);
    } catch {
      return undefined;
    }
  }
  if (typeof value === "string") {
    try {
      value = JSON.parse(value);
    } catch {
      return undefined;
    }
  }
  if (value && typeof value === "object" && typeof (value as ErrorBody).error === "string") {
    const error = value as ErrorBody;
    return { ...error, message: typeof error.message === "string" ? error.message : "" };
  }
  return undefined;
}
