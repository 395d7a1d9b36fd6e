// charts.js: a metric chart on uPlot, redrawn from plain series maps.
//
// Charts are rebuilt only when their series change; otherwise new points go
// through setData. Long series are decimated (min/max per bucket) so the
// canvas never draws more than MAX_POINTS per series, however long the run.

import uPlot from "./vendor/uplot/uPlot.esm.js";

export const MAX_POINTS = 1500;
const WHOLE_STEPS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000];
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569", "#ea580c"];

export function colorFor(index) {
  return PALETTE[index % PALETTE.length];
}

/** Series maps (label -> Map(x -> y)) as uPlot's aligned columns: [xs, ys1, ys2, ...]. */
export function align(series) {
  const xs = new Set();
  for (const points of series.values()) for (const x of points.keys()) xs.add(x);
  const sorted = [...xs].sort((a, b) => a - b);
  const columns = [sorted];
  for (const points of series.values()) columns.push(sorted.map((x) => (points.has(x) ? points.get(x) : null)));
  return decimate(columns);
}

/** Keep the first and last x and, per bucket, the rows holding each series' min and max. */
export function decimate(columns, limit = MAX_POINTS) {
  const n = columns[0].length;
  if (n <= limit) return columns;
  const buckets = Math.floor(limit / 2);
  const keep = new Set([0, n - 1]);
  for (let b = 0; b < buckets; b++) {
    const start = Math.floor((b * n) / buckets);
    const end = Math.floor(((b + 1) * n) / buckets);
    for (let s = 1; s < columns.length; s++) {
      let lo = -1;
      let hi = -1;
      for (let i = start; i < end; i++) {
        const y = columns[s][i];
        if (y === null) continue;
        if (lo < 0 || y < columns[s][lo]) lo = i;
        if (hi < 0 || y > columns[s][hi]) hi = i;
      }
      if (lo >= 0) keep.add(lo).add(hi);
    }
  }
  const rows = [...keep].sort((a, b) => a - b);
  return columns.map((column) => rows.map((i) => column[i]));
}

/** Vertical dashed lines with labels at given x values (early stopping, best epoch). */
function markersPlugin(getMarkers) {
  return {
    hooks: {
      draw: [
        (u) => {
          const ctx = u.ctx;
          getMarkers().forEach(({ x, label, color }, i) => {
            const px = Math.round(u.valToPos(x, "x", true));
            if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) return;
            ctx.save();
            ctx.strokeStyle = color || "#b91c1c";
            ctx.setLineDash([5, 4]);
            ctx.lineWidth = 1.5 * devicePixelRatio;
            ctx.beginPath();
            ctx.moveTo(px, u.bbox.top);
            ctx.lineTo(px, u.bbox.top + u.bbox.height);
            ctx.stroke();
            ctx.fillStyle = color || "#b91c1c";
            ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
            // Near the right edge the label goes on the left of its line; labels stack downwards.
            const right = px > u.bbox.left + u.bbox.width * 0.8;
            ctx.textAlign = right ? "right" : "left";
            ctx.fillText(label, px + (right ? -4 : 4) * devicePixelRatio, u.bbox.top + (12 + 13 * i) * devicePixelRatio);
            ctx.restore();
          });
        },
      ],
    },
  };
}

export class MetricChart {
  /**
   * @param {HTMLElement} parent where the chart card goes
   * @param {{title: string, xLabel: string, id: string}} options
   */
  constructor(parent, { title, xLabel, id }) {
    this.id = id;
    this.xLabel = xLabel;
    this.markers = [];
    this.signature = "";
    this.plot = null;
    this.points = 0;
    this.card = document.createElement("figure");
    this.card.className = "chart";
    this.card.dataset.testid = "chart";
    this.card.dataset.chart = id;
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    this.body = document.createElement("div");
    this.card.append(caption, this.body);
    parent.append(this.card);
    this.resizer = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resizer.observe(this.body);
  }

  size() {
    return { width: Math.max(240, this.body.clientWidth), height: 200 };
  }

  /**
   * @param {Map<string, Map<number, number>>} series label -> (x -> y)
   * @param {{x: number, label: string, color?: string}[]} [markers]
   * @param {Object<string, object>} [styles] label -> uPlot series options (e.g. dash, width)
   */
  update(series, markers = [], styles = {}) {
    this.markers = markers;
    this.points = [...series.values()].reduce((n, points) => n + points.size, 0);
    this.card.dataset.points = String(this.points);
    const labels = [...series.keys()];
    const signature = labels.join("\u0000");
    const data = align(series);
    if (signature !== this.signature || !this.plot) {
      this.plot?.destroy();
      this.signature = signature;
      this.plot = new uPlot(this.options(labels, styles), data, this.body);
    } else {
      this.plot.setData(data);
    }
  }

  options(labels, styles) {
    return {
      ...this.size(),
      legend: { live: false },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false } },
      // Rounds and epochs are whole numbers: no 1.25 ticks.
      axes: [{ label: this.xLabel, size: 40, labelSize: 16, incrs: WHOLE_STEPS }, { size: 50 }],
      series: [
        { label: this.xLabel },
        ...labels.map((label, i) => ({
          label,
          stroke: colorFor(i),
          width: 1.5,
          points: { size: 5 },
          spanGaps: true,
          ...(styles[label] || {}),
        })),
      ],
      plugins: [markersPlugin(() => this.markers)],
    };
  }

  destroy() {
    this.resizer.disconnect();
    this.plot?.destroy();
    this.card.remove();
  }
}

/** Keeps one MetricChart per name inside a container, in the given order. */
export class ChartGrid {
  constructor(container, xLabel, prefix) {
    this.container = container;
    this.xLabel = xLabel;
    this.prefix = prefix;
    this.charts = new Map();
  }

  /** @param {{name: string, title?: string, series: Map, markers?: object[], styles?: object}[]} specs */
  render(specs) {
    for (const spec of specs) {
      let chart = this.charts.get(spec.name);
      if (!chart) {
        chart = new MetricChart(this.container, { title: spec.title || spec.name, xLabel: this.xLabel, id: `${this.prefix}${spec.name}` });
        this.charts.set(spec.name, chart);
      }
      chart.update(spec.series, spec.markers, spec.styles);
    }
  }

  counts() {
    const out = {};
    for (const chart of this.charts.values()) out[chart.id] = chart.points;
    return out;
  }

  /** The x values a chart draws, left to right (for tests): rounds or epochs in order, whatever the arrival order. */
  drawn(id) {
    for (const chart of this.charts.values()) if (chart.id === id) return chart.plot ? [...chart.plot.data[0]] : [];
    return null;
  }
}
