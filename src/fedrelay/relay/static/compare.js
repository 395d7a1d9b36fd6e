// compare.js: runs side by side (#/compare?runs=a,b,...): their metrics overlaid per round or
// epoch (one chart per metric, one series per run, each run in the same colour everywhere), the
// final and best value of each metric per run, and what differs in their training_start configs.
// Each run is followed live from seq 0, like a run's own page, so the view fills in and keeps up.

import { ChartGrid, colorFor } from "./charts.js";
import { badge, fmtNumber, h } from "./dom.js";
import { subscribe } from "./fedrelay.js";
import { RunModel } from "./model.js";

const RENDER_EVERY_MS = 250;
const HIGHER_IS_BETTER = ["acc", "auroc", "auc", "f1", "precision", "recall", "score", "iou", "dice"];
const MAX_RUNS = 12;

/** `#/compare?runs=a,b` for these run ids (run ids never hold a comma). */
export function compareHref(runIds) {
  return `#/compare?runs=${runIds.map(encodeURIComponent).join(",")}`;
}

/** The run ids a compare URL names, in order, without repeats. */
export function comparedRuns(hash) {
  const query = hash.split("?")[1] || "";
  const value = new URLSearchParams(query).get("runs") || "";
  return [...new Set(value.split(",").map((id) => id.trim()).filter(Boolean))].slice(0, MAX_RUNS);
}

function higherIsBetter(name) {
  const lowered = name.toLowerCase();
  return HIGHER_IS_BETTER.some((token) => lowered.includes(token));
}

/** {"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1,2]"}: every leaf under a dotted key. */
export function flatten(value, prefix = "", out = {}) {
  if (typeof value === "object" && value !== null && !Array.isArray(value)) {
    const keys = Object.keys(value);
    if (!keys.length && prefix) out[prefix] = "{}";
    for (const key of keys) flatten(value[key], prefix ? `${prefix}.${key}` : key, out);
  } else if (prefix) {
    out[prefix] = Array.isArray(value) ? JSON.stringify(value) : value;
  }
  return out;
}

/** Keys whose values are not the same in every run (a key missing from a run differs). */
export function configDiff(configs) {
  const keys = [...new Set(configs.flatMap((c) => Object.keys(c)))].sort();
  const differing = [];
  let same = 0;
  for (const key of keys) {
    const values = configs.map((c) => (Object.hasOwn(c, key) ? c[key] : undefined));
    const texts = values.map((v) => (v === undefined ? "\u0000missing" : JSON.stringify(v)));
    if (texts.every((t) => t === texts[0])) same += 1;
    else differing.push({ key, values });
  }
  return { differing, same };
}

function shown(value) {
  if (value === undefined) return "—";
  return typeof value === "number" ? fmtNumber(value) : String(value);
}

/** Mounts the comparison of `runIds` into `root`; returns a function that tears it down. */
export function mountCompare(root, { runIds, token, state, backHref, runHref }) {
  const models = new Map(runIds.map((id) => [id, new RunModel(id)]));
  const legend = h("div", { class: "compare-legend", dataset: { testid: "compare-runs" } });
  const link = h("a", { dataset: { testid: "compare-link" } });
  const roundsBox = h("div", { class: "charts", dataset: { testid: "compare-round-charts" } });
  const epochsBox = h("div", { class: "charts", dataset: { testid: "compare-epoch-charts" } });
  const rounds = new ChartGrid(roundsBox, "round", "compare:round:");
  const epochs = new ChartGrid(epochsBox, "epoch", "compare:epoch:");
  const table = h("table", { class: "compare-table", dataset: { testid: "compare-table" } });
  const diff = h("table", { class: "config-diff", dataset: { testid: "config-diff" } });
  const diffNote = h("p", { class: "muted small", dataset: { testid: "config-same" } });
  root.replaceChildren(
    h("p", {}, h("a", { href: backHref, dataset: { testid: "back" } }, "← all runs")),
    h("h2", {}, `Comparing ${runIds.length} runs`),
    legend,
    h("p", { class: "muted small" }, "Link to this comparison: ", link),
    h("section", {}, h("h3", {}, "Metrics per round"), roundsBox),
    h("section", {}, h("h3", {}, "Metrics per epoch"), epochsBox),
    h("section", {}, h("h3", {}, "Final and best values"), h("div", { class: "table-box" }, table)),
    h("section", {}, h("h3", {}, "Configuration: what differs"), diffNote, h("div", { class: "table-box" }, diff)),
  );
  link.href = location.href;
  link.textContent = location.href;

  let timer = null;

  function label(id) {
    const model = models.get(id);
    return model.experiment ? `${model.experiment} (${id})` : id;
  }

  /** Every (chart, series) the runs have, each as one chart with a series per run. */
  function specs(kind) {
    const charts = new Map(); // "loss/eval" -> {chart, series}
    for (const model of models.values()) {
      const set = kind === "epoch" ? model.epochCharts : model.roundCharts;
      for (const [chart, series] of set.charts) {
        for (const name of series.keys()) charts.set(`${chart}/${name}`, { chart, name });
      }
    }
    const order = [...charts.keys()].sort((a, b) => a.localeCompare(b));
    return order.map((key) => {
      const { chart, name } = charts.get(key);
      const series = new Map();
      const styles = {};
      runIds.forEach((id, i) => {
        const set = kind === "epoch" ? models.get(id).epochCharts : models.get(id).roundCharts;
        series.set(label(id), set.charts.get(chart)?.get(name) || new Map());
        styles[label(id)] = { stroke: colorFor(i) };
      });
      return { name: key, title: `${chart} · ${name}`, series, styles, kind, metric: name === chart ? chart : name };
    });
  }

  /** Final (at the last round or epoch) and best value of each metric, per run. */
  function finalAndBest(all) {
    return all.map((spec) => {
      const higher = higherIsBetter(spec.metric) || higherIsBetter(spec.name.split("/")[0]);
      const values = [...spec.series.values()].map((points) => {
        if (!points.size) return null;
        const xs = [...points.keys()].sort((a, b) => a - b);
        const last = xs[xs.length - 1];
        let best = xs[0];
        for (const x of xs) if (higher ? points.get(x) > points.get(best) : points.get(x) < points.get(best)) best = x;
        return { final: points.get(last), at: last, best: points.get(best), bestAt: best };
      });
      return { metric: `${spec.kind}:${spec.name}`, title: spec.title, higher, values };
    });
  }

  function render() {
    timer = null;
    legend.replaceChildren(
      ...runIds.map((id, i) => {
        const model = models.get(id);
        return h(
          "span",
          { class: "compare-run", dataset: { runId: id } },
          h("i", { style: `background:${colorFor(i)}` }),
          h("a", { href: runHref(id) }, label(id)),
          " ",
          badge(model.status),
          h("span", { class: "muted small" }, model.mode === "centralized" ? ` epoch ${model.epoch}` : ` round ${model.round}`),
        );
      }),
    );
    const roundSpecs = specs("round");
    const epochSpecs = specs("epoch");
    rounds.render(roundSpecs);
    epochs.render(epochSpecs);
    roundsBox.parentElement.hidden = !roundSpecs.length;
    epochsBox.parentElement.hidden = !epochSpecs.length;

    const rows = finalAndBest([...roundSpecs, ...epochSpecs]);
    table.replaceChildren(
      h("thead", {}, h("tr", {}, h("th", {}, "metric"), ...runIds.map((id, i) => h("th", { style: `color:${colorFor(i)}` }, label(id))))),
      h(
        "tbody",
        {},
        ...rows.map((r) =>
          h(
            "tr",
            { dataset: { metric: r.metric } },
            h("td", {}, r.title, h("span", { class: "muted small" }, r.higher ? " (higher is better)" : " (lower is better)")),
            ...r.values.map((v) =>
              h("td", { class: "num" }, v ? `${fmtNumber(v.final)} (${v.at}) · best ${fmtNumber(v.best)} (${v.bestAt})` : "—"),
            ),
          ),
        ),
      ),
    );

    const configs = runIds.map((id) => flatten(models.get(id).startData || {}));
    const { differing, same } = configDiff(configs);
    diffNote.textContent = models.size < 2 ? "" : `${differing.length} settings differ, ${same} are the same in every run.`;
    diff.replaceChildren(
      h("thead", {}, h("tr", {}, h("th", {}, "setting"), ...runIds.map((id, i) => h("th", { style: `color:${colorFor(i)}` }, label(id))))),
      h(
        "tbody",
        {},
        ...differing.map(({ key, values }) =>
          h("tr", { class: "differs", dataset: { key } }, h("td", { class: "mono" }, key), ...values.map((v) => h("td", { class: "mono" }, shown(v)))),
        ),
      ),
    );

    const charts = { ...rounds.counts(), ...epochs.counts() };
    Object.assign(state, {
      view: "compare",
      runs: runIds,
      labels: runIds.map(label),
      charts,
      statuses: runIds.map((id) => models.get(id).status),
      lastSeqs: runIds.map((id) => models.get(id).lastSeq),
      diff: differing.map(({ key, values }) => ({ key, values: values.map((v) => (v === undefined ? null : v)) })),
      table: rows.map((r) => ({ metric: r.metric, values: r.values })),
      rendered: (state.rendered || 0) + 1,
    });
    state.drawn = (id) => rounds.drawn(id) ?? epochs.drawn(id);
    state.points = (id) => {
      const spec = [...roundSpecs, ...epochSpecs].find((s) => `compare:${s.kind}:${s.name}` === id);
      if (!spec) return null;
      return Object.fromEntries([...spec.series].map(([name, points]) => [name, [...points.entries()].sort((a, b) => a[0] - b[0])]));
    };
  }

  function schedule() {
    if (timer === null) timer = setTimeout(() => requestAnimationFrame(render), RENDER_EVERY_MS);
  }

  const sub = subscribe({
    runIds,
    since: 0,
    token,
    onEvent: (event) => {
      const model = models.get(event.run_id);
      if (model && model.apply(event)) schedule();
    },
    onStatus: (status) => (state.connection = status),
  });
  render();
  return () => {
    sub.close();
    clearTimeout(timer);
  };
}
