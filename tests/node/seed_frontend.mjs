// The seed system's frontend, rebuilt (not copied) from h19overflow/federated_learning:
// xray-vision-ai-forge/src/services/websocket.ts (TrainingProgressWebSocket: one socket to
// ws://localhost:8765, every message JSON.parse'd and handed to the listeners of its
// `type` with its `data`; a frame that does not parse is logged and lost; a listener that
// throws is logged and the others go on) and src/hooks/useTrainingExecution.ts (the
// fields each listener reads and the state it sets; its toasts; the disconnect after
// training_end or error). React's state setters become plain assignments; values the
// hook's listeners read from their closure (totalEpochs, overallStatus) keep the value
// they had when the socket was set up, as in the component.
//
//   node seed_frontend.mjs ws://localhost:PORT   prints "open", then the final state as JSON
import WebSocket from "ws";

const url = process.argv[2];
const state = {
  // startTraining(): before the socket is set up
  isRunning: true,
  overallStatus: "running",
  progress: 0,
  runId: null,
  totalEpochs: 0,
  isFederatedTraining: false,
  federatedRounds: [],
  federatedContext: { numRounds: 0, numClients: 0 },
  messages: [],
  toasts: [],
  completedRunIds: [],
  parseErrors: [],
  listenerErrors: [],
  unhandled: [],
  received: [],
};
const closure = { totalEpochs: 0, overallStatus: "idle" }; // as captured by setupWebSocket

const say = (type, message, progress) => state.messages.push({ type, message, progress });
const toast = (kind, text) => state.toasts.push({ kind, text });
const numbers = (metrics) =>
  Object.entries(metrics || {})
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k}: ${v.toFixed(4)}`)
    .join(", ");

let socket = null;
function disconnect() {
  socket?.close();
  socket = null;
  finish();
}

const listeners = {
  connected: () => say("info", "Connected to training progress stream"),
  training_mode(data) {
    state.isFederatedTraining = data.is_federated;
    if (data.is_federated) {
      state.federatedContext = { numRounds: data.num_rounds, numClients: data.num_clients };
      say("info", `Federated Learning: ${data.num_clients} clients x ${data.num_rounds} rounds`);
    }
  },
  round_metrics(data) {
    state.federatedRounds.push({ round: data.round, metrics: data.metrics });
    const acc = data.metrics.accuracy ? (data.metrics.accuracy * 100).toFixed(1) : "N/A";
    const loss = data.metrics.loss ? data.metrics.loss.toFixed(4) : "N/A";
    say("success", `Round ${data.round}/${data.total_rounds}: Accuracy = ${acc}%, Loss = ${loss}`,
      (data.round / data.total_rounds) * 100);
  },
  training_start(data) {
    state.runId = data.run_id;
    state.totalEpochs = data.max_epochs;
    say("success", `Training started! Run ID: ${data.run_id}`);
    say("info", `Training mode: ${data.training_mode}`);
  },
  client_training_start(data) {
    if (data.run_id) state.runId = data.run_id;
    say("info", `Client ${data.client_id?.toString() || "0"} - Round ${data.round || 1}`);
    say("info", `Local epochs: ${data.local_epochs} | Training samples: ${data.num_samples}`);
  },
  round_start(data) {
    if (data.run_id) state.runId = data.run_id;
    const round = data.round || 0;
    if (data.total_rounds > 0) state.progress = (round / data.total_rounds) * 100;
  },
  client_progress(data) {
    const m = data.metrics;
    const progressInfo = m.epoch_progress ? ` ${m.epoch_progress}` : "";
    const percent = m.overall_progress_percent ? ` - ${m.overall_progress_percent.toFixed(1)}%` : "";
    say("progress",
      `Epoch ${(data.local_epoch || 0) + 1}${progressInfo}: loss: ${m.train_loss?.toFixed(4) || "N/A"}, lr: ${m.learning_rate || "N/A"}${percent}`,
      m.overall_progress_percent);
  },
  client_complete(data) {
    say("success", `Completed - Best accuracy: ${data.best_val_accuracy?.toFixed(4) || "N/A"}`);
  },
  round_end(data) {
    const fit = numbers(data.fit_metrics);
    const evaluated = numbers(data.eval_metrics);
    if (fit) say("progress", `Round ${data.round} [train] - ${fit}`);
    if (evaluated) say("progress", `Round ${data.round} [val] - ${evaluated}`);
  },
  epoch_start(data) {
    say("info", `Starting epoch ${data.epoch}/${data.total_epochs}...`);
    state.progress = Math.min(((data.epoch - 1) / data.total_epochs) * 100, 95);
  },
  epoch_end(data) {
    const m = data.metrics;
    say("progress", `Epoch ${data.epoch} [${data.phase}] - ${numbers(m)}`, m.accuracy ? m.accuracy * 100 : undefined);
    if (closure.totalEpochs > 0) state.progress = Math.min((data.epoch / closure.totalEpochs) * 100, 99);
  },
  status(data) {
    if (data.message) say("info", data.message);
    if (data.status === "completed") {
      state.progress = 100;
      state.isRunning = false;
      state.overallStatus = "completed";
      toast("success", "Training completed successfully!");
    } else if (data.status === "failed") {
      state.isRunning = false;
      state.overallStatus = "error";
      toast("error", "Training failed!");
    } else if (data.status === "running") {
      state.overallStatus = "running";
    }
  },
  training_end(data) {
    if (data.status === "completed") {
      say("success", `Training completed! Run ID: ${data.run_id}`);
      say("info", `Best epoch: ${data.best_epoch}, Best recall: ${data.best_val_recall?.toFixed(4) || "N/A"}`);
      say("info", `Total epochs: ${data.total_epochs}, Duration: ${data.training_duration || "N/A"}`);
      state.progress = 100;
      state.isRunning = false;
      state.overallStatus = "completed";
      toast("success", "Training completed successfully!");
      if (data.run_id) state.completedRunIds.push(data.run_id); // onComplete(run_id): to the results view
    } else {
      say("error", `Training failed for run ${data.run_id}`);
      state.isRunning = false;
      state.overallStatus = "error";
      toast("error", "Training failed!");
    }
    disconnect();
  },
  error(data) {
    state.isRunning = false;
    state.overallStatus = "error";
    say("error", `Error: ${data.error}`);
    toast("error", `Training error: ${data.error}`);
    disconnect();
  },
  disconnected() {
    say("info", "Disconnected from training progress stream");
    if (closure.overallStatus === "running") {
      state.isRunning = false;
      state.overallStatus = "error";
    }
  },
};

function emit(type, data) {
  const listener = Object.hasOwn(listeners, type) ? listeners[type] : null;
  if (!listener) {
    state.unhandled.push(type); // "No listeners registered for event"
    return;
  }
  try {
    listener(data);
  } catch (error) {
    state.listenerErrors.push(`${type}: ${error.message}`);
  }
}

let finished = false;
function finish(extra = {}) {
  if (finished) return;
  finished = true;
  clearTimeout(deadline);
  console.log(JSON.stringify({ ...state, ...extra }));
}
const deadline = setTimeout(() => {
  finish({ timedOut: true });
  process.exit(1);
}, Number(process.env.SEED_FRONTEND_TIMEOUT_MS || 60000));

socket = new WebSocket(url);
socket.on("open", () => {
  emit("connected", {});
  console.log("open");
});
socket.on("message", (raw) => {
  let message;
  try {
    message = JSON.parse(raw.toString());
  } catch (error) {
    state.parseErrors.push(String(error.message)); // "Failed to parse message": the frame is lost
    return;
  }
  state.received.push(message);
  emit(message.type, message.data);
});
socket.on("close", () => emit("disconnected", {}));
socket.on("error", (error) => {
  finish({ socketError: String(error.message || error) });
  process.exit(1);
});
