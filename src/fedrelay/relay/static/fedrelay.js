// fedrelay.js: a small browser client for a fedrelay relay.
//
//   import { subscribe } from "/static/fedrelay.js";
//   const sub = subscribe({ runIds: ["run-1"], onEvent: (e) => console.log(e.seq, e.type, e.data) });
//
// Each event reaches onEvent once, in seq order per run. The client remembers
// the last seq of every run and, after a relay restart, a network drop or a
// "slow consumer" close (1013), reconnects with backoff and resumes from there.
// A run that has not started yet is waited for by the relay: no polling.
// Given several addresses of one relay (url: a list, or comma-separated), it
// moves to the next when a connection cannot be made or is lost, and resumes
// there from the same seqs (the nodes of one relay agree on them).
// Types: fedrelay.d.ts (generated from the relay's pydantic schema).

/** @typedef {import("./fedrelay.d.ts").Event} Event */
/** @typedef {import("./fedrelay.d.ts").RelayControl} RelayControl */

const SLOW_CONSUMER = 1013;
const PING_EVERY_MS = 15000;
const PING_TIMEOUT_MS = 10000;
const ASK_ELSEWHERE = new Set([502, 503, 504]); // "not this node, not now": the next address

/** The addresses in `url`: a list, or one string with several comma-separated; each once, in order. */
export function relayUrls(url) {
  const out = [];
  for (const item of Array.isArray(url) ? url : url == null ? [] : [url]) {
    for (const part of String(item).split(",")) {
      const address = part.trim();
      if (address && !out.includes(address)) out.push(address);
    }
  }
  return out;
}

/**
 * Which address to use, as fedrelay/failover.py decides for the Python clients: the first at
 * start; kept while it works (a switch costs a catch-up); after a failure the next, round robin;
 * backoff counted in rounds of the list, so one address behaves as it always did.
 * `undefined` stands for the page's own origin when no address is given.
 */
function failover(url) {
  const urls = relayUrls(url);
  if (!urls.length) urls.push(undefined);
  let index = 0;
  let misses = 0;
  let unreached = 0;
  return {
    get current() {
      return urls[index];
    },
    get allFailed() {
      return unreached >= urls.length;
    },
    /** Failures in a row since the last connection that made progress. */
    get misses() {
      return misses;
    },
    connected() {
      unreached = 0;
    },
    /** Move to the next address; the milliseconds to wait before connecting to it. */
    failed(progress = false) {
      if (progress) misses = 0;
      misses += 1;
      unreached += 1;
      index = (index + 1) % urls.length;
      return backoff(Math.ceil(misses / urls.length) - 1);
    },
  };
}

/** The relay's WebSocket base (ws://host:port) for a URL or the page's own origin. */
export function wsBase(url) {
  const base = new URL(url || globalThis.location.href);
  const scheme = { "https:": "wss:", "http:": "ws:", "wss:": "wss:", "ws:": "ws:" }[base.protocol] || "ws:";
  return `${scheme}//${base.host}`;
}

/** The relay's HTTP base (http://host:port) for a URL or the page's own origin. */
export function httpBase(url) {
  return wsBase(url).replace(/^ws/, "http");
}

function withToken(path, token) {
  if (!token) return path;
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

/** GET `path` from the current address of `relays`, else the next ones (once round the list). */
async function getJson(relays, path, token) {
  for (;;) {
    const url = `${httpBase(relays.current)}${path}`;
    let response;
    try {
      response = await fetch(withToken(url, token), { cache: "no-store" });
    } catch (error) {
      relays.failed();
      if (relays.allFailed) throw error;
      continue;
    }
    if (response.ok) {
      relays.connected();
      return response.json();
    }
    if (ASK_ELSEWHERE.has(response.status)) relays.failed();
    if (!ASK_ELSEWHERE.has(response.status) || relays.allFailed) {
      throw new Error(`${url}: HTTP ${response.status}`);
    }
  }
}

/** GET /api/runs: every run the relay knows, newest first (following `next_cursor` page by page). */
export async function fetchRuns({ url, token } = {}) {
  const relays = failover(url);
  const runs = [];
  let cursor = null;
  do {
    const page = await runsPage(relays, token, { limit: 1000, cursor });
    runs.push(...page.runs);
    cursor = page.next_cursor;
  } while (cursor);
  return runs;
}

/**
 * One page of GET /api/runs: `{runs, next_cursor}`, newest first. Filters: `status` (one or an
 * array), `mode` ("federated" | "centralized"), `q` (run id or experiment name, any case),
 * `updated_since` (seconds since the epoch, the relay's clock: runs with an event since). A page
 * may hold fewer runs than `limit`, even none, and still have a `next_cursor`: follow it until null.
 */
export async function fetchRunsPage({ url, token, ...options } = {}) {
  return runsPage(failover(url), token, options);
}

async function runsPage(relays, token, { limit = 100, cursor, status, mode, q, updated_since } = {}) {
  const query = new URLSearchParams({ limit: String(limit) });
  if (cursor) query.set("cursor", cursor);
  if (updated_since !== undefined) query.set("updated_since", String(updated_since));
  if (status && status.length) query.set("status", [].concat(status).join(","));
  if (mode) query.set("mode", mode);
  if (q) query.set("q", q);
  const page = await getJson(relays, `/api/runs?${query}`, token);
  return { runs: page.runs, next_cursor: page.next_cursor ?? null };
}

/** GET /api/runs/{runId}/clients: one page of the run's federation health (see docs/protocol.md). */
export async function fetchClients({ url, token, runId, cursor, factor, minGap, cells = true }) {
  const query = new URLSearchParams();
  if (cursor) query.set("cursor", cursor);
  if (factor !== undefined) query.set("factor", String(factor));
  if (minGap !== undefined) query.set("min_gap", String(minGap));
  if (!cells) query.set("cells", "0");
  return getJson(failover(url), `/api/runs/${encodeURIComponent(runId)}/clients?${query}`, token);
}

/** GET /api/runs/{runId}: one run's summary. */
export async function fetchRun({ url, token, runId }) {
  return getJson(failover(url), `/api/runs/${encodeURIComponent(runId)}`, token);
}

/**
 * One page of GET /api/runs/{runId}/events: `{events, next_since}`, the stored events after `since`
 * in seq order (at most `limit`, fewer past 4 MiB); `types` (e.g. ["log"]): only those types.
 * With several addresses, the next is tried when one cannot answer.
 */
export async function fetchEventsPage({ url, token, runId, since = 0, limit = 1000, types }) {
  const query = new URLSearchParams({ since: String(since), limit: String(limit) });
  if (types && types.length) query.set("type", [].concat(types).join(","));
  const page = await getJson(failover(url), `/api/runs/${encodeURIComponent(runId)}/events?${query}`, token);
  return { events: page.events, next_since: page.next_since };
}

/** Every stored event of a run after `since` (of `types` only, when given), paging /api/runs/{id}/events. */
export async function fetchEvents({ url, token, runId, since = 0, limit = 5000, types }) {
  const events = [];
  for (;;) {
    const page = await fetchEventsPage({ url, token, runId, since, limit, types });
    if (!page.events.length) return events;
    events.push(...page.events);
    since = page.next_since;
  }
}

/**
 * Follow runs live, resuming from the last seq after any disconnect.
 *
 * @param {object} options
 * @param {string|string[]} [options.url] relay address (ws://, http:// or a page URL), or several nodes
 *   of one relay (a list, or comma-separated), tried in order; default: this page's origin
 * @param {string[]|string} options.runIds run ids to follow, or "*" for every run (live only, no backlog)
 * @param {number|Object<string, number>} [options.since] last seq already seen (per run, or one for all); 0 = from the start
 * @param {string} [options.token] the relay's subscribe token, if it has one
 * @param {(event: Event) => void} [options.onEvent] each event, once, in seq order per run
 * @param {(frame: RelayControl) => void} [options.onControl] control frames (subscribed, error, ...)
 * @param {(gap: {run_id: string, since: number, resume_from: number}) => void} [options.onGap] history lost
 * @param {(state: "connecting"|"open"|"closed", detail: object) => void} [options.onStatus] connection state
 *   (detail.url: the address)
 * @returns {{close(): void, lastSeq(runId: string): number, follow(runId: string, since?: number): void,
 *            unfollow(runId: string): void, readonly connects: number, readonly url: string}}
 */
export function subscribe(options) {
  const { url, token, onEvent, onControl, onGap, onStatus } = options;
  const all = options.runIds === "*";
  const cursors = new Map(); // runId -> last seq delivered
  const runs = new Set(all ? [] : [].concat(options.runIds || []));
  for (const runId of runs) {
    const since = typeof options.since === "object" ? options.since?.[runId] : options.since;
    cursors.set(runId, since || 0);
  }
  const relays = failover(url);
  let ws = null;
  let closed = false;
  let progressed = false; // events arrived on this connection: the backoff starts over
  let connects = 0;
  let retryTimer = null;
  let pingTimer = null;
  let lastFrameAt = 0;

  const status = (state, detail = {}) => onStatus && onStatus(state, detail);

  function send(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
  }

  function join(runId) {
    send({ op: "subscribe", run_id: runId, since: cursors.get(runId) || 0 });
  }

  function deliver(event) {
    const last = cursors.get(event.run_id) || 0;
    if (typeof event.seq === "number") {
      if (event.seq <= last) return; // already delivered: never twice
      cursors.set(event.run_id, event.seq);
    }
    if (onEvent) onEvent(event);
  }

  function onMessage(message) {
    lastFrameAt = Date.now();
    const frame = JSON.parse(message.data);
    if (Array.isArray(frame)) {
      progressed = true;
      frame.forEach(deliver);
      return;
    }
    if (frame.op === undefined) {
      progressed = true;
      deliver(frame);
      return;
    }
    if (frame.op === "gap") {
      cursors.set(frame.run_id, frame.resume_from - 1);
      if (onGap) onGap(frame);
    }
    if (onControl) onControl(frame);
  }

  function connect() {
    if (closed) return;
    const address = wsBase(relays.current);
    status("connecting", { attempt: relays.misses, url: address });
    const socket = new WebSocket(withToken(`${address}/subscribe`, token));
    ws = socket;
    progressed = false;
    socket.onopen = () => {
      connects += 1;
      relays.connected();
      lastFrameAt = Date.now();
      status("open", { connects, url: address });
      if (all) send({ op: "subscribe", run_id: "*" });
      for (const runId of runs) join(runId);
      pingTimer = setInterval(keepAlive, PING_EVERY_MS);
    };
    socket.onmessage = onMessage;
    socket.onclose = (close) => {
      if (ws === socket) lost(close.code, close.reason);
    };
  }

  function lost(code, reason) {
    const socket = ws;
    ws = null;
    clearInterval(pingTimer);
    socket?.close();
    status("closed", { code, reason, url: wsBase(relays.current) });
    if (closed) return;
    // A slow-consumer cut is not a failure of the node: come back to it at once.
    const delay = code === SLOW_CONSUMER ? 50 : relays.failed(progressed);
    retryTimer = setTimeout(connect, delay);
  }

  function keepAlive() {
    // A dropped network can leave a socket "open" for minutes: probe it, give up on silence.
    if (Date.now() - lastFrameAt > PING_EVERY_MS + PING_TIMEOUT_MS) lost(0, "no answer to ping");
    else send({ op: "ping" });
  }

  connect();
  return {
    close() {
      closed = true;
      clearTimeout(retryTimer);
      clearInterval(pingTimer);
      ws?.close();
    },
    lastSeq: (runId) => cursors.get(runId) || 0,
    follow(runId, since) {
      runs.add(runId);
      if (since !== undefined || !cursors.has(runId)) cursors.set(runId, since || 0);
      join(runId);
    },
    unfollow(runId) {
      runs.delete(runId);
      send({ op: "unsubscribe", run_id: runId });
    },
    get connects() {
      return connects;
    },
    /** The address in use, or tried next. */
    get url() {
      return wsBase(relays.current);
    },
  };
}

function backoff(attempt) {
  const base = Math.min(8000, 250 * 2 ** attempt);
  return base / 2 + Math.random() * (base / 2);
}
