"""Shared helpers for the integration tests: run the demo, read a run back from the relay."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Small enough for two cores: 16x16 images, a few hundred samples.
TINY = ["--image-size", "16", "--samples", "240", "--local-epochs", "1", "--no-browser"]


def demo_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a demo subprocess: no Flower telemetry, a private spool."""
    return {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FEDRELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "RAY_DEDUP_LOGS": "0",
    }


async def run_demo(tmp_path: Path, *args: str, timeout: float = 240.0) -> tuple[int, str]:
    """``python -m fedrelay.demo ARGS`` in a subprocess; returns (exit code, output tail)."""
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedrelay.demo", *args, stdout=out, stderr=asyncio.subprocess.STDOUT,
            env=demo_env(tmp_path),
        )  # fmt: skip
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"demo did not finish in {timeout}s:\n{log.read_text()[-4000:]}") from None
    return code, log.read_text(errors="replace")[-6000:]


def stored_events(relay, run_id: str) -> list[dict[str, Any]]:
    status, body = relay.get_json(f"/api/runs/{run_id}/events?since=0&limit=5000")
    assert status == 200, body
    return body["events"]


def run_status(relay, run_id: str) -> str:
    status, body = relay.get_json(f"/api/runs/{run_id}")
    assert status == 200, body
    return body["status"]


def assert_gap_free(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    duplicates = [s for s, n in Counter(seqs).items() if n > 1]
    assert not duplicates, f"duplicate seqs {duplicates}"
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def of_type(events: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind and all(e["data"].get(k) == v for k, v in match.items())]
