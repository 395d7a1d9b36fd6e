"""Per-process behaviour: import weight, child processes, fork, pickling."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import subprocess
import sys
import textwrap

import pytest

from fedrelay.emitters import get_emitter, shared
from tests.support.stored import stored_events


@pytest.fixture
def shared_emitters():
    yield
    for emitter in list(shared._shared.values()):
        emitter.close(timeout=1)
    shared._shared.clear()


def test_import_pulls_in_neither_the_relay_nor_torch_nor_the_pydantic_models():
    code = textwrap.dedent(
        """
        import json, sys
        import fedrelay.emitters
        heavy = ("fedrelay.relay", "aiosqlite", "uvloop", "prometheus_client", "torch", "platformdirs",
                 "pydantic", "fedrelay.schemas")  # a process per Flower message pays every import
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(heavy))))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_get_emitter_in_a_child_process_flushes_at_exit(relay):
    code = textwrap.dedent(
        f"""
        from fedrelay.emitters import get_emitter
        em = get_emitter({relay.url!r}, run_id="child", role="client", client_id="c7")
        assert get_emitter({relay.url!r}) is em
        for i in range(200):
            em.emit("client_progress", {{"round": 1, "client_id": "c7", "local_epoch": i}})
        # no flush, no close: the atexit hook delivers
        """
    )
    subprocess.run([sys.executable, "-c", code], timeout=60, check=True)
    events = stored_events(relay, "child")
    assert [e["data"]["local_epoch"] for e in events] == list(range(200))
    assert events[0]["source"] == {"role": "client", "client_id": "c7"}


def _forked_child(url: str, inherited, parent_producer: str, results) -> None:
    fresh = get_emitter(url, run_id="fork")
    ok = fresh is not inherited and fresh.producer != parent_producer
    ok = ok and inherited.producer != parent_producer  # the inherited object restarts under a new name
    for i in range(20):
        fresh.emit("status", {"message": "child-shared", "i": i})
        inherited.emit("status", {"message": "child-inherited", "i": i})
    results.put(ok and fresh.close(10) and inherited.close(10))


def test_forked_child_gets_a_fresh_sender_and_name(relay, shared_emitters):
    parent = get_emitter(relay.url, run_id="fork")
    for i in range(20):
        parent.emit("status", {"message": "parent", "i": i})
    assert parent.flush(10)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(relay.url, parent, parent.producer, results))
    child.start()
    assert results.get(timeout=30) is True
    child.join(10)
    for i in range(20, 40):
        parent.emit("status", {"message": "parent", "i": i})
    assert parent.flush(10)
    events = stored_events(relay, "fork")
    by_kind: dict[str, list[int]] = {}
    for event in events:
        by_kind.setdefault(event["data"]["message"], []).append(event["data"]["i"])
    assert by_kind == {
        "parent": list(range(40)),
        "child-shared": list(range(20)),
        "child-inherited": list(range(20)),
    }
    assert len({e["producer"] for e in events}) == 3
    assert sorted(e["seq"] for e in events) == list(range(1, 81))


def test_pickled_emitter_becomes_the_shared_one(relay, shared_emitters):
    em = get_emitter(relay.url, run_id="pickled")
    clone = pickle.loads(pickle.dumps(em))
    assert clone is em
