"""``fedrelay tail RUN_ID|--all``: watch training from a terminal.

On a terminal it is a live rich view (progress bar, latest metrics, recent events); piped or
redirected it prints one plain line per event, so scripts and tests can read it. Either way it
resumes from the last seq after a relay restart or a dropped connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .client_settings import DEFAULT_URL, relay_urls, subscribe_token
from .clients_summary import round_line, top_failing_line
from .federation import DEFAULT_FACTOR, DEFAULT_MIN_GAP, FederationHealth
from .follow import Follower, RelayRefused
from .tls import resolve_ca_file

_METRIC_SOURCES = ("fit_metrics", "eval_metrics", "server_metrics", "metrics")
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_CONTROL = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, hyperlinks
    r"|[\x00-\x08\x0b-\x1f\x7f]"  # other control characters, ESC included
)
"""Terminal escapes and control characters: a log message must not recolour or move the terminal."""
_LEVEL_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "red", "critical": "bold red"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def metrics_of(data: dict[str, Any]) -> dict[str, Any]:
    """``{"eval_metrics": {"loss": 1}}`` -> ``{"eval.loss": 1}``; plain ``metrics`` keep their names."""
    out: dict[str, Any] = {}
    for source in _METRIC_SOURCES:
        values = data.get(source)
        if isinstance(values, dict):
            prefix = "" if source == "metrics" else source.split("_")[0] + "."
            out.update((prefix + key, value) for key, value in values.items())
    return out


def describe(event: dict[str, Any]) -> str:
    """A one-line summary of an event's payload."""
    d = event.get("data") or {}
    kind = event.get("type")
    parts: list[str] = []
    if "round" in d and kind not in ("training_start", "status"):
        total = d.get("total_rounds")
        parts.append(f"round {d['round']}" + (f"/{total}" if total else ""))
    if "epoch" in d:
        parts.append(f"epoch {d['epoch']}")
    if d.get("client_id") is not None:
        parts.append(f"client {d['client_id']}")
    for key in ("phase", "local_epoch", "status", "training_mode", "experiment_name", "message", "reason"):
        if d.get(key) is not None and not (key == "phase" and kind == "epoch_end"):
            parts.append(f"{key}={d[key]}" if key in ("local_epoch", "phase") else str(d[key]))
    if kind == "training_end" and d.get("best_metric_name"):
        parts.append(f"best {d['best_metric_name']}={_fmt(d.get('best_metric_value'))}")
    parts.extend(f"{k}={_fmt(v)}" for k, v in metrics_of(d).items() if isinstance(v, int | float))
    return " ".join(parts)


def log_source(event: dict[str, Any]) -> str:
    """``client 3 round 2``, ``server round 2``, ``trainer epoch 4``: where a log record came from."""
    d = event.get("data") or {}
    source = event.get("source") or {}
    client = d.get("client_id", source.get("client_id"))
    parts = [f"client {client}" if client is not None else str(source.get("role") or "?")]
    if d.get("round") is not None:
        parts.append(f"round {d['round']}")
    if d.get("epoch") is not None:
        parts.append(f"epoch {d['epoch']}")
    return " ".join(parts)


def log_text(event: dict[str, Any]) -> str:
    """A log event on one line: its message's first line, and the last line of its exception."""
    d = event.get("data") or {}
    lines = str(d.get("message", "")).strip().splitlines() or [""]
    text = lines[0] + (" …" if len(lines) > 1 else "")
    exception = str(d.get("exception") or "").strip().splitlines()
    if exception:
        text += f" | {exception[-1]}"
    if d.get("dropped"):
        text += f" ({d['dropped']} records dropped before this one)"
    return _CONTROL.sub("", text)


def log_level(event: dict[str, Any]) -> str:
    return str((event.get("data") or {}).get("level", "info")).lower()


def log_line(event: dict[str, Any]) -> str:
    d = event.get("data") or {}
    logger = f" {d['logger']}:" if d.get("logger") else ""
    return f"{log_level(event).upper()} {log_source(event)}{logger} {log_text(event)}"


def plain_line(event: dict[str, Any], with_run: bool) -> str:
    run = f"{event.get('run_id')} " if with_run else ""
    body = log_line(event) if event.get("type") == "log" else describe(event)
    return f"{run}#{event.get('seq')} {event.get('type')} {body}".rstrip()


class LogFilter:
    """Which ``log`` events to show: none unless asked; then by minimum level and client id."""

    def __init__(self, show: bool, level: str | None = None, client: str | None = None) -> None:
        self.show = show or level is not None or client is not None
        self.min_level = _LEVELS.get((level or "debug").lower(), 0)
        self.client = client

    def wants(self, event: dict[str, Any]) -> bool:
        if event.get("type") != "log":
            return True
        if not self.show or _LEVELS.get(log_level(event), 0) < self.min_level:
            return False
        if self.client is None:
            return True
        d = event.get("data") or {}
        client = d.get("client_id", (event.get("source") or {}).get("client_id"))
        return client is not None and str(client) == self.client


class ClientsWatch:
    """``--clients``: one run's federation health, folded as events arrive, judged when shown."""

    SHOWN_ROUNDS = 5
    TOP_EVERY = 1.0
    """Seconds between recomputing the top failing clients in the live view (it judges every round)."""

    def __init__(self, factor: float, min_gap: float) -> None:
        self.health = FederationHealth()
        self.factor = factor
        self.min_gap = min_gap
        self.ended = False
        self._top: tuple[float, str] | None = None

    def add(self, event: dict[str, Any]) -> None:
        self.health.add(event)
        self.ended = self.ended or event.get("type") == "training_end"

    def round_line(self, number: int) -> str | None:
        if number not in self.health.rounds:
            return None
        return round_line(self.health.judge_round(number, self.factor, self.min_gap))

    def recent_lines(self) -> list[str]:
        numbers = sorted(self.health.rounds)[-self.SHOWN_ROUNDS :]
        return [line for line in map(self.round_line, numbers) if line]

    def top_line(self, fresh: bool = True) -> str:
        now = time.monotonic()
        if fresh or self._top is None or now - self._top[0] > self.TOP_EVERY:
            self._top = (now, top_failing_line(self.health.report(self.factor, self.min_gap)))
        return self._top[1]


class RunState:
    """What the live view shows of one run, folded from its events."""

    def __init__(self, run_id: str, clients: ClientsWatch | None = None) -> None:
        self.run_id = run_id
        self.watch = clients
        self.mode: str | None = None
        self.name: str | None = None
        self.status = "running"
        self.round = self.total_rounds = self.epoch = self.max_epochs = None
        self.metrics: dict[str, Any] = {}
        self.clients: set[str] = set()
        self.last_seq = 0

    def apply(self, event: dict[str, Any]) -> None:
        if self.watch is not None:
            self.watch.add(event)
        d = event.get("data") or {}
        kind = event.get("type")
        self.last_seq = event.get("seq") or self.last_seq
        if kind == "training_start":
            self.mode = d.get("training_mode") or self.mode
            self.name = d.get("experiment_name") or self.name
            self.total_rounds = d.get("num_rounds") or self.total_rounds
            self.max_epochs = d.get("max_epochs") or self.max_epochs
            self.status = "running"
        elif kind in ("round_start", "round_end"):
            self.mode = self.mode or "federated"
            self.round = max(self.round or 0, d.get("round") or 0)
            self.total_rounds = d.get("total_rounds") or self.total_rounds
        elif kind in ("epoch_start", "epoch_end"):
            self.mode = self.mode or "centralized"
            self.epoch = max(self.epoch or 0, d.get("epoch") or 0)
        elif kind == "training_end":
            self.status = d.get("status", "completed")
        if d.get("client_id") is not None:
            self.clients.add(str(d["client_id"]))
        if kind in ("round_end", "epoch_end", "status"):
            self.metrics.update((k, v) for k, v in metrics_of(d).items() if isinstance(v, int | float))

    def progress(self) -> tuple[str, int, int | None]:
        if self.mode == "centralized" or (self.round is None and self.epoch is not None):
            return "epoch", self.epoch or 0, self.max_epochs
        return "round", self.round or 0, self.total_rounds


REDRAW_EVERY = 0.05
"""Seconds between redraws of the live view. Drawing takes milliseconds: once per event, a
catch-up of 100,000 events took minutes, and Ctrl-C waited for the ~1,200 of a frame in hand."""


class LiveView:
    """The rich terminal view: one panel per run (the latest few), recent events below."""

    def __init__(
        self, with_run: bool, console: Any = None, clients: tuple[float, float] | None = None
    ) -> None:
        from rich.console import Console
        from rich.live import Live

        self.with_run = with_run
        self.clients = clients
        """``--clients``: (straggler factor, min gap in seconds); None: no clients panel."""
        self.runs: dict[str, RunState] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=12)
        self.logs: deque[dict[str, Any]] = deque(maxlen=10)
        self.console = console or Console()
        self.live = Live(console=self.console, auto_refresh=False, transient=False)
        self.redraws = 0
        self._drawn = -math.inf
        self._later: asyncio.TimerHandle | None = None

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._later is not None:
            self._later.cancel()
        self.live.update(self.render(), refresh=True)
        self.live.__exit__(*exc)

    def apply(self, event: dict[str, Any]) -> None:
        run_id = event.get("run_id", "?")
        state = self.runs.get(run_id)
        if state is None:
            watch = ClientsWatch(*self.clients) if self.clients else None
            state = self.runs[run_id] = RunState(run_id, watch)
        state.apply(event)
        (self.logs if event.get("type") == "log" else self.recent).append(event)

    def refresh(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._drawn = time.monotonic()
        self.redraws += 1
        self.live.update(self.render(), refresh=True)

    def changed(self) -> None:
        """Redraw now, or once REDRAW_EVERY has passed since the last redraw (on the running loop)."""
        wait = self._drawn + REDRAW_EVERY - time.monotonic()
        if wait <= 0:
            self.refresh()
        elif self._later is None:
            self._later = asyncio.get_running_loop().call_later(wait, self.refresh)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/]")

    def render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        panels = []
        for state in list(self.runs.values())[-4:]:
            unit, done, total = state.progress()
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                f"{unit} {done}/{total or '?'}",
                ProgressBar(total=float(total or max(done, 1)), completed=float(done), width=40),
                f"[bold]{state.status}[/]",
                f"{len(state.clients)} clients" if state.clients else "",
            )
            metrics = Table("metric", "latest", box=None, show_header=True, header_style="dim")
            for name, value in list(state.metrics.items())[:16]:
                metrics.add_row(name, _fmt(value))
            where = f"{state.mode or '?'}, {state.run_id}, seq {state.last_seq}"
            title = f"{state.name or state.run_id} [dim]({where})"
            parts: list[Any] = [bar, metrics]
            if state.watch is not None and state.watch.health.rounds:
                clients = Table("clients", box=None, show_header=True, header_style="dim")
                for line in state.watch.recent_lines():
                    clients.add_row(line)
                clients.add_row(state.watch.top_line(fresh=False))
                parts.append(clients)
            panels.append(Panel(Group(*parts), title=title, title_align="left"))
        events = Table(box=None, header_style="dim", title="recent events", title_justify="left")
        events.add_column("seq", justify="right")
        events.add_column("type")
        events.add_column("", no_wrap=True, overflow="ellipsis")
        for event in self.recent:
            run = f"{event.get('run_id')} " if self.with_run else ""
            events.add_row(str(event.get("seq")), f"{run}{event.get('type')}", describe(event))
        if not self.logs:
            return Group(*panels, events)
        logs = Table(box=None, header_style="dim", title="logs", title_justify="left")
        logs.add_column("seq", justify="right")
        logs.add_column("level")
        logs.add_column("source", no_wrap=True)
        logs.add_column("", no_wrap=True, overflow="ellipsis")
        from rich.text import Text  # log text is data, not markup: "[ROUND 1/2]" stays as is

        for event in self.logs:
            level = log_level(event)
            style = _LEVEL_STYLE.get(level, "")
            logs.add_row(
                str(event.get("seq")),
                f"[{style}]{level.upper()}[/]" if style else level.upper(),
                Text(log_source(event)),
                Text(log_text(event)),
            )
        return Group(*panels, events, logs)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``tail`` to a ``fedrelay`` sub-command set."""
    tail = subparsers.add_parser(
        "tail",
        help="watch a run (or all runs) live in the terminal",
        description="Watch a run live: a rich view on a terminal, one line per event when piped. "
        "Resumes from the last seq after a relay restart.",
    )
    target = tail.add_mutually_exclusive_group(required=True)
    target.add_argument("run_id", nargs="?", help="the run to follow")
    target.add_argument("--all", action="store_true", help="every run, live from now (no backlog)")
    tail.add_argument(
        "--url",
        action="append",
        help=f"relay address (FEDRELAY_URL, else {DEFAULT_URL}); several nodes of one relay: "
        "comma-separated or repeated, tried in order, moving on when one fails",
    )
    tail.add_argument("--token", help="subscribe token (FEDRELAY_SUBSCRIBE_TOKEN)")
    tail.add_argument(
        "--ca-file", help="CA bundle for a wss:// relay (FEDRELAY_CA_FILE; default: system CAs)"
    )
    tail.add_argument("--since", type=int, default=0, help="start after this seq (0 = the whole run)")
    stop = tail.add_mutually_exclusive_group()
    stop.add_argument("--once", action="store_true", help="print what is stored so far, then exit")
    stop.add_argument("--until-end", action="store_true", help="exit when the run ends (training_end)")
    tail.add_argument("--plain", action="store_true", help="one line per event, even on a terminal")
    tail.add_argument(
        "--logs", action="store_true", help="show `log` events (forwarded Python logging records)"
    )
    tail.add_argument(
        "--level",
        choices=sorted(_LEVELS, key=_LEVELS.__getitem__),
        help="only log records of this level and above (implies --logs)",
    )
    tail.add_argument("--client", help="only log records of this client id (implies --logs)")
    tail.add_argument(
        "--clients",
        action="store_true",
        help="federation health: per round finished / failed / silent clients, median duration, "
        "stragglers and critical path; the clients failing most",
    )
    tail.add_argument(
        "--straggler-factor",
        type=float,
        default=DEFAULT_FACTOR,
        help=f"--clients: a straggler takes over this many times its round's median ({DEFAULT_FACTOR:g})",
    )
    tail.add_argument(
        "--straggler-min-seconds",
        type=float,
        default=DEFAULT_MIN_GAP,
        help=f"--clients: ...and at least this many seconds more ({DEFAULT_MIN_GAP:g})",
    )
    tail.set_defaults(func=run)
    return tail


def run(args: argparse.Namespace) -> int:
    """Follow until Ctrl-C (exit 130), or as ``--once`` / ``--until-end`` say (exit 0).

    Exit 1 if the relay refuses, 141 when the reader of the output goes away.
    """
    urls = relay_urls(args.url)
    token = subscribe_token(args.token)
    runs: list[str] | str = "*" if args.all else [args.run_id]
    if not (math.isfinite(args.straggler_factor) and args.straggler_factor >= 1):
        print("fedrelay tail: --straggler-factor must be a number >= 1", file=sys.stderr)
        return 2
    if not (math.isfinite(args.straggler_min_seconds) and args.straggler_min_seconds >= 0):
        print("fedrelay tail: --straggler-min-seconds must be a number >= 0", file=sys.stderr)
        return 2
    plain = args.plain or not sys.stdout.isatty()
    clients = (args.straggler_factor, args.straggler_min_seconds) if args.clients else None
    view = None if plain else LiveView(with_run=args.all, clients=clients)
    target: dict[str, int | None] = {"last_seq": None}
    logs = LogFilter(args.logs, args.level, args.client)
    watches: dict[str, ClientsWatch] = {}
    """Plain lines with --clients: each run's health."""

    def clients_lines(event: dict[str, Any]) -> None:
        run_id = str(event.get("run_id"))
        watch = watches.get(run_id)
        if watch is None:
            watch = watches[run_id] = ClientsWatch(*clients)  # type: ignore[misc]
        watch.add(event)
        prefix = f"{run_id} clients " if args.all else "clients "
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if event.get("type") == "round_end" and isinstance(data.get("round"), int):
            line = watch.round_line(data["round"])
            if line:
                print(prefix + line, flush=True)
        elif event.get("type") == "training_end" and watch.health.rounds:
            print(prefix + watch.top_line(), flush=True)

    def on_event(event: dict[str, Any]) -> bool:
        if not logs.wants(event):
            pass
        elif view is None:
            print(plain_line(event, args.all), flush=True)
            if clients is not None:
                clients_lines(event)
        else:
            view.apply(event)
            view.changed()
        if args.until_end and event.get("type") == "training_end":
            return True
        return bool(
            args.once and target["last_seq"] is not None and event.get("seq", 0) >= target["last_seq"]
        )

    def on_control(frame: dict[str, Any]) -> bool:
        if frame.get("op") == "subscribed" and frame.get("run_id") != "*":
            if target["last_seq"] is None:
                target["last_seq"] = frame.get("last_seq") or 0
            return bool(args.once and target["last_seq"] <= args.since)
        if frame.get("op") == "subscribed":
            return bool(args.once)  # all runs: nothing is stored for "*", so --once has nothing to show
        if frame.get("op") == "error":
            print(f"fedrelay tail: {frame.get('code')}: {frame.get('detail')}", file=sys.stderr, flush=True)
        return False

    def on_note(text: str) -> None:
        if view is None:
            print(f"fedrelay tail: {text}", file=sys.stderr, flush=True)
        else:
            view.note(text)

    try:
        follower = Follower(
            urls, runs, since=args.since, token=token, on_event=on_event, on_control=on_control,
            on_note=on_note, ca_file=resolve_ca_file(args.ca_file),
        )  # fmt: skip
        if view is None:
            asyncio.run(follower.run())
            for run_id, watch in watches.items():  # a run that has not ended: where it stands
                if not watch.ended and watch.health.rounds:
                    prefix = f"{run_id} clients " if args.all else "clients "
                    for line in [*watch.recent_lines(), watch.top_line()]:
                        print(prefix + line, flush=True)
        else:
            with view:
                asyncio.run(follower.run())
    except RelayRefused as exc:
        print(f"fedrelay tail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # whatever read our output is gone (`fedrelay tail RUN | head`)
        with contextlib.suppress(OSError):  # and Python's flush at exit must not complain
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedrelay.tail``: the command on its own."""
    parser = argparse.ArgumentParser(prog="fedrelay")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tail", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
