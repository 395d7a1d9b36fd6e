// Connects to ws://localhost:PORT/ as a Node client on a machine whose hosts file says
// "::1 localhost" before "127.0.0.1 localhost" (Debian's default; Node >= 17 then tries
// ::1 first). The lookup below gives exactly that answer whatever this machine's
// /etc/hosts says, and family autoselection is off, so only ::1 is tried: the
// connection succeeds only if the relay listens there.
//
//   node localhost_client.mjs PORT   ->  {"remoteAddress": "::1", "pong": true}
import WebSocket from "ws";

const port = process.argv[2];

function localhostIpv6First(hostname, options, callback) {
  const all = [
    { address: "::1", family: 6 },
    { address: "127.0.0.1", family: 4 },
  ];
  if (hostname !== "localhost") throw new Error(`only localhost here, not ${hostname}`);
  if (options.all) callback(null, all);
  else callback(null, all[0].address, all[0].family);
}

const ws = new WebSocket(`ws://localhost:${port}/`, { lookup: localhostIpv6First, autoSelectFamily: false });
let remoteAddress = null;
const timer = setTimeout(() => finish({ error: "timed out" }), 10000);

function finish(result) {
  clearTimeout(timer);
  console.log(JSON.stringify({ remoteAddress, ...result }));
  ws.terminate();
  process.exitCode = result.error ? 1 : 0;
}

ws.on("upgrade", (response) => {
  remoteAddress = response.socket.remoteAddress;
});
ws.on("open", () => ws.send(JSON.stringify({ type: "ping" })));
ws.on("message", (data) => {
  if (JSON.parse(data.toString()).type === "pong") finish({ pong: true });
});
ws.on("error", (error) => finish({ error: String(error.message || error) }));
