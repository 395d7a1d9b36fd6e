"""``fedrelay tail`` against a real relay and a streaming run (killed and restarted mid-run), and
``fedrelay export`` files compared with what the relay stored."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import threading

from tests.support.relay_process import RelayProcess, wait_until
from tests.support.training import BackgroundProducer, centralized_run, federated_run


def stored(relay: RelayProcess, run_id: str) -> list[dict]:
    status, body = relay.get_json(f"/api/runs/{run_id}/events?since=0&limit=10000")
    assert status == 200, body
    return body["events"]


def cli(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"fedrelay.{module}", *args], capture_output=True, text=True, timeout=timeout
    )


class Tail:
    """``python -m fedrelay.tail`` with its stdout collected line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedrelay.tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

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
    last = len(stored(restarted, run_id))
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


def test_export_files_round_trip(relay, tmp_path):
    events = federated_run("export-run", rounds=3, clients=3, fail=(1, 2))
    BackgroundProducer(relay.url, events, pace=0, batch=100).start().join()
    expected = stored(relay, "export-run")
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
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == len(stored_with(relay, "tok"))


def stored_with(relay: RelayProcess, run_id: str) -> list[dict]:
    status, body = relay.get_json(
        f"/api/runs/{run_id}/events?since=0&limit=10000", headers={"Authorization": "Bearer s3cret"}
    )
    assert status == 200
    return body["events"]


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
