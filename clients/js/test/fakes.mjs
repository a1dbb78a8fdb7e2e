// Test doubles: a manual clock with timers, a scripted sidecar behind a fake fetch, page events.

/** Lets pending promise callbacks (fetch answers, awaits) run. */
export const settle = () => new Promise((resolve) => setImmediate(resolve));

export class FakeTimers {
  constructor(start = Date.parse("2026-01-01T00:00:00Z")) {
    this.t = start;
    this.queue = [];
    this.seq = 0;
  }
  now() {
    return this.t;
  }
  setTimeout(callback, ms) {
    const timer = { at: this.t + ms, callback, seq: ++this.seq };
    this.queue.push(timer);
    return timer;
  }
  clearTimeout(timer) {
    this.queue = this.queue.filter((t) => t !== timer);
  }
  /** Delays of the pending timers from now. */
  pending() {
    return this.queue.map((t) => t.at - this.t);
  }
  /** Moves the clock by `ms`, firing due timers in order and letting their work settle. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await settle();
      this.queue.sort((a, b) => a.at - b.at || a.seq - b.seq);
      const next = this.queue[0];
      if (!next || next.at > end) break;
      this.queue.shift();
      this.t = next.at;
      next.callback();
    }
    this.t = end;
    await settle();
  }
}

/** A JSON answer. */
export function answer(status, body, headers = {}) {
  return new Response(body === undefined ? null : JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

/** A session body as the sidecar returns it, expiring `ttlMs` after `timers.now()`. */
export function sessionBody(timers, overrides = {}) {
  const ttlMs = overrides.ttlMs ?? 90_000;
  const body = {
    sessionId: "a".repeat(40),
    account: "acct",
    streamId: "tv",
    state: "active",
    createdAt: new Date(timers.now()).toISOString(),
    expiresAt: new Date(timers.now() + ttlMs).toISOString(),
    heartbeatIntervalSeconds: 10,
    limit: 1,
    activeSessions: 1,
    ...overrides,
  };
  delete body.ttlMs;
  return body;
}

/**
 * A fake sidecar: `handlers[METHOD]` is a list of functions (or answers) used in turn; the last
 * one repeats. Records every call.
 */
export function fakeSidecar(handlers) {
  const calls = [];
  const used = {};
  const fetch = async (url, init = {}) => {
    const method = init.method ?? "GET";
    calls.push({ method, url: String(url), init });
    const list = handlers[method];
    if (!list || list.length === 0) throw new TypeError(`no handler for ${method}`);
    const index = Math.min(used[method] ?? 0, list.length - 1);
    used[method] = (used[method] ?? 0) + 1;
    const handler = list[index];
    const result = typeof handler === "function" ? handler(url, init) : handler;
    if (result instanceof Error) throw result;
    return result;
  };
  return { fetch, calls };
}

/** Page events the test can fire. */
export class FakePage extends EventTarget {
  fire(type, init = {}) {
    const event = new Event(type);
    Object.assign(event, init);
    this.dispatchEvent(event);
  }
}
