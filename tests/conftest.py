from __future__ import annotations

import pytest

from tests.support.no_skips import pytest_make_collect_report, pytest_runtest_makereport
from tests.support.relay_process import RelayProcess

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport"]  # hooks: a skip is a failure


@pytest.fixture
def relay(tmp_path):
    """A real relay process with a fresh SQLite file."""
    proc = RelayProcess(tmp_path / "relay.db").start()
    yield proc
    proc.stop()


@pytest.fixture
def relay_factory(tmp_path):
    """Start relays with extra flags; all are stopped at the end."""
    started: list[RelayProcess] = []

    def make(*args: str, db=None, env=None, port=None) -> RelayProcess:
        proc = RelayProcess(db or tmp_path / f"relay{len(started)}.db", args=list(args), env=env, port=port)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The random order's seed at the end of every run, ``-q`` too (pytest-randomly prints it in
    the header only): a failure that depends on the order replays with it (docs/testing.md)."""
    if config.pluginmanager.hasplugin("randomly"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(f"random test order: -p randomly --randomly-seed={seed} replays it")
