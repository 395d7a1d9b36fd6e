"""``fedrelay bridge mlflow --tracking-uri URI [RUN_ID | --all]``: record runs in MLflow as they happen.

The feed hands on each run's events once, in order, from the seq last recorded in MLflow; the
mapping turns them into params, metrics and tags; the sink writes them, cursor last. Stopping
the bridge (SIGTERM, Ctrl-C, kill -9), the relay or the MLflow server at any moment loses and
repeats nothing: the next start reads the cursors back from MLflow (docs/mlflow.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any

from ..client_settings import DEFAULT_URL, relay_urls, subscribe_token
from ..follow import RelayRefused, ws_base
from ..tls import resolve_ca_file
from .feed import Feed, FeedConnection
from .mlflow_map import CLIENT_MODES, RunState, translate

log = logging.getLogger("fedrelay.bridge")

MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""The bridge waits for MLflow itself (capped backoff, forever); the client's own retries (7, up to
two minutes apart) would only hide the outage. A user's environment still wins."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bridge mlflow`` to a ``fedrelay`` sub-command set."""
    bridge = subparsers.add_parser("bridge", help="record runs in a tracking tool as they happen (MLflow)")
    tools = bridge.add_subparsers(dest="tool", required=True)
    mlflow = tools.add_parser(
        "mlflow",
        help="record runs in MLflow",
        description="Follow runs on a relay and record them in MLflow as they happen: params, metrics "
        "per round or epoch, per-client child runs, status and best values. Resumes from what MLflow "
        "holds after any restart; never records a point twice. Needs `pip install 'fedrelay[mlflow]'`.",
    )
    target = mlflow.add_mutually_exclusive_group(required=True)
    target.add_argument("run_id", nargs="?", help="the relay run to record")
    target.add_argument("--all", action="store_true", help="every run on the relay, past and future")
    mlflow.add_argument(
        "--tracking-uri", help="MLflow tracking URI (MLFLOW_TRACKING_URI), e.g. http://127.0.0.1:5000"
    )
    mlflow.add_argument(
        "--url",
        action="append",
        help=f"relay address (FEDRELAY_URL, else {DEFAULT_URL}); several nodes of one relay: "
        "comma-separated or repeated, tried in order, moving on when one fails",
    )
    mlflow.add_argument("--token", help="subscribe token (FEDRELAY_SUBSCRIBE_TOKEN)")
    mlflow.add_argument("--ca-file", help="CA certificate to trust for wss:// (FEDRELAY_CA_FILE)")
    mlflow.add_argument(
        "--experiment",
        help="MLflow experiment for every run (default: the run's experiment_name, else 'fedrelay'); "
        "runs are then looked up in this experiment only",
    )
    mlflow.add_argument(
        "--client-metrics",
        choices=CLIENT_MODES,
        default="runs",
        help="per-client metrics as child runs (default), as client/<id>/... keys, or not at all",
    )
    mlflow.add_argument(
        "--until-end", action="store_true", help="exit once the run's training_end is recorded (RUN_ID)"
    )
    mlflow.set_defaults(func=run)
    return mlflow


class Recorder:
    """Keeps each run's :class:`RunState` and records events through the sink (in a thread)."""

    def __init__(self, sink: Any, clients: str, until_end: str | None = None) -> None:
        self.sink = sink
        self.clients = clients
        self.until_end = until_end
        """``--until-end``: the run whose end (recorded, and nothing left on the relay) ends the bridge."""
        self.states: dict[str, RunState] = {}
        self.ended: set[str] = set()
        self.relay_last_seq: int | None = None
        self.done = asyncio.Event()

    async def state(self, run_id: str) -> RunState:
        state = self.states.get(run_id)
        if state is None:
            state = self.states[run_id] = await asyncio.to_thread(self.sink.load, run_id)
            if state.status is not None:
                self.ended.add(run_id)
        return state

    async def record(self, run_id: str, events: list[dict[str, Any]]) -> int | None:
        state = await self.state(run_id)
        fresh = [e for e in events if e["seq"] > state.cursor]
        if fresh:
            writes = translate(fresh, state, clients=self.clients)
            await asyncio.to_thread(self.sink.apply, state, writes)
            if writes.terminate is not None:
                log.info("run %s: recorded up to seq %d, status %s", run_id, state.cursor, state.status)
                self.ended.add(run_id)
                self.states.pop(run_id, None)  # reloaded from MLflow if more comes
        self._check_done(run_id, state.cursor)
        return state.cursor

    def on_control(self, frame: dict[str, Any]) -> None:
        if frame.get("op") == "subscribed" and frame.get("run_id") == self.until_end:
            self.relay_last_seq = int(frame.get("last_seq") or 0)
            state = self.states.get(self.until_end)
            if state is not None:
                self._check_done(self.until_end, state.cursor)

    def _check_done(self, run_id: str, cursor: int) -> None:
        caught_up = self.relay_last_seq is not None and cursor >= self.relay_last_seq
        if run_id == self.until_end and run_id in self.ended and caught_up:
            self.done.set()


def run(args: argparse.Namespace) -> int:
    """Exit 0 when stopped (SIGTERM) or after ``--until-end``; 130 on Ctrl-C; 1 when the relay
    refuses the token; 2 without mlflow or a tracking URI."""
    for name, value in MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        print("fedrelay bridge mlflow: give --tracking-uri (or set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 2
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("fedrelay bridge mlflow: needs mlflow: pip install 'fedrelay[mlflow]'", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    urls = relay_urls(args.url)
    token = subscribe_token(args.token)
    ca_file = resolve_ca_file(args.ca_file)
    try:
        return asyncio.run(_bridge(args, tracking_uri, urls, token, ca_file))
    except RelayRefused as exc:
        print(f"fedrelay bridge mlflow: {exc}", file=sys.stderr)
        return 1


async def _bridge(
    args: argparse.Namespace,
    tracking_uri: str,
    urls: tuple[str, ...],
    token: str | None,
    ca_file: str | None,
) -> int:
    from .mlflow_sink import MlflowSink, Stopped

    stopping = threading.Event()
    sink = MlflowSink(
        tracking_uri,
        experiment=args.experiment,
        relay=",".join(ws_base(url) for url in urls),
        clients=args.client_metrics,
        stopping=stopping,
    )
    recorder = Recorder(sink, args.client_metrics, args.run_id if args.until_end else None)
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()

    exit_code = {"code": 0}

    def stop(code: int) -> None:
        exit_code["code"] = code
        stopping.set()  # a write waiting for MLflow gives up; one in flight finishes first
        main.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop, 0)
    loop.add_signal_handler(signal.SIGINT, stop, 130)
    try:
        if args.all:
            cursors = await asyncio.to_thread(sink.known_runs)
            feed = Feed(None, cursors)
            where = ", ".join(urls)
            known = len(cursors)
            log.info("recording every run of %s in MLflow at %s (%d known)", where, tracking_uri, known)
        else:
            state = await recorder.state(args.run_id)
            feed = Feed([args.run_id], {args.run_id: state.cursor})
            log.info("recording run %s of %s in MLflow at %s from seq %d", args.run_id, ", ".join(urls),
                     tracking_uri, state.cursor + 1)  # fmt: skip
        connection = FeedConnection(
            urls, feed, recorder.record, token=token, ca_file=ca_file, on_control=recorder.on_control
        )
        following = asyncio.ensure_future(connection.run())
        ended = asyncio.ensure_future(recorder.done.wait())
        try:
            await asyncio.wait({following, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            connection.stopped = True
            for task in (following, ended):
                task.cancel()
        if following.done() and not following.cancelled():
            following.result()  # RelayRefused
    except (asyncio.CancelledError, Stopped):
        pass
    finally:
        stopping.set()
    return exit_code["code"]
