// runs.js: the runs list, kept live. Any event of any run ("*") refreshes
// the list from /api/runs (throttled), so new runs appear as they start.

import { fetchRuns, subscribe } from "./fedrelay.js";
import { badge, fmtDuration, fmtTime, h, progress, throttle } from "./dom.js";

function progressOf(run) {
  if (run.round !== undefined && run.round !== null) {
    return { text: `round ${run.round} / ${run.num_rounds ?? "?"}`, value: run.round, total: run.num_rounds };
  }
  if (run.epoch !== undefined && run.epoch !== null) {
    return { text: `epoch ${run.epoch} / ${run.max_epochs ?? "?"}`, value: run.epoch, total: run.max_epochs };
  }
  return { text: "–", value: 0, total: 0 };
}

function row(run, href) {
  const p = progressOf(run);
  const started = run.started_at || run.created_at;
  const end = run.ended_at || (run.status === "running" ? Date.now() / 1000 : run.updated_at);
  return h(
    "tr",
    { dataset: { testid: "run-row", runId: run.run_id } },
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

/** Mounts the runs list into `root`; returns a function that tears it down. */
export function mountRuns(root, { token, href, state }) {
  const body = h("tbody");
  const empty = h("p", { class: "muted", dataset: { testid: "no-runs" } }, "No runs yet. Start a trainer that publishes to this relay.");
  const error = h("p", { class: "error", hidden: true });
  root.replaceChildren(
    h("h2", {}, "Runs"),
    error,
    h(
      "table",
      { class: "runs", dataset: { testid: "runs-table" } },
      h("thead", {}, h("tr", {}, ...["Run", "Status", "Mode", "Progress", "Started", "Duration", "Events"].map((t) => h("th", {}, t)))),
      body,
    ),
    empty,
  );

  async function refresh() {
    try {
      const runs = await fetchRuns({ token });
      body.replaceChildren(...runs.map((run) => row(run, href)));
      empty.hidden = runs.length > 0;
      error.hidden = true;
      state.runs = runs.map((run) => run.run_id);
    } catch (exc) {
      error.textContent = `Cannot load runs: ${exc.message}`;
      error.hidden = false;
    }
  }

  const soon = throttle(refresh, 1000);
  const sub = subscribe({
    runIds: "*",
    token,
    onEvent: soon,
    onControl: (frame) => frame.op === "subscribed" && soon(), // (re)connected: catch up on what we missed
    onStatus: (status) => (state.connection = status),
  });
  const ticker = setInterval(refresh, 5000); // durations and stalled runs move without events
  refresh();
  return () => {
    sub.close();
    clearInterval(ticker);
  };
}
