// fedrelay.js's subscribe() under Node, ws standing in for the browser's WebSocket: follows
// one run from seq 0, prints {"open": true} once connected, then each event's seq and
// type as JSON lines, and after COUNT events {"done": true, "connects": N, "controls": [...]}.
//
//   node follow_run.mjs ws://127.0.0.1:PORT RUN_ID COUNT
import { readFile } from "node:fs/promises";
import WebSocket from "ws";

/** A browser's WebSocket reports a failed connection to onerror/onclose and goes on; ws throws
 * on an "error" event nobody listens to, so listen. */
class BrowserLikeWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    this.on("error", () => {});
  }
}
globalThis.WebSocket = BrowserLikeWebSocket;
// fedrelay.js is an ES module without a package.json saying so: load its text as one.
const source = await readFile(new URL("../../src/fedrelay/relay/static/fedrelay.js", import.meta.url), "utf8");
const { subscribe } = await import(`data:text/javascript;base64,${Buffer.from(source).toString("base64")}`);

const [url, runId, count] = process.argv.slice(2);
const controls = [];
let received = 0;
const sub = subscribe({
  url,
  runIds: [runId],
  onEvent(event) {
    console.log(JSON.stringify({ seq: event.seq, type: event.type, run_id: event.run_id }));
    received += 1;
    if (received === Number(count)) {
      console.log(JSON.stringify({ done: true, connects: sub.connects, controls }));
      sub.close();
      process.exit(0);
    }
  },
  onControl: (frame) => controls.push(frame),
  onStatus(status) {
    if (status === "open") console.log(JSON.stringify({ open: true }));
  },
});
setTimeout(() => {
  console.log(JSON.stringify({ done: false, connects: sub.connects, controls, received }));
  process.exit(1);
}, 60000);
