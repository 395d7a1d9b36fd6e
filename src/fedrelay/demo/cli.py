"""``fedrelay demo``: start a relay if none answers, open the dashboard, train while streaming live.

Wired into the main CLI with ``add_demo_parser(commands)``; also runnable alone as
``python -m fedrelay.demo``. Torch, Flower and Lightning are imported only when the demo runs, so
``fedrelay --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Sequence
from urllib.parse import urlsplit

from ..client_settings import DEFAULT_URL, relay_urls
from ..emitters import get_emitter

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` command to a ``fedrelay`` sub-command set."""
    demo = subparsers.add_parser(
        "demo",
        help="run the federated pneumonia demo, streaming live",
        description="Train a small pneumonia classifier (Flower simulation or Lightning) and stream it "
        "to a relay. A local relay is started when none answers at --relay.",
    )
    demo.add_argument("--mode", choices=["federated", "centralized"], default="federated")
    demo.add_argument("--rounds", type=int, default=3, help="federated rounds (3)")
    demo.add_argument("--clients", type=int, default=5, help="simulated clients (5)")
    demo.add_argument("--partition", choices=["iid", "noniid"], default="iid", help="client data split")
    demo.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg")
    demo.add_argument("--local-epochs", type=int, default=2, help="epochs per round on each client (2)")
    demo.add_argument("--max-epochs", type=int, default=20, help="centralized: epoch limit (20)")
    demo.add_argument("--patience", type=int, default=3, help="centralized: early-stopping patience (3)")
    demo.add_argument("--data", metavar="DIR", help="real chest_xray/{train,test}/{NORMAL,PNEUMONIA} folder")
    demo.add_argument("--image-size", type=int, default=32, help="image side in pixels (32)")
    demo.add_argument("--samples", type=int, default=1000, help="generated training images (1000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--relay", metavar="URL", help=f"relay address (FEDRELAY_URL, else {DEFAULT_URL})")
    demo.add_argument(
        "--no-start-relay",
        action="store_true",
        help="never start a local relay: stream to --relay, or spool for `fedrelay sync` if it is down",
    )
    demo.add_argument("--no-browser", action="store_true", help="do not open the dashboard; exit when done")
    demo.add_argument("--no-telemetry", action="store_true", help="train without streaming (baseline)")
    faults = demo.add_argument_group("failure injection (to see failures on the dashboard)")
    faults.add_argument("--fail-client", type=int, metavar="ID", help="this client's training raises")
    faults.add_argument("--fail-round", type=int, metavar="N", help="... only in round N")
    faults.add_argument(
        "--fail-server-round", type=int, metavar="N", help="server evaluation raises in round N"
    )
    faults.add_argument("--fail-epoch", type=int, metavar="N", help="centralized: training raises in epoch N")
    demo.set_defaults(func=run_demo)
    return demo


# --------------------------------------------------------------------------- the relay


def http_base(url: str) -> str:
    """``ws://h:p/x`` -> ``http://h:p`` (the relay serves HTTP on the same port)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    return f"{scheme}://{parts.netloc}"


def relay_answers(url: str, timeout: float = 1.0) -> bool:
    """True when ``GET /healthz`` answers (a 503 'degraded' relay still answers)."""
    try:
        with urllib.request.urlopen(http_base(url) + "/healthz", timeout=timeout) as response:
            return response.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 503
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_local_relay(url: str, timeout: float = 20.0) -> subprocess.Popen[bytes]:
    """``python -m fedrelay serve`` on the URL's host and port; waits until it answers."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 8765
    if host not in _LOCAL_HOSTS:
        raise RuntimeError(f"no relay answers at {url}, and it is not local, so none can be started here")
    cmd = [
        sys.executable,
        "-m",
        "fedrelay",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not relay_answers(url, timeout=0.5):
        if proc.poll() is not None:
            raise RuntimeError(f"the relay exited with code {proc.returncode} (is port {port} taken?)")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"the relay did not answer within {timeout:.0f}s")
        time.sleep(0.1)
    return proc


def stop_relay(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dashboard_url(url: str) -> str:
    """Where a browser on this machine sees the dashboard (a 0.0.0.0 listener is reached locally)."""
    parts = urlsplit(http_base(url))
    return f"{parts.scheme}://{parts.netloc.replace('0.0.0.0', '127.0.0.1')}/"


# --------------------------------------------------------------------------- the run


def _train(args: argparse.Namespace, url: str) -> dict:
    if args.mode == "centralized":
        from .centralized import CentralizedConfig, run_centralized

        return run_centralized(
            CentralizedConfig(
                max_epochs=args.max_epochs, patience=args.patience, data_dir=args.data,
                image_size=args.image_size, n_train=args.samples, seed=args.seed, url=url,
                telemetry=not args.no_telemetry, fail_epoch=args.fail_epoch,
            )
        )  # fmt: skip
    from .federated import FederatedConfig, run_federated

    outcome = run_federated(
        FederatedConfig(
            rounds=args.rounds, clients=args.clients, partition=args.partition, data_dir=args.data,
            image_size=args.image_size, n_train=args.samples, local_epochs=args.local_epochs,
            strategy=args.strategy, seed=args.seed, url=url, telemetry=not args.no_telemetry,
            fail_client=args.fail_client, fail_round=args.fail_round,
            fail_server_round=args.fail_server_round,
        )
    )  # fmt: skip
    result = outcome.pop("result")
    final = result.evaluate_metrics_serverapp.get(args.rounds)
    outcome["metrics"] = dict(final) if final is not None else {}
    outcome.pop("config", None)
    return outcome


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    url = relay_urls(args.relay)[0]
    relay: subprocess.Popen[bytes] | None = None
    if not args.no_telemetry and not args.no_start_relay and not relay_answers(url):
        try:
            relay = start_local_relay(url)
        except (RuntimeError, OSError) as exc:
            print(f"fedrelay demo: {exc}", file=sys.stderr)
            return 1
        print(f"fedrelay demo: started a relay at {url}", flush=True)
    watch = dashboard_url(url)
    try:
        if not args.no_telemetry:
            print(f"fedrelay demo: watch live at {watch}", flush=True)
            if not args.no_browser and _has_display():
                webbrowser.open(watch)
        try:
            outcome = _train(args, url)
        except Exception as exc:
            print(f"fedrelay demo: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in outcome["metrics"].items()}
        print(f"fedrelay demo: run {outcome.get('run_id')} done in {outcome['seconds']:.1f}s", flush=True)
        print(json.dumps(summary, sort_keys=True), flush=True)
        if relay is not None and not args.no_browser and sys.stdin.isatty():
            print(f"fedrelay demo: the relay keeps serving {watch}; Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                relay.wait()
        return 0
    finally:
        if relay is not None:
            # This process's emitter first: what it holds is delivered, and it does not report
            # the relay going away as a lost connection.
            get_emitter(url).close(timeout=5)
            stop_relay(relay)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedrelay.demo``: the demo command on its own."""
    parser = argparse.ArgumentParser(prog="fedrelay")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


def _has_display() -> bool:
    """Open a browser only where one can show: on a headless Linux box,
    ``webbrowser`` would start a text browser in this terminal instead."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
