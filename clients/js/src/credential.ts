/**
 * How a media request proves its session. Today the proxy takes the session id
 * (`X-StreamGate-Session` or `?session=`); with viewer authentication it takes a short-lived
 * playback token (`X-StreamGate-Token` or `?sg=`). Adapters never build these themselves.
 */

/** What a media request carries. */
export interface Credential {
  kind: "session" | "token";
  value: string;
}

/** A request with its credential placed. */
export interface PlacedCredential {
  url: string;
  headers: Record<string, string>;
}

/**
 * Where the credential goes: `query` (default: a cross-origin GET with no custom header needs no
 * CORS preflight, so each segment costs one round trip), `header`, or a function for anything
 * else (a CDN's own token scheme).
 */
export type CredentialPlacement =
  | "query"
  | "header"
  | ((credential: Credential, url: string) => PlacedCredential);

/** Header and query parameter names per credential kind. */
export const CREDENTIAL_NAMES = {
  session: { header: "X-StreamGate-Session", query: "session" },
  token: { header: "X-StreamGate-Token", query: "sg" },
} as const;

/** `url` and headers carrying `credential` as `placement` says; unchanged without a credential. */
export function placeCredential(
  placement: CredentialPlacement,
  credential: Credential | undefined,
  url: string,
): PlacedCredential {
  if (!credential) {
    return { url, headers: {} };
  }
  if (typeof placement === "function") {
    return placement(credential, url);
  }
  const names = CREDENTIAL_NAMES[credential.kind];
  if (placement === "header") {
    return { url, headers: { [names.header]: credential.value } };
  }
  return { url: withQueryParameter(url, names.query, credential.value), headers: {} };
}

/** `url` with `name=value` set in its query (replacing an older value), keeping its fragment. */
export function withQueryParameter(url: string, name: string, value: string): string {
  if (url === "") {
    return url;
  }
  const hashAt = url.indexOf("#");
  const fragment = hashAt >= 0 ? url.slice(hashAt) : "";
  const rest = hashAt >= 0 ? url.slice(0, hashAt) : url;
  const queryAt = rest.indexOf("?");
  const path = queryAt >= 0 ? rest.slice(0, queryAt) : rest;
  const params = new URLSearchParams(queryAt >= 0 ? rest.slice(queryAt + 1) : "");
  params.set(name, value);
  return `${path}?${params.toString()}${fragment}`;
}
