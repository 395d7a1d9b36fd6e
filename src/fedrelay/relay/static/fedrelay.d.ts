// fedrelay.d.ts: types of the fedrelay wire protocol and of fedrelay.js.
// GENERATED from the pydantic models by fedrelay.schemas.typescript.render_typescript(); do not edit.
// Regenerate: fedrelay schema --typescript > src/fedrelay/relay/static/fedrelay.d.ts

/** Every event of `producer` with id <= `upto` is stored or was refused. */
export interface Ack {
  op: "ack";
  producer: string;
  upto: number;
}

export interface ClientCompleteData {
  round: number;
  client_id: string | number;
  num_examples?: number | null;
  metrics?: { [key: string]: number | null } | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface ClientCompleteEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "client_complete";
  data: ClientCompleteData;
}

export interface ClientProgressData {
  round: number;
  client_id: string | number;
  local_epoch?: number | null;
  metrics?: { [key: string]: number | null } | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface ClientProgressEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "client_progress";
  data: ClientProgressData;
}

export interface EarlyStoppingData {
  epoch?: number | null;
  metric_name?: string | null;
  best_metric_value?: number | null;
  patience?: number | null;
  reason?: string | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface EarlyStoppingEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "early_stopping";
  data: EarlyStoppingData;
}

export interface EpochEndData {
  epoch: number;
  phase?: string | null;
  metrics?: { [key: string]: number | null } | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface EpochEndEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "epoch_end";
  data: EpochEndData;
}

export interface EpochStartData {
  epoch: number;
  phase?: string | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface EpochStartEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "epoch_start";
  data: EpochStartData;
}

export interface ErrorData {
  message: string;
  detail?: string | null;
  client_id?: string | number | null;
  round?: number | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface ErrorEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "error";
  data: ErrorData;
}

export interface ErrorFrame {
  op: "error";
  code: string;
  detail: string;
  id?: number | null;
  index?: number | null;
  run_id?: string | null;
  stale_after?: number | null;
}

/** History no longer holds `since + 1`: events resume at `resume_from`. */
export interface Gap {
  op: "gap";
  run_id: string;
  since: number;
  resume_from: number;
}

/** Sent to a producer on connect: where the relay's dedup stands for it, and the frame limits past which its frames are refused. */
export interface Hello {
  op: "hello";
  producer: string;
  last_id: number | null;
  max_frame_bytes: number;
  max_events_per_frame: number;
  accepts?: string[];
}

/** One Python `logging` record forwarded from a training process. `message` and `exception` may have been cut to a size cap: `truncated` then maps each cut field to its original length in characters. `dropped` counts the records the producer's rate limit dropped since its previous `log` event. */
export interface LogData {
  level: string;
  message: string;
  levelno?: number | null;
  logger?: string | null;
  exception?: string | null;
  client_id?: string | number | null;
  round?: number | null;
  epoch?: number | null;
  file?: string | null;
  line?: number | null;
  function?: string | null;
  process?: number | null;
  dropped?: number | null;
  truncated?: { [key: string]: number } | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface LogEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "log";
  data: LogData;
}

export interface Ping {
  op: "ping";
}

export interface Pong {
  op: "pong";
}

export interface RoundEndData {
  round: number;
  total_rounds?: number | null;
  fit_metrics?: { [key: string]: number | null } | null;
  eval_metrics?: { [key: string]: number | null } | null;
  server_metrics?: { [key: string]: number | null } | null;
  duration?: number | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface RoundEndEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "round_end";
  data: RoundEndData;
}

export interface RoundStartData {
  round: number;
  total_rounds?: number | null;
  participating_clients?: (string | number)[] | number | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface RoundStartEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "round_start";
  data: RoundStartData;
}

/** Who produced an event: the Flower server, a client, or a trainer. */
export interface Source {
  role: "server" | "client" | "trainer";
  client_id?: string | number | null;
}

export interface StatusData {
  message?: string | null;
  level?: string | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface StatusEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "status";
  data: StatusData;
}

/** Subscriber -> relay: add a run (or `*`) to this connection. */
export interface Subscribe {
  op: "subscribe";
  run_id: string;
  since?: number;
}

export interface Subscribed {
  op: "subscribed";
  run_id: string;
  since: number | null;
  last_seq: number | null;
}

export interface TrainingEndData {
  status?: "completed" | "failed" | "stopped";
  best_round?: number | null;
  best_epoch?: number | null;
  best_metric_name?: string | null;
  best_metric_value?: number | null;
  training_duration?: number | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface TrainingEndEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "training_end";
  data: TrainingEndData;
}

export interface TrainingStartData {
  experiment_name?: string | null;
  training_mode?: "federated" | "centralized" | null;
  num_rounds?: number | null;
  num_clients?: number | null;
  local_epochs?: number | null;
  max_epochs?: number | null;
  config?: { [key: string]: unknown } | null;
  /** Extra fields are kept as sent (trainers log arbitrary metrics). */
  [key: string]: unknown;
}

export interface TrainingStartEvent {
  run_id: string;
  timestamp?: string | null;
  source?: Source | null;
  id?: number | null;
  seq?: number | null;
  producer?: string | null;
  type: "training_start";
  data: TrainingStartData;
}

export interface Unsubscribe {
  op: "unsubscribe";
  run_id: string;
}

export interface Unsubscribed {
  op: "unsubscribed";
  run_id: string;
}

export type Event =
  | TrainingStartEvent
  | RoundStartEvent
  | ClientProgressEvent
  | ClientCompleteEvent
  | RoundEndEvent
  | EpochStartEvent
  | EpochEndEvent
  | EarlyStoppingEvent
  | TrainingEndEvent
  | StatusEvent
  | ErrorEvent
  | LogEvent;

export type RelayControl =
  | Hello
  | Ack
  | Subscribed
  | Unsubscribed
  | Gap
  | ErrorFrame
  | Pong;

export type SubscriberControl =
  | Subscribe
  | Unsubscribe
  | Ping;

// ---- fedrelay.js -------------------------------------------------------------------------------

/** The event types, and the event interface of each. */
export type EventType = Event["type"];
export type EventOf<T extends EventType> = Extract<Event, { type: T }>;

/** Events as the relay sends them: always numbered and attributed. */
export type StoredEvent = Event & { seq: number; producer: string; timestamp: string };

export type ConnectionState = "connecting" | "open" | "closed";
export type ConnectionDetail = {
  attempt?: number;
  connects?: number;
  code?: number;
  reason?: string;
  /** The address connected to, or being tried (ws:// or wss://). */
  url?: string;
};

/** A relay address (ws://, http:// or any URL on its origin), or several nodes of one relay (a list,
 * or comma-separated): tried in order, the next when one fails; default: the page's origin. */
export type RelayAddress = string | string[];

export interface SubscribeOptions {
  /** The relay's address(es); default: the page's origin. */
  url?: RelayAddress;
  /** Runs to follow, or "*" for every run (live only, no backlog). */
  runIds: string[] | "*";
  /** Last seq already seen, for all runs or per run; 0 (default) = from the start. */
  since?: number | { [runId: string]: number };
  /** The relay's subscribe token, if it has one. */
  token?: string;
  /** Each event once, in seq order per run, across reconnects. */
  onEvent?: (event: StoredEvent) => void;
  onControl?: (frame: RelayControl) => void;
  /** The relay no longer holds the history after `since`: events resume at `resume_from`. */
  onGap?: (gap: Gap) => void;
  onStatus?: (state: ConnectionState, detail: ConnectionDetail) => void;
}

export interface Subscription {
  close(): void;
  lastSeq(runId: string): number;
  follow(runId: string, since?: number): void;
  unfollow(runId: string): void;
  readonly connects: number;
  /** The address in use, or tried next. */
  readonly url: string;
}

/** What a run lacks that the relay knows exists (see docs/protocol.md, "Run status"). */
export interface RunIncomplete {
  rounds: number[];
  rounds_missing: number;
  reports_missing: number;
  held_events: number;
  holding_producers: number;
  detail: string;
}

export interface RunSummary {
  run_id: string;
  status: "running" | "completed" | "failed" | "stopped" | "stalled" | "inactive" | "incomplete";
  created_at: number;
  updated_at: number;
  started_at: number | null;
  ended_at: number | null;
  last_seq: number;
  first_seq: number;
  incomplete: RunIncomplete | null;
  [key: string]: unknown;
}

/** One page of `GET /api/runs`: follow `next_cursor` until it is null. */
export interface RunsPage {
  runs: RunSummary[];
  next_cursor: string | null;
}

/** A client's state in one round of `GET /api/runs/{id}/clients` (not sampled: no cell). */
export type CellState = "finished" | "straggler" | "failed" | "silent" | "running";

export interface HealthCell {
  state: CellState;
  /** Seconds, as the ClientApp mod measured the train message (receipt to reply). */
  duration?: number;
  /** Failed: the error event's message, its detail (e.g. a traceback's end), phase and seq. */
  reason?: string;
  detail?: string;
  phase?: string;
  seq?: number;
}

export interface RoundHealth {
  round: number;
  closed: boolean;
  sampled: number;
  finished: number;
  straggler: number;
  failed: number;
  silent: number;
  running: number;
  median: number | null;
  /** Durations above this are stragglers. */
  threshold: number | null;
  critical_path: { client_id: string; duration: number } | null;
  /** At most 50 ids; `num_stragglers` counts them all. */
  stragglers: string[];
  num_stragglers: number;
  /** Absent with `cells: false`; a round split over pages continues on the next one. */
  cells?: { [clientId: string]: HealthCell };
}

export interface ClientHealth {
  client_id: string;
  sampled: number;
  finished: number;
  straggler: number;
  failed: number;
  silent: number;
  running: number;
  /** Over the sampled rounds that are over; null when there is none. */
  dropout_rate: number | null;
  failure_rate: number | null;
  straggler_rate: number | null;
  mean_duration: number | null;
}

/** One page of `GET /api/runs/{id}/clients`: follow `next_cursor` until it is null. */
export interface ClientsPage {
  run_id: string;
  last_seq: number;
  straggler_factor: number;
  straggler_min_seconds: number;
  num_clients: number;
  num_rounds: number;
  truncated: boolean;
  clients: ClientHealth[];
  rounds: RoundHealth[];
  next_cursor: string | null;
}

export function subscribe(options: SubscribeOptions): Subscription;
export function fetchRuns(options?: { url?: RelayAddress; token?: string }): Promise<RunSummary[]>;
export function fetchRunsPage(options?: {
  url?: RelayAddress;
  token?: string;
  limit?: number;
  cursor?: string | null;
  status?: string | string[];
  mode?: "federated" | "centralized";
  q?: string;
  updated_since?: number;
}): Promise<RunsPage>;
export function fetchClients(options: {
  url?: RelayAddress;
  token?: string;
  runId: string;
  cursor?: string | null;
  factor?: number;
  minGap?: number;
  cells?: boolean;
}): Promise<ClientsPage>;
export function fetchRun(options: { url?: RelayAddress; token?: string; runId: string }): Promise<RunSummary>;
export function fetchEventsPage(options: {
  url?: RelayAddress;
  token?: string;
  runId: string;
  since?: number;
  limit?: number;
  types?: string[] | string;
}): Promise<{ events: StoredEvent[]; next_since: number }>;
export function fetchEvents(options: {
  url?: RelayAddress;
  token?: string;
  runId: string;
  since?: number;
  limit?: number;
  types?: string[] | string;
}): Promise<StoredEvent[]>;
export function wsBase(url?: string): string;
export function httpBase(url?: string): string;
export function relayUrls(url?: RelayAddress): string[];
