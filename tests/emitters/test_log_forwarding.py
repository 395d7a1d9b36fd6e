"""``forward_logs()`` against a real relay: records stored as ``log`` events, and every bound
(threshold, rate limit with its dropped count, size caps, no recursion) holding."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from fedrelay.emitters import forward_logs, logs
from fedrelay.emitters.logs import LogSource, log_source
from tests.support.stored import stored_events
from tests.support.waiting import wait_until

log = logging.getLogger("test.logs.app")


@pytest.fixture(autouse=True)
def _fresh_forwarding(monkeypatch):
    """Each test starts with no forwarder and full buckets, and leaves none behind."""
    monkeypatch.setattr(logs, "_limits", {})
    log.setLevel(logging.DEBUG)
    yield
    forwarder = logs.installed_forwarder()
    if forwarder is not None:
        forwarder.remove()


def log_events(relay, run_id: str) -> list[dict]:
    return [e for e in stored_events(relay, run_id) if e["type"] == "log"]


def flushed(emitter) -> None:
    assert emitter.flush(10)


def test_records_are_stored_with_level_logger_source_and_exception(relay, make_emitter):
    em = make_emitter(relay.url, run_id="logs-basic")
    forwarder = forward_logs(em)
    assert forward_logs() is forwarder  # one per process
    log.debug("below the INFO threshold")
    log.info("hello %s", "relay")
    with log_source(LogSource(run_id="logs-basic", role="client", client_id=3, round=2)):
        log.warning("from client 3")
        try:
            raise ValueError("bad value")
        except ValueError:
            log.exception("it failed")
    forwarder.remove()
    log.warning("after removal")
    flushed(em)

    events = log_events(relay, "logs-basic")
    assert [e["data"]["message"] for e in events] == ["hello relay", "from client 3", "it failed"]
    hello, client, failed = (e["data"] for e in events)
    assert hello["level"] == "info" and hello["levelno"] == 20 and hello["logger"] == "test.logs.app"
    assert hello["file"] == "test_log_forwarding.py" and hello["function"].startswith("test_records")
    assert "client_id" not in hello and "round" not in hello
    assert events[1]["source"] == {"role": "client", "client_id": 3}
    assert client["client_id"] == 3 and client["round"] == 2 and client["level"] == "warning"
    assert failed["level"] == "error" and failed["exception"].startswith("Traceback (most recent call last)")
    assert failed["exception"].rstrip().endswith("ValueError: bad value")
    assert "truncated" not in failed and "dropped" not in failed
    assert forwarder.stats["forwarded"] == 3


def test_rate_limit_drops_counts_and_reports_what_it_dropped_and_spares_errors(relay, make_emitter):
    em = make_emitter(relay.url, run_id="logs-rate")
    forwarder = forward_logs(em, rate=0.01, burst=5)  # no refill within the test: exact counts
    for i in range(60):
        log.info("chatter %d", i)
    log.error("still reported")  # its own bucket; it carries the count dropped so far
    for i in range(20):
        log.info("more chatter %d", i)
    forwarder.remove()  # reports the 20 dropped since the last forwarded record
    flushed(em)

    events = log_events(relay, "logs-rate")
    assert [e["data"]["message"] for e in events[:5]] == [f"chatter {i}" for i in range(5)]
    assert events[5]["data"]["message"] == "still reported" and events[5]["data"]["dropped"] == 55
    summary = events[6]["data"]
    assert summary["logger"] == "fedrelay.logs" and summary["dropped"] == 20 and "20" in summary["message"]
    assert len(events) == 7 and forwarder.stats["dropped"] == 75


def test_size_caps_keep_the_head_of_a_message_and_the_tail_of_a_traceback(relay, make_emitter):
    em = make_emitter(relay.url, run_id="logs-size")
    forwarder = forward_logs(em, max_message=100, max_exception=300)

    def deep(n: int) -> None:
        if n == 0:
            raise RuntimeError("the real cause")
        deep(n - 1)

    log.warning("A" * 5000)
    try:
        deep(40)
    except RuntimeError:
        log.exception("deep failure")
    forwarder.remove()
    flushed(em)

    message, traceback_ = (e["data"] for e in log_events(relay, "logs-size"))
    assert message["message"] == "A" * 100 + "… [4900 more characters]"
    assert message["truncated"] == {"message": 5000}
    exception = traceback_["exception"]
    assert exception.startswith("[") and " characters cut] …" in exception
    assert exception.endswith("RuntimeError: the real cause") and len(exception) < 340
    assert traceback_["truncated"]["exception"] > 300
    assert forwarder.stats["truncated"] == 2


def test_a_megabyte_message_is_stored_capped(relay, make_emitter):
    em = make_emitter(relay.url, run_id="logs-huge")
    forwarder = forward_logs(em)
    log.warning("é" * 1_000_000)
    forwarder.remove()
    flushed(em)
    (event,) = log_events(relay, "logs-huge")
    assert event["data"]["truncated"] == {"message": 1_000_000}
    assert len(event["data"]["message"]) < 8300


quiet = logging.getLogger("test.logs.quiet")


class Loud:
    """A log argument that logs while it is formatted, i.e. while the forwarder handles it."""

    def __str__(self) -> str:
        quiet.warning("logged from inside the handler")
        return "loud"


def test_never_forwards_its_own_logs_websockets_logs_or_what_is_logged_while_it_runs(relay, make_emitter):
    em = make_emitter(relay.url, run_id="logs-quiet")
    quiet.propagate = False  # only the forwarder formats its records (pytest's handlers would too)
    try:
        forwarder = forward_logs(em, loggers=["", quiet])
        em.emit("no_such_type", {})  # the emitter logs a warning about it (logger fedrelay.emitter)
        logging.getLogger("fedrelay.relay").error("the relay's own")
        logging.getLogger("websockets.client").warning("websockets noise")
        quiet.warning("value: %s", Loud())
        quiet.warning("last")
        forwarder.remove()
    finally:
        quiet.propagate = True
    flushed(em)

    assert [e["data"]["message"] for e in log_events(relay, "logs-quiet")] == ["value: loud", "last"]
    assert quiet.handlers == []


def test_the_one_line_changes_nothing_the_program_printed(relay, tmp_path):
    """With no logging configured, Python prints warnings to stderr (``lastResort``); a handler on
    the root logger would silence that. The forwarder keeps it, and removing it puts things back."""
    script = textwrap.dedent(
        f"""
        import logging
        from fedrelay.emitters import Emitter, forward_logs
        em = Emitter({relay.url!r}, run_id="logs-print", spool_dir={str(tmp_path / "spool")!r})
        forwarder = forward_logs(em)
        logging.getLogger("app").warning("printed while forwarding")
        forwarder.remove()
        logging.getLogger("app").warning("printed after removal")
        assert em.flush(10)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "printed while forwarding\n" in out.stderr and "printed after removal\n" in out.stderr
    wait_until(lambda: log_events(relay, "logs-print"), 10, what="the forwarded record")
    assert [e["data"]["message"] for e in log_events(relay, "logs-print")] == ["printed while forwarding"]


def test_the_integrations_refuse_a_level_that_does_not_exist():
    from flwr.serverapp.strategy import FedAvg

    from fedrelay.emitters.flower import client_mod, instrument

    assert client_mod(forward_logs="warning").forward_logs == "warning"
    for make in (lambda: client_mod(forward_logs="loud"), lambda: instrument(FedAvg(), forward_logs="loud")):
        with pytest.raises(ValueError, match="unknown logging level 'loud'"):
            make()
