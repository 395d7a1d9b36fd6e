"""Frame parsing and validation: what is refused, and how it is explained."""

from __future__ import annotations

import json

import pytest

from fedrelay.schemas.compat import repair_values, root_event, root_run_name, root_view
from fedrelay.schemas.wire import Refused, parse_frame, parse_json, split_frame, validate_event


def refused(fn, *args) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", '{"x": [1, NaN]}'])
def test_non_finite_numbers_are_refused(text):
    assert refused(parse_json, text).code == "non_finite"


def test_huge_integers_and_deep_nesting_are_refused_cleanly():
    assert refused(parse_json, "9" * 5000).code == "bad_json"
    assert refused(parse_json, "[" * 100_000 + "]" * 100_000).code == "bad_json"


def test_binary_frames_are_refused():
    assert refused(parse_json, b'{"type": "status"}').code == "binary_frame"


def test_split_frame_limits():
    assert split_frame({"a": 1}, 10) == [{"a": 1}]
    assert refused(split_frame, [], 10).code == "bad_frame"
    assert refused(split_frame, [{}] * 11, 10).code == "too_many_events"
    assert refused(split_frame, 42, 10).code == "bad_frame"


def ok_event(**overrides):
    base = {"type": "round_end", "run_id": "r", "data": {"round": 2, "fit_metrics": {"loss": 0.1}}}
    base.update(overrides)
    return base


def test_valid_event_keeps_extra_metrics_exactly():
    raw = ok_event(data={"round": 2, "custom": {"deep": [1, "x"]}, "f1": 0.5})
    assert validate_event(raw) is raw


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        ([1], "not_object", "object"),
        ({"run_id": "r", "data": {}}, "missing_type", "type"),
        (ok_event(type="nope"), "unknown_type", "unknown event type"),
        (ok_event(run_id="has space"), "bad_run_id", "run_id"),
        (ok_event(run_id="abc\n"), "bad_run_id", "run_id"),
        (ok_event(run_id="x" * 129), "bad_run_id", "run_id"),
        (ok_event(data={"round": "2"}), "invalid_event", "round"),
        (ok_event(data={"fit_metrics": {"loss": 1}}), "invalid_event", "round"),
        (ok_event(data={"round": 1, "fit_metrics": {"loss": "high"}}), "invalid_event", "fit_metrics"),
        (ok_event(timestamp="yesterday"), "invalid_event", "ISO-8601"),
        (ok_event(id=0), "invalid_event", "id"),
        (ok_event(extra_top_level=1), "invalid_event", "extra_top_level"),
        (ok_event(source={"role": "boss"}), "invalid_event", "role"),
    ],
)
def test_invalid_events_say_what_is_wrong(raw, code, words):
    exc = refused(validate_event, raw)
    assert exc.code == code
    assert words in exc.detail


def test_root_frames_keep_any_type_and_data_as_sent():
    event, named = root_event({"type": "my_thing", "timestamp": "t", "data": {"x": 1}, "other": 2})
    assert event == {"type": "my_thing", "via": "root", "timestamp": "t", "data": {"x": 1}}
    assert named is None
    assert root_event({"type": "round_start", "data": {"round": "x", "run_id": 7}})[1] == "7"
    assert root_event({"type": "x", "data": [1]})[0]["data"] == [1]
    assert root_event({"type": "x", "timestamp": 5})[0] == {"type": "x", "via": "root", "sent_timestamp": 5}
    assert refused(root_event, [1]).code == "not_object"
    assert refused(root_event, {"type": 3}).code == "missing_type"


def test_root_run_ids_are_stringified_and_invalid_ones_mapped_deterministically():
    assert root_run_name(42) == "42" and root_run_name("run-1") == "run-1" and root_run_name(1.5) == "1.5"
    assert root_run_name(None) is None and root_run_name("") is None
    odd = root_run_name("my run/1")
    assert odd == root_run_name("my run/1") and odd.startswith("my_run_1-") and len(odd) == 9 + 16
    assert root_run_name("my run_1") != odd  # the hash keeps different ids apart
    long = root_run_name("a" * 500)
    assert len(long) == 128 and long != root_run_name("a" * 501)


def test_root_frames_get_non_finite_numbers_as_null_and_lone_surrogates_replaced():
    frame = '{"type": "x", "data": {"a": NaN, "b": [Infinity, -Infinity, 1e400], "k\\udc00": "v\\ud800"}}'
    raw, suspect = parse_frame(frame)
    assert suspect
    repaired = {"a": None, "b": [None, None, None], "k\ufffd": "v\ufffd"}
    assert repair_values(raw) == {"type": "x", "data": repaired}
    assert repair_values(parse_frame("NaN")[0]) is None


def test_root_view_gives_root_events_back_as_sent_and_published_ones_as_before():
    stored = {"type": "x", "via": "root", "run_id": "r", "seq": 3, "timestamp": "now", "sent_timestamp": None,
              "data": {"a": 1}, "producer": "anon-1"}  # fmt: skip
    assert root_view(stored) == {"type": "x", "timestamp": None, "data": {"a": 1}, "run_id": "r", "seq": 3}
    published = {"type": "status", "run_id": "r", "seq": 4, "timestamp": "t", "data": {"message": "m"}}
    as_before = {"message": "m", "run_id": "r", "seq": 4}
    assert root_view(published) == {"type": "status", "timestamp": "t", "data": as_before}


def test_every_event_type_has_a_schema_that_accepts_a_minimal_payload():
    from fedrelay.schemas.events import EVENT_TYPES

    minimal = {
        "round_start": {"round": 1},
        "client_progress": {"round": 1, "client_id": "c"},
        "client_complete": {"round": 1, "client_id": 3},
        "round_end": {"round": 1},
        "epoch_start": {"epoch": 0},
        "epoch_end": {"epoch": 0},
        "error": {"message": "boom"},
        "log": {"level": "warning", "message": "careful"},
    }
    for kind in EVENT_TYPES:
        raw = {"type": kind, "run_id": "r", "data": minimal.get(kind, {})}
        assert validate_event(json.loads(json.dumps(raw))) == raw
