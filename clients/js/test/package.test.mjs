import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const read = (path) => readFileSync(new URL(path, import.meta.url), "utf8");

test("the package version is the project's version, and it has no runtime dependencies", () => {
  const pkg = JSON.parse(read("../package.json"));
  const workspace = read("../../../Cargo.toml");
  const version = workspace.match(/\[workspace\.package\][^[]*?\nversion = "([^"]+)"/)[1];
  assert.equal(pkg.version, version);
  assert.equal(pkg.name, "@streamgate/client");
  assert.equal(pkg.dependencies, undefined);
  assert.equal(pkg.type, "module");
  assert.equal(pkg.exports["."].types, "./dist/index.d.ts");
});
