"""Decision A.3 end to end: two emitter processes with one explicit producer name.

Both start with ``producer="flower-client"`` (two spool dirs, as on two hosts) and emit 1,000
events each at the same time, and neither closes before both have flushed: the second cannot
wait for the first to leave. The relay refuses the second live connection under the name
(``producer_in_use``); an emitter that never sent under the name takes a fresh one at once.
Every event must be stored once, under two names, both ``flush()`` True, and the relay must
have said so in a WARNING. Needs the emitter side of decision A (helper i13a).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.stored import stored_events
from tests.support.waiting import wait_until

EMITTER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from fedrelay.emitters import Emitter

    url, spool, client, go, done = sys.argv[1:6]
    em = Emitter(url, run_id="shared-name", producer="flower-client", spool_dir=spool,
                 role="client", client_id=client, max_backoff=0.5)
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.005)
    for i in range(1000):
        em.emit("client_progress", {"round": 1, "client_id": client, "local_epoch": i})
    flushed = em.flush(60)
    print(json.dumps({"flushed": flushed, "producer": em.producer}), flush=True)
    while not Path(done).exists():  # stay connected until both have flushed
        time.sleep(0.01)
    em.close(10)
    """
)


def test_two_emitters_with_one_producer_name_lose_nothing(relay, tmp_path: Path):
    go, done = tmp_path / "go", tmp_path / "done"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EMITTER, relay.url, str(tmp_path / f"spool-{c}"), c, str(go), str(done)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for c in ("a", "b")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()
        results = [json.loads(proc.stdout.readline()) for proc in procs]  # type: ignore[union-attr]
        done.touch()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    finally:
        done.touch()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [r["flushed"] for r in results] == [True, True], results
    events = wait_until(lambda: (e := stored_events(relay, "shared-name")) and len(e) >= 2000 and e, 10)
    by_client: dict[str, list[int]] = {}
    for e in events:
        by_client.setdefault(e["data"]["client_id"], []).append(e["data"]["local_epoch"])
    assert {c: sorted(v) for c, v in by_client.items()} == {"a": list(range(1000)), "b": list(range(1000))}
    assert len(events) == 2000
    producers = {e["producer"] for e in events}
    assert len(producers) == 2 and "flower-client" in producers, producers
    assert {r["producer"] for r in results} == producers
    warnings = [line for line in relay.log().splitlines() if "flower-client" in line and "WARNING" in line]
    assert warnings, relay.log()
