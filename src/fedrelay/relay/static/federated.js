// federated.js: the federated run view: charts per round, the clients table
// and a per-client chart that draws at most MAX_CLIENT_SERIES clients plus
// the min / mean / max band over all of them, whatever their number.

import { ChartGrid } from "./charts.js";
import { ClientsTable, naturalSort } from "./clients.js";
import { h } from "./dom.js";
import { HealthView } from "./health.js";

const MAX_CLIENT_SERIES = 6;
const BAND = { dash: [4, 4], width: 1, stroke: "#94a3b8" };

function preferredMetric(names) {
  return (
    names.find((n) => n === "evaluate: accuracy") ||
    names.find((n) => n.startsWith("evaluate:")) ||
    names.find((n) => n.endsWith("loss")) ||
    names[0]
  );
}

export class FederatedView {
  constructor(parent) {
    this.roundsBox = h("div", { class: "charts", dataset: { testid: "round-charts" } });
    this.rounds = new ChartGrid(this.roundsBox, "round", "round:");
    this.metricSelect = h("select", { dataset: { testid: "client-metric" } });
    this.metricSelect.addEventListener("change", () => {
      this.metric = this.metricSelect.value;
      this.onChange();
    });
    this.clientChartBox = h("div", { class: "charts single" });
    this.clientChart = new ChartGrid(this.clientChartBox, "round", "client:");
    const tableBox = h("div");
    this.table = new ClientsTable(tableBox, (id) => this.pick(id));
    this.metric = null;
    this.picked = new Set();
    this.userPicked = false;
    this.onChange = () => {};
    parent.append(
      h("section", {}, h("h3", {}, "Aggregated metrics per round"), this.roundsBox,
        h("p", { class: "muted", dataset: { testid: "no-round-metrics" } }, "")),
    );
    this.health = new HealthView(parent);
    parent.append(
      h(
        "section",
        { class: "clients" },
        h("h3", {}, "Clients"),
        h("div", { class: "client-chart-head" }, h("label", {}, "per-client metric ", this.metricSelect),
          h("span", { class: "muted" }, `min / mean / max over all clients, and up to ${MAX_CLIENT_SERIES} picked clients (click a row)`)),
        this.clientChartBox,
        tableBox,
      ),
    );
    this.emptyNote = parent.querySelector('[data-testid="no-round-metrics"]');
  }

  pick(id) {
    this.userPicked = true;
    if (this.picked.has(id)) this.picked.delete(id);
    else {
      if (this.picked.size >= MAX_CLIENT_SERIES) this.picked.delete(this.picked.values().next().value);
      this.picked.add(id);
    }
    this.onChange();
  }

  render(model, now) {
    const names = model.roundCharts.names();
    this.rounds.render(names.map((name) => ({ name, series: model.roundCharts.charts.get(name) })));
    this.emptyNote.textContent = names.length ? "" : "No round has ended yet.";

    const metrics = [...model.clientMetrics.keys()].sort();
    if (metrics.join("|") !== [...this.metricSelect.options].map((o) => o.value).join("|")) {
      this.metricSelect.replaceChildren(...metrics.map((m) => h("option", { value: m }, m)));
    }
    if (!this.metric || !metrics.includes(this.metric)) this.metric = preferredMetric(metrics);
    if (this.metric) this.metricSelect.value = this.metric;
    if (!this.userPicked) {
      this.picked = new Set(naturalSort([...model.clients.keys()]).slice(0, 3));
    }
    if (this.metric) this.renderClientChart(model.clientMetrics.get(this.metric));
    this.table.update(model, now, this.picked);
    this.health.render(model.federation);
  }

  renderClientChart(metric) {
    const series = new Map();
    const band = { min: new Map(), mean: new Map(), max: new Map() };
    for (const [round, agg] of metric.byRound) {
      band.min.set(round, agg.min);
      band.mean.set(round, agg.sum / agg.n);
      band.max.set(round, agg.max);
    }
    series.set("min", band.min);
    series.set("mean", band.mean);
    series.set("max", band.max);
    for (const id of this.picked) series.set(`client ${id}`, metric.byClient.get(id) || new Map());
    this.clientChart.render([
      {
        name: "per-client",
        title: this.metric,
        series,
        styles: { min: BAND, max: BAND, mean: { stroke: "#0f172a", width: 2 } },
      },
    ]);
  }

  counts() {
    return { ...this.rounds.counts(), ...this.clientChart.counts(), ...this.health.counts() };
  }

  drawn(id) {
    return this.rounds.drawn(id) ?? this.clientChart.drawn(id) ?? this.health.drawn(id);
  }

  points(id) {
    return this.health.points(id);
  }
}
