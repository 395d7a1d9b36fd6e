"""Frame parsing and validation: what is refused, and how it is explained."""

from __future__ import annotations

import json

import pytest

from fedrelay.schemas.wire import Refused, legacy_to_event, parse_json, split_frame, validate_event


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


def test_legacy_frames_pass_unknown_types_but_check_known_ones():
    event = legacy_to_event({"type": "my_thing", "timestamp": "t", "data": {"x": 1}})
    assert event == {"type": "my_thing", "run_id": "default", "data": {"x": 1}, "timestamp": "t"}
    assert legacy_to_event({"type": "status", "data": {"run_id": 7}})["run_id"] == "7"
    assert refused(legacy_to_event, {"type": "round_start", "data": {"round": "x"}}).code == "invalid_event"
    assert refused(legacy_to_event, {"type": "x", "data": []}).code == "bad_data"


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
