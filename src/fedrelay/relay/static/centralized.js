// centralized.js: the centralized run view: train / validation curves per
// epoch, with the early-stopping epoch and the best epoch marked.

import { ChartGrid } from "./charts.js";
import { h } from "./dom.js";

export class CentralizedView {
  constructor(parent) {
    this.box = h("div", { class: "charts", dataset: { testid: "epoch-charts" } });
    this.grid = new ChartGrid(this.box, "epoch", "epoch:");
    this.note = h("p", { class: "muted" });
    parent.append(h("section", {}, h("h3", {}, "Train / validation per epoch"), this.box, this.note));
  }

  render(model) {
    const markers = [];
    if (model.earlyStopping?.epoch) markers.push({ x: model.earlyStopping.epoch, label: "early stop" });
    if (model.summary?.best_epoch) markers.push({ x: model.summary.best_epoch, label: "best", color: "#15803d" });
    const names = model.epochCharts.names();
    this.grid.render(names.map((name) => ({ name, series: model.epochCharts.charts.get(name), markers })));
    this.note.textContent = names.length ? "" : "No epoch has ended yet.";
  }

  counts() {
    return this.grid.counts();
  }

  drawn(id) {
    return this.grid.drawn(id);
  }
}
