// health.js: the federation health view of a federated run: the clients x rounds grid (sortable,
// filterable), a cell's detail (a failure's message and detail), and per round the distribution
// of client durations with its median, the straggler threshold and the critical path.
//
// It draws from the run model's FederationHealth (federation.js), which folds events as they
// arrive; render() does nothing when neither the data nor the settings changed.
//
// Hook for a log panel: `onOpenLog(clientId, round)` is called by the detail's "events" button
// (run.js sets it; data-testid="health-open-log").

import { ChartGrid } from "./charts.js";
import { h } from "./dom.js";
import { DEFAULT_FACTOR, DEFAULT_MIN_GAP, cellJson, naturalCompare } from "./federation.js";
import { COLORS, HealthGrid } from "./healthgrid.js";

const SORTS = {
  id: null,
  failure: "failure_rate",
  dropout: "dropout_rate",
  straggler: "straggler_rate",
  duration: "mean_duration",
};
const SHOWS = {
  all: () => true,
  trouble: (c) => c.failed + c.silent + c.straggler > 0,
  failed: (c) => c.failed > 0,
  silent: (c) => c.silent > 0,
  straggler: (c) => c.straggler > 0,
};
const STRIP_HEIGHT = 96;

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? `${Math.round(value)} s` : value >= 1 ? `${value.toFixed(2)} s` : `${value.toPrecision(2)} s`;
}

function numberInput(value, min, step, testid, title) {
  return h("input", { type: "number", value: String(value), min: String(min), step: String(step), title, dataset: { testid } });
}

export class HealthView {
  constructor(parent) {
    this.factor = DEFAULT_FACTOR;
    this.minGap = DEFAULT_MIN_GAP;
    this.filter = "";
    this.show = "all";
    this.sort = "id";
    this.selected = null; // {clientId, round|null}
    this.roundShown = null; // null: the latest round
    this.onOpenLog = null;
    this.health = null;
    this.key = "";
    this.rows = [];
    this.judged = [];

    const factor = numberInput(this.factor, 1, 0.1, "straggler-factor", "straggler: slower than this many times the round's median");
    const minGap = numberInput(this.minGap, 0, 0.5, "straggler-min-gap", "...and at least this many seconds slower");
    const setting = (input, name, min) =>
      input.addEventListener("input", () => {
        const value = Number(input.value);
        if (input.value !== "" && Number.isFinite(value) && value >= min) {
          this[name] = value;
          this.refresh();
        }
      });
    setting(factor, "factor", 1);
    setting(minGap, "minGap", 0);
    const filter = h("input", { type: "search", placeholder: "filter clients", dataset: { testid: "health-filter" } });
    filter.addEventListener("input", () => {
      this.filter = filter.value.trim();
      this.refresh();
    });
    const show = h(
      "select",
      { dataset: { testid: "health-show" } },
      h("option", { value: "all" }, "all clients"),
      h("option", { value: "trouble" }, "failed, silent or slow once"),
      h("option", { value: "failed" }, "failed once"),
      h("option", { value: "silent" }, "silent once"),
      h("option", { value: "straggler" }, "straggled once"),
    );
    show.addEventListener("change", () => {
      this.show = show.value;
      this.refresh();
    });
    const sort = h(
      "select",
      { dataset: { testid: "health-sort" } },
      h("option", { value: "id" }, "sort: client id"),
      h("option", { value: "failure" }, "sort: failure rate"),
      h("option", { value: "dropout" }, "sort: silent rate"),
      h("option", { value: "straggler" }, "sort: straggler rate"),
      h("option", { value: "duration" }, "sort: mean duration"),
    );
    sort.addEventListener("change", () => {
      this.sort = sort.value;
      this.refresh();
    });
    this.countsText = h("span", { class: "muted", dataset: { testid: "health-counts" } });
    const legend = h(
      "span",
      { class: "legend" },
      ...["finished", "straggler", "failed", "silent", "running"].map((s) => h("span", {}, h("i", { style: `background:${COLORS[s]}` }), s)),
      h("span", {}, h("i", { style: `background:${COLORS.none}` }), "not sampled"),
    );
    const gridBox = h("div");
    this.grid = new HealthGrid(gridBox, {
      onSelect: (clientId, round) => this.select(clientId, round),
      describe: (clientId, round) => this.describe(clientId, round),
    });
    this.detail = h("div", { class: "health-detail", dataset: { testid: "health-detail" }, hidden: true });
    this.roundSelect = h("select", { dataset: { testid: "health-round" } });
    this.roundSelect.addEventListener("change", () => {
      this.roundShown = Number(this.roundSelect.value);
      this.refresh();
    });
    this.strip = h("canvas", { class: "duration-strip", dataset: { testid: "duration-strip" } });
    this.roundSummary = h("p", { class: "round-summary", dataset: { testid: "round-summary" } });
    this.chartBox = h("div", { class: "charts single" });
    this.chart = new ChartGrid(this.chartBox, "round", "health:");
    this.section = h(
      "section",
      { class: "health", dataset: { testid: "health" } },
      h("h3", {}, "Federation health"),
      h(
        "div",
        { class: "toolbar wrap" },
        h("label", {}, "straggler: over ", factor, " × the round median and ", minGap, " s more"),
        filter,
        show,
        sort,
      ),
      h("div", { class: "toolbar" }, legend, this.countsText),
      gridBox,
      this.detail,
      h("div", { class: "toolbar" }, h("label", {}, "client durations in round ", this.roundSelect)),
      this.strip,
      this.roundSummary,
      this.chartBox,
    );
    parent.append(this.section);
  }

  refresh() {
    this.key = "";
    if (this.health) this.render(this.health);
  }

  /** Redraws what changed; nothing when neither the data nor the settings did. */
  render(health) {
    this.health = health;
    const key = `${health.version}|${this.factor}|${this.minGap}|${this.filter}|${this.show}|${this.sort}|${this.roundShown}|${JSON.stringify(this.selected)}`;
    if (key === this.key) return;
    this.key = key;
    const rounds = health.roundNumbers();
    this.section.hidden = rounds.length === 0;
    this.judged = rounds.map((r) => health.judgeRound(r, this.factor, this.minGap));
    const clients = health.clients(this.factor, this.minGap);
    let rows = clients.filter(SHOWS[this.show]);
    if (this.filter) rows = rows.filter((c) => c.client_id.includes(this.filter));
    const field = SORTS[this.sort];
    if (field) rows = [...rows].sort((a, b) => (b[field] ?? -1) - (a[field] ?? -1) || naturalCompare(a.client_id, b.client_id));
    this.rows = rows;
    const judged = this.judged;
    this.grid.selected = this.selected;
    this.grid.setData(rows, rounds, (clientId, column) => judged[column].cells.get(clientId) || null);

    let failed = 0;
    let silent = 0;
    let slow = 0;
    for (const c of clients) {
      failed += c.failed;
      silent += c.silent;
      slow += c.straggler;
    }
    const shown = rows.length === clients.length ? "" : ` (${rows.length} shown)`;
    this.countsText.textContent =
      `${clients.length} clients${shown} · ${rounds.length} rounds · ${failed} failures · ${silent} silent · ${slow} stragglers` +
      (health.truncated ? " · later rounds not tracked (too many cells)" : "");
    this.renderRound(rounds);
    this.renderDetail();
    const median = new Map();
    const critical = new Map();
    const threshold = new Map();
    for (const r of judged) {
      if (r.median !== null) median.set(r.round, r.median);
      if (r.criticalPath) critical.set(r.round, r.criticalPath[1]);
      if (r.threshold !== null) threshold.set(r.round, r.threshold);
    }
    this.durationSeries = new Map([
      ["median", median],
      ["straggler threshold", threshold],
      ["critical path (slowest)", critical],
    ]);
    this.chart.render([
      {
        name: "durations",
        title: "client train duration per round (s)",
        series: this.durationSeries,
        styles: { median: { stroke: "#059669", width: 2 }, "straggler threshold": { stroke: "#d97706", dash: [4, 4] }, "critical path (slowest)": { stroke: "#dc2626" } },
      },
    ]);
  }

  judgedRound(round) {
    return this.judged.find((r) => r.round === round) || null;
  }

  select(clientId, round) {
    this.selected = { clientId, round };
    if (round !== null) this.roundShown = round;
    this.render(this.health);
  }

  describe(clientId, round) {
    const r = this.judgedRound(round);
    const cell = r?.cells.get(clientId);
    if (!cell) return `client ${clientId} · round ${round}: not sampled`;
    let text = `client ${clientId} · round ${round}: ${cell.state}`;
    if (cell.duration !== null) text += `, ${seconds(cell.duration)} (median ${seconds(r.median)})`;
    if (cell.failure) text += ` — ${cell.failure.reason}`;
    return text;
  }

  renderDetail() {
    const sel = this.selected;
    this.detail.hidden = !sel;
    if (!sel) return;
    const info = this.health.clients(this.factor, this.minGap).find((c) => c.client_id === sel.clientId);
    const rates = info
      ? `sampled in ${info.sampled} rounds: ${info.finished} finished, ${info.straggler} slow, ${info.failed} failed, ${info.silent} silent`
      : "";
    const parts = [h("div", { class: "muted" }, rates)];
    let title = `client ${sel.clientId}`;
    if (sel.round !== null) {
      const r = this.judgedRound(sel.round);
      const cell = r?.cells.get(sel.clientId);
      title += ` · round ${sel.round} · ${cell ? cell.state : "not sampled"}`;
      if (cell && cell.duration !== null) {
        parts.push(h("div", {}, `train took ${seconds(cell.duration)}: round median ${seconds(r.median)}, stragglers over ${seconds(r.threshold)}`));
      }
      if (cell?.failure) {
        const f = cell.failure;
        parts.push(h("div", { class: "reason", dataset: { testid: "health-reason" } }, f.reason));
        if (f.detail) parts.push(h("pre", { class: "detail", dataset: { testid: "health-failure-detail" } }, f.detail));
        const where = [f.phase && `phase ${f.phase}`, f.seq !== null && `event #${f.seq}`].filter(Boolean).join(" · ");
        if (where) parts.push(h("div", { class: "muted small" }, where));
      }
      if (this.onOpenLog) {
        parts.push(
          h("button", { type: "button", dataset: { testid: "health-open-log" }, onclick: () => this.onOpenLog(sel.clientId, sel.round) },
            `events of client ${sel.clientId} in round ${sel.round}`),
        );
      }
    }
    this.detail.replaceChildren(h("strong", {}, title), ...parts);
  }

  renderRound(rounds) {
    const options = [...this.roundSelect.options].map((o) => o.value).join(",");
    if (options !== rounds.join(",")) this.roundSelect.replaceChildren(...rounds.map((r) => h("option", { value: String(r) }, String(r))));
    const withDurations = this.judged.filter((r) => r.median !== null);
    const shown = this.roundShown ?? (withDurations.length ? withDurations[withDurations.length - 1].round : rounds[rounds.length - 1]);
    if (shown === undefined) return;
    this.roundSelect.value = String(shown);
    const r = this.judgedRound(shown);
    this.shownRound = r;
    const counts = { finished: 0, straggler: 0, failed: 0, silent: 0, running: 0 };
    for (const cell of r?.cells.values() || []) counts[cell.state] += 1;
    const sampled = r ? r.cells.size : 0;
    const critical = r?.criticalPath ? `critical path: client ${r.criticalPath[0]} (${seconds(r.criticalPath[1])})` : "no duration yet";
    this.roundSummary.textContent =
      `round ${shown}: ${sampled} sampled · ${counts.finished} finished · ${counts.straggler} straggling · ${counts.failed} failed · ` +
      `${counts.silent} silent${counts.running ? ` · ${counts.running} running` : ""} · median ${seconds(r?.median)} · ` +
      `stragglers over ${seconds(r?.threshold)} · ${critical}`;
    this.drawStrip(r);
  }

  /** Each finished client a dot at its duration; the median, the straggler threshold, the slowest named. */
  drawStrip(r) {
    const canvas = this.strip;
    const width = Math.max(300, canvas.clientWidth || this.section.clientWidth || 600);
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(STRIP_HEIGHT * dpr);
    canvas.style.height = `${STRIP_HEIGHT}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, STRIP_HEIGHT);
    const points = [];
    for (const [id, cell] of r?.cells || []) if (cell.duration !== null) points.push([id, cell]);
    if (!points.length) return;
    const max = Math.max(r.threshold ?? 0, ...points.map(([, c]) => c.duration)) * 1.08 || 1;
    const pad = 12;
    const x = (value) => pad + ((width - 2 * pad) * value) / max;
    const base = STRIP_HEIGHT - 18;
    ctx.strokeStyle = "#cbd5e1";
    ctx.beginPath();
    ctx.moveTo(pad, base);
    ctx.lineTo(width - pad, base);
    ctx.stroke();
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#64748b";
    ctx.textAlign = "left";
    ctx.fillText("0 s", pad, STRIP_HEIGHT - 4);
    ctx.textAlign = "right";
    ctx.fillText(seconds(max / 1.08), width - pad, STRIP_HEIGHT - 4);
    points.forEach(([, cell], i) => {
      ctx.fillStyle = COLORS[cell.state] || COLORS.finished;
      const jitter = ((i * 7919) % 41) - 20; // spread dots vertically, the same way every draw
      ctx.beginPath();
      ctx.arc(x(cell.duration), base - 34 + jitter * 0.7, cell.state === "straggler" ? 4 : 2.5, 0, 2 * Math.PI);
      ctx.fill();
    });
    const line = (value, color, dash, label, row) => {
      const px = Math.round(x(value)) + 0.5;
      ctx.save();
      ctx.strokeStyle = color;
      ctx.setLineDash(dash);
      ctx.beginPath();
      ctx.moveTo(px, 4);
      ctx.lineTo(px, base);
      ctx.stroke();
      ctx.fillStyle = color;
      ctx.textAlign = px > width * 0.75 ? "right" : "left";
      ctx.fillText(label, px + (px > width * 0.75 ? -4 : 4), 12 + 12 * row);
      ctx.restore();
    };
    line(r.median, "#0f172a", [], `median ${seconds(r.median)}`, 0);
    if (r.threshold !== null) line(r.threshold, "#d97706", [4, 3], `straggler over ${seconds(r.threshold)}`, 1);
    if (r.criticalPath) line(r.criticalPath[1], "#dc2626", [2, 2], `critical path: ${r.criticalPath[0]}`, 2);
  }

  counts() {
    return this.chart.counts();
  }

  drawn(id) {
    return this.chart.drawn(id);
  }

  /** The points of "health:durations": series -> [[round, seconds], ...]. */
  points(id) {
    if (id !== "health:durations" || !this.durationSeries) return null;
    return Object.fromEntries([...this.durationSeries].map(([name, points]) => [name, [...points.entries()].sort((a, b) => a[0] - b[0])]));
  }

  /** For tests and the console: what the view shows now (getters: always current). */
  testState() {
    const view = this;
    return {
      get clients() {
        return view.rows.length;
      },
      get rounds() {
        return view.judged.length;
      },
      get factor() {
        return view.factor;
      },
      get minGap() {
        return view.minGap;
      },
      get rowIds() {
        return view.rows.map((r) => r.client_id);
      },
      get selected() {
        return view.selected;
      },
      get roundShown() {
        return view.shownRound ? view.shownRound.round : null;
      },
      visible: () => view.grid.visible(),
      cell: (clientId, round) => {
        const cell = view.judgedRound(round)?.cells.get(String(clientId));
        return cell ? cellJson(cell) : null;
      },
      round: (round) => {
        const r = view.judgedRound(round);
        return r && { median: r.median, threshold: r.threshold, criticalPath: r.criticalPath, stragglers: r.stragglers };
      },
      reveal: (clientId, round) => view.grid.reveal(String(clientId), round),
    };
  }
}
