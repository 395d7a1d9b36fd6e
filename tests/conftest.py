from __future__ import annotations

import pytest

from fedrelay.emitters import Emitter
from tests.support.no_skips import pytest_make_collect_report, pytest_runtest_makereport
from tests.support.postgres import PgServer
from tests.support.relay_process import RelayProcess
from tests.support.webhook_receiver import WebhookReceiver

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport"]  # hooks: a skip is a failure


@pytest.fixture
def sqlite_relay(tmp_path):
    """A real relay process with a fresh SQLite file, by a name that a both-backend module's
    own ``relay`` leaves alone: for its tests that read or lock the SQLite file itself."""
    proc = RelayProcess(tmp_path / "relay.db").start()
    yield proc
    proc.stop()


@pytest.fixture
def relay(sqlite_relay):
    """A real relay process with a fresh SQLite file."""
    return sqlite_relay


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A PostgreSQL server of the suite's own, started on first use (a database per test:
    ``pg_server.fresh_db()``)."""
    server = PgServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_db(request, tmp_path) -> str:
    """A ``--db`` on each backend: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "relay.db")
    return request.getfixturevalue("pg_server").fresh_db()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_relay(request, tmp_path):
    """A real relay process on each backend: a fresh SQLite file, or a fresh PostgreSQL database.
    A module runs against both by defining ``relay`` as this fixture."""
    if request.param == "sqlite":
        proc = RelayProcess(tmp_path / "relay.db")
    else:
        proc = RelayProcess(request.getfixturevalue("pg_server").fresh_db(), log_dir=tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def relay_factory(tmp_path):
    """Start relays with extra flags; all are stopped at the end."""
    started: list[RelayProcess] = []

    def make(*args: str, db=None, env=None, port=None, log_dir=None) -> RelayProcess:
        proc = RelayProcess(
            db or tmp_path / f"relay{len(started)}.db", args=list(args), env=env, port=port, log_dir=log_dir
        )
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


@pytest.fixture
def receiver():
    """A real local HTTP server that records the alerts POSTed to it (tests/support/webhook_receiver.py)."""
    rx = WebhookReceiver().start()
    yield rx
    rx.stop()


@pytest.fixture
def emitter(tmp_path):
    """``emitter(relay)``: a real Emitter on that relay, with its own spool, closed after the test
    (modules that need another kind of emitter define their own)."""
    made: list[Emitter] = []

    def make(relay: RelayProcess) -> Emitter:
        em = Emitter(relay.url, spool_dir=tmp_path / f"spool{len(made)}")
        made.append(em)
        return em

    yield make
    for em in made:
        em.close(timeout=2)
