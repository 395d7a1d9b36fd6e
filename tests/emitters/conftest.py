from __future__ import annotations

import pytest

from fedrelay.emitters import Emitter


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
