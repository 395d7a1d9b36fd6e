// app.js: the dashboard's entry point. Routes between the runs list (#/), a run
// (#/runs/RUN_ID) and runs side by side (#/compare?runs=A,B), and forwards ?token= to every
// relay call.
//
// window.fedrelayDashboard is the page's state for tests and the console (docs/dashboard.md):
// view, runs, runId, mode, status, lastSeq, round, epoch, clients, charts (points per chart),
// stats (events, duplicates, holes, gaps), connects, health, and points("round:loss").

import { compareHref, comparedRuns, mountCompare } from "./compare.js";
import { mountRun } from "./run.js";
import { mountRuns } from "./runs.js";

const token = new URLSearchParams(location.search).get("token") || undefined;
const root = document.getElementById("app");
const runHref = (runId) => `#/runs/${encodeURIComponent(runId)}`;
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
  } else if (location.hash.startsWith("#/compare")) {
    const runIds = comparedRuns(location.hash);
    document.title = `${runIds.join(" vs ")} · fedrelay`;
    unmount = mountCompare(root, { runIds, token, state, backHref: "#/", runHref });
  } else {
    document.title = "fedrelay";
    state.view = "runs";
    unmount = mountRuns(root, { token, state, href: runHref, compareHref });
  }
}

window.addEventListener("hashchange", route);
route();
