// runs.js: the runs list, paged through GET /api/runs (never every run at once), searchable by
// name or id, filtered by status and mode, and kept live by two small requests every
// REFRESH_MS: the first page (new runs appear at the top) and, when more pages are shown, the
// runs updated since the last look (updated_since), which refreshes rows further down. Nothing
// follows the events of every run. Rows can be picked for the side-by-side comparison.

import { fetchRunsPage } from "./fedrelay.js";
import { badge, fmtDuration, fmtTime, h, progress } from "./dom.js";

const PAGE = 50;
const REFRESH_MS = 2000;
const SEARCH_DELAY_MS = 250;
const MAX_EMPTY_PAGES = 20; // a filtered page may be empty and still have a next_cursor
const STATUSES = ["running", "stalled", "inactive", "incomplete", "completed", "failed", "stopped"];

function progressOf(run) {
  if (run.round !== undefined && run.round !== null) {
    return { text: `round ${run.round} / ${run.num_rounds ?? "?"}`, value: run.round, total: run.num_rounds };
  }
  if (run.epoch !== undefined && run.epoch !== null) {
    return { text: `epoch ${run.epoch} / ${run.max_epochs ?? "?"}`, value: run.epoch, total: run.max_epochs };
  }
  return { text: "–", value: 0, total: 0 };
}

function row(run, href, picked, onPick) {
  const p = progressOf(run);
  const started = run.started_at || run.created_at;
  const end = run.ended_at || (run.status === "running" ? Date.now() / 1000 : run.updated_at);
  const box = h("input", { type: "checkbox", title: "compare", dataset: { testid: "run-select" } });
  box.checked = picked;
  box.addEventListener("change", () => onPick(run.run_id, box.checked));
  return h(
    "tr",
    { dataset: { testid: "run-row", runId: run.run_id } },
    h("td", { class: "pick" }, box),
    h(
      "td",
      {},
      h("a", { href: href(run.run_id), dataset: { testid: "run-link" } }, run.experiment_name || run.run_id),
      run.experiment_name ? h("div", { class: "muted mono" }, run.run_id) : null,
    ),
    h(
      "td",
      {},
      badge(run.status),
      run.incomplete ? h("div", { class: "muted small", dataset: { testid: "run-incomplete" } }, run.incomplete.detail) : null,
    ),
    h("td", {}, run.training_mode || "–"),
    h("td", { class: "progress-cell" }, h("span", { dataset: { testid: "run-progress" } }, p.text), progress(p.value, p.total)),
    h("td", {}, fmtTime(started * 1000)),
    h("td", {}, fmtDuration(started ? end - started : null)),
    h("td", { class: "num" }, String(run.last_seq)),
  );
}

function select(testid, options) {
  return h("select", { dataset: { testid } }, ...options.map(([value, label]) => h("option", { value }, label)));
}

/** Mounts the runs list into `root`; returns a function that tears it down. */
export function mountRuns(root, { token, href, compareHref, state }) {
  const body = h("tbody");
  const empty = h("p", { class: "muted", dataset: { testid: "no-runs" }, hidden: true });
  const error = h("p", { class: "error", hidden: true });
  const search = h("input", { type: "search", placeholder: "search name or run id", dataset: { testid: "runs-search" } });
  const status = select("runs-status", [["", "any status"], ...STATUSES.map((s) => [s, s])]);
  const mode = select("runs-mode", [["", "any mode"], ["federated", "federated"], ["centralized", "centralized"]]);
  const compare = h("button", { type: "button", dataset: { testid: "compare-button" }, disabled: true }, "compare");
  const pickedNote = h("span", { class: "muted", dataset: { testid: "picked" } });
  const more = h("button", { type: "button", dataset: { testid: "runs-more" }, hidden: true }, "more runs");
  root.replaceChildren(
    h("h2", {}, "Runs"),
    h("div", { class: "toolbar wrap" }, search, status, mode, compare, pickedNote),
    error,
    h(
      "table",
      { class: "runs", dataset: { testid: "runs-table" } },
      h("thead", {}, h("tr", {}, ...["", "Run", "Status", "Mode", "Progress", "Started", "Duration", "Events"].map((t) => h("th", {}, t)))),
      body,
    ),
    empty,
    more,
  );

  const picked = new Set();
  let first = []; // the first page, refreshed every REFRESH_MS
  let extra = []; // pages loaded with "more runs", in order
  let cursor = null; // where the next "more runs" page starts
  let generation = 0; // bumped by a filter change: answers to older requests are dropped
  let newest = 0; // the latest updated_at seen (the relay's clock): rows further down refresh from it
  let closed = false;
  let loaded = false; // the first answer came

  const filters = () => ({ q: search.value.trim() || undefined, status: status.value || undefined, mode: mode.value || undefined });

  function draw() {
    const seen = new Set();
    const runs = [...first, ...extra].filter((run) => !seen.has(run.run_id) && seen.add(run.run_id));
    body.replaceChildren(...runs.map((run) => row(run, href, picked.has(run.run_id), pick)));
    const filtered = Boolean(filters().q || filters().status || filters().mode);
    empty.hidden = runs.length > 0 || !loaded;
    empty.textContent = filtered ? "No run matches." : "No runs yet. Start a trainer that publishes to this relay.";
    more.hidden = !cursor;
    compare.disabled = picked.size < 2;
    pickedNote.textContent = picked.size ? `${picked.size} picked` : "pick two or more runs to compare them";
    Object.assign(state, { view: "runs", runs: runs.map((run) => run.run_id), more: Boolean(cursor), picked: [...picked] });
    state.rendered = (state.rendered || 0) + 1;
  }

  function pick(runId, on) {
    if (on) picked.add(runId);
    else picked.delete(runId);
    draw();
  }

  function noteTimes(runs) {
    for (const run of runs) newest = Math.max(newest, run.updated_at || 0);
  }

  function failed(exc) {
    error.textContent = `Cannot load runs: ${exc.message}`;
    error.hidden = false;
  }

  async function refresh() {
    const mine = generation;
    try {
      const page = await fetchRunsPage({ token, limit: PAGE, ...filters() });
      if (mine !== generation || closed) return;
      if (extra.length) {
        // Rows pushed off the first page by new runs stay, above the pages loaded after it.
        const now = new Set(page.runs.map((run) => run.run_id));
        extra = [...first.filter((run) => !now.has(run.run_id)), ...extra.filter((run) => !now.has(run.run_id))];
        const since = newest;
        const changed = await fetchRunsPage({ token, limit: 1000, ...filters(), updated_since: since });
        if (mine !== generation || closed) return;
        const byId = new Map(changed.runs.map((run) => [run.run_id, run]));
        extra = extra.map((run) => byId.get(run.run_id) || run);
        noteTimes(changed.runs);
      } else {
        cursor = page.next_cursor;
      }
      first = page.runs;
      loaded = true;
      noteTimes(first);
      error.hidden = true;
      draw();
    } catch (exc) {
      if (mine === generation) failed(exc);
    }
  }

  async function loadMore() {
    const mine = generation;
    more.disabled = true;
    try {
      let next = cursor;
      let got = [];
      for (let i = 0; next && !got.length && i < MAX_EMPTY_PAGES; i++) {
        const page = await fetchRunsPage({ token, limit: PAGE, cursor: next, ...filters() });
        if (mine !== generation || closed) return;
        got = page.runs;
        next = page.next_cursor;
      }
      extra = [...extra, ...got];
      noteTimes(got);
      cursor = next;
      draw();
    } catch (exc) {
      failed(exc);
    } finally {
      more.disabled = false;
    }
  }

  function restart() {
    generation += 1;
    first = [];
    extra = [];
    cursor = null;
    refresh();
  }

  let searchTimer = null;
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(restart, SEARCH_DELAY_MS);
  });
  status.addEventListener("change", restart);
  mode.addEventListener("change", restart);
  more.addEventListener("click", loadMore);
  compare.addEventListener("click", () => {
    if (picked.size >= 2) location.hash = compareHref([...picked]);
  });

  const ticker = setInterval(refresh, REFRESH_MS); // new runs, status changes, durations
  draw();
  refresh();
  return () => {
    closed = true;
    clearInterval(ticker);
    clearTimeout(searchTimer);
  };
}
