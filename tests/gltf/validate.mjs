// Validate glTF / GLB files with the Khronos glTF validator and print its report as JSON (one object per file).
// Usage: node validate.mjs FILE.glb [FILE.gltf ...]   (run `npm ci` in this folder first)
// Exits 0 when every file has no errors, 1 otherwise; warnings and infos are reported, not fatal.
import { readFile } from "node:fs/promises";
import path from "node:path";
import validator from "gltf-validator";

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs FILE.glb [...]");
  process.exit(2);
}
let failed = false;
const reports = [];
for (const file of files) {
  const bytes = new Uint8Array(await readFile(file));
  const report = await validator.validateBytes(bytes, {
    uri: path.basename(file),
    maxIssues: 100,
    externalResourceFunction: async (uri) =>
      new Uint8Array(await readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)))),
  });
  failed ||= report.issues.numErrors > 0;
  reports.push({ file, ...report });
}
console.log(JSON.stringify(reports, null, 2));
process.exit(failed ? 1 : 0);
