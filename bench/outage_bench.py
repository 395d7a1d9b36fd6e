"""What a relay outage costs training: the ClientApp mod, the Lightning callback, process exit.

Relay states:

- ``up``: a real relay (``fedrelay serve``) on loopback;
- ``network``: the same relay reached over a network (as root: from a network namespace through a
  veth pair, so through the kernel's IP stack and a link rather than loopback);
- ``closed``: nothing listens on the port (connects are refused at once);
- ``blackhole``: the relay's host drops packets (connects hang until their timeout). As root, the
  clients run in a network namespace whose route to the relay's address leads nowhere
  (``ip netns``); otherwise they connect to a local port whose accept queue is full, which Linux
  treats the same way (SYNs dropped).

How a fresh process learns that the relay is unreachable (issue 13):

- ``mark`` (the emitter as shipped): a mark file in the spool directory, written by whoever found
  the relay unreachable, read by every new emitter; a first connection whose TCP connect nothing
  answers within ``connect_budget`` (10 ms) ends the waits (and writes the mark); one whose TCP
  connect is answered gets up to ``reach_timeout`` (1 s) for the TLS handshake and the hello;
- ``nomark``: the same without the shared mark (every process pays the connect budget).

Measured:

1. The mod per message in a fresh ``flwr-clientapp``-like process (a new Python process per
   message that imports the app, builds the emitter, handles one train message and exits, as the
   Deployment Engine runs them, one after the other on one spool directory): the time the mod adds
   to the message (``app(msg, ctx)`` minus the handler), the time ``close()`` at exit takes, the
   process's whole exit (atexit, interpreter teardown), and the same exit without fedrelay.
2. The mod per message in one warm process (a Ray actor): messages 2..M.
3. ``FedRelayCallback`` per ``fit()``: the time spent in its hooks, first fit of a fresh process
   (no mark yet) and the median of the later ones.

Times are medians over ``--repeats`` (p90 and max beside them): run it on an idle machine.

    sudo .venv/bin/python bench/outage_bench.py [--repeats 15] [--fits 5] [--out FILE] [--netns NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.support, as the tests import it

NETWORK_RELAY, NETWORK_CLIENT = "10.97.0.1", "10.97.0.2"
"""The veth pair between the host (the relay) and the bench's namespace (the clients)."""
BLACKHOLE_ADDRESS = "10.99.1.2"
"""Inside the bench's namespace, 10.99.1.0/24 routes via an address on lo that is not the
destination: the kernel drops the packets, connects hang."""

CLIENTAPP_CHILD = textwrap.dedent(
    """
    import atexit, json, os, sys, time
    atexit.register(lambda: print("CLOSED", time.monotonic(), flush=True))  # runs after fedrelay's close
    started = time.monotonic()
    url, strategy, telemetry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.supercore.task_identity import TaskIdentity
    if telemetry:
        from fedrelay.emitters import get_emitter, reach
        from fedrelay.emitters.flower import FLOWER_LOG, fedrelay_mod
        if strategy == "nomark":
            reach.ReachMark.down_recently = lambda self, now=None: False
            reach.ReachMark.set = lambda self, up: None

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4242, 0
    app = ClientApp(mods=[fedrelay_mod] if telemetry else [])
    handled = [0.0]

    @app.train()
    def train(msg, context):
        t0 = time.perf_counter()
        metrics = MetricRecord({"loss": 0.5, "num-examples": 10})
        reply = Message(RecordDict({"metrics": metrics}), reply_to=msg)
        handled[0] = time.perf_counter() - t0
        return reply

    context = Context(4242, 7, {"partition-id": 0}, RecordDict(), {"fedrelay-url": url})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 7, "train")
    imported = time.monotonic()
    t0 = time.perf_counter()
    app(msg, context)
    mod_s = time.perf_counter() - t0 - handled[0]
    acked = None
    if telemetry:
        em = get_emitter(url)
        acked = em.stats["acked"]
    done = time.monotonic()
    print("RESULT " + json.dumps({"mod_ms": mod_s * 1000, "acked": acked, "done": done,
                                  "import_s": imported - started}), flush=True)
    """
)

WARM_CHILD = textwrap.dedent(
    """
    import json, sys, time
    url, messages = sys.argv[1], int(sys.argv[2])
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.supercore.task_identity import TaskIdentity
    from fedrelay.emitters.flower import fedrelay_mod

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 4243, 0
    app = ClientApp(mods=[fedrelay_mod])

    @app.train()
    def train(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"loss": 0.5, "num-examples": 10})}), reply_to=msg)

    context = Context(4243, 7, {"partition-id": 0}, RecordDict(), {"fedrelay-url": url})
    times = []
    for r in range(1, messages + 1):
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": r})}), 7, "train")
        t0 = time.perf_counter()
        app(msg, context)
        times.append((time.perf_counter() - t0) * 1000)
    print("RESULT " + json.dumps({"ms": times}), flush=True)
    """
)

LIGHTNING_CHILD = textwrap.dedent(
    """
    import json, sys, time, warnings
    warnings.filterwarnings("ignore")
    url, strategy, fits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import torch
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset
    from fedrelay.emitters import get_emitter, reach
    from fedrelay.emitters.lightning import FedRelayCallback
    if strategy == "nomark":
        reach.ReachMark.down_recently = lambda self, now=None: False
        reach.ReachMark.set = lambda self, up: None

    class Timed(FedRelayCallback):
        spent = 0.0
    for name in ("on_train_start", "on_train_epoch_start", "on_train_epoch_end", "on_train_end"):
        def timed(self, *args, _hook=getattr(FedRelayCallback, name), **kwargs):
            t0 = time.perf_counter()
            try:
                return _hook(self, *args, **kwargs)
            finally:
                self.spent += time.perf_counter() - t0
        setattr(Timed, name, timed)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)
        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return loss
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=16)
    per_fit = []
    for k in range(fits):
        callback = Timed(url=url, run_id=f"bench-fit-{k}")
        trainer = pl.Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(Tiny(), data)
        per_fit.append(callback.spent * 1000)
    print("RESULT " + json.dumps({"ms": per_fit}), flush=True)
    """
)


@dataclass
class Target:
    """Where the clients find the relay in one state, and how to start them."""

    state: str
    url: str
    prefix: list[str] = field(default_factory=list)
    """Command prefix for the client processes (``ip netns exec NAME``)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def result_of(proc: subprocess.CompletedProcess[str]) -> tuple[dict, float | None]:
    lines = proc.stdout.splitlines()
    results = [line for line in lines if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    closed = [float(line.split()[1]) for line in lines if line.startswith("CLOSED ")]
    return json.loads(results[-1][len("RESULT ") :]), (closed[-1] if closed else None)


def clientapp_run(target: Target, strategy: str, telemetry: bool, env: dict[str, str]) -> dict:
    cmd = [
        *target.prefix,
        sys.executable,
        "-c",
        CLIENTAPP_CHILD,
        target.url,
        strategy,
        "1" if telemetry else "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate(timeout=120)
    ended = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable with the child's
    result, closed = result_of(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    result["close_ms"] = (closed - result["done"]) * 1000 if closed else None
    result["exit_ms"] = (ended - result["done"]) * 1000
    return result


def bench_clientapp(target: Target, strategy: str, repeats: int, env: dict[str, str]) -> dict:
    runs = [clientapp_run(target, strategy, True, env) for _ in range(repeats)]
    baseline = [clientapp_run(target, strategy, False, env) for _ in range(max(3, repeats // 3))]
    return {
        "mod": [r["mod_ms"] for r in runs],
        "close": [r["close_ms"] for r in runs if r["close_ms"] is not None],
        "exit": [r["exit_ms"] for r in runs],
        "exit_without": [r["exit_ms"] for r in baseline],
        "dispatch_without": [r["mod_ms"] for r in baseline],
        "acked": sum(1 for r in runs if r["acked"]),
        "runs": len(runs),
    }


def bench_warm(target: Target, messages: int, env: dict[str, str]) -> list[float]:
    cmd = [*target.prefix, sys.executable, "-c", WARM_CHILD, target.url, str(messages)]
    result, _ = result_of(subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300))
    return result["ms"][1:]


def bench_lightning(target: Target, strategy: str, fits: int, env: dict[str, str]) -> list[float]:
    cmd = [*target.prefix, sys.executable, "-c", LIGHTNING_CHILD, target.url, strategy, str(fits)]
    result, _ = result_of(subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600))
    return result["ms"]


@contextlib.contextmanager
def namespace(name: str):
    """A network namespace where BLACKHOLE_ADDRESS drops packets; None when it cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield None
        return
    host_end, ns_end = f"fro{os.getpid() % 100000}h", f"fro{os.getpid() % 100000}n"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "addr", "add", "10.98.0.1/32", "dev", "lo"],
        ["ip", "-n", name, "route", "add", "10.99.1.0/24", "via", "10.98.0.1", "dev", "lo"],
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end],
        ["ip", "link", "set", ns_end, "netns", name],
        ["ip", "addr", "add", f"{NETWORK_RELAY}/30", "dev", host_end],
        ["ip", "link", "set", host_end, "up"],
        ["ip", "-n", name, "addr", "add", f"{NETWORK_CLIENT}/30", "dev", ns_end],
        ["ip", "-n", name, "link", "set", ns_end, "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)
    except (subprocess.CalledProcessError, OSError) as exc:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        print(f"no network namespace ({exc}); using a full accept queue instead", file=sys.stderr)
        yield None
        return
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def row(values: list[float]) -> str:
    """median / p90 / max in one cell."""
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {percentile(values, 0.9):.1f} / {max(values):.1f}"


def report(results: dict, args: argparse.Namespace, blackhole_how: str) -> str:
    lines = [
        f"Relay outage bench: {args.repeats} fresh processes per row, {args.fits} fits, "
        f"{args.messages} warm messages; Python {platform.python_version()}, {os.cpu_count()} CPUs. "
        f"Blackhole: {blackhole_how}. Times in ms: median / p90 / max.",
        "",
        "**ClientApp mod, one fresh process per message** (budget: mod < 20 ms, exit < 100 ms)",
        "",
        "| relay | strategy | mod (ms) | app() without fedrelay (ms) | close() at exit (ms) "
        "| whole exit (ms) | exit without fedrelay (ms) | acked before the reply |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (state, strategy), r in results["clientapp"].items():
        lines.append(
            f"| {state} | {strategy} | {row(r['mod'])} | {row(r['dispatch_without'])} | {row(r['close'])} "
            f"| {row(r['exit'])} "
            f"| {row(r['exit_without'])} | {r['acked']}/{r['runs']} |"
        )
    lines += [
        "",
        "**ClientApp mod, one warm process** (a Ray actor), messages 2..M, the emitter as shipped",
        "",
        "| relay | mod + handler (ms) |",
        "|---|---|",
    ]
    for state, values in results["warm"].items():
        lines.append(f"| {state} | {row(values)} |")
    lines += [
        "",
        "**FedRelayCallback per fit()** (budget: < 50 ms), time in its hooks; a fresh process without a mark",
        "",
        "| relay | strategy | first fit (ms) | later fits (ms) |",
        "|---|---|---|---|",
    ]
    for (state, strategy), values in results["lightning"].items():
        lines.append(f"| {state} | {strategy} | {values[0]:.1f} | {row(values[1:])} |")
    lines += [
        "",
        "mod: the time `app(msg, ctx)` takes beyond the handler, fedrelay's mod included (the emitter is "
        "made, two events queued, then `settle`); app() without fedrelay: the same without the mod. "
        "close() at exit: from the end of the message to the end of fedrelay's atexit hook. "
        "whole exit: to the end of the process (interpreter teardown included).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="fresh processes per relay state and strategy"
    )
    parser.add_argument("--messages", type=int, default=30, help="messages in the warm process")
    parser.add_argument("--fits", type=int, default=5, help="fit() calls in the Lightning process")
    parser.add_argument("--states", nargs="+", default=["up", "network", "closed", "blackhole"])
    parser.add_argument("--strategies", nargs="+", default=["mark", "nomark"])
    parser.add_argument(
        "--no-lightning", action="store_true", help="skip the Lightning part (~5 s per process)"
    )
    parser.add_argument(
        "--netns", default=f"fedrelay-outage-{os.getpid()}", help="network namespace to create"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()

    from tests.support.blackhole import Blackhole  # a full accept queue
    from tests.support.relay_process import RelayProcess

    with tempfile.TemporaryDirectory() as tmp, namespace(args.netns) as netns:
        work = Path(tmp)
        base_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
        hosts = ["127.0.0.1", NETWORK_RELAY] if netns else ["127.0.0.1"]
        wanted = {"up", "network"} & set(args.states)
        relay = RelayProcess(work / "relay.db", hosts=hosts).start() if wanted else None
        hole = Blackhole() if netns is None and "blackhole" in args.states else None
        prefix = ["ip", "netns", "exec", netns] if netns else []
        targets = {
            "up": Target("up", relay.url if relay else ""),
            "network": Target("network", f"ws://{NETWORK_RELAY}:{relay.port}" if relay else "", prefix),
            "closed": Target("closed", f"ws://127.0.0.1:{free_port()}", prefix),
            "blackhole": Target(
                "blackhole", f"ws://{BLACKHOLE_ADDRESS}:8765" if netns else hole.url if hole else "", prefix
            ),
        }
        blackhole_how = (
            f"network namespace {netns}, route to {BLACKHOLE_ADDRESS} leads nowhere"
            if netns
            else "local port with a full accept queue"
        )
        results: dict = {"clientapp": {}, "warm": {}, "lightning": {}}
        try:
            for state in args.states:
                target = targets[state]
                if state == "network" and netns is None:
                    print("network: needs root (a network namespace); skipped", file=sys.stderr)
                    continue
                for strategy in args.strategies:
                    spool = work / f"spool-{state}-{strategy}"
                    env = {**base_env, "FEDRELAY_SPOOL_DIR": str(spool)}
                    print(f"{state}/{strategy}: clientapp x{args.repeats}", file=sys.stderr, flush=True)
                    results["clientapp"][(state, strategy)] = bench_clientapp(
                        target, strategy, args.repeats, env
                    )
                    if not args.no_lightning:
                        print(f"{state}/{strategy}: lightning", file=sys.stderr, flush=True)
                        env = {**base_env, "FEDRELAY_SPOOL_DIR": str(work / f"spool-l-{state}-{strategy}")}
                        results["lightning"][(state, strategy)] = bench_lightning(
                            target, strategy, args.fits, env
                        )
                print(f"{state}: warm", file=sys.stderr, flush=True)
                env = {**base_env, "FEDRELAY_SPOOL_DIR": str(work / f"spool-w-{state}")}
                results["warm"][state] = bench_warm(target, args.messages, env)
        finally:
            if relay is not None:
                relay.stop()
            if hole is not None:
                hole.close()
    text = report(results, args, blackhole_how)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
