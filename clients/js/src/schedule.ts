/**
 * When to send the next heartbeat or retry: pure functions of the advertised interval, the
 * attempt number and a random source, so that the schedule is tested without timers.
 */

/** Exponential backoff for retries of an unavailable sidecar. */
export interface BackoffOptions {
  /** Delay before the first retry, in milliseconds (default 500). */
  initialMs: number;
  /** Longest delay between two retries, in milliseconds (default 8000). */
  maxMs: number;
  /** Growth per attempt (default 2). */
  factor: number;
}

/** The defaults of {@link BackoffOptions}. */
export const DEFAULT_BACKOFF: BackoffOptions = { initialMs: 500, maxMs: 8000, factor: 2 };

/** Fraction of the heartbeat interval by which heartbeats are spread (default 0.1). */
export const DEFAULT_JITTER = 0.1;

/**
 * Delay before the next heartbeat: the advertised interval shortened by up to `jitter` of it,
 * so that viewers who started together do not heartbeat together, and never later than
 * advertised (the TTL is at least twice the interval, so an early heartbeat is always safe).
 */
export function heartbeatDelayMs(
  intervalSeconds: number,
  jitter: number,
  random: () => number,
): number {
  const interval = Math.max(intervalSeconds, 0.05) * 1000;
  const spread = Math.min(Math.max(jitter, 0), 0.5);
  return Math.round(interval * (1 - spread * random()));
}

/**
 * Delay before retry number `attempt` (0 for the first): exponential up to `maxMs`, with "equal
 * jitter" (half fixed, half random) so that retries of many viewers spread out after an outage.
 */
export function backoffDelayMs(
  attempt: number,
  options: BackoffOptions,
  random: () => number,
): number {
  const exponential = options.initialMs * Math.pow(options.factor, Math.max(attempt, 0));
  const capped = Math.min(options.maxMs, exponential);
  return Math.round(capped / 2 + (capped / 2) * random());
}

/**
 * A `Retry-After` header's delay in milliseconds (seconds or an HTTP date), or undefined when
 * absent or unreadable.
 */
export function retryAfterMs(header: string | null | undefined, nowMs: number): number | undefined {
  if (header == null || header.trim() === "") {
    return undefined;
  }
  const text = header.trim();
  if (/^\d+$/.test(text)) {
    return Number(text) * 1000;
  }
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, date - nowMs);
}

/**
 * Whether a retry after `delayMs` still lands before the session expires at `expiresAtMs`;
 * past that, the session is gone whatever the sidecar says.
 */
export function retryFitsTtl(nowMs: number, delayMs: number, expiresAtMs: number): boolean {
  return nowMs + delayMs < expiresAtMs;
}
