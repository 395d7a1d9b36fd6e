"""TypeScript declarations for frontends, generated from the JSON Schema of the pydantic models.

Generating from the schema (not by hand) keeps ``fedrelay.d.ts`` and the relay's validation from
drifting: a field added to a model appears in the declarations at the next ``render_typescript()``,
and a test fails while the committed file is stale.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import TypeAdapter

from .control import RelayControl, SubscriberControl
from .events import Event

HEADER = """\
// fedrelay.d.ts: types of the fedrelay wire protocol and of fedrelay.js.
// GENERATED from the pydantic models by fedrelay.schemas.typescript.render_typescript(); do not edit.
// Regenerate: fedrelay schema --typescript > src/fedrelay/relay/static/fedrelay.d.ts
"""

CLIENT_API = """\
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
"""


def _schemas() -> dict[str, dict[str, Any]]:
    return {
        "Event": TypeAdapter(Event).json_schema(),
        "RelayControl": TypeAdapter(RelayControl).json_schema(),
        "SubscriberControl": TypeAdapter(SubscriberControl).json_schema(),
    }


def _payload_names(defs: dict[str, Any]) -> dict[str, str]:
    """Event payload models get a ``Data`` suffix: ``Error`` would shadow the global ``Error``."""
    names = {}
    for schema in defs.values():
        ref = schema.get("properties", {}).get("data", {}).get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[-1]
            names[name] = f"{name}Data"
    return names


class _Renderer:
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def name(self, ref: str) -> str:
        base = ref.rsplit("/", 1)[-1]
        return self.names.get(base, base)

    def type(self, schema: dict[str, Any]) -> str:
        if "$ref" in schema:
            return self.name(schema["$ref"])
        if "const" in schema:
            return json.dumps(schema["const"])
        if "enum" in schema:
            return " | ".join(json.dumps(v) for v in schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                parts = [self.type(s) for s in schema[key]]
                return " | ".join(dict.fromkeys(parts))
        kind = schema.get("type")
        if kind in ("integer", "number"):
            return "number"
        if kind in ("string", "boolean", "null"):
            return kind
        if kind == "array":
            item = self.type(schema.get("items", {}))
            return f"({item})[]" if "|" in item else f"{item}[]"
        if kind == "object" and "properties" not in schema:
            extra = schema.get("additionalProperties", True)
            value = "unknown" if extra is True or extra == {} else self.type(extra)
            return f"{{ [key: string]: {value} }}"
        return "unknown"

    def interface(self, name: str, schema: dict[str, Any]) -> str:
        lines = _doc(schema.get("description"), "")
        lines.append(f"export interface {self.names.get(name, name)} {{")
        required = set(schema.get("required", []))
        for prop, sub in schema.get("properties", {}).items():
            lines.extend(_doc(sub.get("description"), "  "))
            optional = "" if prop in required else "?"
            lines.append(f"  {_key(prop)}{optional}: {self.type(sub)};")
        if schema.get("additionalProperties") is True:
            lines.append("  /** Extra fields are kept as sent (trainers log arbitrary metrics). */")
            lines.append("  [key: string]: unknown;")
        lines.append("}")
        return "\n".join(lines)


def _doc(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    text = re.sub(r"``([^`]+)``", r"`\1`", text.strip())
    return [f"{indent}/** {' '.join(text.split())} */"]


def _key(prop: str) -> str:
    return prop if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", prop) else json.dumps(prop)


def render_typescript() -> str:
    """The whole ``fedrelay.d.ts``: protocol types from the schema, then the fedrelay.js API."""
    schemas = _schemas()
    defs: dict[str, Any] = {}
    for schema in schemas.values():
        defs.update(schema.get("$defs", {}))
    renderer = _Renderer(_payload_names(defs))
    blocks = [HEADER]
    for name in sorted(defs, key=lambda n: renderer.names.get(n, n)):
        blocks.append(renderer.interface(name, defs[name]))
    for name, schema in schemas.items():
        members = schema.get("oneOf") or schema.get("anyOf") or []
        blocks.append(f"export type {name} =\n" + "\n".join(f"  | {renderer.type(m)}" for m in members) + ";")
    blocks.append(CLIENT_API)
    return "\n\n".join(block.rstrip("\n") for block in blocks) + "\n"


if __name__ == "__main__":
    print(render_typescript(), end="")
