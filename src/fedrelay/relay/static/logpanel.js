// logpanel.js: a run's log panel: its forwarded log records (logbook.js), newest first, filtered by
// source (a client, or the server and trainer), round, minimum level and text; a picked record's
// whole message and exception below the list. Virtualised: only the rows in view are in the DOM.
// Every text of a record goes in as text (textContent, text nodes), never as HTML.
//
// Records the page no longer holds (past logbook.js's bounds) are searched for on demand in the
// relay (GET /api/runs/{id}/events?type=log), with the filters in force; a record the page clipped
// is fetched whole when it is picked.

import { h } from "./dom.js";
import { fetchEventsPage } from "./fedrelay.js";
import { LEVELS, MAX_RECORDS, OlderSearch, clipped, defaultFilter, filterKey, sourceOf } from "./logbook.js";

const ROW_HEIGHT = 24;
const OVERSCAN = 8;
const ROW_CHARS = 400; // of a row's message: the rest is in the detail
const PAGE = 2000; // events per API page when searching older records

function pad(n, width = 2) {
  return String(n).padStart(width, "0");
}

function clock(at) {
  if (at === null) return "";
  const d = new Date(at);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function firstLine(text) {
  const end = text.indexOf("\n");
  return (end < 0 ? text : text.slice(0, end)).slice(0, ROW_CHARS);
}

function lastLine(text) {
  const lines = text.trimEnd().split("\n");
  return lines[lines.length - 1].slice(0, ROW_CHARS);
}

function when(record) {
  if (record.round !== null) return `round ${record.round}`;
  if (record.epoch !== null) return `epoch ${record.epoch}`;
  return "";
}

export class LogPanel {
  /**
   * @param {HTMLElement} parent
   * @param {import("./logbook.js").LogBook} book
   * @param {{runId: string, token?: string}} relay where older and whole records come from
   */
  constructor(parent, book, relay) {
    this.book = book;
    this.relay = relay;
    this.filter = defaultFilter();
    this.rows = [];
    this.rowsKey = "";
    this.topSeq = null; // the row at the top of the view at the last draw, and its index
    this.topIndex = 0;
    this.detailKey = null;
    this.picked = null; // the record shown in the detail
    this.whole = null; // the picked record fetched whole from the relay, when the page clipped it
    this.older = null; // an OlderSearch, its state and error
    this.olderState = "idle"; // idle | searching | done | failed
    this.olderError = null;
    this.opened = false;
    this.frame = null;

    this.clientSelect = h("select", { dataset: { testid: "log-client" }, title: "records of one client, or of the server and trainer" });
    this.clientSelect.addEventListener("change", () => {
      const value = this.clientSelect.value;
      this.setFilter(
        value === "all" ? { source: "all", client: null } : value === "none" ? { source: "none", client: null } : { source: "client", client: value.slice(2) },
      );
    });
    this.levelSelect = h(
      "select",
      { dataset: { testid: "log-level" }, title: "this level and above" },
      h("option", { value: "0" }, "all levels"),
      ...LEVELS.map(([name, n]) => h("option", { value: String(n) }, n === 50 ? name : `${name} and above`)),
    );
    this.levelSelect.addEventListener("change", () => this.setFilter({ minLevel: Number(this.levelSelect.value) }));
    this.roundClear = h("button", { type: "button", class: "chip-x", title: "all rounds", dataset: { testid: "log-round-clear" }, onclick: () => this.setFilter({ round: null }) }, "×");
    this.roundLabel = h("span");
    this.roundChip = h("span", { class: "chip", dataset: { testid: "log-round" }, hidden: true }, this.roundLabel, this.roundClear);
    this.search = h("input", { type: "search", placeholder: "find text", dataset: { testid: "log-search" } });
    this.search.addEventListener("input", () => this.setFilter({ text: this.search.value }));
    this.counts = h("span", { class: "muted", dataset: { testid: "log-counts" } });
    this.spacer = h("div", { class: "spacer" });
    this.viewport = h("div", { class: "logs-viewport", dataset: { testid: "log-list" } }, this.spacer);
    this.viewport.addEventListener("scroll", () => this.drawSoon());
    this.empty = h("p", { class: "muted", dataset: { testid: "log-empty" }, hidden: true });
    // Updated in place (text, a label), never rebuilt: a live run renders 4 times a second, and a
    // button replaced between a press and its release would lose the click.
    this.olderText = h("span");
    this.olderButton = h("button", { type: "button", dataset: { testid: "log-load-older" }, onclick: () => this.searchOlder() });
    this.olderNote = h("div", { class: "muted small-note", dataset: { testid: "log-older" }, hidden: true }, this.olderText, " ", this.olderButton);
    this.drawn = new Map(); // seq -> the row element drawn for it (kept while in view: a click lands)
    this.detail = h("div", { class: "log-detail", dataset: { testid: "log-detail" }, hidden: true });
    this.section = h(
      "section",
      { class: "logs", dataset: { testid: "log-panel" }, hidden: true },
      h("h3", {}, "Logs"),
      h("div", { class: "toolbar wrap" }, this.clientSelect, this.levelSelect, this.roundChip, this.search, this.counts),
      this.viewport,
      this.empty,
      this.olderNote,
      this.detail,
    );
    parent.append(this.section);
  }

  /** Opens the panel filtered to one client's records of one round (the federation view's failed cells). */
  openFor(clientId, round) {
    this.opened = true;
    this.setFilter({ source: "client", client: String(clientId), round: Number.isInteger(round) ? round : null, text: "", minLevel: 0 });
    this.section.scrollIntoView({ block: "start" });
    if (this.book.evicted && this.olderState !== "searching") this.searchOlder();
  }

  setFilter(change) {
    const before = filterKey(this.filter);
    this.filter = { ...this.filter, ...change };
    if (filterKey(this.filter) === before) return;
    this.viewport.scrollTop = 0;
    this.topSeq = null;
    this.render();
  }

  render() {
    const book = this.book;
    this.section.hidden = !this.opened && book.held === 0 && book.evicted === 0;
    if (this.section.hidden) return;
    this.syncControls();
    const held = book.filtered(this.filter);
    const key = `${book.version}|${filterKey(this.filter)}|${this.older ? this.older.found.size + this.olderState : ""}`;
    if (key !== this.rowsKey) {
      this.rowsKey = key;
      // Newest first: keep the rows in view where they were when newer ones arrive above them.
      if (this.topSeq !== null && this.viewport.scrollTop > 0) {
        const index = held.findIndex((r) => r.seq <= this.topSeq);
        if (index > this.topIndex) this.viewport.scrollTop += (index - this.topIndex) * ROW_HEIGHT;
      }
      const older = this.older && this.older.key === filterKey(this.filter) ? this.older.rows() : [];
      this.rows = older.length ? [...held, ...older] : held;
    }
    const shown = this.rows.length;
    const total = book.held;
    const parts = [`${held.length} of ${total} record${total === 1 ? "" : "s"}${book.evicted ? " held" : ""}`];
    if (shown > held.length) parts.push(`${shown - held.length} older from the relay`);
    if (book.producerDropped) parts.push(`${book.producerDropped} dropped by the producers' rate limits`);
    this.counts.textContent = parts.join(" · ");
    this.empty.hidden = shown > 0;
    if (!shown) this.empty.textContent = total ? "No record matches these filters." : "No log record in this run (yet): forward_logs() sends them (docs/emitters.md).";
    this.renderOlder();
    this.draw();
  }

  syncControls() {
    const clients = this.book.clients();
    if (this.filter.source === "client" && !clients.includes(this.filter.client)) clients.push(this.filter.client);
    const values = ["all", "none", ...clients.map((id) => `c:${id}`)];
    if ([...this.clientSelect.options].map((o) => o.value).join("\n") !== values.join("\n")) {
      this.clientSelect.replaceChildren(
        h("option", { value: "all" }, "all sources"),
        h("option", { value: "none" }, "server and trainer"),
        ...clients.map((id) => h("option", { value: `c:${id}` }, `client ${id}`)),
      );
    }
    const f = this.filter;
    this.clientSelect.value = f.source === "client" ? `c:${f.client}` : f.source;
    this.levelSelect.value = String(f.minLevel);
    if (this.search.value !== f.text) this.search.value = f.text;
    this.roundChip.hidden = f.round === null;
    if (f.round !== null) this.roundLabel.textContent = `round ${f.round} `;
  }

  renderOlder() {
    const book = this.book;
    const current = this.older && this.older.key === filterKey(this.filter) ? this.older : null;
    this.olderNote.hidden = !book.evicted;
    if (!book.evicted) return;
    let text = `${book.evicted} older record${book.evicted === 1 ? " is" : "s are"} not held in the page (it keeps the newest ${MAX_RECORDS.toLocaleString("en")}). `;
    let label = null;
    if (!current) {
      label = "find the older ones matching these filters";
    } else if (this.olderState === "searching") {
      text += `Searching the relay: ${current.scanned} older records read, ${current.found.size} match…`;
    } else if (this.olderState === "failed") {
      text += `The search failed (${this.olderError}).`;
      label = "try again";
    } else {
      const found = current.found.size;
      const more = current.more ? ` (and ${current.more} older matches not kept: narrow the filters)` : "";
      text += `Below the held records: ${found} older match${found === 1 ? "" : "es"} of ${current.scanned} read from the relay${more}`;
      if (book.records.evictedUpto >= current.upto) {
        text += "; more were evicted since.";
        label = "search again";
      } else {
        text += ".";
      }
    }
    if (this.olderText.textContent !== text) this.olderText.textContent = text;
    this.olderButton.hidden = label === null;
    if (label !== null && this.olderButton.textContent !== label) this.olderButton.textContent = label;
  }

  /** Pages the run's older log records from the relay, keeping those matching the filters. */
  async searchOlder() {
    const search = new OlderSearch(this.filter, this.book.oldestSeq || Number.MAX_SAFE_INTEGER);
    this.older = search;
    this.olderState = "searching";
    this.render();
    const wanted = () => this.older === search && search.key === filterKey(this.filter); // else: abandoned
    try {
      let since = 0;
      while (since !== null && wanted()) {
        const page = await fetchEventsPage({ token: this.relay.token, runId: this.relay.runId, since, limit: PAGE, types: ["log"] });
        since = search.take(page);
        this.render();
      }
      if (this.older === search) {
        this.olderState = wanted() ? "done" : "idle";
        if (!wanted()) this.older = null; // the filters changed: offer a search with the new ones
      }
    } catch (error) {
      if (this.older === search) {
        this.olderState = "failed";
        this.olderError = String(error.message || error);
      }
    }
    this.rowsKey = "";
    this.render();
  }

  drawSoon() {
    if (this.frame === null) this.frame = requestAnimationFrame(() => this.draw());
  }

  /**
   * The rows in view (and a few more), from the filtered list. A row stays the same element while
   * its record is in view (moved, never rebuilt), so a click or the keyboard focus survives the
   * redraws of a live run.
   */
  draw() {
    this.frame = null;
    const rows = this.rows;
    this.spacer.style.height = `${rows.length * ROW_HEIGHT}px`;
    const top = this.viewport.scrollTop;
    const height = this.viewport.clientHeight || 360;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(rows.length, Math.ceil((top + height) / ROW_HEIGHT) + OVERSCAN);
    this.topIndex = Math.min(rows.length - 1, Math.floor(top / ROW_HEIGHT));
    this.topSeq = rows.length ? rows[this.topIndex].seq : null;
    const heldFrom = this.older ? this.book.oldestSeq : 0;
    const wanted = new Map();
    for (let i = first; i < last; i++) wanted.set(rows[i].seq, i);
    for (const [seq, el] of this.drawn) {
      if (!wanted.has(seq) || rows[wanted.get(seq)] !== el.record) {
        el.remove();
        this.drawn.delete(seq);
      }
    }
    for (const [seq, i] of wanted) {
      let el = this.drawn.get(seq);
      if (!el) {
        el = this.row(rows[i]);
        this.drawn.set(seq, el);
        this.spacer.append(el);
      }
      const y = `${i * ROW_HEIGHT}px`;
      if (el.style.top !== y) el.style.top = y;
      el.dataset.index = String(i);
      el.classList.toggle("older", seq < heldFrom);
      el.classList.toggle("picked", this.picked !== null && this.picked.seq === seq);
    }
    this.renderDetail();
  }

  row(record) {
    let text = firstLine(record.message);
    if (record.exception) text += ` — ${lastLine(record.exception)}`;
    const el = h(
      "div",
      {
        class: `log-row lv-${record.levelno >= 40 ? "error" : record.levelno >= 30 ? "warning" : "info"}`,
        role: "button",
        tabindex: "0",
        title: record.exception ? "click for the message and its exception" : "click for the whole record",
        dataset: { testid: "log-row", seq: String(record.seq), level: record.level, clientId: record.clientId ?? "", round: record.round ?? "" },
        onclick: () => this.pick(record),
        onkeydown: (e) => e.key === "Enter" && this.pick(record),
      },
      h("span", { class: "mono muted" }, clock(record.at)),
      h("span", { class: "lv" }, record.level),
      h("span", { class: "src" }, sourceOf(record)),
      h("span", { class: "muted" }, when(record)),
      h("span", { class: "mono muted lg" }, record.logger),
      h("span", { class: "msg" }, record.exception ? h("b", { class: "exc" }, "▸ ") : null, text),
    );
    el.record = record;
    return el;
  }

  pick(record) {
    this.picked = this.picked && this.picked.seq === record.seq ? null : record;
    this.whole = null;
    this.draw();
  }

  /** The picked record fetched whole from the relay (the page held a clip of its text). */
  async loadWhole(record) {
    try {
      const page = await fetchEventsPage({ token: this.relay.token, runId: this.relay.runId, since: record.seq - 1, limit: 1, types: ["log"] });
      const event = page.events.find((e) => e.seq === record.seq);
      if (!event || this.picked !== record) return;
      const d = event.data && typeof event.data === "object" ? event.data : {};
      this.whole = { seq: record.seq, message: typeof d.message === "string" ? d.message : record.message, exception: typeof d.exception === "string" ? d.exception : record.exception };
    } catch (error) {
      this.whole = { seq: record.seq, error: String(error.message || error) };
    }
    this.renderDetail();
  }

  renderDetail() {
    const r = this.picked;
    const key = r ? `${r.seq}|${this.whole ? this.whole.seq : ""}` : null;
    if (key === this.detailKey) return; // the same: leave it (and any text selected in it) alone
    this.detailKey = key;
    this.detail.hidden = !r;
    if (!r) return;
    const whole = this.whole && this.whole.seq === r.seq && !this.whole.error ? this.whole : null;
    const head = [r.level, clock(r.at), sourceOf(r), when(r), r.logger && `logger ${r.logger}`, `event #${r.seq}`].filter(Boolean).join(" · ");
    const parts = [h("strong", {}, head)];
    if (r.where) parts.push(h("div", { class: "muted mono" }, r.where));
    parts.push(h("pre", { class: "msg", dataset: { testid: "log-message" } }, whole ? whole.message : r.message));
    if (r.exception !== null || whole?.exception) {
      parts.push(h("pre", { class: "exc", dataset: { testid: "log-exception" } }, whole?.exception ?? r.exception));
    }
    const notes = [];
    if (!whole && clipped(r)) {
      notes.push(`The page holds ${r.message.length} of the message's ${r.messageChars} characters` + (r.exceptionChars > (r.exception?.length ?? 0) ? ` and the last ${r.exception.length} of the exception's ${r.exceptionChars}. ` : ". "));
      notes.push(h("button", { type: "button", dataset: { testid: "log-load-whole" }, onclick: () => this.loadWhole(r) }, "show all of it"));
    }
    if (this.whole && this.whole.seq === r.seq && this.whole.error) notes.push(` (could not fetch it: ${this.whole.error})`);
    if (r.truncated) {
      const cut = Object.entries(r.truncated).map(([field, n]) => `${field} from ${n} characters`).join(", ");
      notes.push(` Cut by the producer: ${cut}.`);
    }
    if (r.dropped) notes.push(` The producer's rate limit dropped ${r.dropped} records before this one.`);
    if (notes.length) parts.push(h("div", { class: "muted" }, ...notes));
    this.detail.replaceChildren(...parts);
  }

  /** For tests and the console (getters: always current). */
  testState() {
    const panel = this;
    const plain = (r) => ({ seq: r.seq, level: r.level, levelno: r.levelno, role: r.role, clientId: r.clientId, round: r.round, epoch: r.epoch, logger: r.logger, message: r.message, exception: r.exception });
    return {
      get open() {
        return !panel.section.hidden;
      },
      get held() {
        return panel.book.held;
      },
      get evicted() {
        return panel.book.evicted;
      },
      get producerDropped() {
        return panel.book.producerDropped;
      },
      get filter() {
        return { ...panel.filter };
      },
      get shown() {
        return panel.rows.length;
      },
      get clients() {
        return panel.book.clients();
      },
      get older() {
        const o = panel.older;
        return o && { state: panel.olderState, found: o.found.size, scanned: o.scanned, more: o.more, upto: o.upto, filter: { ...o.filter } };
      },
      get picked() {
        return panel.picked ? panel.picked.seq : null;
      },
      /** The seq of the row at the top of the list's view. */
      get top() {
        return panel.topSeq;
      },
      /** The records the filters let through, newest first (held ones, then older ones found). */
      records: () => panel.rows.map(plain),
      /** The rows in the DOM: seq and text, top to bottom. */
      visible: () =>
        [...panel.spacer.children]
          .sort((a, b) => Number(a.dataset.index) - Number(b.dataset.index))
          .map((row) => ({ seq: Number(row.dataset.seq), text: row.textContent })),
      /** Scrolls the list so that the row of `seq` is in view; returns its element's box centre. */
      reveal: (seq) => {
        const i = panel.rows.findIndex((r) => r.seq === seq);
        if (i < 0) return null;
        panel.viewport.scrollTop = Math.max(0, i * ROW_HEIGHT - ROW_HEIGHT * 2);
        panel.draw();
        return i;
      },
    };
  }
}
