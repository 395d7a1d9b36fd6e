// healthgrid.js: the clients x rounds grid of the federation health view.
//
// Virtualised both ways: only the rows in view have a DOM element (a pool, reused as it scrolls),
// and the cells are drawn on one canvas the size of the viewport, visible rows x visible rounds
// only, so 1,000 clients x 100 rounds cost what 25 x 60 do. A scroll redraws at the next
// animation frame; new data redraws when the view renders (at most four times a second).

export const ROW_HEIGHT = 18;
export const HEADER_HEIGHT = 22;
export const LABEL_WIDTH = 250;
const MIN_CELL = 4;
const MAX_CELL = 18;
const LABEL_GAP = 30; // pixels between round numbers in the header

export const COLORS = {
  finished: "#059669",
  straggler: "#d97706",
  failed: "#dc2626",
  silent: "#7c3aed",
  running: "#93c5fd",
  none: "#eef2f7",
};
/** One letter per round in a row's data-cells (tests read it): "." = not sampled. */
export const LETTERS = { finished: "f", straggler: "s", failed: "x", silent: "q", running: "r" };

function percent(rate) {
  return rate === null || rate === undefined ? "–" : `${Math.round(rate * 100)}%`;
}

export class HealthGrid {
  /**
   * @param {HTMLElement} parent
   * @param {{onSelect: (clientId: string, round: number) => void, describe: (clientId: string, round: number) => string}} hooks
   */
  constructor(parent, { onSelect, describe }) {
    this.onSelect = onSelect;
    this.describe = describe;
    this.rows = []; // client rows in display order: {client_id, failure_rate, dropout_rate, straggler_rate}
    this.rounds = []; // round numbers, ascending
    this.cellAt = () => null; // (clientId, column) -> {state, ...} | null
    this.selected = null; // {clientId, round}
    this.cellWidth = MAX_CELL;
    this.frame = null;
    this.draws = 0;
    this.letters = new Map(); // client id -> its data-cells, until the data changes
    this.drawTimes = []; // ms per draw, the latest few hundred (bench/dashboard_grid.py reads them)

    this.canvas = document.createElement("canvas");
    this.canvas.className = "hg-canvas";
    this.canvas.dataset.testid = "health-canvas";
    this.rowsBox = document.createElement("div");
    this.rowsBox.className = "hg-rows";
    this.rowsBox.style.width = `${LABEL_WIDTH}px`;
    this.corner = document.createElement("div");
    this.corner.className = "hg-corner hg-row";
    this.corner.style.width = `${LABEL_WIDTH}px`;
    this.corner.style.height = `${HEADER_HEIGHT}px`;
    for (const text of ["client", "failed", "silent", "slow"]) {
      const span = document.createElement("span");
      span.textContent = text;
      this.corner.append(span);
    }
    this.spacer = document.createElement("div");
    this.spacer.className = "hg-spacer";
    this.spacer.append(this.canvas, this.rowsBox, this.corner);
    this.viewport = document.createElement("div");
    this.viewport.className = "hg-viewport";
    this.viewport.dataset.testid = "health-grid";
    this.viewport.append(this.spacer);
    parent.append(this.viewport);
    this.pool = [];

    this.viewport.addEventListener("scroll", () => this.schedule(), { passive: true });
    this.resizer = new ResizeObserver(() => this.schedule());
    this.resizer.observe(this.viewport);
    this.canvas.addEventListener("mousemove", (e) => {
      const hit = this.hit(e.offsetX, e.offsetY);
      this.canvas.title = hit ? this.describe(hit.clientId, hit.round) : "";
      this.canvas.style.cursor = hit ? "pointer" : "default";
    });
    this.canvas.addEventListener("click", (e) => {
      const hit = this.hit(e.offsetX, e.offsetY);
      if (hit) this.onSelect(hit.clientId, hit.round);
    });
  }

  /** New rows, rounds or cells: redraw now (the caller renders at most four times a second). */
  setData(rows, rounds, cellAt) {
    this.rows = rows;
    this.rounds = rounds;
    this.cellAt = cellAt;
    this.letters.clear();
    this.draw();
  }

  schedule() {
    if (this.frame === null) this.frame = requestAnimationFrame(() => this.draw());
  }

  /** Row and round under a point of the canvas (viewport coordinates), or null. */
  hit(x, y) {
    if (x < LABEL_WIDTH || y < HEADER_HEIGHT) return null;
    const row = Math.floor((y - HEADER_HEIGHT + this.viewport.scrollTop) / ROW_HEIGHT);
    const column = Math.floor((x - LABEL_WIDTH + this.viewport.scrollLeft) / this.cellWidth);
    if (row < 0 || row >= this.rows.length || column < 0 || column >= this.rounds.length) return null;
    return { clientId: this.rows[row].client_id, round: this.rounds[column] };
  }

  /** Scrolls a cell into view; its centre in viewport coordinates (what a click needs), or null. */
  reveal(clientId, round) {
    const row = this.rows.findIndex((r) => r.client_id === clientId);
    const column = this.rounds.indexOf(round);
    if (row < 0 || column < 0) return null;
    const v = this.viewport;
    const top = HEADER_HEIGHT + row * ROW_HEIGHT;
    if (top - HEADER_HEIGHT < v.scrollTop || top + ROW_HEIGHT > v.scrollTop + v.clientHeight) {
      v.scrollTop = Math.max(0, top - HEADER_HEIGHT - v.clientHeight / 2);
    }
    const left = LABEL_WIDTH + column * this.cellWidth;
    if (left - LABEL_WIDTH < v.scrollLeft || left + this.cellWidth > v.scrollLeft + v.clientWidth) {
      v.scrollLeft = Math.max(0, left - LABEL_WIDTH - (v.clientWidth - LABEL_WIDTH) / 2);
    }
    this.draw();
    let box = v.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) {
      v.scrollIntoView({ block: "center" });
      box = v.getBoundingClientRect();
    }
    return {
      x: box.left + left - v.scrollLeft + this.cellWidth / 2,
      y: box.top + top - v.scrollTop + ROW_HEIGHT / 2,
    };
  }

  draw() {
    const started = performance.now();
    this.paint();
    this.drawTimes.push(performance.now() - started);
    if (this.drawTimes.length > 500) this.drawTimes.splice(0, 250);
  }

  paint() {
    this.frame = null;
    this.draws += 1;
    const v = this.viewport;
    const rounds = this.rounds.length;
    const width = Math.max(LABEL_WIDTH + 40, v.clientWidth);
    this.cellWidth = Math.max(MIN_CELL, Math.min(MAX_CELL, Math.floor((width - LABEL_WIDTH) / Math.max(1, rounds))));
    const cw = this.cellWidth;
    this.spacer.style.width = `${LABEL_WIDTH + rounds * cw}px`;
    this.spacer.style.height = `${HEADER_HEIGHT + this.rows.length * ROW_HEIGHT}px`;
    const height = v.clientHeight;
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(width * dpr) || this.canvas.height !== Math.round(height * dpr)) {
      this.canvas.width = Math.round(width * dpr);
      this.canvas.height = Math.round(height * dpr);
      this.canvas.style.width = `${width}px`;
      this.canvas.style.height = `${height}px`;
      this.canvas.style.marginBottom = `-${height}px`;
    }
    const top = v.scrollTop;
    const left = v.scrollLeft;
    const firstRow = Math.max(0, Math.floor(top / ROW_HEIGHT));
    const lastRow = Math.min(this.rows.length, Math.ceil((top + height - HEADER_HEIGHT) / ROW_HEIGHT) + 1);
    const firstColumn = Math.max(0, Math.floor(left / cw));
    const lastColumn = Math.min(rounds, Math.ceil((left + width - LABEL_WIDTH) / cw) + 1);

    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    // One path per colour: setting fillStyle is what costs, not the rectangles.
    const gap = cw >= 8 ? 1 : 0;
    const paths = {};
    for (const state of Object.keys(COLORS)) paths[state] = new Path2D();
    for (let i = firstRow; i < lastRow; i++) {
      const id = this.rows[i].client_id;
      const y = HEADER_HEIGHT + i * ROW_HEIGHT - top;
      for (let j = firstColumn; j < lastColumn; j++) {
        const cell = this.cellAt(id, j);
        paths[cell ? cell.state : "none"].rect(LABEL_WIDTH + j * cw - left, y + 2, cw - gap, ROW_HEIGHT - 4);
      }
    }
    for (const [state, path] of Object.entries(paths)) {
      ctx.fillStyle = COLORS[state];
      ctx.fill(path);
    }
    if (this.selected) {
      const i = this.rows.findIndex((r) => r.client_id === this.selected.clientId);
      const j = this.rounds.indexOf(this.selected.round);
      if (i >= firstRow && i < lastRow && j >= firstColumn && j < lastColumn) {
        ctx.strokeStyle = "#0f172a";
        ctx.lineWidth = 2;
        ctx.strokeRect(LABEL_WIDTH + j * cw - left - 1, HEADER_HEIGHT + i * ROW_HEIGHT - top + 1, cw + 1, ROW_HEIGHT - 2);
      }
    }
    // The header: round numbers, every few rounds, over whatever scrolled under it.
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(LABEL_WIDTH, 0, width - LABEL_WIDTH, HEADER_HEIGHT);
    ctx.fillStyle = "#64748b";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "center";
    const every = Math.max(1, Math.ceil(LABEL_GAP / cw));
    for (let j = firstColumn; j < lastColumn; j++) {
      if (j % every && j !== rounds - 1) continue;
      ctx.fillText(String(this.rounds[j]), LABEL_WIDTH + j * cw - left + cw / 2, HEADER_HEIGHT - 7);
    }
    ctx.clearRect(0, 0, LABEL_WIDTH, height);
    this.drawRows(firstRow, lastRow);
  }

  /** The label rows in view, from the pool: client id and its failed / silent / slow rates. */
  drawRows(first, last) {
    const needed = Math.max(0, last - first);
    while (this.pool.length < needed) {
      const row = document.createElement("div");
      row.className = "hg-row";
      row.style.width = `${LABEL_WIDTH}px`;
      row.style.height = `${ROW_HEIGHT}px`;
      row.dataset.testid = "health-row";
      for (let k = 0; k < 4; k++) row.append(document.createElement("span"));
      row.firstChild.className = "mono";
      row.addEventListener("click", () => row.dataset.clientId && this.onSelect(row.dataset.clientId, null));
      this.pool.push(row);
    }
    if (this.rowsBox.childElementCount !== needed) this.rowsBox.replaceChildren(...this.pool.slice(0, needed));
    for (let k = 0; k < needed; k++) {
      const i = first + k;
      const info = this.rows[i];
      const row = this.pool[k];
      row.style.transform = `translateY(${HEADER_HEIGHT + i * ROW_HEIGHT}px)`;
      if (row.dataset.clientId !== info.client_id) row.dataset.clientId = info.client_id;
      const [id, failed, silent, slow] = row.children;
      id.textContent = info.client_id;
      failed.textContent = percent(info.failure_rate);
      silent.textContent = percent(info.dropout_rate);
      slow.textContent = percent(info.straggler_rate);
      let letters = this.letters.get(info.client_id);
      if (letters === undefined) {
        letters = "";
        for (let j = 0; j < this.rounds.length; j++) {
          const cell = this.cellAt(info.client_id, j);
          letters += cell ? LETTERS[cell.state] : ".";
        }
        this.letters.set(info.client_id, letters);
      }
      if (row.dataset.cells !== letters) row.dataset.cells = letters;
      row.classList.toggle("selected", this.selected?.clientId === info.client_id);
    }
  }

  /** What is drawn now (for tests): the DOM rows, first visible row and round. */
  visible() {
    const rows = [...this.rowsBox.children].map((row) => ({ clientId: row.dataset.clientId, cells: row.dataset.cells }));
    return {
      rows,
      firstRow: Math.floor(this.viewport.scrollTop / ROW_HEIGHT),
      firstRound: this.rounds[Math.floor(this.viewport.scrollLeft / this.cellWidth)] ?? null,
      cellWidth: this.cellWidth,
      draws: this.draws,
      drawTimes: [...this.drawTimes],
    };
  }

  destroy() {
    this.resizer.disconnect();
    if (this.frame !== null) cancelAnimationFrame(this.frame);
  }
}
