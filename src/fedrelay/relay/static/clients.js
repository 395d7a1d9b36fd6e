// clients.js: the federated clients table. Virtualised: only the rows in
// view are in the DOM, so a thousand clients cost what thirty do.

import { fmtNumber, h } from "./dom.js";

const ROW_HEIGHT = 30;
const OVERSCAN = 6;
const STRIP_ROUNDS = 10;

/** Client ids in natural order: "2" before "10". */
export function naturalSort(ids) {
  return ids.sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
}

function metricsText(metrics) {
  const entries = Object.entries(metrics || {}).filter(([, v]) => typeof v === "number");
  return entries
    .slice(0, 4)
    .map(([k, v]) => `${k} ${fmtNumber(v)}`)
    .join(" · ");
}

export class ClientsTable {
  /** @param {(id: string) => void} onPick called when a row is clicked (to chart that client) */
  constructor(parent, onPick) {
    this.onPick = onPick;
    this.ids = [];
    this.model = null;
    this.now = 0;
    this.selected = new Set();
    this.filter = "";
    this.summary = h("span", { class: "muted", dataset: { testid: "client-counts" } });
    const search = h("input", { type: "search", placeholder: "filter clients", dataset: { testid: "client-filter" } });
    search.addEventListener("input", () => {
      this.filter = search.value.trim();
      this.draw();
    });
    const cols = ["client", "status", `last ${STRIP_ROUNDS} rounds`, "epoch", "last metrics"];
    this.head = h("div", { class: "client-row head" }, ...cols.map((c) => h("span", {}, c)));
    this.spacer = h("div", { class: "spacer" });
    this.viewport = h("div", { class: "clients-viewport", dataset: { testid: "clients-table" } }, this.spacer);
    this.viewport.addEventListener("scroll", () => this.draw());
    parent.append(h("div", { class: "toolbar" }, search, this.summary), this.head, this.viewport);
  }

  update(model, now, selected) {
    this.model = model;
    this.now = now;
    this.selected = selected;
    this.ids = naturalSort([...model.clients.keys()]);
    const counts = {};
    for (const id of this.ids) {
      const status = model.clientStatus(model.clients.get(id), model.round, now);
      counts[status] = (counts[status] || 0) + 1;
    }
    this.summary.textContent =
      `${this.ids.length} clients · round ${model.round}: ` +
      Object.entries(counts)
        .map(([status, n]) => `${n} ${status}`)
        .join(" · ");
    this.draw();
  }

  draw() {
    if (!this.model) return;
    const ids = this.filter ? this.ids.filter((id) => id.includes(this.filter)) : this.ids;
    this.spacer.style.height = `${ids.length * ROW_HEIGHT}px`;
    const top = this.viewport.scrollTop;
    const height = this.viewport.clientHeight || 400;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(ids.length, Math.ceil((top + height) / ROW_HEIGHT) + OVERSCAN);
    const rows = ids.slice(first, last).map((id, i) => this.row(id, (first + i) * ROW_HEIGHT));
    this.spacer.replaceChildren(...rows);
  }

  row(id, y) {
    const model = this.model;
    const client = model.clients.get(id);
    const status = model.clientStatus(client, model.round, this.now);
    const strip = [];
    for (let r = Math.max(1, model.round - STRIP_ROUNDS + 1); r <= model.round; r++) {
      const s = model.clientStatus(client, r, this.now);
      strip.push(h("i", { class: `cell ${s}`, title: `round ${r}: ${s}` }));
    }
    const state = client.rounds.get(model.round);
    const metrics = client.metrics.evaluate || client.metrics.train || Object.values(client.metrics)[0];
    return h(
      "div",
      {
        class: `client-row${this.selected.has(id) ? " selected" : ""}`,
        style: `top:${y}px`,
        title: state?.error || "click to chart this client",
        dataset: { testid: "client-row", clientId: id, status },
        onclick: () => this.onPick(id),
      },
      h("span", { class: "mono" }, id),
      h("span", {}, h("span", { class: `badge ${status}` }, status)),
      h("span", { class: "strip" }, strip),
      h("span", { class: "num" }, state?.epoch ?? "–"),
      h("span", { class: "metrics" }, metricsText(metrics)),
    );
  }
}
