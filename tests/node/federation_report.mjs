// The dashboard's federation fold (static/federation.js) on runs read as JSON from stdin (a list of
// event lists): prints a report per run, for the test comparing them with the relay's
// (fedrelay/federation.py).
//
//   node federation_report.mjs FACTOR MIN_GAP < runs.json
import { readFile } from "node:fs/promises";

// federation.js imports nothing: load its text as an ES module.
const source = await readFile(new URL("../../src/fedrelay/relay/static/federation.js", import.meta.url), "utf8");
const { FederationHealth } = await import(`data:text/javascript;base64,${Buffer.from(source).toString("base64")}`);

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const runs = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const [factor, minGap] = process.argv.slice(2).map(Number);
const reports = runs.map((events) => {
  const health = new FederationHealth();
  for (const event of events) health.add(event);
  return health.report(factor, minGap);
});
process.stdout.write(JSON.stringify(reports));
