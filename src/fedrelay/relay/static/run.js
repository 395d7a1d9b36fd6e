// run.js: one run, rebuilt from its whole history (since=0) and then kept
// live; after any disconnect fedrelay.js resumes from the last seq, so the
// model sees every event exactly once. The status shown is the relay's
// (GET /api/runs/{id}): only the relay knows a run is stalled, inactive, or
// incomplete (events it knows exist but does not have, e.g. still spooled on
// a client's host), and says what is missing.

import { CentralizedView } from "./centralized.js";
import { badge, fmtDuration, fmtNumber, fmtTime, h, progress, throttle } from "./dom.js";
import { FederatedView } from "./federated.js";
import { fetchRun, subscribe } from "./fedrelay.js";
import { RunModel } from "./model.js";

const RENDER_EVERY_MS = 250;
const SUMMARY_EVERY_MS = 5000;

function describe(event) {
  const d = typeof event.data === "object" && event.data !== null ? event.data : {};
  const metrics = (m) =>
    Object.entries(m || {})
      .filter(([, v]) => typeof v === "number")
      .slice(0, 4)
      .map(([k, v]) => `${k}=${fmtNumber(v)}`)
      .join(" ");
  switch (event.type) {
    case "training_start":
      return `${d.training_mode || ""} ${d.experiment_name || ""}`.trim();
    case "round_start":
      return `round ${d.round}${d.total_rounds ? "/" + d.total_rounds : ""}`;
    case "round_end":
      return `round ${d.round} ${metrics(d.server_metrics || d.eval_metrics || d.fit_metrics)}`;
    case "client_progress":
      return `client ${d.client_id} round ${d.round} ${d.phase || ""} ${d.local_epoch !== undefined ? "epoch " + d.local_epoch : d.status || ""} ${metrics(d.metrics)}`;
    case "client_complete":
      return `client ${d.client_id} round ${d.round} ${d.phase || ""} done ${metrics(d.metrics)}`;
    case "epoch_start":
    case "epoch_end":
      return `epoch ${d.epoch} ${metrics(d.metrics)}`;
    case "early_stopping":
      return `epoch ${d.epoch}: ${d.reason || d.metric_name || ""}`;
    case "training_end":
      return `${d.status || "completed"} ${d.best_metric_name ? `best ${d.best_metric_name}=${fmtNumber(d.best_metric_value)}` : ""}`;
    case "error":
      return `${d.client_id !== undefined && d.client_id !== null ? "client " + d.client_id + ": " : ""}${d.message ?? d.error ?? ""}`;
    default:
      return typeof d.message === "string" ? d.message : "";
  }
}

function summaryItems(model, status) {
  const s = model.summary || {};
  const items = [["status", status]];
  if (s.best_round) items.push(["best round", s.best_round]);
  if (s.best_epoch) items.push(["best epoch", s.best_epoch]);
  if (s.best_metric_name) items.push([`best ${s.best_metric_name}`, fmtNumber(s.best_metric_value)]);
  if (s.training_duration !== undefined) {
    const duration = s.training_duration;
    items.push(["training time", typeof duration === "string" ? duration : fmtDuration(duration)]);
  }
  if (s.epochs_completed !== undefined) items.push(["epochs completed", s.epochs_completed]);
  if (s.rounds_completed !== undefined) items.push(["rounds completed", s.rounds_completed]);
  if (model.errors) items.push(["errors", model.errors]);
  if (model.lastError) items.push(["last error", model.lastError]);
  return items;
}

/** Mounts the view of `runId` into `root`; returns a function that tears it down. */
export function mountRun(root, { runId, token, state, backHref }) {
  const model = new RunModel(runId);
  const title = h("h2", { dataset: { testid: "run-title" } }, runId);
  const meta = h("div", { class: "meta" });
  const counter = h("div", { class: "counter", dataset: { testid: "progress-counter" } });
  const bar = h("div");
  const banner = h("div", { class: "banner", dataset: { testid: "early-stopping" }, hidden: true });
  const incomplete = h("div", { class: "banner incomplete", dataset: { testid: "incomplete" }, hidden: true });
  const summary = h("dl", { class: "summary", dataset: { testid: "summary" }, hidden: true });
  const body = h("div");
  const log = h("tbody");
  const logFilterNote = h("p", { class: "muted small", dataset: { testid: "log-filter" }, hidden: true });
  const connection = h("span", { class: "conn", dataset: { testid: "connection" } }, "connecting");
  root.replaceChildren(
    h("p", {}, h("a", { href: backHref, dataset: { testid: "back" } }, "← all runs"), " ", connection),
    title,
    meta,
    h("div", { class: "progress-row" }, counter, bar),
    incomplete,
    banner,
    summary,
    body,
    h(
      "section",
      {},
      h("h3", {}, "Events"),
      logFilterNote,
      h(
        "div",
        { class: "log-box" },
        h("table", { class: "log", dataset: { testid: "event-log" } },
          h("thead", {}, h("tr", {}, ...["seq", "time", "type", "source", ""].map((t) => h("th", {}, t)))), log),
      ),
    ),
  );

  let view = null;
  let logFilter = null; // {clientId, round}: the event log shows only that client's events of that round
  let connects = 0;
  let timer = null;
  let receivedAt = Date.now();
  let relayRun = null; // the relay's summary of this run, once fetched

  async function refreshSummary() {
    try {
      relayRun = await fetchRun({ token, runId });
    } catch {
      return; // not created yet (404), or the relay is away: keep what we had
    }
    schedule();
  }
  const summarySoon = throttle(refreshSummary, 1000);

  /** The relay's status when known (stalled, inactive, incomplete are its to judge), else the events'. */
  function shownStatus() {
    return relayRun ? relayRun.status : model.status;
  }

  /**
   * The health view's "events of this client in this round": filters the event log to them.
   * The hook for a fuller log panel (issue 17): replace this function; the view calls it with a
   * client id and a round, and data-testid="health-open-log" is its button.
   */
  function openLog(clientId, round) {
    logFilter = { clientId: String(clientId), round };
    render();
    log.closest("section")?.scrollIntoView({ block: "start" });
  }

  function ensureView() {
    if (view || !model.mode) return;
    view = model.mode === "centralized" ? new CentralizedView(body) : new FederatedView(body);
    view.onChange = render;
    if (view.health) view.health.onOpenLog = openLog;
  }

  function shownEvents() {
    if (!logFilter) return model.recentEvents(100);
    const { clientId, round } = logFilter;
    const nodes = new Set([clientId]);
    for (const [node, client] of model.federation.aliases) if (client === clientId) nodes.add(node);
    return model.recentEvents(Infinity).filter((e) => {
      const d = e.data && typeof e.data === "object" ? e.data : {};
      const named = (d.client_id !== undefined && nodes.has(String(d.client_id))) || (d.node_id !== undefined && nodes.has(String(d.node_id)));
      const listed = ["participating_clients", "failed_clients", "participating_nodes", "failed_nodes"].some(
        (k) => Array.isArray(d[k]) && d[k].some((id) => nodes.has(String(id))),
      );
      return d.round === round && (named || listed);
    });
  }

  function render() {
    timer = null;
    ensureView();
    // Straggler detection runs on the run's own clock, advanced by wall time while it is live.
    const now = model.lastEventAt === null ? Date.now() : model.lastEventAt + (model.status === "running" ? Date.now() - receivedAt : 0);
    title.textContent = model.experiment ? `${model.experiment}` : runId;
    const end = model.endedAt || (model.status === "running" ? now : model.lastEventAt);
    const missing = relayRun?.incomplete?.detail || null;
    incomplete.hidden = !missing;
    if (missing) incomplete.textContent = missing;
    meta.replaceChildren(
      badge(shownStatus()),
      h("span", {}, model.mode || "mode unknown"),
      h("span", { class: "mono" }, runId),
      h("span", {}, `started ${fmtTime(model.startedAt)}`),
      h("span", {}, `duration ${fmtDuration(model.startedAt ? (end - model.startedAt) / 1000 : null)}`),
      h("span", { dataset: { testid: "last-seq" } }, `seq ${model.lastSeq}`),
    );
    if (model.mode === "centralized") {
      counter.textContent = `Epoch ${model.epoch} of ${model.maxEpochs ?? "?"}`;
      bar.replaceChildren(progress(model.epoch, model.maxEpochs, "progress-bar"));
    } else {
      counter.textContent = `Round ${model.round} of ${model.totalRounds ?? "?"}`;
      bar.replaceChildren(progress(model.round, model.totalRounds, "progress-bar"));
    }
    const es = model.earlyStopping;
    banner.hidden = !es;
    if (es) banner.textContent = `Early stopping at epoch ${es.epoch ?? "?"}: ${es.reason || `${es.metric_name} did not improve for ${es.patience} epochs`}`;
    summary.hidden = !model.summary && !model.lastError;
    if (!summary.hidden) summary.replaceChildren(...summaryItems(model, shownStatus()).map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, String(v)))));
    view?.render(model, now);
    logFilterNote.hidden = !logFilter;
    if (logFilter) {
      logFilterNote.replaceChildren(
        `Events of client ${logFilter.clientId} in round ${logFilter.round}, among the last ${model.log.length} this page holds. `,
        h("a", { href: "javascript:void 0", onclick: () => { logFilter = null; render(); } }, "show all"),
      );
    }
    log.replaceChildren(
      ...shownEvents().map((e) =>
        h("tr", { class: e.type },
          h("td", { class: "num" }, String(e.seq)),
          h("td", {}, e.timestamp ? new Date(e.timestamp).toLocaleTimeString() : ""),
          h("td", {}, e.type),
          h("td", {}, e.source ? `${e.source.role}${e.source.client_id !== null && e.source.client_id !== undefined ? " " + e.source.client_id : ""}` : ""),
          h("td", {}, describe(e)),
        ),
      ),
    );
    publish();
  }

  function publish() {
    const charts = view ? view.counts() : {};
    Object.assign(state, {
      view: "run",
      runId,
      mode: model.mode,
      status: shownStatus(),
      incomplete: relayRun?.incomplete?.detail || null,
      lastSeq: model.lastSeq,
      round: model.round,
      totalRounds: model.totalRounds,
      epoch: model.epoch,
      maxEpochs: model.maxEpochs,
      clients: [...model.clients.keys()],
      charts,
      stats: { ...model.stats },
      connects,
      earlyStopping: model.earlyStopping,
      lastError: model.lastError,
      rendered: (state.rendered || 0) + 1,
    });
    state.points = (name) => pointsOf(model, name) ?? view?.points?.(name) ?? null;
    state.drawn = (id) => view?.drawn(id) ?? null;
    state.health = view?.health ? view.health.testState() : null;
    state.logFilter = logFilter;
  }

  function schedule() {
    if (timer === null) timer = setTimeout(() => requestAnimationFrame(render), RENDER_EVERY_MS);
  }

  const sub = subscribe({
    runIds: [runId],
    since: 0,
    token,
    onEvent: (event) => {
      receivedAt = Date.now();
      if (model.apply(event)) {
        schedule();
        summarySoon();
      }
    },
    onGap: () => {
      model.gap();
      schedule();
    },
    onStatus: (status, detail) => {
      if (status === "open") {
        connects = detail.connects;
        summarySoon();
      }
      connection.textContent = status === "open" ? "live" : status === "closed" ? "reconnecting…" : "connecting…";
      connection.className = `conn ${status}`;
      state.connection = status;
      state.connects = connects;
    },
  });
  const ticker = setInterval(() => model.status === "running" && schedule(), 2000); // durations, stragglers
  const summaryTicker = setInterval(refreshSummary, SUMMARY_EVERY_MS); // stalled, incomplete: no event says so
  render();
  refreshSummary();
  return () => {
    sub.close();
    clearInterval(ticker);
    clearInterval(summaryTicker);
    clearTimeout(timer);
  };
}

/** The model's points of one chart ("round:loss", "epoch:loss"): series -> [[x, y], ...] in x order. */
function pointsOf(model, name) {
  const [kind, chart] = name.split(/:(.*)/s);
  const set = kind === "epoch" ? model.epochCharts : model.roundCharts;
  const series = set.charts.get(chart);
  if (!series) return null;
  const out = {};
  for (const [label, points] of series) out[label] = [...points.entries()].sort((a, b) => a[0] - b[0]);
  return out;
}
