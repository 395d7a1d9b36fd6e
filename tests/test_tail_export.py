"""``fedrelay tail`` against a real relay and a streaming run (killed and restarted mid-run), and
``fedrelay export`` files compared with what the relay stored."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import math
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

from fedrelay.tail import REDRAW_EVERY, LiveView
from tests.support.clients import ResendingProducer
from tests.support.clients import event as make_event
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.seed_system import centralized_run as seed_centralized_run
from tests.support.seed_system import send_frames
from tests.support.stored import stored_events
from tests.support.training import BackgroundProducer, centralized_run, federated_run
from tests.support.waiting import until, wait_until

TAIL = [
    sys.executable,
    "-c",
    "import sys, fedrelay.follow; fedrelay.follow.CLOSE_TIMEOUT = 600.0; "
    "from fedrelay.tail import main; sys.exit(main())",
]
"""``fedrelay tail`` with a closing handshake that may wait 600 s instead of 2 s: an exit that
waits for it cannot pass for a prompt one, so "exits promptly" is a generous timeout
(PROMPTLY) rather than a wall-clock limit that the 2 s wait fits under."""
PROMPTLY = 60.0
"""Seconds an exit may take (it takes well under one); the bugs it guards against take 600 s or
never end."""


def cli(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"fedrelay.{module}", *args], capture_output=True, text=True, timeout=timeout
    )


def exit_code_within(proc: subprocess.Popen, timeout: float, failure: str) -> int:
    """The process's exit code, or kill it and fail the test with ``failure``."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(failure)


class Tail:
    """``python -m fedrelay.tail`` with its stdout collected line by line as it comes."""

    def __init__(self, *args: str, reading: bool = True) -> None:
        self.proc = subprocess.Popen(
            [*TAIL, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.reading = threading.Event()
        """Clear it to stop reading tail's output (a terminal that cannot keep up); set it again."""
        if reading:
            self.reading.set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.reading.wait(60)
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def exit_within(self, timeout: float, failure: str) -> tuple[int, str]:
        """Exit code and stderr, or kill it and fail the test with ``failure``."""
        code = exit_code_within(self.proc, timeout, failure)
        return code, self.wait(timeout=10)[1]

    def seqs(self) -> list[int]:
        return [int(line.split()[0].lstrip("#")) for line in self.lines if line.startswith("#")]


def test_tail_follows_a_run_across_a_relay_restart(relay_factory, tmp_path):
    db = tmp_path / "tail.db"
    relay = relay_factory(db=db)
    port = relay.port
    run_id = "tail-fed"
    events = federated_run(run_id, rounds=8, clients=3)
    tail = Tail(run_id, "--url", relay.url, "--until-end")  # before the run exists: it waits for it
    producer = BackgroundProducer(relay.url, events, pace=0.05, batch=4).start()
    wait_until(lambda: len(tail.lines) >= 30, timeout=30, what="tail printing the first events")
    relay.kill()  # SIGKILL mid-run
    restarted = relay_factory(db=db, port=port)
    producer.join(60)
    code, err = tail.wait(60)

    assert code == 0, err
    last = len(stored_events(restarted, run_id))
    assert last == len(events)
    assert tail.seqs() == list(range(1, last + 1)), "every seq once, in order, across the restart"
    assert "resuming" in err
    round_ends = [line for line in tail.lines if " round_end " in line]
    assert len(round_ends) == 8
    assert (
        "round 8/8" in round_ends[-1] and "eval.loss=" in round_ends[-1] and "server.auroc=" in round_ends[-1]
    )
    assert tail.lines[-1].startswith(f"#{last} training_end completed")


def test_tail_once_prints_the_stored_run_and_exits(relay):
    events = centralized_run("tail-cen", stop_at=6, patience=2)
    BackgroundProducer(relay.url, events, pace=0, batch=100).start().join()
    result = cli("tail", "tail-cen", "--url", relay.url, "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f"#{i}" for i in range(1, len(events) + 1)]
    assert "epoch 6" in lines[-3] and "val_loss=" in lines[-3]
    assert lines[-2].startswith("#8 early_stopping epoch 6")

    since = cli("tail", "tail-cen", "--url", relay.url, "--once", "--since", "7")
    assert [line.split()[0] for line in since.stdout.splitlines()] == ["#8", "#9"]


@pytest.fixture
def children():
    """Processes a test starts; any still running at the end (a failed wait) are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def publish(relay: RelayProcess, events: list[dict]) -> None:
    """Through a real /publish connection, in array frames of 1,000, until all are acked."""
    asyncio.run(ResendingProducer(relay.url, "bulk").publish_all(events, batch=1000, timeout=60))


def subscribers(relay: RelayProcess) -> float:
    return scrape(relay).get('fedrelay_connections{endpoint="subscribe"}', 0.0)


def events_sent(relay: RelayProcess) -> float:
    return scrape(relay)["fedrelay_events_out_total"]


AHEAD = 15_000
"""Events (~3 MB) the relay must have sent beyond what tail printed before tail is stopped: the
relay's close frame then queues behind more than tail's receive queue takes in (max_queue = 16
frames of up to 256 KiB; the relay keeps sending until it reads tail's close). Unread, tail's socket
buffers fill at 20,000-25,000 events here; from 15,000 the old tail stalled in every run."""


def test_tail_exits_promptly_on_ctrl_c_during_a_large_catch_up(relay, children):
    """Ctrl-C while 100,000 stored events stream in. The relay's close frame would queue behind
    everything it already sent; once tail's receive queue is full, reading pauses and a closing
    handshake can never complete: it used to sit out websockets' close_timeout (10 s)."""
    total = 100_000
    publish(relay, [make_event("big", i) for i in range(1, total + 1)])
    tail = Tail("big", "--url", relay.url)
    children.append(tail.proc)
    try:
        wait_until(lambda: len(tail.lines) >= 1000, timeout=30, what="tail printing the catch-up")
        # Stop reading its output, like a terminal that cannot keep up: tail blocks in print()
        # and the relay runs ahead until the socket buffers are full.
        tail.reading.clear()
        wait_until(
            lambda: events_sent(relay) - len(tail.lines) >= AHEAD,
            timeout=10,
            what="the relay running ahead of tail",
        )
        tail.proc.send_signal(signal.SIGINT)
    finally:
        tail.reading.set()
    code, err = tail.exit_within(PROMPTLY, "fedrelay tail did not exit after Ctrl-C during a catch-up")

    assert code == 130, err
    assert "Traceback" not in err, err
    seqs = tail.seqs()
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < total, "stopped mid catch-up, in order"
    wait_until(lambda: subscribers(relay) == 0, timeout=5, what="the relay dropping the subscriber")


def test_tail_until_end_exits_promptly_with_events_still_in_flight(relay, children):
    """--until-end stops at training_end with thousands of later events in flight: a clean close
    that reads and drops them, not one stuck until close_timeout behind a full receive queue."""
    end = 2_000
    events = [make_event("ends", i) for i in range(1, 40_001)]
    events[end - 1] = make_event("ends", end, "training_end", status="completed")
    publish(relay, events)
    tail = Tail("ends", "--url", relay.url, "--until-end", reading=False)
    children.append(tail.proc)
    try:  # unread, tail blocks in print() before training_end; the relay fills the socket buffers
        wait_until(
            lambda: events_sent(relay) >= end + AHEAD, timeout=10, what="the relay running ahead of tail"
        )
    finally:
        tail.reading.set()
    code, err = tail.exit_within(PROMPTLY, "fedrelay tail --until-end did not exit with events in flight")

    assert code == 0, err
    assert tail.seqs() == list(range(1, end + 1)) and tail.lines[-1].startswith(f"#{end} training_end")
    wait_until(lambda: subscribers(relay) == 0, timeout=5, what="the relay dropping the subscriber")


def test_live_view_exits_promptly_on_ctrl_c_during_a_large_catch_up(relay, children):
    """The same on a terminal, in the rich view. It also redrew once per event (~4 ms each), so
    Ctrl-C first waited for the ~1,200 events of the frame in hand: ~4.5 s, then the 10 s close."""
    publish(relay, [make_event("big", i) for i in range(1, 100_001)])
    master, child = pty.openpty()
    proc = subprocess.Popen(
        [*TAIL, "big", "--url", relay.url],
        stdin=child,
        stdout=child,
        stderr=child,
        close_fds=True,
    )
    children.append(proc)
    os.close(child)
    screen = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the child is gone
            while chunk := os.read(master, 65536):
                screen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: b"recent events" in screen, timeout=30, what="the live view")
        proc.send_signal(signal.SIGINT)
        code = exit_code_within(proc, PROMPTLY, "the live view did not exit after Ctrl-C during a catch-up")
        assert code == 130, bytes(screen[-2000:]).decode(errors="replace")
        assert b"Traceback" not in screen
    finally:
        reader.join(5)
        os.close(master)


def test_live_view_draws_a_burst_of_events_a_few_times_then_the_last_state():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    view = LiveView(with_run=False, console=console)

    async def burst() -> tuple[int, float]:
        with view:
            started = time.monotonic()
            for i in range(1, 5_001):
                view.apply({"run_id": "r", "seq": i, "type": "round_end", "data": {"round": i}})
                view.changed()
            took = time.monotonic() - started
            drawn = view.redraws
            await until(lambda: "seq 5000" in console.file.getvalue(), timeout=5, what="the last state")
        return drawn, took

    drawn, took = asyncio.run(burst())
    # At most one redraw per REDRAW_EVERY of the burst's own duration (plus the first): however
    # slow the machine, that bound grows with it; once per event it is 5,000.
    assert 1 <= drawn <= 2 + took / REDRAW_EVERY, (drawn, took)


def test_tail_exits_when_the_reader_of_its_output_goes_away(relay, children):
    """``fedrelay tail RUN | head -3``: it used to take the BrokenPipeError for a lost connection
    and reconnect forever, one event (and one "connection lost" note) per attempt."""
    publish(relay, [make_event("piped", i) for i in range(1, 5_001)])  # more than a pipe buffer holds
    tail = subprocess.Popen(
        [*TAIL, "piped", "--url", relay.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(tail)
    assert tail.stdout is not None and tail.stderr is not None
    first = [tail.stdout.readline() for _ in range(3)]
    tail.stdout.close()  # as head does after three lines
    code = exit_code_within(
        tail, PROMPTLY, "fedrelay tail kept running after the reader of its output went away"
    )

    assert [line.split()[0] for line in first] == ["#1", "#2", "#3"]
    err = tail.stderr.read()
    assert code == 141, err
    assert err == "", "no traceback, no reconnect notes"
    wait_until(lambda: subscribers(relay) == 0, timeout=5, what="the relay dropping the subscriber")


def test_export_files_round_trip(relay, tmp_path):
    events = federated_run("export-run", rounds=3, clients=3, fail=(1, 2))
    BackgroundProducer(relay.url, events, pace=0, batch=100).start().join()
    expected = stored_events(relay, "export-run")
    assert len(expected) == len(events)

    jsonl = tmp_path / "run.jsonl"
    result = cli("export", "export-run", "--format", "jsonl", "--out", str(jsonl), "--url", relay.http)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == expected

    out = tmp_path / "run.csv"
    result = cli("export", "export-run", "--format", "csv", "--out", str(out), "--url", relay.url)
    assert result.returncode == 0, result.stderr
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected)
    assert list(rows[0])[:4] == ["seq", "type", "run_id", "timestamp"]
    for row, event in zip(rows, expected, strict=True):
        leaves = dict(_leaves(event, ""))
        assert set(leaves) <= set(row), f"columns missing: {set(leaves) - set(row)}"
        for column, text in row.items():
            if column not in leaves:
                assert text == "", f"{column} should be empty for seq {event['seq']}"
                continue
            _assert_cell(text, leaves[column], column)


def test_tail_and_export_present_the_subscribe_token(relay_factory, tmp_path):
    relay = relay_factory("--subscribe-token", "s3cret")
    BackgroundProducer(relay.url, federated_run("tok", rounds=1, clients=2), pace=0, batch=100).start().join()
    refused = cli("tail", "tok", "--url", relay.url, "--once", "--token", "wrong")
    assert refused.returncode == 1 and "401" in refused.stderr
    ok = cli("tail", "tok", "--url", relay.url, "--once", "--token", "s3cret")
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].startswith("#")
    denied = cli("export", "tok", "--url", relay.url)
    assert denied.returncode == 1 and "401" in denied.stderr
    exported = cli("export", "tok", "--url", relay.url, "--token", "s3cret")
    stored = stored_events(relay, "tok", headers={"Authorization": "Bearer s3cret"})
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == len(stored)


def _leaves(value, prefix):
    """(dotted path, value) of every leaf, written independently of fedrelay.export.flatten."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


def _assert_cell(text: str, value, column: str) -> None:
    if value is None:
        assert text == "", column
    elif isinstance(value, bool):
        assert text == ("true" if value else "false"), column
    elif isinstance(value, int | float):
        assert math.isclose(float(text), value, rel_tol=0, abs_tol=0) and float(text) == value, column
    elif isinstance(value, str):
        assert text == value, column
    else:
        assert json.loads(text) == value, column


def test_export_of_a_run_from_the_root_path(relay, tmp_path):
    """The seed system's centralized run, sent on ``/``, exports like any other run."""
    frames = seed_centralized_run(7)
    asyncio.run(send_frames(relay.url + "/", frames))
    expected = wait_until(lambda: len(stored_events(relay, "7")) == len(frames) and stored_events(relay, "7"))
    out = tmp_path / "seed.csv"
    result = cli("export", "7", "--format", "csv", "--out", str(out), "--url", relay.url)
    assert result.returncode == 0, result.stderr
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["type"] for row in rows] == [frame["type"] for frame in frames]
    assert [row["via"] for row in rows] == ["root"] * len(frames)
    epochs = [row for row in rows if row["type"] == "epoch_end"]
    assert epochs[0]["data.metrics.val_auroc"] == "" and epochs[1]["data.metrics.val_auroc"] == "0.77"
    assert epochs[0]["data.metrics.timestamp"] == frames[1]["data"]["metrics"]["timestamp"]
    assert len(rows) == len(expected)


def log_event(run_id: str, i: int, level: str, message: str, client: int | None = None, **data) -> dict:
    source = {"role": "client", "client_id": client} if client is not None else {"role": "server"}
    body = {"level": level, "logger": "app", "message": message, **data}
    if client is not None:
        body.update(client_id=client, round=1)
    return {"type": "log", "run_id": run_id, "id": i, "source": source, "data": body}


LOGGED_RUN = [
    make_event("logged", 1, "round_start", round=1),
    log_event("logged", 2, "info", "[ROUND 1/2] starting [bold]now[/bold]"),
    log_event("logged", 3, "warning", "only 10 examples", client=2),
    log_event("logged", 4, "error", "train failed", client=3, exception="Traceback ...\nValueError: bad\n"),
    log_event("logged", 5, "warning", "evil \x1b]0;pwned\x07 title \x1b[31mred", client=2, dropped=7),
    make_event("logged", 6, "round_end", round=1),
]


def test_tail_shows_log_events_only_with_logs_and_filters_them(relay):
    asyncio.run(ResendingProducer(relay.url, "logs").publish_all(LOGGED_RUN))

    def lines(*args: str) -> list[str]:
        result = cli("tail", "logged", "--url", relay.url, "--once", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    assert [line.split()[:2] for line in lines()] == [["#1", "round_start"], ["#6", "round_end"]]
    shown = lines("--logs")
    assert shown[1] == "#2 log INFO server app: [ROUND 1/2] starting [bold]now[/bold]"
    assert shown[2] == "#3 log WARNING client 2 round 1 app: only 10 examples"
    assert shown[3] == "#4 log ERROR client 3 round 1 app: train failed | ValueError: bad"
    dropped = "(7 records dropped before this one)"
    assert shown[4] == f"#5 log WARNING client 2 round 1 app: evil  title red {dropped}"  # no escapes
    assert [line.split()[0] for line in lines("--level", "error")] == ["#1", "#4", "#6"]
    assert [line.split()[0] for line in lines("--client", "2")] == ["#1", "#3", "#5", "#6"]


def test_live_view_lists_log_lines_as_text_not_markup_or_terminal_codes():
    console = Console(file=io.StringIO(), force_terminal=False, width=160)
    view = LiveView(with_run=False, console=console)
    for seq, event in enumerate(LOGGED_RUN, start=1):
        view.apply({**event, "seq": seq})
    console.print(view.render())
    out = console.file.getvalue()
    assert "[ROUND 1/2] starting [bold]now[/bold]" in out  # text, not rich markup
    assert "only 10 examples" in out and "ValueError: bad" in out
    assert "\x1b" not in out and "\x07" not in out
    assert "recent events" in out and "logs" in out
