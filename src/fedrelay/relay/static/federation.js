// federation.js: federation health folded from a run's events, with the rules of the relay's
// fedrelay/federation.py (a test feeds both the same events and compares what they judge).
// No DOM and no imports, so Node can load it on its own.
//
// Per round and client (train phase; an error of either phase fails the round):
//   sampled    listed in round_start / round_end, or a train event from it
//   finished   a train client_complete (its `duration` from the ClientApp mod)
//   straggler  finished, slower than factor x the round's median and at least minGap s slower
//   failed     an error naming the client and the round, or round_end.failed_clients
//   silent     sampled, no outcome, and the round is over; "running" until then
// Node ids (what servers see) are shown under the client id a client event joined them to.
//
// Events are folded as they arrive (a few map operations each); rounds are judged lazily and the
// judgement is kept until that round, the aliases or the settings change, so a live run re-judges
// only its current round.

export const STATES = ["finished", "straggler", "failed", "silent", "running"];
export const DEFAULT_FACTOR = 2;
export const DEFAULT_MIN_GAP = 1;

const MAX_CELLS = 200000;
const MAX_ALIASES = 100000;
const MAX_ID_CHARS = 128;
const MAX_REASON_CHARS = 300;
const MAX_DETAIL_CHARS = 2000;
const MAX_DETAIL_TOTAL = 2 * 1024 * 1024;
const MAX_DURATION = 1e9;
const SAFE = Number.MAX_SAFE_INTEGER;
const LISTED = 0;
const FROM_SERVER = 1;
const FROM_CLIENT = 2;

function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function whole(value) {
  return typeof value === "number" && Number.isInteger(value) && Math.abs(value) <= SAFE ? value : null;
}

function idOf(value) {
  let text = null;
  if (typeof value === "string") text = value;
  else if (whole(value) !== null) text = String(value);
  return text !== null && text.length > 0 && text.length <= MAX_ID_CHARS ? text : null;
}

function roundOf(data) {
  const value = whole(data.round);
  return value !== null && value >= 1 ? value : null;
}

function ids(value) {
  if (!Array.isArray(value)) return [];
  return value.map(idOf).filter((id) => id !== null);
}

function listed(data, kind) {
  return [...ids(data[`${kind}_clients`]), ...ids(data[`${kind}_nodes`])];
}

function durationOf(value) {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 && value <= MAX_DURATION ? value : null;
}

function textOf(value, limit, tail = false) {
  if (typeof value !== "string") return null;
  return tail ? value.slice(-limit) : value.slice(0, limit);
}

function chunks(text) {
  return text.match(/[0-9]+|[^0-9]+/g) || [];
}

function compareDigits(a, b) {
  const x = a.replace(/^0+/, "");
  const y = b.replace(/^0+/, "");
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}

/** "2" before "10", "c2" before "c10"; the same total order as the relay's natural_key. */
export function naturalCompare(a, b) {
  const xs = chunks(a);
  const ys = chunks(b);
  for (let i = 0; i < Math.min(xs.length, ys.length); i++) {
    const x = xs[i];
    const y = ys[i];
    const xd = x.charCodeAt(0) <= 57 && x.charCodeAt(0) >= 48;
    const yd = y.charCodeAt(0) <= 57 && y.charCodeAt(0) >= 48;
    if (xd !== yd) return xd ? -1 : 1;
    const order = xd ? compareDigits(x, y) : x < y ? -1 : x > y ? 1 : 0;
    if (order !== 0) return order;
  }
  if (xs.length !== ys.length) return xs.length - ys.length;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The middle of sorted values; the mean of the two middle ones for an even count. */
export function median(sorted) {
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

class Round {
  constructor() {
    this.sampled = new Set();
    this.finished = new Map(); // raw id -> duration | null
    this.failed = new Map(); // raw id -> {reason, detail, phase, seq, rank}
    this.ended = false;
    this.version = 0;
  }
}

export class FederationHealth {
  constructor() {
    this.rounds = new Map(); // round -> Round
    this.aliases = new Map(); // node id -> client id
    this.latestStart = 0;
    this.runEnded = false;
    this.truncated = false;
    this.version = 0; // bumped by every change: the views' caches key on it
    this.aliasVersion = 0;
    this.cells = 0;
    this.detailChars = 0;
    this.judged = new Map(); // round -> {key, value}
    this.clientsCache = null;
  }

  /** Folds one event in; returns whether anything changed. */
  add(event) {
    const data = event.data;
    if (!isObject(data)) return false;
    const before = this.version;
    switch (event.type) {
      case "training_end":
        if (!this.runEnded) {
          this.runEnded = true;
          this.version += 1;
        }
        break;
      case "round_start":
        this.roundStart(data);
        break;
      case "round_end":
        this.roundEnd(data);
        break;
      case "client_progress":
      case "client_complete":
      case "error":
        this.clientEvent(event, data);
        break;
      default:
    }
    return this.version !== before;
  }

  room() {
    if (this.cells >= MAX_CELLS) {
      this.truncated = true;
      return false;
    }
    this.cells += 1;
    return true;
  }

  round(number) {
    let state = this.rounds.get(number);
    if (!state) {
      if (!this.room()) return null;
      this.rounds.set(number, (state = new Round()));
      this.touch(state);
    }
    return state;
  }

  touch(state) {
    state.version += 1;
    this.version += 1;
  }

  sample(state, list) {
    for (const raw of list) {
      if (!state.sampled.has(raw) && this.room()) {
        state.sampled.add(raw);
        this.touch(state);
      }
    }
  }

  learn(clients, nodes) {
    if (Array.isArray(clients) && Array.isArray(nodes) && clients.length === nodes.length) {
      clients.forEach((client, i) => this.alias(idOf(nodes[i]), idOf(client)));
    }
  }

  alias(node, client) {
    if (node === null || client === null || node === client || this.aliases.has(node)) return;
    if (this.aliases.size < MAX_ALIASES) {
      this.aliases.set(node, client);
      this.aliasVersion += 1;
      this.version += 1;
    }
  }

  roundStart(data) {
    const number = roundOf(data);
    if (number === null) return;
    if (number > this.latestStart) {
      this.latestStart = number;
      this.version += 1;
    }
    this.learn(data.participating_clients, data.participating_nodes);
    const state = this.round(number);
    if (state) this.sample(state, listed(data, "participating"));
  }

  roundEnd(data) {
    const number = roundOf(data);
    if (number === null) return;
    for (const kind of ["participating", "failed", "evaluated"]) this.learn(data[`${kind}_clients`], data[`${kind}_nodes`]);
    const state = this.round(number);
    if (!state) return;
    if (!state.ended) {
      state.ended = true;
      this.touch(state);
    }
    this.sample(state, listed(data, "participating"));
    const failed = listed(data, "failed");
    this.sample(state, failed);
    for (const raw of failed) {
      if (state.sampled.has(raw) && !state.failed.has(raw)) {
        state.failed.set(raw, { reason: "listed in round_end.failed_clients", detail: null, phase: null, seq: null, rank: LISTED });
        this.touch(state);
      }
    }
  }

  clientEvent(event, data) {
    const raw = idOf(data.client_id);
    if (raw === null) return;
    this.alias(idOf(data.node_id), raw);
    const number = roundOf(data);
    if (number === null) return;
    const phase = data.phase;
    if (event.type !== "error" && phase !== undefined && phase !== null && phase !== "train") return;
    const state = this.round(number);
    if (!state) return;
    this.sample(state, [raw]);
    if (!state.sampled.has(raw)) return;
    if (event.type === "client_complete") {
      state.finished.set(raw, durationOf(data.duration));
      this.touch(state);
    } else if (event.type === "error") {
      this.failedEvent(state, raw, event, data);
    }
  }

  failedEvent(state, raw, event, data) {
    const rank = isObject(event.source) && event.source.role === "client" ? FROM_CLIENT : FROM_SERVER;
    const old = state.failed.get(raw);
    if (old && old.rank >= rank) return;
    const message = Object.hasOwn(data, "message") ? data.message : data.error;
    let detail = textOf(data.detail, MAX_DETAIL_CHARS, true);
    if (detail !== null) {
      if (this.detailChars + detail.length > MAX_DETAIL_TOTAL) detail = null;
      else this.detailChars += detail.length;
    }
    state.failed.set(raw, {
      reason: textOf(message, MAX_REASON_CHARS) || "error",
      detail,
      phase: textOf(data.phase, 32),
      seq: whole(event.seq),
      rank,
    });
    this.touch(state);
  }

  canonical(raw) {
    return this.aliases.get(raw) ?? raw;
  }

  closed(number) {
    const state = this.rounds.get(number);
    return this.runEnded || number < this.latestStart || Boolean(state && state.ended);
  }

  roundNumbers() {
    return [...this.rounds.keys()].sort((a, b) => a - b);
  }

  /**
   * One round judged: {round, closed, cells: Map(client -> {state, duration, failure}), median,
   * threshold, criticalPath: [client, duration] | null, stragglers: [...]}. Kept until it changes.
   */
  judgeRound(number, factor = DEFAULT_FACTOR, minGap = DEFAULT_MIN_GAP) {
    const state = this.rounds.get(number);
    if (!state) return null;
    const closed = this.closed(number);
    const key = `${state.version}|${this.aliasVersion}|${closed}|${factor}|${minGap}`;
    const kept = this.judged.get(number);
    if (kept && kept.key === key) return kept.value;
    const finished = new Map();
    for (const [raw, duration] of state.finished) {
      const id = this.canonical(raw);
      if (finished.get(id) === undefined || finished.get(id) === null) finished.set(id, duration);
    }
    const failed = new Map();
    for (const [raw, failure] of state.failed) {
      const id = this.canonical(raw);
      const old = failed.get(id);
      if (!old || failure.rank > old.rank) failed.set(id, failure);
    }
    const durations = [...finished.values()].filter((d) => d !== null).sort((a, b) => a - b);
    const mid = durations.length ? median(durations) : null;
    const threshold = mid === null ? null : Math.max(factor * mid, mid + minGap);
    const cells = new Map();
    const stragglers = [];
    let critical = null;
    const members = [...new Set([...state.sampled].map((raw) => this.canonical(raw)))].sort(naturalCompare);
    for (const id of members) {
      const duration = finished.has(id) ? finished.get(id) : null;
      if (failed.has(id)) {
        cells.set(id, { state: "failed", duration, failure: failed.get(id) });
      } else if (finished.has(id)) {
        const slow = duration !== null && threshold !== null && duration > threshold;
        cells.set(id, { state: slow ? "straggler" : "finished", duration, failure: null });
        if (slow) stragglers.push(id);
      } else {
        cells.set(id, { state: closed ? "silent" : "running", duration: null, failure: null });
      }
      if (duration !== null && finished.has(id) && (critical === null || duration > critical[1])) critical = [id, duration];
    }
    const value = { round: number, closed, cells, median: mid, threshold, criticalPath: critical, stragglers };
    this.judged.set(number, { key, value });
    return value;
  }

  /** Every client with its counts and rates, in natural id order; kept until anything changes. */
  clients(factor = DEFAULT_FACTOR, minGap = DEFAULT_MIN_GAP) {
    const key = `${this.version}|${factor}|${minGap}`;
    if (this.clientsCache && this.clientsCache.key === key) return this.clientsCache.value;
    const byId = new Map();
    for (const number of this.roundNumbers()) {
      for (const [id, cell] of this.judgeRound(number, factor, minGap).cells) {
        let c = byId.get(id);
        if (!c) byId.set(id, (c = { client_id: id, sampled: 0, finished: 0, straggler: 0, failed: 0, silent: 0, running: 0, durationSum: 0, durations: 0 }));
        c.sampled += 1;
        c[cell.state] += 1;
        if (cell.duration !== null && (cell.state === "finished" || cell.state === "straggler")) {
          c.durationSum += cell.duration;
          c.durations += 1;
        }
      }
    }
    const value = [...byId.keys()].sort(naturalCompare).map((id) => clientJson(byId.get(id)));
    this.clientsCache = { key, value };
    return value;
  }

  /** The report as the relay's API gives it (for the cross-check with fedrelay/federation.py). */
  report(factor = DEFAULT_FACTOR, minGap = DEFAULT_MIN_GAP) {
    const rounds = this.roundNumbers().map((number) => {
      const r = this.judgeRound(number, factor, minGap);
      const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
      const cells = {};
      for (const [id, cell] of r.cells) {
        counts[cell.state] += 1;
        cells[id] = cellJson(cell);
      }
      return {
        round: r.round,
        closed: r.closed,
        sampled: r.cells.size,
        ...counts,
        median: r.median,
        threshold: r.threshold,
        critical_path: r.criticalPath ? { client_id: r.criticalPath[0], duration: r.criticalPath[1] } : null,
        stragglers: r.stragglers.slice(0, 50),
        num_stragglers: r.stragglers.length,
        cells,
      };
    });
    return { truncated: this.truncated, rounds, clients: this.clients(factor, minGap) };
  }
}

function rate(count, c) {
  const over = c.sampled - c.running;
  return over ? count / over : null;
}

function clientJson(c) {
  return {
    client_id: c.client_id,
    sampled: c.sampled,
    finished: c.finished,
    straggler: c.straggler,
    failed: c.failed,
    silent: c.silent,
    running: c.running,
    dropout_rate: rate(c.silent, c),
    failure_rate: rate(c.failed, c),
    straggler_rate: rate(c.straggler, c),
    mean_duration: c.durations ? c.durationSum / c.durations : null,
  };
}

/** A cell as the relay's API gives it. */
export function cellJson(cell) {
  const out = { state: cell.state };
  if (cell.duration !== null) out.duration = cell.duration;
  if (cell.failure) {
    out.reason = cell.failure.reason;
    if (cell.failure.detail !== null) out.detail = cell.failure.detail;
    if (cell.failure.phase !== null) out.phase = cell.failure.phase;
    if (cell.failure.seq !== null) out.seq = cell.failure.seq;
  }
  return out;
}
