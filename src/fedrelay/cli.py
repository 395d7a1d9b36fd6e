"""``fedrelay serve | runs | tail | export | schema | sync | bridge | demo``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.parse
from collections.abc import Sequence
from typing import Any

from . import __version__, export, tail
from .api_client import ApiClient
from .bridge.cli import add_parser as add_bridge_parser
from .demo.cli import add_demo_parser
from .follow import RelayRefused, relay_urls
from .tls import certificate_problem, explain_certificate, resolve_ca_file


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; keep ours readable.
    logging.getLogger("websockets").setLevel(max(root.level, logging.WARNING))


def _raise_fd_limit() -> None:
    """Each connection is a file descriptor; the usual soft limit of 1024 is low."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not fatal
        pass


def _serve(args: argparse.Namespace) -> int:
    from .relay import Relay, RelayConfig
    from .relay.store import StoreError
    from .relay.tls import TlsError

    try:
        config = RelayConfig.from_env(
            host=[part for value in args.host for part in value.split(",")] if args.host else None,
            port=args.port,
            db=":memory:" if args.memory else args.db,
            replay_size=args.replay_size,
            replay_bytes=args.replay_bytes,
            retain_events=args.retain_events,
            forget_producers_after=args.forget_producers_after,
            max_frame_bytes=args.max_frame_bytes,
            max_events_per_frame=args.max_events_per_frame,
            max_queue_bytes=args.max_queue_bytes,
            max_store_lag=args.max_store_lag,
            max_connections_per_ip=args.max_connections_per_ip,
            ping_interval=args.ping_interval,
            ping_timeout=args.ping_timeout,
            publish_token=args.publish_token,
            subscribe_token=args.subscribe_token,
            allow_origins=args.allow_origin or None,
            certfile=args.certfile,
            keyfile=args.keyfile,
            stall_after=args.stall_after,
            alert_webhook=args.alert_webhook or None,
            alert_rule=args.alert_rule or None,
            alerts=args.alerts,
            compression=True if args.compression else None,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    except (ValueError, TypeError) as exc:
        print(f"fedrelay serve: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level, config.log_format)
    _raise_fd_limit()
    from .relay.websockets_check import check_websockets

    try:
        check_websockets()
    except RuntimeError as exc:
        logging.getLogger("fedrelay").error("%s", exc)
        return 1

    async def run() -> int:
        try:
            relay = Relay(config)
        except StoreError as exc:
            logging.getLogger("fedrelay").error("%s", exc)
            return 1
        try:
            await relay.start()
        except TlsError as exc:
            logging.getLogger("fedrelay").error("TLS: %s", exc)
            return 2
        except StoreError as exc:
            logging.getLogger("fedrelay").error("%s", exc)
            return 1
        except OSError as exc:
            port = config.port
            where = ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host in config.host)
            logging.getLogger("fedrelay").error("cannot listen on %s: %s", where, exc.strerror or exc)
            await relay.store.close()
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.request_stop)
        print(
            f"fedrelay {__version__} relay on {relay.url}  (dashboard: {relay.http_url}/)",
            flush=True,
        )
        left = await relay.serve_until_stopped()
        return 1 if left else 0

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        runner = asyncio.Runner()
    with runner:
        return runner.run(run())


def _http_base(url: str) -> str:
    url = url.rstrip("/")
    if url.startswith("ws://") or url.startswith("wss://"):
        url = "http" + url[2:]
    return url


def _every_run(client: ApiClient) -> list[dict[str, Any]]:
    """Every run, newest first: ``/api/runs`` pages, followed by ``next_cursor`` until it is null.

    A cursor is one node's: when another node answers a later page (the first failed), the
    listing starts over there, at most once per address.
    """
    restarts = len(client.relays.urls)
    runs: list[dict[str, Any]] = []
    cursor, origin = None, None
    while True:
        query = "?limit=1000" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else "")
        payload = client.get("/api/runs" + query)
        if origin is not None and client.answered_by != origin and restarts > 0:
            restarts -= 1
            runs, cursor, origin = [], None, None
            continue
        origin = client.answered_by
        runs.extend(payload["runs"])
        cursor = payload.get("next_cursor")  # absent from relays before pagination
        if not cursor:
            return runs


def _runs(args: argparse.Namespace) -> int:
    ca_file = resolve_ca_file(args.ca_file)
    urls = relay_urls(args.url)
    try:
        client = ApiClient([_http_base(url) for url in urls], args.token, ca_file)
    except RelayRefused as exc:  # the CA file
        print(f"fedrelay runs: {exc}", file=sys.stderr)
        return 1
    try:
        runs = _every_run(client)
    except urllib.error.HTTPError as exc:
        print(
            f"fedrelay runs: {client.last_tried} answered {exc.code}: "
            f"{exc.read().decode(errors='replace').strip()}",
            file=sys.stderr,
        )
        return 1
    except (urllib.error.URLError, OSError) as exc:
        problem = certificate_problem(exc)
        if problem is not None:
            explained = explain_certificate(client.last_tried, problem, ca_file)
            print(f"fedrelay runs: {explained}", file=sys.stderr)
            return 1
        print(
            f"fedrelay runs: no relay at {', '.join(urls)} ({getattr(exc, 'reason', exc)})",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print("no runs yet")
        return 0
    rows = [("RUN", "STATUS", "MODE", "PROGRESS", "EVENTS", "STARTED")]
    for run in runs:
        if run.get("round") is not None:
            progress = f"round {run['round']}/{run.get('num_rounds') or '?'}"
        elif run.get("epoch") is not None:
            progress = f"epoch {run['epoch']}/{run.get('max_epochs') or '?'}"
        else:
            progress = "-"
        started = run.get("started_at") or run.get("created_at")
        rows.append(
            (
                run["run_id"],
                run["status"],
                run.get("training_mode") or "-",
                progress,
                str(run["last_seq"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
    return 0


def _schema(args: argparse.Namespace) -> int:
    if args.typescript:
        from .schemas.typescript import render_typescript

        sys.stdout.write(render_typescript())
        return 0
    from pydantic import TypeAdapter

    from .schemas import Event, RelayControl, SubscriberControl

    parts = {
        "event": TypeAdapter(Event),
        "relay_control": TypeAdapter(RelayControl),
        "subscriber_control": TypeAdapter(SubscriberControl),
    }
    if args.part != "all":
        print(json.dumps(parts[args.part].json_schema(), indent=2))
        return 0
    print(json.dumps({name: a.json_schema() for name, a in parts.items()}, indent=2))
    return 0


def _sync(args: argparse.Namespace) -> int:
    from .emitters import sync_spool

    report = sync_spool(args.url, args.spool_dir, args.token, timeout=args.timeout, ca_file=args.ca_file)
    if report.error or report.busy:
        why = report.error or f"{report.busy} spools are in use by running emitters"
        print(f"fedrelay sync: {why}; {report.remaining} events stay in {report.spool_dir}", file=sys.stderr)
        return 1
    print(f"delivered {report.delivered} events from {report.producers} spools in {report.spool_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrelay", description="Live telemetry relay for Flower and Lightning training."
    )
    parser.add_argument("--version", action="version", version=f"fedrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Every option can also be set as FEDRELAY_<OPTION> "
        "(e.g. FEDRELAY_PORT, FEDRELAY_PUBLISH_TOKEN); flags win over the environment.",
    )
    serve.add_argument(
        "--host",
        action="append",
        help="address to listen on; repeat (or comma-separate in FEDRELAY_HOST) for several "
        "(default: 127.0.0.1 and ::1, where localhost may point)",
    )
    serve.add_argument("--port", type=int, help="port (default 8765; 0 picks a free one)")
    serve.add_argument(
        "--db", help="SQLite file (default: the user data dir, relay.db) or postgresql://USER@HOST:PORT/DB"
    )
    serve.add_argument("--memory", action="store_true", help="keep events in memory only")
    serve.add_argument("--replay-size", type=int, help="events per run kept in memory (1000)")
    serve.add_argument("--replay-bytes", type=int, help="characters per run kept in memory, at most (8 MiB)")
    serve.add_argument("--retain-events", type=int, help="events per run kept on disk (0 = all)")
    serve.add_argument(
        "--forget-producers-after",
        type=float,
        help="seconds after which an idle producer's dedup position is forgotten; a resend of an "
        "already stored event under its name is then stored again (30 days; 0 = never)",
    )
    serve.add_argument("--max-frame-bytes", type=int, help="largest accepted frame (1 MiB)")
    serve.add_argument("--max-events-per-frame", type=int, help="events per frame (1000)")
    serve.add_argument(
        "--max-queue-bytes", type=int, help="send queue per subscriber before cutting it (4 MiB)"
    )
    serve.add_argument("--max-store-lag", type=int, help="uncommitted events before producers wait (200000)")
    serve.add_argument(
        "--max-connections-per-ip",
        type=int,
        help="open connections per client address (IPv6: per /64), WebSocket or HTTP; "
        "more are refused with HTTP 503 (2048; 0 = no limit)",
    )
    serve.add_argument("--ping-interval", type=float, help="seconds between keepalive pings (20)")
    serve.add_argument("--ping-timeout", type=float, help="seconds to wait for a pong (20)")
    serve.add_argument("--publish-token", help="token producers must present")
    serve.add_argument("--subscribe-token", help="token subscribers and /api must present")
    serve.add_argument("--allow-origin", action="append", help="extra browser origin allowed ('*' = any)")
    serve.add_argument(
        "--certfile",
        help="PEM certificate chain: serve wss:// and https:// on the port (FEDRELAY_CERTFILE)",
    )
    serve.add_argument("--keyfile", help="PEM private key of --certfile, unencrypted (FEDRELAY_KEYFILE)")
    serve.add_argument("--stall-after", type=float, help="seconds of silence before 'stalled' (300)")
    serve.add_argument(
        "--alert-webhook",
        action="append",
        metavar="URL",
        help="POST an alert here when a run fails, stalls or ends, or a rule holds; repeatable "
        "(FEDRELAY_ALERT_WEBHOOK, comma-separated, keeps the URL out of ps; docs/alerts.md)",
    )
    serve.add_argument(
        "--alert-rule",
        action="append",
        metavar="RULE",
        help="alert when a metric rule holds, e.g. 'eval_metrics.val_loss > 2' or "
        "'no improvement of auroc for 10 rounds'; repeatable",
    )
    serve.add_argument(
        "--alerts", metavar="FILE", help="alerts file (TOML): webhooks, rules, delivery options"
    )
    serve.add_argument("--compression", action="store_true", help="enable permessage-deflate")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.set_defaults(func=_serve)

    runs = commands.add_parser("runs", help="list the runs a relay knows")
    runs.add_argument(
        "--url",
        action="append",
        help="relay address (FEDRELAY_URL, else http://127.0.0.1:8765); several nodes of one relay: "
        "comma-separated or repeated, the next asked when one cannot answer",
    )
    runs.add_argument("--token", help="subscribe token, if the relay needs one")
    runs.add_argument(
        "--ca-file", help="CA bundle for an https:// relay (FEDRELAY_CA_FILE; default: system CAs)"
    )
    runs.add_argument("--json", action="store_true", help="print JSON")
    runs.set_defaults(func=_runs)

    sync = commands.add_parser("sync", help="send the events emitters left in their spool")
    sync.add_argument(
        "--url",
        action="append",
        help="relay address (default: FEDRELAY_URL or ws://127.0.0.1:8765); several nodes of one relay: "
        "comma-separated or repeated, tried in order, moving on when one fails",
    )
    sync.add_argument(
        "--spool-dir",
        help="spool dir (default: FEDRELAY_SPOOL_DIR, else the relay's own dir in the user data dir "
        "and the shared one older versions used)",
    )
    sync.add_argument("--token", help="publish token (default: FEDRELAY_PUBLISH_TOKEN)")
    sync.add_argument(
        "--ca-file", help="CA bundle for a wss:// relay (FEDRELAY_CA_FILE; default: system CAs)"
    )
    sync.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for acks per spool")
    sync.set_defaults(func=_sync)

    schema = commands.add_parser("schema", help="print the wire contract as JSON Schema")
    schema.add_argument(
        "--part", choices=["all", "event", "relay_control", "subscriber_control"], default="all"
    )
    schema.add_argument(
        "--typescript", action="store_true", help="print TypeScript declarations (fedrelay.d.ts)"
    )
    schema.set_defaults(func=_schema)
    tail.add_parser(commands)
    export.add_parser(commands)
    add_bridge_parser(commands)
    add_demo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
