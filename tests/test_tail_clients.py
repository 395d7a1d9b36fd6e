"""``fedrelay tail --clients``: the clients summary of a federated run, plain and live, against a
real relay."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from rich.console import Console

from fedrelay.tail import LiveView
from tests.support.federation_run import generated_run, publish


def tail(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedrelay.tail", *args], capture_output=True, text=True, timeout=60
    )


def expected_line(run, rnd: int) -> str:
    cells = {c: s for (r, c), s in run.cells.items() if r == rnd}
    finished = sum(1 for s in cells.values() if s in ("finished", "straggler"))
    failed = sum(1 for s in cells.values() if s == "failed")
    silent = sum(1 for s in cells.values() if s == "silent")
    durations = sorted(d for (r, _), d in run.durations.items() if r == rnd)
    mid = (durations[len(durations) // 2] + durations[(len(durations) - 1) // 2]) / 2
    slowest = max(((c, d) for (r, c), d in run.durations.items() if r == rnd), key=lambda x: x[1])
    stragglers = sorted((c for c, s in cells.items() if s == "straggler"), key=int)
    text = f"clients round {rnd}: {finished} finished, {failed} failed, {silent} silent"
    if stragglers:
        plural = "s" if len(stragglers) > 1 else ""
        named = ", ".join(stragglers[:5]) + (" ..." if len(stragglers) > 5 else "")
        text += f", {len(stragglers)} straggler{plural} ({named})"
    return text + f"; median {mid:.2f}s; critical path {slowest[0]} ({slowest[1]:.2f}s)"


async def test_plain_lines_give_each_round_and_the_clients_failing_most(relay):
    run = generated_run("tail-health", clients=40, rounds=5, fail=0.08, silent=0.05, straggle=0.05, seed=11)
    await publish(relay.url, run)
    result = tail("tail-health", "--url", relay.url, "--once", "--clients")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("clients ")]
    assert lines[:5] == [expected_line(run, r) for r in range(1, 6)]
    # Every round_end line comes right after its round_end event.
    out = result.stdout.splitlines()
    for r in range(1, 6):
        at = next(i for i, line in enumerate(out) if re.match(rf"#\d+ round_end round {r}/5", line))
        assert out[at + 1] == expected_line(run, r)

    failing: dict[str, list[str]] = {}
    for (_, client), state in run.cells.items():
        failing.setdefault(client, []).append(state)
    worst = max(
        failing,
        key=lambda c: (
            failing[c].count("failed") + failing[c].count("silent"),
            failing[c].count("failed"),
            -int(c),
        ),
    )
    top = lines[-1]
    assert top.startswith(f"clients top failing clients: {worst} (")
    assert len(lines) == 6

    # Without --clients, no such line; a factor below 1 is refused.
    assert "clients round" not in tail("tail-health", "--url", relay.url, "--once").stdout
    refused = tail("tail-health", "--url", relay.url, "--once", "--clients", "--straggler-factor", "0.5")
    assert refused.returncode == 2 and "--straggler-factor" in refused.stderr


def test_the_live_view_shows_recent_rounds_and_the_top_failing_clients():
    run = generated_run("live-health", clients=30, rounds=7, fail=0.1, seed=2)
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    view = LiveView(with_run=False, console=console, clients=(2.0, 1.0))
    for seq, event in enumerate(run.events, 1):
        view.apply({**event, "seq": seq})
    console.print(view.render())
    text = console.file.getvalue()
    shown = [expected_line(run, r)[len("clients ") :] for r in range(3, 8)]
    for line in shown:
        assert line in text
    assert expected_line(run, 2)[len("clients ") :] not in text  # the last five rounds only
    assert "top failing clients: " in text
