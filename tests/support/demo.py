"""The pneumonia demo (``python -m fedrelay.demo``) and ``fedrelay sync`` as subprocesses, each run
with a private spool dir and Flower's telemetry off."""

from __future__ import annotations

import asyncio
import json
import os
import sys
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


async def run_demo(
    tmp_path: Path, *args: str, timeout: float = 240.0, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """``python -m fedrelay.demo ARGS`` in a subprocess; returns (exit code, output tail).

    Each call writes its own log.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "demo.log"
    n = 1
    while log.exists():
        n += 1
        log = tmp_path / f"demo{n}.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedrelay.demo", *args,
            stdout=out, stderr=asyncio.subprocess.STDOUT, env={**demo_env(tmp_path), **(env or {})},
        )  # fmt: skip
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"demo did not finish in {timeout}s:\n{log.read_text()[-4000:]}") from None
    return code, log.read_text(errors="replace")[-6000:]


# The demo starts a local relay when none answers at --relay, and has no flag to forbid it. For
# "relay down for the whole run" the same CLI runs with that probe answering yes: nothing starts,
# and the emitters find nobody listening.
async def run_demo_without_relay(tmp_path: Path, *args: str, timeout: float = 240.0) -> tuple[int, str]:
    """Like :func:`run_demo`, but the demo never starts a relay of its own."""
    return await run_demo(tmp_path, *args, "--no-start-relay", timeout=timeout)


def final_metrics(log: str) -> dict[str, Any]:
    """The final server metrics the demo prints after ``fedrelay demo: run ... done``."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("fedrelay demo: run ") and " done in " in line:
            return json.loads(lines[i + 1])
    raise AssertionError(f"no final metrics in the demo output:\n{log[-3000:]}")


async def run_sync(tmp_path: Path, url: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """``python -m fedrelay sync --url URL`` with the demo's private spool dir."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedrelay", "sync", "--url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=demo_env(tmp_path),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
