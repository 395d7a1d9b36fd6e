// model.js: folds one run's events into what the views draw. No DOM here.
//
// Every point is keyed by (chart, series, x), so the model is the place that
// would notice a lost or doubled event: it counts seq duplicates and holes.
//
// Events from the root path reach it unvalidated (a round may be a string,
// metrics may hold a timestamp text): each handler takes only the values of
// the kind it expects and ignores the rest.

import { FederationHealth } from "./federation.js";

const PREFERRED = ["loss", "accuracy", "acc", "precision", "recall", "f1", "auroc", "auc"];
const PHASE_PREFIX = /^(train|training|fit|val|valid|validation|eval|evaluate|test)[_/.-]/i;
const COUNT_KEYS = /^(num[-_ ]?examples|num[-_ ]?samples|examples|samples|epoch|(global[-_ ]?)?step|round)$/i;
const END_STATUSES = ["completed", "failed", "stopped"];
const LOG_SIZE = 300;

/** "val_loss" -> "loss": metrics of one quantity share a chart. */
export function baseName(key) {
  return key.replace(PHASE_PREFIX, "") || key;
}

/** Known metrics first (loss, accuracy, ...), then the rest alphabetically. */
export function chartOrder(a, b) {
  const rank = (name) => {
    const i = PREFERRED.indexOf(name.toLowerCase());
    return i < 0 ? PREFERRED.length : i;
  };
  return rank(a) - rank(b) || a.localeCompare(b);
}

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function isCount(value) {
  return Number.isInteger(value) && value >= 0;
}

function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function text(value) {
  return typeof value === "string" ? value : null;
}

/** Charts: name -> series label -> Map(x -> y). */
class ChartSet {
  constructor() {
    this.charts = new Map();
  }

  add(key, series, x, y) {
    if (!isNumber(y) || !isNumber(x) || COUNT_KEYS.test(key)) return;
    const name = baseName(key);
    let chart = this.charts.get(name);
    if (!chart) this.charts.set(name, (chart = new Map()));
    let points = chart.get(series);
    if (!points) chart.set(series, (points = new Map()));
    points.set(x, y);
  }

  addAll(metrics, x, label) {
    if (!isObject(metrics)) return;
    for (const [key, value] of Object.entries(metrics)) this.add(key, label(key), x, value);
  }

  names() {
    return [...this.charts.keys()].sort(chartOrder);
  }

  counts() {
    const out = {};
    for (const [name, chart] of this.charts) {
      out[name] = [...chart.values()].reduce((n, points) => n + points.size, 0);
    }
    return out;
  }
}

/** Per-client metric for one key: client -> Map(round -> value), plus per-round min/mean/max. */
class ClientMetric {
  constructor() {
    this.byClient = new Map();
    this.byRound = new Map(); // round -> {n, sum, min, max}
  }

  add(client, round, value) {
    let rounds = this.byClient.get(client);
    if (!rounds) this.byClient.set(client, (rounds = new Map()));
    const old = rounds.get(round);
    rounds.set(round, value);
    let agg = this.byRound.get(round);
    if (!agg) this.byRound.set(round, (agg = { n: 0, sum: 0, min: Infinity, max: -Infinity }));
    if (old !== undefined) {
      agg.n -= 1;
      agg.sum -= old;
    }
    agg.n += 1;
    agg.sum += value;
    agg.min = Math.min(agg.min, value);
    agg.max = Math.max(agg.max, value);
  }
}

/** One client: its status in each round and its latest metrics. */
class Client {
  constructor(id) {
    this.id = id;
    this.nodeId = null;
    this.rounds = new Map(); // round -> {status, phase, startedAt, endedAt, epoch, error}
    this.lastRound = 0;
    this.metrics = {}; // phase -> latest metrics
    this.numExamples = null;
  }

  at(round) {
    let state = this.rounds.get(round);
    if (!state) {
      this.rounds.set(round, (state = { status: "training", phase: null, startedAt: null, endedAt: null }));
      this.lastRound = Math.max(this.lastRound, round);
    }
    return state;
  }
}

function timeOf(event) {
  const t = event.timestamp ? Date.parse(event.timestamp) : NaN;
  return Number.isNaN(t) ? null : t;
}

export class RunModel {
  constructor(runId) {
    this.runId = runId;
    this.lastSeq = 0;
    this.stats = { events: 0, duplicates: 0, holes: 0, gaps: 0 };
    this.mode = null;
    this.status = "running";
    this.experiment = null;
    this.startedAt = null;
    this.endedAt = null;
    this.lastEventAt = null;
    this.round = 0;
    this.totalRounds = null;
    this.roundsEnded = new Map(); // round -> end time
    this.roundStarted = new Map(); // round -> {at, expected}
    this.epoch = 0;
    this.maxEpochs = null;
    this.earlyStopping = null;
    this.summary = null;
    this.roundCharts = new ChartSet();
    this.epochCharts = new ChartSet();
    this.clients = new Map();
    this.nodes = new Map(); // Flower node id -> client id
    this.clientMetrics = new Map(); // "phase: key" -> ClientMetric
    this.errors = 0;
    this.lastError = null;
    this.log = [];
    this.federation = new FederationHealth(); // who took part in each round, and how it went
    this.startData = null;
  }

  /** Fold one event in; an event at or below the last seq is counted and ignored. */
  apply(event) {
    if (typeof event.seq === "number") {
      if (event.seq <= this.lastSeq) {
        this.stats.duplicates += 1;
        return false;
      }
      if (event.seq !== this.lastSeq + 1) this.stats.holes += 1;
      this.lastSeq = event.seq;
    }
    this.stats.events += 1;
    const at = timeOf(event);
    if (at !== null) this.lastEventAt = Math.max(this.lastEventAt || 0, at);
    const data = isObject(event.data) ? event.data : {};
    const handler = Object.hasOwn(HANDLERS, event.type) ? HANDLERS[event.type] : otherEvent;
    handler(this, data, at, event);
    this.federation.add(event);
    this.log.push(event);
    if (this.log.length > LOG_SIZE * 2) this.log.splice(0, this.log.length - LOG_SIZE);
    return true;
  }

  /** The relay lost history before resume_from: what follows is still right, but a part is missing. */
  gap() {
    this.stats.gaps += 1;
  }

  recentEvents(limit = 100) {
    return this.log.slice(-limit).reverse();
  }

  client(id, data) {
    const key = String(id);
    let client = this.clients.get(key);
    if (!client) this.clients.set(key, (client = new Client(key)));
    if (data && data.node_id !== undefined && data.node_id !== null) {
      client.nodeId = String(data.node_id);
      this.nodes.set(client.nodeId, key);
    }
    return client;
  }

  /** Server-side errors name Flower node ids; clients name themselves by partition: map one to the other. */
  clientFor(id) {
    const key = String(id);
    return this.clients.get(key) || this.client(this.nodes.get(key) ?? key);
  }

  clientMetric(name) {
    let metric = this.clientMetrics.get(name);
    if (!metric) this.clientMetrics.set(name, (metric = new ClientMetric()));
    return metric;
  }

  /**
   * A client's status in a round: done, failed, training, straggling (still
   * training well after its peers finished, or after the round ended), or idle.
   */
  clientStatus(client, round, now) {
    const state = client.rounds.get(round);
    if (!state) return "idle";
    if (state.status !== "training") return state.status;
    if (this.roundsEnded.has(round) || this.status !== "running") return "straggling";
    const peers = [...this.clients.values()]
      .map((c) => c.rounds.get(round))
      .filter((s) => s && s.status === "done" && s.startedAt !== null && s.endedAt !== null);
    const started = this.roundStarted.get(round);
    const expected = started?.expected || this.clients.size;
    if (peers.length === 0 || peers.length < expected / 2 || state.startedAt === null) return "training";
    const durations = peers.map((s) => s.endedAt - s.startedAt).sort((a, b) => a - b);
    const median = durations[Math.floor(durations.length / 2)];
    return now - state.startedAt > Math.max(2 * median, 2000) ? "straggling" : "training";
  }
}

function setMode(model, mode) {
  if (!model.mode) model.mode = mode;
}

/** A type the dashboard does not know: its numeric metrics still chart by round or epoch. */
function otherEvent(model, data, at, event) {
  if (!isObject(data.metrics) || typeof event.type !== "string") return;
  const label = (key) => `${event.type} ${key}`;
  if (isCount(data.round)) model.roundCharts.addAll(data.metrics, data.round, label);
  else if (isCount(data.epoch)) model.epochCharts.addAll(data.metrics, data.epoch, label);
}

const HANDLERS = {
  training_start(model, data, at) {
    model.startData = data; // its settings, for the side-by-side comparison
    model.mode = text(data.training_mode) || model.mode;
    model.experiment = text(data.experiment_name) || model.experiment;
    model.totalRounds = isCount(data.num_rounds) ? data.num_rounds : model.totalRounds;
    model.maxEpochs = isCount(data.max_epochs) ? data.max_epochs : model.maxEpochs;
    model.startedAt = at;
    model.status = "running";
    model.summary = null;
  },
  round_start(model, data, at) {
    setMode(model, "federated");
    if (!isCount(data.round)) return;
    model.round = Math.max(model.round, data.round);
    if (isCount(data.total_rounds)) model.totalRounds = data.total_rounds;
    const clients = data.participating_clients;
    const expected = Array.isArray(clients) ? clients.length : isNumber(clients) ? clients : null;
    model.roundStarted.set(data.round, { at, expected });
  },
  client_progress(model, data, at) {
    setMode(model, "federated");
    if (data.client_id === undefined || data.client_id === null || !isCount(data.round)) return;
    const client = model.client(data.client_id, data);
    const state = client.at(data.round);
    const phase = text(data.phase);
    if (state.status !== "training" && phase && phase !== state.phase) state.status = "training";
    if (state.startedAt === null || (data.status === "started" && phase !== state.phase)) {
      state.startedAt = at;
    }
    state.phase = phase || state.phase;
    if (isNumber(data.local_epoch)) state.epoch = data.local_epoch;
    if (isObject(data.metrics)) client.metrics[phase || "train"] = data.metrics;
  },
  client_complete(model, data, at) {
    setMode(model, "federated");
    if (data.client_id === undefined || data.client_id === null) return;
    const client = model.client(data.client_id, data);
    if (isCount(data.num_examples)) client.numExamples = data.num_examples;
    if (!isCount(data.round)) return; // a summary of the client's whole run, not of one round
    const state = client.at(data.round);
    if (state.status !== "failed") state.status = "done";
    if (state.startedAt === null) state.startedAt = at;
    state.endedAt = at;
    const phase = text(data.phase) || "train";
    state.phase = text(data.phase) || state.phase;
    if (!isObject(data.metrics)) return;
    client.metrics[phase] = data.metrics;
    for (const [key, value] of Object.entries(data.metrics)) {
      if (isNumber(value) && !COUNT_KEYS.test(key)) model.clientMetric(`${phase}: ${key}`).add(client.id, data.round, value);
    }
  },
  round_end(model, data, at) {
    setMode(model, "federated");
    if (!isCount(data.round)) return;
    model.round = Math.max(model.round, data.round);
    if (isCount(data.total_rounds) && data.total_rounds > 0) model.totalRounds = data.total_rounds;
    model.roundsEnded.set(data.round, at);
    const label = (source) => (key) => (baseName(key) === key ? source : `${source} ${key}`);
    model.roundCharts.addAll(data.fit_metrics, data.round, label("fit"));
    model.roundCharts.addAll(data.eval_metrics, data.round, label("eval"));
    model.roundCharts.addAll(data.server_metrics, data.round, label("server"));
  },
  status(model, data) {
    // The Flower emitter reports the initial server-side evaluation as round 0.
    if (isObject(data.server_metrics) && isCount(data.round)) {
      model.roundCharts.addAll(data.server_metrics, data.round, (key) =>
        baseName(key) === key ? "server" : `server ${key}`,
      );
    }
  },
  epoch_start(model, data) {
    setMode(model, "centralized");
    if (isCount(data.epoch)) model.epoch = Math.max(model.epoch, data.epoch);
  },
  epoch_end(model, data) {
    setMode(model, "centralized");
    if (!isCount(data.epoch)) return;
    model.epoch = Math.max(model.epoch, data.epoch);
    const phase = text(data.phase) && data.phase !== "train" ? data.phase : null;
    model.epochCharts.addAll(data.metrics, data.epoch, (key) => (phase && !PHASE_PREFIX.test(key) ? `${phase}_${key}` : key));
  },
  early_stopping(model, data) {
    model.earlyStopping = { ...data };
  },
  error(model, data, at, event) {
    model.errors += 1;
    const message = text(data.message) ?? text(data.error);
    model.lastError = message;
    if (data.client_id === undefined || data.client_id === null) {
      // On the root path, a hand-rolled trainer's fatal error (as its frontends take it); fedrelay's
      // emitters end a failed run with training_end and report other things (a dropped event) here.
      if (event.via === "root") {
        model.status = "failed";
        model.endedAt = at;
      }
      return;
    }
    if (!isCount(data.round)) return;
    const client = model.clientFor(data.client_id);
    const state = client.at(data.round);
    state.status = "failed";
    state.error = message;
    state.endedAt = at;
  },
  training_end(model, data, at) {
    model.status = END_STATUSES.includes(data.status) ? data.status : "completed";
    model.endedAt = at;
    model.summary = { ...data };
  },
};
