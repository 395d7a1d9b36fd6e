// app.js: the dashboard's entry point. Routes between the runs list (#/)
// and a run (#/runs/RUN_ID), and forwards ?token= to every relay call.
//
// window.fedrelayDashboard is the page's state for tests and the console:
// view, runs, runId, mode, status, lastSeq, round, epoch, clients, charts
// (points per chart), stats (events, duplicates, holes, gaps), connects,
// and points("round:loss") for the points themselves.

import { mountRun } from "./run.js";
import { mountRuns } from "./runs.js";

const token = new URLSearchParams(location.search).get("token") || undefined;
const root = document.getElementById("app");
let unmount = () => {};

function route() {
  unmount();
  const state = { view: null };
  window.fedrelayDashboard = state;
  const match = location.hash.match(/^#\/runs\/(.+)$/);
  if (match) {
    const runId = decodeURIComponent(match[1]);
    document.title = `${runId} · fedrelay`;
    unmount = mountRun(root, { runId, token, state, backHref: "#/" });
  } else {
    document.title = "fedrelay";
    state.view = "runs";
    unmount = mountRuns(root, { token, state, href: (runId) => `#/runs/${encodeURIComponent(runId)}` });
  }
}

window.addEventListener("hashchange", route);
route();
