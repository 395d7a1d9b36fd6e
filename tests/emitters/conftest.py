from __future__ import annotations

import pytest

from fedrelay.emitters import Emitter
from tests.support.relay_process import RelayProcess


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test may touch the user's spool dir or pick up a relay from the environment."""
    monkeypatch.setenv("FEDRELAY_SPOOL_DIR", str(tmp_path / "spool"))
    for name in (
        "FEDRELAY_URL",
        "FEDRELAY_TOKEN",
        "FEDRELAY_PUBLISH_TOKEN",
        "FEDRELAY_RUN_ID",
        "FEDRELAY_CA_FILE",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_emitter(tmp_path):
    """Emitters that are closed (quickly) when the test ends, whatever happened."""
    made: list[Emitter] = []

    def make(url: str, **kwargs) -> Emitter:
        kwargs.setdefault("spool_dir", tmp_path / "spool")
        kwargs.setdefault("max_backoff", 0.5)
        emitter = Emitter(url, **kwargs)
        made.append(emitter)
        return emitter

    yield make
    for emitter in made:
        emitter.close(timeout=1)


def stored_events(relay: RelayProcess, run_id: str) -> list[dict]:
    """Every event the relay stored for ``run_id``, in seq order."""
    events: list[dict] = []
    since = 0
    while True:
        status, page = relay.get_json(f"/api/runs/{run_id}/events?since={since}&limit=1000")
        if status == 404:
            return events
        assert status == 200, page
        if not page["events"]:
            return events
        events.extend(page["events"])
        since = page["next_since"]


def spooled_count(spool_dir) -> int:
    return sum(int(p.stem.rsplit("-", 1)[1]) for p in spool_dir.glob("*/*.seg"))
