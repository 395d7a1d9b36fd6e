"""The default spool directory is one per relay URL; spools of the old shared layout are still
found, by ``fedrelay sync`` and by a new emitter, but only by those talking to their relay."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fedrelay.emitters import Emitter
from fedrelay.emitters.config import default_spool_dir, relay_key
from tests.support.relay_process import RelayProcess, free_port
from tests.support.spool import spooled_count
from tests.support.stored import stored_events
from tests.support.waiting import wait_until


def spool_for(url: str, run_id: str, n: int, **kwargs) -> Emitter:
    """An emitter whose relay is down: its n events end in its spool when it closes."""
    em = Emitter(url, run_id=run_id, max_backoff=0.2, **kwargs)
    for i in range(n):
        em.emit("status", {"message": run_id, "i": i})
    assert em.close(0.2) is False
    return em


def test_each_relay_has_its_own_default_dir_and_sync_takes_only_its_own_spools(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDRELAY_SPOOL_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    root = tmp_path / "data" / "fedrelay" / "spool"
    one, two = (f"ws://127.0.0.1:{free_port()}" for _ in range(2))
    assert default_spool_dir(one) == root / relay_key(one) and relay_key(one).startswith("@ws-127.0.0.1-")
    spool_for(one, "new-one", 3)
    spool_for(two, "new-two", 4)
    spool_for(one, "old-one", 5, spool_dir=root)  # what older versions left in the shared dir
    spool_for(two, "old-two", 6, spool_dir=root)
    assert spooled_count(root / relay_key(one)) == 3 and spooled_count(root / relay_key(two)) == 4
    assert spooled_count(root) == 11

    relay = RelayProcess(tmp_path / "relay.db", port=int(one.rsplit(":", 1)[1])).start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedrelay", "sync", "--url", one],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ),  # XDG_DATA_HOME set, FEDRELAY_SPOOL_DIR not
        )
        assert done.returncode == 0, done.stderr
        assert "delivered 8 events" in done.stdout
        assert len(stored_events(relay, "new-one")) == 3 and len(stored_events(relay, "old-one")) == 5
        assert stored_events(relay, "new-two") == [] and stored_events(relay, "old-two") == []
        assert spooled_count(root / relay_key(two)) == 4 and spooled_count(root) == 6  # the other relay's
    finally:
        relay.stop()


def test_a_new_emitter_delivers_orphans_of_its_relay_from_both_layouts(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDRELAY_SPOOL_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    root = tmp_path / "data" / "fedrelay" / "spool"
    port = free_port()
    url, other = f"ws://127.0.0.1:{port}", f"ws://127.0.0.1:{free_port()}"
    spool_for(url, "orphans", 3)
    spool_for(url, "orphans", 4, spool_dir=root)
    stranger = spool_for(other, "stranger", 2, spool_dir=root)
    relay = RelayProcess(tmp_path / "relay.db", port=port).start()
    em = Emitter(url, run_id="orphans")
    try:
        em.emit("status", {"message": "new", "i": 99})
        assert em.flush(10)
        wait_until(lambda: len(stored_events(relay, "orphans")) == 8, 15, what="both orphans")
        wait_until(lambda: em.stats["resumed"] == 7, 10, what="resume stats")
        assert stored_events(relay, "stranger") == []
        assert json.loads((root / stranger.producer / "meta.json").read_text())["url"] == other
    finally:
        em.close(2)
        relay.stop()
