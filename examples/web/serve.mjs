// Serves the example player page, the built client library (clients/js/dist) and the players
// (clients/js/node_modules) on its own origin, apart from the sidecar's:
//   (cd clients/js && npm ci && npm run build) && node examples/web/serve.mjs [PORT]
// then open http://127.0.0.1:PORT/?endpoint=http://127.0.0.1:8080 (the sidecar must allow this
// origin: --cors-allowed-origins http://127.0.0.1:PORT).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { dirname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const client = join(here, "..", "..", "clients", "js");

const routes = [
  ["/lib/", join(client, "dist")],
  ["/vendor/hls.mjs", join(client, "node_modules", "hls.js", "dist", "hls.mjs")],
  ["/vendor/shaka-player.compiled.js", join(client, "node_modules", "shaka-player", "dist", "shaka-player.compiled.js")],
  ["/app.js", join(here, "app.js")],
  ["/", join(here, "index.html")],
];

const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".map": "application/json" };

/** The file behind a URL path, or undefined; never outside the served folders. */
function resolve(path) {
  for (const [prefix, target] of routes) {
    if (prefix.endsWith("/") && prefix !== "/") {
      if (!path.startsWith(prefix)) continue;
      const file = normalize(join(target, path.slice(prefix.length)));
      return file.startsWith(target + sep) ? file : undefined;
    }
    if (path === prefix) return target;
  }
  return undefined;
}

/** Starts the page server on `port` (0: any free one) of 127.0.0.1; resolves to its origin. */
export function startPageServer(port = 0) {
  const server = createServer(async (request, response) => {
    const path = new URL(request.url, "http://x").pathname;
    const file = resolve(path);
    try {
      if (!file) throw new Error("not found");
      const body = await readFile(file);
      const type = types[file.slice(file.lastIndexOf("."))] ?? "application/octet-stream";
      response.writeHead(200, { "content-type": type, "cache-control": "no-store" });
      response.end(body);
    } catch {
      response.writeHead(404, { "content-type": "text/plain" });
      response.end("not found\n");
    }
  });
  return new Promise((resolvePromise, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => {
      const { port: bound } = server.address();
      resolvePromise({ origin: `http://127.0.0.1:${bound}`, close: () => new Promise((r) => server.close(r)) });
    });
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { origin } = await startPageServer(Number(process.argv[2] ?? 8081));
  console.log(`example player page on ${origin}/`);
}
