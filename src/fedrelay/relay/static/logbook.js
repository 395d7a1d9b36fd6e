// logbook.js: a run's forwarded log records (`log` events) as the log panel holds them, the
// filters over them, and the search of older records the page no longer holds. No DOM, no I/O.
//
// Bounded: the page holds the newest MAX_RECORDS records and at most MAX_TEXT_CHARS characters of
// their text (each record clipped to MESSAGE_CHARS of message and the last EXCEPTION_CHARS of its
// exception); older ones are evicted and counted, and found again on demand through the events API
// (OlderSearch), at most as many. A run streams every record through the page once (since=0), so
// the cost per record is a small object and, past the bound, one eviction.
//
// Events from the root path reach it unvalidated: every field is taken only if it has the kind
// expected, and any text is shown as text (the panel never parses it as HTML).

export const MAX_RECORDS = 5000;
export const MAX_TEXT_CHARS = 4 * 1024 * 1024;
export const MESSAGE_CHARS = 2000;
export const EXCEPTION_CHARS = 8000;
const SMALL_CHARS = 300; // logger, file, function names
export const LEVELS = [
  ["debug", 10],
  ["info", 20],
  ["warning", 30],
  ["error", 40],
  ["critical", 50],
];
const LEVEL_NUMBERS = new Map([...LEVELS, ["warn", 30], ["fatal", 50], ["exception", 40]]);

function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isCount(value) {
  return Number.isInteger(value) && value >= 0;
}

/** Any JSON value as text: strings as they are, other values as JSON, nothing as "". */
function textOf(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

function idOf(value) {
  return value === undefined || value === null || isObject(value) || Array.isArray(value) ? null : String(value);
}

/** A record's level as a number: `levelno` when it is one, else from the level's name (0 when unknown). */
export function levelNumber(data) {
  if (Number.isInteger(data.levelno)) return data.levelno;
  return LEVEL_NUMBERS.get(textOf(data.level).toLowerCase()) ?? 0;
}

/** The name shown for a level number, or the record's own name. */
function levelName(data, levelno) {
  const name = typeof data.level === "string" && data.level ? data.level.toLowerCase() : null;
  if (name) return name.slice(0, 20);
  const known = LEVELS.find(([, n]) => n === levelno);
  return known ? known[0] : levelno ? `level ${levelno}` : "?";
}

/** A `log` event as the panel holds it: its text clipped to the page's bounds. */
export function toRecord(event) {
  const d = isObject(event.data) ? event.data : {};
  const source = isObject(event.source) ? event.source : {};
  const levelno = levelNumber(d);
  const clientId = idOf(d.client_id) ?? idOf(source.client_id);
  const message = textOf(d.message);
  const exception = textOf(d.exception);
  const at = typeof event.timestamp === "string" ? Date.parse(event.timestamp) : NaN;
  return {
    seq: typeof event.seq === "number" ? event.seq : 0,
    at: Number.isNaN(at) ? null : at,
    level: levelName(d, levelno),
    levelno,
    role: typeof source.role === "string" ? source.role.slice(0, 20) : null,
    clientId: clientId === null ? null : clientId.slice(0, 200),
    round: isCount(d.round) ? d.round : null,
    epoch: isCount(d.epoch) ? d.epoch : null,
    logger: textOf(d.logger).slice(0, SMALL_CHARS),
    message: message.slice(0, MESSAGE_CHARS),
    messageChars: message.length,
    exception: exception ? exception.slice(-EXCEPTION_CHARS) : null,
    exceptionChars: exception.length,
    truncated: isObject(d.truncated) ? truncatedOf(d.truncated) : null,
    dropped: isCount(d.dropped) ? d.dropped : 0,
    where: whereOf(d),
  };
}

function truncatedOf(truncated) {
  const out = {};
  for (const key of ["message", "exception"]) if (isCount(truncated[key])) out[key] = truncated[key];
  return Object.keys(out).length ? out : null;
}

function whereOf(d) {
  const file = typeof d.file === "string" ? d.file.slice(-SMALL_CHARS) : "";
  const line = isCount(d.line) ? `:${d.line}` : "";
  const fn = typeof d.function === "string" && d.function ? ` in ${d.function.slice(0, SMALL_CHARS)}` : "";
  const process = isCount(d.process) ? ` (process ${d.process})` : "";
  return file || fn ? `${file}${line}${fn}${process}` : "";
}

/** Whether the page clipped a record's text (the whole of it is in the relay). */
export function clipped(record) {
  return record.message.length < record.messageChars || (record.exception?.length ?? 0) < record.exceptionChars;
}

function sizeOf(record) {
  return record.message.length + (record.exception?.length ?? 0);
}

/** Where a record comes from: "client 3", "server", "trainer". */
export function sourceOf(record) {
  if (record.clientId !== null) return `client ${record.clientId}`;
  return record.role || "?";
}

/** The filters: source ("all" | "client" | "none": records without a client), client, round, level, text. */
export function defaultFilter() {
  return { source: "all", client: null, round: null, minLevel: 0, text: "" };
}

export function filterKey(filter) {
  return JSON.stringify([filter.source, filter.client, filter.round, filter.minLevel, filter.text]);
}

export function matches(record, filter) {
  if (record.levelno < filter.minLevel) return false;
  if (filter.source === "client" && record.clientId !== filter.client) return false;
  if (filter.source === "none" && record.clientId !== null) return false;
  if (filter.round !== null && record.round !== filter.round) return false;
  if (filter.text) {
    const needle = filter.text.toLowerCase();
    if (
      !record.message.toLowerCase().includes(needle) &&
      !record.logger.toLowerCase().includes(needle) &&
      !(record.exception && record.exception.toLowerCase().includes(needle))
    ) {
      return false;
    }
  }
  return true;
}

/** Records oldest first, at most MAX_RECORDS of them and MAX_TEXT_CHARS of text: the oldest go. */
class BoundedRecords {
  constructor() {
    this.items = [];
    this.head = 0; // items before it are evicted (compacted now and then: no shift per record)
    this.chars = 0;
    this.evicted = 0;
    this.evictedUpto = 0; // the highest seq evicted
  }

  get size() {
    return this.items.length - this.head;
  }

  push(record, onEvict) {
    this.items.push(record);
    this.chars += sizeOf(record);
    while (this.size > MAX_RECORDS || (this.chars > MAX_TEXT_CHARS && this.size > 1)) {
      const old = this.items[this.head];
      this.items[this.head] = undefined;
      this.head += 1;
      this.chars -= sizeOf(old);
      this.evicted += 1;
      this.evictedUpto = Math.max(this.evictedUpto, old.seq);
      onEvict?.(old);
    }
    if (this.head > MAX_RECORDS) {
      this.items.splice(0, this.head);
      this.head = 0;
    }
  }

  first() {
    return this.size ? this.items[this.head] : null;
  }

  /** Newest first, those matching `keep`. */
  newestFirst(keep) {
    const out = [];
    for (let i = this.items.length - 1; i >= this.head; i--) if (keep(this.items[i])) out.push(this.items[i]);
    return out;
  }
}

/** A run's log records held by the page, newest MAX_RECORDS; the clients they name. */
export class LogBook {
  constructor() {
    this.records = new BoundedRecords();
    this.clientCounts = new Map(); // client id -> records held
    this.producerDropped = 0; // what the producers' rate limits dropped, as their records say
    this.version = 0;
    this.cache = { key: null, rows: [] };
  }

  get held() {
    return this.records.size;
  }

  get evicted() {
    return this.records.evicted;
  }

  /** The oldest held record's seq (0 when none): older records are searched in the relay. */
  get oldestSeq() {
    return this.records.first()?.seq ?? 0;
  }

  add(event) {
    const record = toRecord(event);
    this.producerDropped += record.dropped;
    if (record.clientId !== null) this.clientCounts.set(record.clientId, (this.clientCounts.get(record.clientId) || 0) + 1);
    this.records.push(record, (old) => {
      if (old.clientId === null) return;
      const left = this.clientCounts.get(old.clientId) - 1;
      if (left) this.clientCounts.set(old.clientId, left);
      else this.clientCounts.delete(old.clientId);
    });
    this.version += 1;
    return record;
  }

  /** The held records matching `filter`, newest first (kept until a record or the filter changes). */
  filtered(filter) {
    const key = `${this.version}|${filterKey(filter)}`;
    if (this.cache.key !== key) this.cache = { key, rows: this.records.newestFirst((r) => matches(r, filter)) };
    return this.cache.rows;
  }

  clients() {
    return [...this.clientCounts.keys()].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  }
}

/**
 * Older records matching a filter, from the events API (`type=log`, oldest first) up to the oldest
 * record the page held when the search began. Keeps the newest MAX_RECORDS matches (and at most
 * MAX_TEXT_CHARS of their text); `more` counts the matches it let go.
 */
export class OlderSearch {
  constructor(filter, upto) {
    this.filter = { ...filter };
    this.key = filterKey(filter);
    this.upto = upto;
    this.found = new BoundedRecords();
    this.since = 0;
    this.scanned = 0;
    this.done = false;
  }

  /** Folds one page in; returns the `since` of the next page to fetch, or null when it is over. */
  take(page) {
    for (const event of page.events) {
      if (typeof event.seq !== "number" || event.seq >= this.upto) {
        this.done = true;
        break;
      }
      if (event.type !== "log") continue;
      this.scanned += 1;
      const record = toRecord(event);
      if (matches(record, this.filter)) this.found.push(record);
    }
    if (!page.events.length || page.next_since <= this.since) this.done = true;
    this.since = page.next_since;
    return this.done ? null : this.since;
  }

  get more() {
    return this.found.evicted;
  }

  /** Newest first. */
  rows() {
    return this.found.newestFirst(() => true);
  }
}
