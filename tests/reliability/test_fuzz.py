"""Fuzzing a real relay: hostile frames, queries and paths never crash it or cost a valid stream an event.

One relay process serves the module. All along, a steady producer publishes numbered events
to run ``steady`` and a subscriber follows them (:class:`SteadyStream`, on a thread and event
loop of its own, so the fuzz cannot pause it). After every test, whatever the order, the relay
is healthy, holds the fds, threads and connections it held before the fuzz, and the steady
stream still flows; once the module's last test has run, the ``env`` fixture checks that every
steady event arrived exactly once, in seq order, unchanged (so no test depends on running last).

Each hypothesis example opens a connection, sends its hostile input, then a *sentinel* (a valid
event, stored after anything the input got stored) and a *marker* (a frame whose reply is
unique), and reads every reply up to the marker's. So each example sees all the relay said
about its input and nothing of the next one, and checks that every frame (every event of an
array) had exactly one documented outcome: an error frame with a known code and a short
detail, a documented close code, or storage, read back over HTTP and compared field by field.

``FEDRELAY_RELIABILITY_SCALE`` multiplies the examples; ``FEDRELAY_FUZZ_SEED`` picks the seed
(recorded with the figures) so that a failure replays; hypothesis also prints a reproduce blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import math
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from fedrelay.schemas.compat import root_run_name
from fedrelay.schemas.events import EVENT_TYPES, RUN_ID_RE
from tests.reliability.report import record, scale
from tests.support.metrics import scrape
from tests.support.relay_process import RelayProcess
from tests.support.sockets import send_handshake
from tests.support.stored import stored_events
from tests.support.waiting import until, wait_until

MAX_FRAME = 64 * 1024
"""--max-frame-bytes: small, so that too_large and 1009 cost little to reach."""
HARD_LIMIT = 4 * MAX_FRAME
"""Past this a frame closes the connection (1009)."""
MAX_EVENTS = 50
KNOWN = "fz-known"
"""A run with KNOWN_LEN events and no more: subscriptions to it have an exact expected backlog."""
KNOWN_LEN = 6
STEADY = "steady"
STEADY_PRODUCER = "steady-producer"
STEADY_PACE = 0.02
"""Seconds between the steady producer's frames (1-4 events each)."""
SEED = int(os.environ.get("FEDRELAY_FUZZ_SEED", "20261128"))
SCALE = scale()
TIMEOUT = 20.0
"""Generous: the machine is shared with other test runs."""
MAX_DETAIL = 1000
"""An error detail longer than this is not a clear sentence but an echo of the input."""
FD_SLACK = 4
THREAD_SLACK = 2
NO_KEEPALIVE: dict[str, Any] = {"ping_interval": None}
"""Client keepalive pings draw from the global ``random`` while hypothesis generates data."""

PUBLISH_CODES = frozenset(
    {
        "bad_json", "binary_frame", "bad_frame", "too_many_events", "too_large", "not_object",
        "missing_type", "unknown_type", "bad_run_id", "invalid_event", "non_finite", "bad_unicode",
    }
)  # fmt: skip
SUBSCRIBE_CODES = frozenset(
    {
        "bad_json", "binary_frame", "bad_frame", "bad_op", "bad_run_id", "bad_since",
        "too_many_runs", "too_large", "non_finite", "bad_unicode",
    }
)  # fmt: skip
ROOT_CODES = frozenset({"bad_json", "binary_frame", "not_object", "missing_type", "too_large"})
"""All the root path still refuses: what no browser could read back, or too much of it."""


def fuzz(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings for one property: ``examples`` at scale 1, a fixed seed, no database."""
    chosen = settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )

    def apply(fn: Callable[..., None]) -> Callable[..., None]:
        return seed(SEED)(chosen(fn))

    return apply


# -- JSON with hostile values ------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text sent exactly as written, and what the relay must make of an event holding it.

    ``must``: the event is refused with this code; ``may``: it may be (else it is stored);
    ``whole``: the refusal is for the whole frame, which could not be parsed.
    """

    text: str
    must: str | None = None
    may: str | None = None
    whole: bool = False

    def __repr__(self) -> str:  # 10_000 brackets would drown a failure report
        more = f"...({len(self.text)} chars)" if len(self.text) > 40 else ""
        return f"Raw({self.text[:40]!r}{more}, must={self.must}, may={self.may})"


HOSTILE_NUMBERS: tuple[Raw, ...] = (
    Raw("NaN", must="non_finite"),
    Raw("Infinity", must="non_finite"),
    Raw("-Infinity", must="non_finite"),
    Raw("1e400", must="non_finite"),
    Raw("-2.5e999", must="non_finite"),
    Raw(str(10**400), must="non_finite"),
    Raw("-" + str(10**400), must="non_finite"),
)
HOSTILE: tuple[Raw, ...] = (
    *HOSTILE_NUMBERS,
    Raw('"\\ud800"', must="bad_unicode"),
    Raw('"lone \\udfff low"', must="bad_unicode"),
    Raw('"\\ude00\\ud83d"', must="bad_unicode"),  # a surrogate pair in the wrong order
    Raw('"\\ud83d"', must="bad_unicode"),
    Raw("[" * 10_000 + "]" * 10_000, must="bad_json", whole=True),
    Raw('{"a":' * 10_000 + "1" + "}" * 10_000, must="bad_json", whole=True),
    Raw("9" * 5_000, must="bad_json", whole=True),  # past int()'s digit limit: not even a number
)
EDGE: tuple[Raw, ...] = (  # accepted, and stored as the same values
    Raw(str(10**300)),
    Raw("-" + str(2**64)),
    Raw("1.7976931348623157e308"),
    Raw("5e-324"),
    Raw("-0.0"),
    Raw("1e15"),
    Raw("1E+2"),
    Raw('"\\ud83d\\ude00"'),  # an escaped pair: one emoji
    Raw('"\\u0000"'),
    Raw('"\\u200f\\u202e\\u2066"'),
    Raw('"\\uFEFF\\uFFFF"'),
    Raw("[" * 100 + "]" * 100),
    Raw('{"a":' * 100 + "null" + "}" * 100),
)
UNICODE_EDGE: tuple[str, ...] = (
    "",
    "\x00",
    "nul\x00inside",
    "\u200f\u05e9\u05dc\u05d5\u05dd",  # RTL mark and Hebrew
    "\u202eevil",
    "\U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\U0010ffff",
    "\ufeff",
    "e\u0301",
    "\u2028\u2029",
    "\x7f\x1b[31m",
    '\\"',
    "</script>",
)


def dump(value: Any, ascii_only: bool = True) -> str:
    """JSON text for ``value``, with :class:`Raw` parts written as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        keys = (k if isinstance(k, Raw) else str(k) for k in value)
        items = (
            f"{dump(k, ascii_only)}:{dump(v, ascii_only)}" for k, v in zip(keys, value.values(), strict=True)
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False)


def raws_in(value: Any) -> Iterator[Raw]:
    if isinstance(value, Raw):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from raws_in(k)
            yield from raws_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from raws_in(v)


def utf8_len(message: str | bytes) -> int:
    return len(message.encode()) if isinstance(message, str) else len(message)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(UNICODE_EDGE),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
BIG_TEXT = st.builds(
    lambda n, ch: ch * n,
    st.sampled_from([1_000, 10_000, 30_000]),
    st.sampled_from(["x", "\u00e9", "\u65e5", "\U0001f600"]),
)


def deepish(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth, may="bad_json", whole=True)


DEEPISH = st.integers(650, 1100).map(deepish)
"""Around the decoder's depth limit: parsed and stored whole, or refused whole."""
BAD_RUN_IDS = st.one_of(
    st.text(max_size=140).filter(lambda s: RUN_ID_RE.fullmatch(s) is None),
    st.sampled_from(["", "a" * 129, "has space", "a/b", "steady\n", "\u00e9t\u00e9", "run\x00", "*"]),
)
EXTRA_KEYS = st.one_of(
    st.text(max_size=12).map(lambda k: "x_" + k),
    st.sampled_from([500, 5_000, 20_000]).map(lambda n: "x_" + "k" * n),
)


def hostile_placed(draw: st.DrawFn, raw: Raw) -> Any:
    """A hostile value alone, buried in containers, or under a key that is a lone surrogate."""
    lone_key = Raw('"k\\udbff"', must="bad_unicode")
    return draw(st.sampled_from([raw, [1, raw], {"deep": [{"er": raw}]}, [[[raw]]], {lone_key: raw}]))


def extra_value(draw: st.DrawFn) -> Any:
    """A value for a field the schema does not know: kept as sent, unless hostile."""
    pick = draw(
        st.sampled_from(["json"] * 6 + ["edge"] * 2 + ["unicode"] * 2 + ["big", "hostile", "deepish"])
    )
    if pick == "json":
        return draw(JSON)
    if pick == "edge":
        return draw(st.sampled_from(EDGE))
    if pick == "unicode":
        return draw(st.sampled_from(UNICODE_EDGE))
    if pick == "big":
        return draw(BIG_TEXT)
    if pick == "deepish":
        return draw(DEEPISH)
    return hostile_placed(draw, draw(st.sampled_from(HOSTILE)))


# -- events and what the relay owes them -------------------------------------------

BASE_DATA: dict[str, dict[str, Any]] = {
    "training_start": {"experiment_name": "fz", "training_mode": "federated", "num_rounds": 3},
    "round_start": {"round": 1, "total_rounds": 3, "participating_clients": ["c1", 2]},
    "client_progress": {"round": 1, "client_id": "c1", "local_epoch": 0, "metrics": {"loss": 0.5}},
    "client_complete": {"round": 1, "client_id": 7, "num_examples": 10, "metrics": {"acc": None}},
    "round_end": {"round": 2, "fit_metrics": {"loss": 0.25}, "duration": 1.5},
    "epoch_start": {"epoch": 0, "phase": "train"},
    "epoch_end": {"epoch": 0, "metrics": {"val_loss": 1}},
    "early_stopping": {"epoch": 3, "metric_name": "loss", "patience": 2},
    "training_end": {"status": "completed", "best_round": 2},
    "status": {"message": "hi", "level": "info"},
    "error": {"message": "boom", "round": 1},
    "log": {"level": "warning", "message": "careful", "logger": "app", "client_id": 3, "round": 1},
}
assert set(BASE_DATA) == EVENT_TYPES, "a new event type needs a base payload here"
KINDS = sorted(EVENT_TYPES)
REQUIRED: dict[str, tuple[str, ...]] = {
    "round_start": ("round",),
    "client_progress": ("round", "client_id"),
    "client_complete": ("round", "client_id"),
    "round_end": ("round",),
    "epoch_start": ("epoch",),
    "epoch_end": ("epoch",),
    "error": ("message",),
    "log": ("level", "message"),
}
FIELD_KIND = {
    "experiment_name": "text", "training_mode": "mode", "num_rounds": "count", "round": "count",
    "total_rounds": "count", "participating_clients": "clients", "client_id": "client",
    "local_epoch": "count",
    "metrics": "metrics", "num_examples": "count", "fit_metrics": "metrics", "duration": "number",
    "epoch": "count", "phase": "text", "metric_name": "text", "patience": "count", "status": "status",
    "best_round": "count", "message": "text", "level": "text",
}  # fmt: skip
WRONG: dict[str, list[Any]] = {  # values each kind of known field must refuse
    "count": ["3", -1, 1.5, True, [1], {"n": 1}],
    "text": [5, 1.5, True, ["a"], {"a": "b"}],
    "client": [1.5, True, ["c"], {"c": 1}],
    "metrics": ["low", [1.0], {"loss": "low"}, {"loss": [1]}, {"loss": True}],
    "mode": ["Federated", "", 1],
    "status": ["done", "", 3],
    "number": ["1", True, [1]],
    "clients": ["c1", [1.5], -1],
}
ENVELOPE_KEYS = {"type", "run_id", "timestamp", "source", "id", "data", "seq", "producer"}


@dataclass
class EventCase:
    """One element of a producer frame, and what the relay must make of it."""

    value: Any
    must: frozenset[str] = frozenset()
    """Refused, with one of these codes."""
    may: frozenset[str] = frozenset()
    """May be refused with one of these codes; else stored."""
    whole_must: frozenset[str] = frozenset()
    """Refuses the whole frame (it cannot be parsed)."""
    whole_may: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls, value: Any, must: set[str] | frozenset[str] = frozenset(), may: set[str] = frozenset()
    ) -> EventCase:
        raws = list(raws_in(value))
        return cls(
            value,
            frozenset(must) | {r.must for r in raws if r.must and not r.whole},
            frozenset(may) | {r.may for r in raws if r.may and not r.whole},
            frozenset(r.must for r in raws if r.must and r.whole),
            frozenset(r.may for r in raws if r.may and r.whole),
        )

    @property
    def int_id(self) -> int | None:
        """The id an error about this event must carry (an integer id, valid or not)."""
        raw = self.value.get("id") if isinstance(self.value, dict) else None
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else None

    def __repr__(self) -> str:
        text = dump(self.value)
        short = text[:300] + ("..." if len(text) > 300 else "")
        return f"EventCase({short}, must={set(self.must)}, may={set(self.may)})"


@st.composite
def events(draw: st.DrawFn, run: str) -> EventCase:
    """A valid event of any type with at most one variant per field group, so none undoes another."""
    kind = draw(st.sampled_from(KINDS))
    ev: dict[str, Any] = {"type": kind, "run_id": run, "data": copy.deepcopy(BASE_DATA[kind])}
    must: set[str] = set()
    may: set[str] = set()
    type_variant = draw(
        st.sampled_from(["keep"] * 16 + ["not_text", "drop", "unknown", "other_known", "hostile"])
    )
    if type_variant == "not_text":
        ev["type"] = draw(st.sampled_from([3, None, [], {}, True, 1.5]))
        must.add("missing_type")
    elif type_variant == "drop":
        del ev["type"]
        must.add("missing_type")
    elif type_variant == "unknown":
        ev["type"] = draw(st.text(max_size=80).filter(lambda s: s not in EVENT_TYPES) | st.just("t" * 500))
        must.add("unknown_type")
    elif type_variant == "other_known":
        ev["type"] = draw(st.sampled_from([k for k in KINDS if k != kind]))
        may.add("invalid_event")
    elif type_variant == "hostile":
        ev["type"] = Raw('"\\ud800status"', must="bad_unicode")
    # A data mutation is surely invalid only under the type whose schema it breaks.
    strict = must.add if type_variant == "keep" else may.add

    run_variant = draw(st.sampled_from(["keep"] * 16 + ["invalid", "drop", "not_text"]))
    if run_variant == "invalid":
        ev["run_id"] = draw(BAD_RUN_IDS)
    elif run_variant == "drop":
        del ev["run_id"]
    elif run_variant == "not_text":
        ev["run_id"] = draw(st.sampled_from([42, None, ["r"], {"r": 1}, True, 1.5]))
    if run_variant != "keep":
        must.add("bad_run_id")

    id_variant = draw(st.sampled_from(["absent"] * 5 + ["valid"] * 5 + ["null", "invalid", "hostile"]))
    if id_variant == "valid":
        ev["id"] = draw(st.integers(1, 2**63 - 1) | st.sampled_from([1, 2, 3, 2**63 - 1]))
    elif id_variant == "null":
        ev["id"] = None
    elif id_variant == "invalid":
        ev["id"] = draw(
            st.sampled_from([0, -1, -(2**63), 2**63, 10**30, True, False, 1.0, 7.5, "7", [7], {"i": 7}])
        )
        must.add("invalid_event")
    elif id_variant == "hostile":
        ev["id"] = draw(st.sampled_from(HOSTILE_NUMBERS))

    ts_variant = draw(st.sampled_from(["absent"] * 6 + ["valid"] * 2 + ["null", "invalid"]))
    if ts_variant == "valid":
        ev["timestamp"] = draw(
            st.sampled_from(
                [
                    "2026-11-28T05:40:00+00:00",
                    "2026-11-28",
                    "2026-11-28T05:40:00.123456Z",
                    "2026-11-28T05:40:00-07:30",
                    "2026-11-28 05:40",
                ]
            )
        )
    elif ts_variant == "null":
        ev["timestamp"] = None
    elif ts_variant == "invalid":
        ev["timestamp"] = draw(
            st.sampled_from(["yesterday", "", "2026-13-45", "28/11/2026", 5, True, [], {}])
        )
        must.add("invalid_event")

    source_variant = draw(st.sampled_from(["absent"] * 8 + ["valid"] * 2 + ["invalid"]))
    if source_variant == "valid":
        ev["source"] = draw(
            st.sampled_from(
                [
                    {"role": "server"},
                    {"role": "client", "client_id": 3},
                    {"role": "trainer", "client_id": None},
                    {"role": "client", "client_id": "c\u00e9"},
                ]
            )
        )
    elif source_variant == "invalid":
        ev["source"] = draw(
            st.sampled_from(
                [
                    "server",
                    {"role": "boss"},
                    {"role": "client", "extra": 1},
                    {"client_id": "c"},
                    {"role": "client", "client_id": 1.5},
                ]
            )
        )
        must.add("invalid_event")

    envelope = draw(st.sampled_from(["none"] * 14 + ["extra", "seq", "bad_seq", "producer", "bad_producer"]))
    if envelope == "extra":
        ev[draw(EXTRA_KEYS.filter(lambda k: k not in ENVELOPE_KEYS))] = draw(JSON)
        must.add("invalid_event")
    elif envelope == "seq":
        ev["seq"] = draw(st.integers(1, 2**40))  # the relay's own seq replaces it
    elif envelope == "bad_seq":
        ev["seq"] = draw(st.sampled_from([0, -5, "3", 1.5, True]))
        must.add("invalid_event")
    elif envelope == "producer":
        ev["producer"] = draw(st.text(max_size=20))  # the relay's own name replaces it
    elif envelope == "bad_producer":
        ev["producer"] = draw(st.sampled_from([5, [], {}, True]))
        must.add("invalid_event")

    data = ev["data"]
    data_variant = draw(
        st.sampled_from(["keep"] * 14 + ["not_dict", "drop", "drop_required", "wrong_field", "random_field"])
    )
    if data_variant == "not_dict":
        ev["data"] = draw(st.sampled_from([[], "data", 3, None, True, [{"round": 1}]]))
        must.add("invalid_event")
    elif data_variant == "drop":
        del ev["data"]
        must.add("invalid_event")
    elif data_variant == "drop_required" and REQUIRED.get(kind):
        del data[draw(st.sampled_from(REQUIRED[kind]))]
        strict("invalid_event")
    elif data_variant == "wrong_field":
        name = draw(st.sampled_from(sorted(data)))
        data[name] = draw(st.sampled_from(WRONG[FIELD_KIND[name]]))
        strict("invalid_event")
    elif data_variant == "random_field":
        data[draw(st.sampled_from(sorted(data)))] = draw(JSON)
        may.add("invalid_event")
    if isinstance(ev.get("data"), dict):
        for key in draw(st.lists(EXTRA_KEYS, max_size=3, unique=True)):
            ev["data"][key] = extra_value(draw)
        if isinstance(ev["data"].get("metrics"), dict) and draw(st.integers(0, 5)) == 0:
            ev["data"]["metrics"]["loss"] = draw(st.sampled_from(HOSTILE_NUMBERS))
    if len(dump(ev, ascii_only=False).encode()) > MAX_FRAME - 1024 - 600:
        may.add("too_large")  # its stored form (seq, producer, timestamp added) may not fit
    return EventCase.of(ev, must, may)


def non_object(value: Any) -> EventCase:
    return EventCase.of(value, {"not_object"})


NON_OBJECTS = st.one_of(
    st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none(), st.booleans()
)


def good_event(run: str, **data: Any) -> dict[str, Any]:
    return {"type": "status", "run_id": run, "data": {"message": "fine", **data}}


def padded_event(run: str, size: int, ch: str) -> str:
    """A valid event whose UTF-8 text is at least ``size`` bytes (exactly, with ASCII padding)."""
    base = good_event(run, pad="")
    need = size - len(dump(base, ascii_only=False).encode())
    base["data"]["pad"] = ch * max(0, -(-need // len(ch.encode())))
    return dump(base, ascii_only=False)


@dataclass
class FrameCase:
    """A frame for ``/publish``, and what the relay must answer."""

    message: str | bytes
    events: list[EventCase] | None = None
    """None: junk, of which nothing can be stored."""
    is_array: bool = False
    frame_must: str | None = None
    """One error with this code for the whole frame, and nothing stored."""
    frame_may: str | None = None
    close: int | None = None

    def __repr__(self) -> str:
        text = self.message if isinstance(self.message, str) else repr(self.message)
        short = text[:400] + (f"...({len(text)} chars)" if len(text) > 400 else "")
        return (
            f"FrameCase({short!r}, events={self.events}, must={self.frame_must}, "
            f"may={self.frame_may}, close={self.close})"
        )


def finish(case: FrameCase) -> FrameCase:
    """Apply what the relay checks before anything else: size, then parsing."""
    size = utf8_len(case.message)
    if size > HARD_LIMIT:
        case.close, case.frame_must = 1009, None
    elif size > MAX_FRAME:
        case.frame_must = "too_large"
    elif case.events is not None and case.frame_must is None:
        whole_must = set().union(*(e.whole_must for e in case.events))
        whole_may = set().union(*(e.whole_may for e in case.events))
        if whole_must:
            case.frame_must = sorted(whole_must)[0]
        elif whole_may:
            case.frame_may = sorted(whole_may)[0]
    return case


PUBLISH_FORMS = ["one"] * 5 + ["array"] * 5 + [
    "junk_text", "junk_json", "binary", "oversize", "near_limit", "too_many", "empty", "scalar", "wrapped",
]  # fmt: skip


@st.composite
def publish_frames(draw: st.DrawFn, run: str) -> FrameCase:
    form = draw(st.sampled_from(PUBLISH_FORMS))
    ascii_only = draw(st.booleans())
    if form == "one":
        ev = draw(events(run))
        return finish(FrameCase(dump(ev.value, ascii_only), [ev]))
    if form == "array":
        items = draw(
            st.lists(st.one_of(events(run), events(run), NON_OBJECTS.map(non_object)), min_size=1, max_size=8)
        )
        text = "[" + ",".join(dump(e.value, ascii_only) for e in items) + "]"
        return finish(FrameCase(text, items, is_array=True))
    if form == "junk_text":
        return finish(FrameCase(draw(st.text(max_size=300))))
    if form == "junk_json":
        return finish(FrameCase(dump(draw(JSON), ascii_only)))
    if form == "binary":
        payload = draw(st.binary(max_size=300) | st.just(json.dumps(good_event(run)).encode()))
        return finish(FrameCase(payload, frame_must="binary_frame"))
    if form == "oversize":
        size = draw(
            st.sampled_from([MAX_FRAME + 1, MAX_FRAME + 3, MAX_FRAME + 5000, HARD_LIMIT, HARD_LIMIT + 1])
        )
        return finish(FrameCase(padded_event(run, size, draw(st.sampled_from(["x", "\U0001f600"])))))
    if form == "near_limit":
        size = MAX_FRAME - 1024 - draw(st.sampled_from([0, 40, 100, 200, 1000]))
        ev = EventCase.of(json.loads(padded_event(run, size, "x")), may={"too_large"})
        return finish(FrameCase(dump(ev.value, ascii_only=False), [ev]))
    if form == "too_many":
        count = draw(st.integers(MAX_EVENTS + 1, MAX_EVENTS + 5))
        return finish(FrameCase(json.dumps([good_event(run)] * count), frame_must="too_many_events"))
    if form == "empty":
        return finish(FrameCase(draw(st.sampled_from(["[]", "[ ]", " [\n] "])), frame_must="bad_frame"))
    if form == "scalar":
        value = draw(
            st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(), st.none())
        )
        return finish(FrameCase(dump(value, ascii_only), frame_must="bad_frame"))
    ev = draw(events(run))
    text = dump(ev.value, ascii_only)
    wrapper = draw(st.sampled_from(["space", "bom", "trailing", "twice", "comment"]))
    if wrapper == "space":
        return finish(FrameCase(f" \n\t{text}\r\n ", [ev]))
    wrapped = {
        "bom": "\ufeff" + text,
        "trailing": text + " x",
        "twice": text + text,
        "comment": "/*c*/" + text,
    }
    return finish(FrameCase(wrapped[wrapper], frame_must="bad_json"))


# -- channels: one connection, library-made or hand-made ---------------------------


class Closed(Exception):
    """The relay closed the connection; ``code`` is its close code (None: no close frame)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed by the relay: {code} {reason!r}")
        self.code = code


@dataclass(frozen=True)
class Fragmented:
    """One message sent as several frames. Pieces may split a UTF-8 character; ``pings``
    (hand-made connections only) are control frames sent between pieces."""

    pieces: tuple[bytes, ...]
    text: bool
    pings: tuple[bytes | None, ...] = ()


Message = str | bytes | Fragmented


class Channel(Protocol):
    def send(self, message: Message) -> None: ...
    def recv(self) -> str: ...


class LibChannel:
    """A websockets client connection."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    def send(self, message: Message) -> None:
        try:
            if isinstance(message, Fragmented):
                self.conn.send(list(message.pieces), text=message.text)
            else:
                self.conn.send(message)
        except ConnectionClosed as exc:
            raise Closed(exc.rcvd.code if exc.rcvd else None) from None

    def recv(self) -> str:
        try:
            frame = self.conn.recv(TIMEOUT)
        except ConnectionClosed as exc:
            raise Closed(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "") from None
        assert isinstance(frame, str), f"the relay sent a binary frame: {frame[:100]!r}"
        return frame


class RawChannel:
    """A WebSocket client written by hand: it sends what no library would (bad UTF-8, reserved
    bits, pings between fragments) and reads the relay's frames one by one."""

    def __init__(self, port: int, target: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = bytearray()
        self.pongs: list[bytes] = []
        self.pings_sent: list[bytes] = []
        self.frames_sent = 0
        send_handshake(self.sock, port, target)
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise AssertionError(f"the relay closed during the handshake for {target!r}")
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        assert head.split(b" ", 2)[1] == b"101", head.decode(errors="replace")

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return False
        self.buffer += chunk
        return bool(chunk)

    def send_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        masked: bool = True,
        length: int | None = None,
    ) -> None:
        """One frame, as RFC 6455 lays it out; ``length`` may lie about the payload."""
        size = len(payload) if length is None else length
        first = (0x80 if fin else 0) | (rsv << 4) | opcode
        mask_bit = 0x80 if masked else 0
        if size < 126:
            header = bytes((first, mask_bit | size))
        elif size < 1 << 16:
            header = struct.pack("!BBH", first, mask_bit | 126, size)
        else:
            header = struct.pack("!BBQ", first, mask_bit | 127, size)
        if masked:
            key = os.urandom(4)
            mask = (key * (len(payload) // 4 + 1))[: len(payload)]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(
                len(payload), "big"
            )
            header += key
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # its close frame says why
            self.sock.sendall(header + payload)
        self.frames_sent += 1

    def recv_frame(self) -> tuple[int, bytes] | None:
        """The relay's next frame as (opcode, payload); None once it closed TCP."""
        while True:
            buf = self.buffer
            if len(buf) >= 2:
                assert buf[0] & 0x80, "the relay fragmented a frame"
                assert not buf[1] & 0x80, "the relay masked a frame"
                size, offset = buf[1] & 0x7F, 2
                if size == 126 and len(buf) >= 4:
                    size, offset = struct.unpack_from("!H", buf, 2)[0], 4
                elif size == 127 and len(buf) >= 10:
                    size, offset = struct.unpack_from("!Q", buf, 2)[0], 10
                if (size < 126 or offset > 2) and len(buf) >= offset + size:
                    opcode, payload = buf[0] & 0x0F, bytes(buf[offset : offset + size])
                    del buf[: offset + size]
                    return opcode, payload
            if not self._fill():
                return None

    def send(self, message: Message) -> None:
        if isinstance(message, Fragmented):
            last = len(message.pieces) - 1
            for i, piece in enumerate(message.pieces):
                opcode = (1 if message.text else 2) if i == 0 else 0
                self.send_frame(opcode, piece, fin=i == last)
                ping = message.pings[i] if i < len(message.pings) else None
                if ping is not None and i != last:
                    self.send_frame(9, ping)
                    self.pings_sent.append(ping)
        elif isinstance(message, str):
            self.send_frame(1, message.encode())
        else:
            self.send_frame(2, message)

    def recv(self) -> str:
        while True:
            frame = self.recv_frame()
            if frame is None:
                raise Closed(None, "TCP closed without a close frame")
            opcode, payload = frame
            if opcode == 1:
                return payload.decode()
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise Closed(code, payload[2:].decode(errors="replace"))
            if opcode == 9:
                self.send_frame(10, payload)
            elif opcode == 10:
                self.pongs.append(payload)
            else:
                raise AssertionError(f"the relay sent opcode {opcode}")

    def close_code(self) -> int | None:
        """Read up to the relay's close frame: its code."""
        try:
            while True:
                self.recv()
        except Closed as closed:
            return closed.code

    def wait_closed(self) -> None:
        """The relay must also close TCP, not leave the socket open (its fd would leak)."""
        while self.recv_frame() is not None:
            pass

    def finish(self) -> None:
        """Close as a polite client does: close frame, then wait for the relay's side to go (it
        may have closed already; a relay that never closes TCP fails at the socket timeout)."""
        try:
            self.send_frame(8, struct.pack("!H", 1000))
            self.wait_closed()
        finally:
            self.sock.close()


ChannelFactory = Callable[[str], contextlib.AbstractContextManager[Channel]]


# -- the relay, the steady stream, and the tally ----------------------------------


NOTES = (
    "plain",
    "\u200f\u05e2\u05d1\u05e8\u05d9\u05ea\u200f",
    "emoji \U0001f600\U0001f680",
    "nul\x00inside",
    "\u65e5\u672c\u8a9e",
    "e\u0301 combining",
    "\ufeffbom",
    "max \U0010ffff",
    'quote " and \\ backslash',
    "line\u2028separator",
)


def steady_event(i: int) -> dict[str, Any]:
    return {
        "type": "client_progress",
        "run_id": STEADY,
        "id": i,
        "timestamp": f"2026-11-28T05:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}+00:00",
        "source": {"role": "client", "client_id": f"c{i % 7}"},
        "data": {
            "round": i // 10,
            "client_id": f"c{i % 7}",
            "local_epoch": i,
            "metrics": {"loss": 1 / (i + 1), "tiny": i * 1e-300, "big": 1e15 + i},
            "note": NOTES[i % len(NOTES)],
        },
    }


class SteadyStream:
    """A valid stream all module long: numbered events to run ``steady`` from one producer, and
    a subscriber following it, on a thread and event loop of their own so the fuzz cannot pause
    them. Every reply and frame is kept for the last test to check."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.controls: list[dict[str, Any]] = []
        self.producer_replies: list[dict[str, Any]] = []
        self.acked = 0
        self.failure: BaseException | None = None
        self._rng = random.Random(SEED)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-steady-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(TIMEOUT * 2):
            raise TimeoutError("the steady stream did not start")
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        """Stop publishing; returns once everything sent was acked and delivered (or it failed)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(TIMEOUT * 6)
        if self._thread.is_alive():
            raise TimeoutError("the steady stream did not finish")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        producer_url = f"{self.url}/publish?producer={STEADY_PRODUCER}"
        async with async_connect(
            producer_url, compression=None, open_timeout=TIMEOUT, **NO_KEEPALIVE
        ) as producer:
            hello = json.loads(await asyncio.wait_for(producer.recv(), TIMEOUT))
            greeting = (hello["op"], hello["producer"], hello["last_id"])
            assert greeting == ("hello", STEADY_PRODUCER, None), hello
            acks = asyncio.create_task(self._read_replies(producer))
            await self._publish(producer)
            await self._until(lambda: self.acked >= len(self.sent), acks, "the first steady ack")
            sub_url = f"{self.url}/subscribe?run_id={STEADY}&since=0"
            async with async_connect(
                sub_url, compression=None, max_size=None, open_timeout=TIMEOUT, **NO_KEEPALIVE
            ) as sub:
                reader = asyncio.create_task(self._read_events(sub))
                self._ready.set()
                while not self._stop.is_set():
                    await self._publish(producer)
                    with contextlib.suppress(TimeoutError):  # pacing that a stop cuts short
                        await asyncio.wait_for(self._stop.wait(), STEADY_PACE)
                await self._until(lambda: self.acked >= len(self.sent), acks, "every steady event acked")
                await self._until(
                    lambda: len(self.received) >= len(self.sent), reader, "every event delivered"
                )
                # Everything is stored and was written at commit: a duplicate would come before this pong.
                await sub.send(json.dumps({"op": "ping"}))
                await self._until(lambda: {"op": "pong"} in self.controls, reader, "the subscriber's pong")
            acks.cancel()
            await asyncio.gather(acks, reader, return_exceptions=True)

    async def _publish(self, producer: Any) -> None:
        start = len(self.sent) + 1
        batch = [steady_event(i) for i in range(start, start + self._rng.randint(1, 4))]
        self.sent.extend(batch)
        await producer.send(json.dumps(batch, ensure_ascii=start % 2 == 0))

    async def _read_replies(self, producer: Any) -> None:
        async for frame in producer:
            msg = json.loads(frame)
            if msg.get("op") == "ack" and msg.get("producer") == STEADY_PRODUCER:
                self.acked = max(self.acked, msg["upto"])
            else:
                self.producer_replies.append(msg)

    async def _read_events(self, sub: Any) -> None:
        async for frame in sub:
            msg = json.loads(frame)
            if isinstance(msg, dict) and "op" in msg:
                self.controls.append(msg)
            else:
                self.received.extend(msg if isinstance(msg, list) else [msg])

    @staticmethod
    async def _until(predicate: Callable[[], bool], task: asyncio.Task[None], what: str) -> None:
        """Await ``predicate``, failing at once if the connection ``task`` reads has ended."""

        def holds() -> bool:
            if predicate():
                return True
            if task.done():
                raise AssertionError(f"steady stream: connection ended before {what}: {task.exception()!r}")
            return False

        await until(holds, TIMEOUT * 3, what=f"steady stream: {what}")


@dataclass(frozen=True)
class Usage:
    """What the relay process holds: open file descriptors and threads."""

    fds: int
    threads: int


def usage(pid: int) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
    assert threads is not None
    return Usage(len(os.listdir(f"/proc/{pid}/fd")), int(threads.group(1)))


def connection_gauges(relay: RelayProcess) -> dict[str, float]:
    """Open connections per endpoint (the endpoints with none left out)."""
    return {k: v for k, v in scrape(relay).items() if k.startswith("fedrelay_connections{") and v}


@dataclass
class Env:
    """The module's relay, steady stream and counters."""

    relay: RelayProcess
    steady: SteadyStream
    baseline: Usage
    gauges: dict[str, float]
    started: float
    tally: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    serial: Iterator[int] = field(default_factory=itertools.count)
    root_seen: Counter[str] = field(default_factory=Counter)
    """Events already checked of runs other than an example's own (``default``, integer and
    mapped run ids, the previous example's run)."""
    last_root_run: str | None = None
    """The run the last root frame named (each example's sentinel): unnamed frames follow it
    while it is running."""

    def fresh(self, prefix: str) -> str:
        """A new run id of fixed width, so that what hypothesis draws does not depend on the count."""
        return f"{prefix}-{next(self.serial):09d}"

    def next(self) -> int:
        n = next(self.serial)
        if n % 50 == 49:  # an example batch: the relay is still there and healthy
            assert_alive(self)
        return n

    def lib(self, path: str) -> contextlib.AbstractContextManager[Channel]:
        return lib_channel(self.relay.url + path)

    def raw(self, path: str) -> contextlib.AbstractContextManager[Channel]:
        return raw_channel(self.relay.port, path)

    def events_of(self, run: str, since: int = 0) -> list[dict[str, Any]]:
        """The run's stored events after ``since`` (none for a run the relay does not know)."""
        self.tally["http_checks"] += 1
        return stored_events(self.relay, run, since=since)

    def stored_before_sentinel(self, run: str, is_sentinel: Callable[[dict[str, Any]], bool]) -> list[dict]:
        """The run's events up to the sentinel sent after the input: all that input got stored."""

        def sentinel_stored() -> list[dict[str, Any]] | None:
            found = self.events_of(run)
            return found if found and is_sentinel(found[-1]) else None

        found = wait_until(sentinel_stored, TIMEOUT, interval=0.003, what=f"the sentinel of run {run}")
        assert [e["seq"] for e in found] == list(range(1, len(found) + 1)), "seqs not gap-free from 1"
        return found[:-1]


@contextlib.contextmanager
def lib_channel(url: str) -> Iterator[Channel]:
    with connect(
        url, compression=None, max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT, **NO_KEEPALIVE
    ) as conn:
        yield LibChannel(conn)


@contextlib.contextmanager
def raw_channel(port: int, path: str) -> Iterator[Channel]:
    ch = RawChannel(port, path)
    try:
        yield ch
    except BaseException:
        ch.sock.close()  # the example failed already: its error is the one to report
        raise
    ch.finish()


def assert_alive(env: Env) -> None:
    assert env.relay.proc is not None and env.relay.proc.poll() is None, f"relay died: {env.relay.log()}"
    status, body = env.relay.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok", (status, body)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One relay for the module, a run of known length, and the steady stream under way; once the
    module's last test has run (whichever it is), the steady stream must be whole."""
    started = time.monotonic()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # read back events nested ~1000 deep
    relay = RelayProcess(
        tmp_path_factory.mktemp("fuzz") / "relay.db",
        args=["--max-frame-bytes", str(MAX_FRAME), "--max-events-per-frame", str(MAX_EVENTS)],
    ).start()
    steady = SteadyStream(relay.url)
    try:
        with connect(f"{relay.url}/publish?producer=fz-known", compression=None) as conn:
            assert json.loads(conn.recv(TIMEOUT))["op"] == "hello"
            conn.send(json.dumps([{**good_event(KNOWN, n=i), "id": i} for i in range(1, KNOWN_LEN + 1)]))
            assert json.loads(conn.recv(TIMEOUT)) == {"op": "ack", "producer": "fz-known", "upto": KNOWN_LEN}
        steady.start()
        assert relay.get("/api/runs")[0] == 200  # the reader thread and caches are warm before the baseline
        want = {
            'fedrelay_connections{endpoint="publish"}': 1.0,
            'fedrelay_connections{endpoint="subscribe"}': 1.0,
        }
        wait_until(lambda: connection_gauges(relay) == want, TIMEOUT, what="only the steady connections open")
        env = Env(relay, steady, usage(relay.proc.pid), want, started)
        yield env
        check_the_steady_stream(env)
    finally:
        try:
            steady.stop()  # at once if the check above stopped it already
        finally:
            relay.stop()
            sys.setrecursionlimit(limit)


@pytest.fixture(autouse=True)
def relay_survives(env: Env) -> Iterator[None]:
    """Every test starts and ends with the relay alive and healthy; after it, the relay holds
    what it held before the fuzz, and the steady stream still flows."""
    assert_alive(env)
    yield
    assert_alive(env)
    assert_nothing_leaked(env)
    assert_the_steady_stream_flows(env)


# -- checks shared by the properties ----------------------------------------------


def check_error(msg: dict[str, Any], codes: frozenset[str]) -> dict[str, Any]:
    """An error frame is clear: a documented code and a short, readable detail."""
    assert set(msg) <= {"op", "code", "detail", "id", "index", "run_id"}, msg
    assert msg["code"] in codes, msg
    detail = msg["detail"]
    assert isinstance(detail, str) and 0 < len(detail) <= MAX_DETAIL, f"unclear detail: {detail[:2000]!r}"
    return msg


def check_legacy_error(msg: dict[str, Any]) -> dict[str, Any]:
    assert set(msg) == {"type", "data"} and set(msg["data"]) == {"code", "detail"}, msg
    check_error({"op": "error", **msg["data"]}, ROOT_CODES)
    return msg["data"]


def comparable(value: Any, *, drop_timestamp: bool) -> Any:
    """An event without the fields the relay sets, for comparing what was sent with what is stored."""
    out = {k: v for k, v in value.items() if k not in ("seq", "producer")}
    if drop_timestamp:
        out.pop("timestamp", None)
    return out


def read_until(ch: Channel, done: Callable[[Any], bool]) -> list[Any]:
    """Every frame the relay sends before the one ``done`` picks."""
    out: list[Any] = []
    while True:
        msg = json.loads(ch.recv())
        if done(msg):
            return out
        out.append(msg)


def closed_as_expected(env: Env, closed: Closed, expected: int | None, case: Any) -> None:
    assert expected is not None, f"the relay closed the connection ({closed}) for {case!r}"
    assert closed.code == expected, f"closed with {closed.code}, not {expected}, for {case!r}"
    env.closes[closed.code] += 1


# -- /publish ----------------------------------------------------------------------


def as_is(message: str | bytes) -> Message:
    return message


Shape = Callable[[str | bytes], Message]
"""How a test sends a message: whole, or cut into fragments."""


def publish_example(env: Env, run: str, case: FrameCase, open_channel: ChannelFactory, shape: Shape) -> None:
    """Send one fuzzed frame; every event in it is refused with a clear error or stored intact."""
    n = env.next()
    producer = f"{run}-producer"
    marker = f"'fz-marker-{n}'"
    with open_channel(f"/publish?producer={producer}") as ch:
        hello = json.loads(ch.recv())
        assert (hello["op"], hello["producer"], hello["last_id"]) == ("hello", producer, None), hello
        try:
            ch.send(shape(case.message))
            env.tally["publish_frames"] += 1
            ch.send(json.dumps(good_event(run, sentinel=n)))
            ch.send(json.dumps({"type": f"fz-marker-{n}", "run_id": run, "data": {}}))
            replies = read_until(
                ch, lambda m: m.get("code") == "unknown_type" and marker in m.get("detail", "")
            )
        except Closed as closed:
            closed_as_expected(env, closed, case.close, case)
            return
        if isinstance(ch, RawChannel):
            assert ch.pongs == ch.pings_sent, "pings between fragments were not answered"
    assert case.close is None, f"expected close {case.close}, the connection went on: {case!r}"
    for msg in replies:
        assert msg.get("op") in ("error", "ack"), msg
        if msg["op"] == "ack":
            assert msg["producer"] == producer and isinstance(msg["upto"], int) and msg["upto"] >= 1, msg
    errors = [check_error(m, PUBLISH_CODES) for m in replies if m["op"] == "error"]
    env.tally["error_frames"] += len(errors)
    stored = env.stored_before_sentinel(run, lambda e: e["data"].get("sentinel") == n)
    assert all(e["producer"] == producer for e in stored)
    env.tally["events_stored_checked"] += check_publish_outcomes(case, errors, stored)


def check_publish_outcomes(case: FrameCase, errors: list[dict], stored: list[dict]) -> int:
    """Each event got exactly one outcome (error, dropped as a duplicate, or stored as sent)."""
    if case.frame_must is None and case.events is None:  # junk: refused, somehow, nothing stored
        assert errors and not stored, (errors, stored, case)
        return 0
    if case.frame_must is not None or (
        case.frame_may is not None
        and errors
        and errors[0]["code"] == case.frame_may
        and "index" not in errors[0]
    ):
        code = case.frame_must or case.frame_may
        assert [e["code"] for e in errors] == [code], (errors, case)
        assert "id" not in errors[0] and "index" not in errors[0], errors
        assert not stored, (stored, case)
        return 0
    assert case.events is not None
    many = case.is_array and len(case.events) > 1
    by_index: dict[int, dict] = {}
    for error in errors:
        if many:
            assert "index" in error, f"an error about one event of an array names no index: {error}"
        elif not case.is_array:
            assert "index" not in error, error
        index = error.get("index", 0)
        assert 0 <= index < len(case.events) and index not in by_index, (error, errors)
        by_index[index] = error
    expected: list[EventCase] = []
    last_id = 0
    for index, ev in enumerate(case.events):
        error = by_index.get(index)
        if error is not None and error["code"] != "too_large":
            assert ev.must or ev.may, f"a valid event was refused: {error} for {ev!r}"
            assert error["code"] in ev.must | ev.may, f"{error} for {ev!r}"
            assert error.get("id") == ev.int_id, f"the error should carry id {ev.int_id}: {error}"
            continue
        assert not ev.must, f"event {index} should have been refused ({set(ev.must)}): {error} {ev!r}"
        event_id = ev.int_id
        if event_id is not None:
            if event_id <= last_id:  # a duplicate id is dropped, silently
                assert error is None, f"a duplicate got an error: {error}"
                continue
            last_id = event_id
        if error is not None:
            assert "too_large" in ev.may, f"{error} for {ev!r}"
            assert error.get("id") == event_id, error
            continue
        expected.append(ev)
    assert len(stored) == len(expected), (
        f"stored {len(stored)} events, expected {len(expected)}: {stored!r:.2000} for {case!r}"
    )
    for got, ev in zip(stored, expected, strict=True):
        sent = json.loads(dump(ev.value))
        no_ts = sent.get("timestamp") is None
        assert comparable(got, drop_timestamp=no_ts) == comparable(sent, drop_timestamp=no_ts), (got, ev)
        assert isinstance(got["timestamp"], str)
    return len(expected)


@st.composite
def pieces_of(draw: st.DrawFn, message: str | bytes) -> Fragmented:
    """The message cut at arbitrary byte offsets: pieces may split a multibyte character."""
    data = message.encode() if isinstance(message, str) else message
    cuts = (
        sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), min_size=1, max_size=6))) if data else []
    )
    bounds = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
    return Fragmented(tuple(data[a:b] for a, b in itertools.pairwise(bounds)), text=isinstance(message, str))


def test_publish_frames_get_a_clear_error_or_are_stored_intact(env: Env) -> None:
    """Random, mutated and hostile producer frames (some fragmented): one outcome per event."""

    @fuzz(400)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        run_id = env.fresh("fz-p")
        case = data.draw(publish_frames(run_id), label="frame")
        if data.draw(st.integers(0, 4), label="fragment") == 0:  # the library cuts it into frames
            frag = data.draw(pieces_of(case.message), label="pieces")
            env.tally["fragments"] += len(frag.pieces)
            publish_example(env, run_id, case, env.lib, lambda _: frag)
        else:
            publish_example(env, run_id, case, env.lib, as_is)

    run()


@pytest.mark.parametrize("raw", HOSTILE, ids=lambda r: f"{r.text[:12]}-{len(r.text)}")
def test_each_hostile_value_is_refused_alone_and_in_an_array(env: Env, raw: Raw) -> None:
    """Every catalogued hostile value, at least once, whatever the random draws cover."""
    for as_array in (False, True):
        run = env.fresh("fz-h")
        bad = EventCase.of({**good_event(run), "id": 5, "data": {"message": "m", "x": [{"v": raw}]}})
        good = [EventCase.of({**good_event(run), "id": i}) for i in (4, 6)]
        items = [good[0], bad, good[1]] if as_array else [bad]
        text = "[" + ",".join(dump(e.value) for e in items) + "]" if as_array else dump(bad.value)
        publish_example(env, run, finish(FrameCase(text, items, is_array=as_array)), env.lib, as_is)


def test_nesting_near_the_decoder_limit_never_costs_the_connection(env: Env) -> None:
    """Every depth across the decoder's limit, beside a NaN that makes the relay re-encode the
    event: refused whole (bad_json) or stored, never a closed connection. (Before the fix,
    depths just under the limit re-encoded at a deeper stack raised RecursionError: 1011.)"""

    def deep_event(run: str, depth: int) -> EventCase:
        return EventCase.of({**good_event(run), "id": 2, "data": {"message": "m", "x": deepish(depth)}})

    # Every depth around the decoder's limit with and without the headroom: the window where
    # an event decodes but cannot be encoded again is a few levels wide.
    for depth in [*range(650, 740, 30), *range(740, 800), *range(800, 930, 30), *range(930, 1050)]:
        run = env.fresh("fz-d")
        nan = EventCase.of({**good_event(run), "id": 1, "data": {"n": Raw("NaN", must="non_finite")}})
        items = [nan, deep_event(run, depth)]
        text = "[" + ",".join(dump(e.value) for e in items) + "]"
        publish_example(env, run, finish(FrameCase(text, items, is_array=True)), env.lib, as_is)
        alone = deep_event(run := env.fresh("fz-d"), depth)
        publish_example(env, run, finish(FrameCase(dump(alone.value), [alone])), env.lib, as_is)


def test_an_error_about_a_one_event_array_names_its_index(env: Env) -> None:
    run = env.fresh("fz-i")
    with env.lib(f"/publish?producer={run}") as ch:
        ch.recv()
        ch.send(json.dumps([{"type": "bogus", "run_id": run, "data": {}}]))
        error = json.loads(ch.recv())
    assert error["code"] == "unknown_type" and error.get("index") == 0, error


# -- fragments, bad UTF-8 and protocol violations on hand-made connections ---------


def test_fragmented_messages_with_split_characters_and_pings_between(env: Env) -> None:
    """Any message cut anywhere (inside a UTF-8 character too), with pings between the pieces,
    is answered exactly as if it came whole, and every ping gets its pong."""

    @fuzz(200)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        endpoint = data.draw(st.sampled_from(["publish", "root", "subscribe"]), label="endpoint")
        hand_made = data.draw(st.integers(0, 2), label="hand-made") > 0
        opener = env.raw if hand_made else env.lib

        def fragment(message: str | bytes) -> Fragmented:
            frag = data.draw(pieces_of(message), label="pieces")
            if hand_made:
                pings = data.draw(
                    st.lists(
                        st.none() | st.binary(max_size=125),
                        min_size=len(frag.pieces),
                        max_size=len(frag.pieces),
                    ),
                    label="pings",
                )
                frag = Fragmented(frag.pieces, frag.text, tuple(pings))
            env.tally["fragmented_messages"] += 1
            env.tally["fragments"] += len(frag.pieces)
            return frag

        if endpoint == "publish":
            run_id = env.fresh("fz-f")
            publish_example(env, run_id, data.draw(publish_frames(run_id), label="frame"), opener, fragment)
        elif endpoint == "root":
            run_id = env.fresh("fz-rf")
            case = data.draw(root_frames(run_id, int_run(env)), label="frame")
            root_example(env, run_id, case, opener, fragment)
        else:
            cases = data.draw(st.lists(control_frames(), min_size=1, max_size=3), label="frames")
            control_example(env, cases, opener, fragment)

    run()


INVALID_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xaf",  # overlong, three bytes
    b"\xed\xa0\x80",  # a UTF-16 surrogate, encoded
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\x80",  # a continuation byte alone
    b"\xc3\x28",  # a lead byte, then no continuation
    b"\xf0\x9f\x98",  # a truncated emoji
)


def test_invalid_utf8_in_a_text_message_closes_with_1007(env: Env) -> None:
    """Bad UTF-8 anywhere in a text message, whole or in pieces, closes that connection with 1007."""

    @fuzz(100)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        env.next()
        path = data.draw(st.sampled_from(["/publish?producer=fz-utf8", "/subscribe", "/"]), label="path")
        bad = data.draw(
            st.sampled_from(INVALID_UTF8)
            | st.binary(min_size=1, max_size=12).filter(lambda b: not _is_utf8(b)),
            label="bad",
        )
        before = data.draw(st.text(max_size=30), label="before").encode()
        after = data.draw(st.text(max_size=30), label="after").encode()
        payload = b'{"op":"' + before + bad + after + b'"}'
        ch = RawChannel(env.relay.port, path)
        try:
            if data.draw(st.booleans(), label="fragmented"):
                frag = data.draw(pieces_of(payload), label="pieces")
                ch.send(Fragmented(frag.pieces, text=True))
            else:
                ch.send_frame(1, payload)
            env.tally["invalid_utf8_messages"] += 1
            code = ch.close_code()
            assert code == 1007, f"closed with {code}, not 1007, for {payload!r}"
            env.closes[1007] += 1
            ch.wait_closed()
        finally:
            ch.sock.close()

    run()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


# name: (send the violation, the close codes RFC 6455 allows for it)
VIOLATIONS: dict[str, tuple[Callable[[RawChannel, st.DataObject], None], frozenset[int]]] = {
    "reserved_opcode": (
        lambda ch, d: ch.send_frame(d.draw(st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])), b"{}"),
        frozenset({1002}),
    ),
    "reserved_bits": (
        lambda ch, d: ch.send_frame(1, b'{"op":"ping"}', rsv=d.draw(st.integers(1, 7))),
        frozenset({1002}),
    ),
    "unmasked": (lambda ch, d: ch.send_frame(1, b'{"op":"ping"}', masked=False), frozenset({1002})),
    "control_too_long": (
        lambda ch, d: ch.send_frame(9, b"p" * d.draw(st.integers(126, 400))),
        frozenset({1002}),
    ),
    "fragmented_control": (lambda ch, d: ch.send_frame(9, b"p", fin=False), frozenset({1002})),
    "orphan_continuation": (lambda ch, d: ch.send_frame(0, b"{}"), frozenset({1002})),
    "data_inside_fragments": (
        lambda ch, d: (
            ch.send_frame(1, b'{"op"', fin=False),
            ch.send_frame(d.draw(st.sampled_from([1, 2])), b"x"),
        ),
        frozenset({1002}),
    ),
    "close_one_byte": (lambda ch, d: ch.send_frame(8, b"\x03"), frozenset({1002})),
    "close_bad_code": (
        lambda ch, d: ch.send_frame(
            8,
            _close_payload(
                d.draw(st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]))
            ),
        ),
        frozenset({1002}),
    ),
    "close_bad_reason": (
        lambda ch, d: ch.send_frame(8, _close_payload(1000, b"bye \xff\xfe")),
        frozenset({1007}),
    ),
    "declared_too_big": (
        lambda ch, d: ch.send_frame(1, b"", length=HARD_LIMIT + d.draw(st.integers(1, 1 << 30))),
        frozenset({1009}),
    ),
    "length_top_bit": (lambda ch, d: ch.send_frame(1, b"", length=(1 << 63) + 5), frozenset({1002, 1009})),
    "fragments_too_big": (
        lambda ch, d: [
            ch.send_frame(1 if i == 0 else 0, b"x" * (MAX_FRAME - 10), fin=False)
            for i in range(HARD_LIMIT // MAX_FRAME + 1)
        ],
        frozenset({1009}),
    ),
}


def test_protocol_violations_close_with_the_documented_code(env: Env) -> None:
    """Frames RFC 6455 forbids close that one connection with its code; a normal close is echoed."""

    @fuzz(120)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        env.next()
        path = data.draw(st.sampled_from(["/publish?producer=fz-proto", "/subscribe?run_id=fz-known", "/"]))
        name = data.draw(st.sampled_from([*sorted(VIOLATIONS), "normal_close"]), label="violation")
        ch = RawChannel(env.relay.port, path)
        try:
            if name == "normal_close":
                code = data.draw(st.sampled_from([1000, 1001, 3000, 4000, 4999]), label="code")
                ch.send_frame(
                    8, _close_payload(code, data.draw(st.text(max_size=20), label="reason").encode())
                )
                allowed = frozenset({code})
            else:
                send, allowed = VIOLATIONS[name]
                send(ch, data)
            env.tally["protocol_violations"] += 1
            got = ch.close_code()
            assert got in allowed, f"{name} on {path}: closed with {got}, expected one of {set(allowed)}"
            env.closes[got] += 1
            ch.wait_closed()
        finally:
            ch.sock.close()

    run()


# -- /subscribe --------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """One control reply the relay owes a subscriber."""

    op: str
    run_id: str | None = None
    since: int | None = None
    codes: frozenset[str] = frozenset()
    last_seq: int | None = None

    def matches(self, msg: dict[str, Any]) -> bool:
        if self.op == "error":
            return msg.get("op") == "error" and msg.get("code") in self.codes
        if self.op == "subscribed":
            wanted = {
                "op": "subscribed",
                "run_id": self.run_id,
                "since": self.since,
                "last_seq": self.last_seq,
            }
            return msg == wanted
        if self.op == "unsubscribed":
            return msg == {"op": "unsubscribed", "run_id": self.run_id}
        return msg == {"op": self.op}


def error(*codes: str) -> Expect:
    return Expect("error", codes=frozenset(codes))


def join(run_id: str, since: int) -> Expect:
    """What subscribing to ``run_id`` from ``since`` must answer (the only runs with events here
    are KNOWN, the fuzz runs and steady, and the generators never name the last two). A run
    with no event yet is waited for from 0; a since past its last seq is refused."""
    if run_id == "*":
        return Expect("subscribed", "*", None)
    if RUN_ID_RE.fullmatch(run_id) is None:
        return error("bad_run_id")
    last = KNOWN_LEN if run_id == KNOWN else 0
    if since > last:
        return error("bad_since")
    return Expect("subscribed", run_id, since, last_seq=last)


def check_subscriber_replies(replies: list[Any], expects: list[Expect]) -> None:
    """Control replies in order, and right after each subscription to KNOWN its exact backlog."""
    seen: list[tuple[str, Any]] = []
    for msg in replies:
        if isinstance(msg, dict) and "op" in msg:
            if msg["op"] == "error":
                check_error(msg, SUBSCRIBE_CODES)
            seen.append(("control", msg))
        else:  # events; those of other runs come from a wildcard subscription
            seen.extend(
                ("event", e["seq"]) for e in (msg if isinstance(msg, list) else [msg]) if e["run_id"] == KNOWN
            )
    wanted: list[tuple[str, Any]] = []
    for expect in expects:
        wanted.append(("control", expect))
        if expect.op == "subscribed" and expect.run_id == KNOWN:
            assert expect.since is not None
            wanted.extend(("event", seq) for seq in range(expect.since + 1, KNOWN_LEN + 1))
    assert len(seen) == len(wanted), f"got {seen!r:.3000}, expected {wanted!r:.3000}"
    for (kind, got), (want_kind, want) in zip(seen, wanted, strict=True):
        assert kind == want_kind, (seen, wanted)
        assert want.matches(got) if kind == "control" else got == want, f"got {got}, expected {want}"


@dataclass
class ControlCase:
    """A subscriber frame and the reply it must get (None: it closes the connection with ``close``)."""

    message: str | bytes
    expect: Expect | None
    close: int | None = None

    def __repr__(self) -> str:
        text = repr(self.message)
        return (
            f"ControlCase({text[:300]}{'...' if len(text) > 300 else ''}, {self.expect}, close={self.close})"
        )


SINCE_VALUES = st.one_of(
    st.integers(0, KNOWN_LEN),
    st.integers(KNOWN_LEN + 1, 2**70),
    st.integers(-(2**70), -1),
    st.sampled_from(["3", 1.0, 2.5, True, False, None, [1], {"s": 1}]),
)


def control_verdict(op: Any, run_id: Any, since: Any, has_since: bool) -> Expect:
    """What the protocol says a well-formed control object gets (``op`` None: absent)."""
    if not isinstance(op, str):
        return error("bad_frame")
    if op == "ping":
        return Expect("pong")
    if op not in ("subscribe", "unsubscribe"):
        return error("bad_op")
    if not isinstance(run_id, str):
        return error("bad_run_id")
    if op == "unsubscribe":
        return Expect("unsubscribed", run_id)
    if not has_since:
        since = 0
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        return error("bad_since")
    return join(run_id, since)


@st.composite
def control_frames(draw: st.DrawFn) -> ControlCase:
    form = draw(st.sampled_from(["object"] * 8 + ["junk_text", "junk_json", "binary", "oversize", "array"]))
    ascii_only = draw(st.booleans())
    if form == "object":
        msg: dict[str, Any] = {}
        op = draw(
            st.sampled_from(
                ["subscribe"] * 4 + ["unsubscribe"] * 2 + ["ping"] * 2 + ["other", "not_text", "absent"]
            )
        )
        if op == "other":
            op = draw(st.text(max_size=50).filter(lambda s: s not in ("subscribe", "unsubscribe", "ping")))
        elif op == "not_text":
            op = draw(st.sampled_from([1, None, ["ping"], {"op": "ping"}, True]))
        if op != "absent":
            msg["op"] = op
        run_choice = draw(st.sampled_from([KNOWN] * 3 + ["*", "unknown", "invalid", "not_text", "absent"]))
        run_id: Any = {
            "unknown": draw(st.from_regex(r"nx-[A-Za-z0-9._:-]{1,20}", fullmatch=True)),
            "invalid": draw(BAD_RUN_IDS),
            "not_text": draw(st.sampled_from([1, None, ["r"], {"r": 1}, True])),
        }.get(run_choice, run_choice)
        if run_choice != "absent":
            msg["run_id"] = run_id
        has_since = draw(st.booleans())
        since = draw(SINCE_VALUES) if has_since else None
        if has_since:
            msg["since"] = since
        for key in draw(st.lists(EXTRA_KEYS.filter(lambda k: k not in msg), max_size=2, unique=True)):
            msg[key] = draw(JSON)
        expect = control_verdict(msg.get("op"), msg.get("run_id"), since, has_since)
        hostile = draw(st.none() | st.none() | st.sampled_from(HOSTILE))
        if hostile is not None and hostile.must:
            msg["x_hostile"] = placed = hostile_placed(draw, hostile)
            expect = error(*(r.must for r in raws_in(placed) if r.must))
        text = dump(msg, ascii_only)
    elif form == "junk_text":
        text = draw(st.text(max_size=200).filter(lambda t: not _json_with_key(t, "op")))
        expect = error("bad_json", "bad_frame", "non_finite", "bad_unicode")
    elif form == "junk_json":
        text = dump(draw(JSON.filter(lambda v: not (isinstance(v, dict) and "op" in v))), ascii_only)
        expect = error("bad_frame")
    elif form == "array":
        text = json.dumps([{"op": "ping"}] * draw(st.integers(0, 3)))
        expect = error("bad_frame")
    elif form == "binary":
        return ControlCase(draw(st.binary(max_size=100) | st.just(b'{"op":"ping"}')), error("binary_frame"))
    else:
        size = draw(st.sampled_from([MAX_FRAME + 1, MAX_FRAME + 100, HARD_LIMIT + 1]))
        text = json.dumps({"op": "ping", "pad": "x" * size})
        expect = error("too_large")
    if utf8_len(text) > HARD_LIMIT:
        return ControlCase(text, None, close=1009)
    if utf8_len(text) > MAX_FRAME:
        expect = error("too_large")
    return ControlCase(text, expect)


def _json_with_key(text: str, key: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and key in value


def control_example(env: Env, cases: list[ControlCase], open_channel: ChannelFactory, shape: Shape) -> None:
    """Send a few control frames; each gets its reply, in order, and the connection goes on."""
    n = env.next()
    marker = f"'fz-marker-{n}'"
    close_at = next((i for i, c in enumerate(cases) if c.close is not None), None)
    cases = cases if close_at is None else cases[: close_at + 1]  # nothing is read after a close
    with open_channel("/subscribe") as ch:
        try:
            for case in cases:
                ch.send(shape(case.message))
                env.tally["subscriber_frames"] += 1
                if case.close is not None:
                    break
            ch.send(json.dumps({"op": f"fz-marker-{n}"}))
            replies = read_until(ch, lambda m: isinstance(m, dict) and marker in str(m.get("detail", "")))
        except Closed as closed:
            closed_as_expected(env, closed, cases[-1].close if cases else None, cases)
            return
        if isinstance(ch, RawChannel):
            assert ch.pongs == ch.pings_sent, "pings between fragments were not answered"
    assert all(c.close is None for c in cases), f"expected a close for {cases}"
    expects = [c.expect for c in cases if c.expect is not None]
    check_subscriber_replies(replies, expects)
    env.tally["error_frames"] += sum(e.op == "error" for e in expects)


def test_subscriber_control_frames_get_their_reply_and_the_connection_goes_on(env: Env) -> None:
    """subscribe / unsubscribe / ping objects with random fields, and junk, on one connection."""

    @fuzz(300)
    @given(cases=st.lists(control_frames(), min_size=1, max_size=4))
    def run(cases: list[ControlCase]) -> None:
        control_example(env, cases, env.lib, as_is)

    run()


QUERY_KEYS = st.sampled_from(["run_id"] * 4 + ["since"] * 3 + ["run%5Fid", "si%6Ece", "RUN_ID", "token", "x"])
QUERY_VALUES = st.one_of(
    st.just(KNOWN),
    st.just("*"),
    st.integers(0, KNOWN_LEN + 2).map(str),
    st.sampled_from(
        ["", "-1", "1.5", "1e3", "+1", " 1", "0x10", "NaN", "0005", "9" * 18, "9" * 19, "0" * 19 + "1"]
    ),
    st.sampled_from(["\uff11", "\u0663", "%", "%zz", "%ff", "%00", "a b", "\U0001f600"]),
    st.from_regex(r"nx-[A-Za-z0-9._:-]{1,20}", fullmatch=True),
    st.text(max_size=15),
)
RAW_SAFE = re.compile(r"[A-Za-z0-9._~:*-]*")
JUNK_SEGMENTS = st.sampled_from(
    ["", "&", "=", "==", "%", "%zz=1", "since", "run_id", "a=b=c", ";", "run_id=%2A"]
)


@st.composite
def subscribe_queries(draw: st.DrawFn) -> str:
    """A query string of run_id / since pairs, repeated, percent-encoded or not, with junk."""
    segments = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            segments.append(draw(JUNK_SEGMENTS))
            continue
        key, value = draw(QUERY_KEYS), draw(QUERY_VALUES)
        raw = RAW_SAFE.fullmatch(value) is not None and draw(st.booleans())
        segments.append(f"{key}={value if raw else urllib.parse.quote(value, safe='')}")
    return "&".join(segments)


def query_verdict(query: str) -> list[Expect]:
    """What the protocol says a subscribe query gets, decoded as the relay decodes it."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    runs = params.get("run_id", [])
    since_text = params["since"][0] if params.get("since") else None
    since = 0
    if since_text is not None:
        if not (since_text.isascii() and since_text.isdigit() and len(since_text) <= 18):
            return [error("bad_since")]  # ASCII digits, at most 18: then no run is joined
        since = int(since_text)
    return [join(run_id, since) for run_id in runs]


def test_subscribe_query_strings_get_one_answer_per_run(env: Env) -> None:
    """Random ``/subscribe?...`` queries: per named run a subscribed or an error, in order."""

    @fuzz(250)
    @given(query=subscribe_queries())
    def run(query: str) -> None:
        n = env.next()
        marker = f"'fz-marker-{n}'"
        with env.lib(f"/subscribe?{query}") as ch:
            env.tally["subscribe_queries"] += 1
            ch.send(json.dumps({"op": f"fz-marker-{n}"}))
            replies = read_until(ch, lambda m: isinstance(m, dict) and marker in str(m.get("detail", "")))
        expects = query_verdict(query)
        check_subscriber_replies(replies, expects)
        env.tally["error_frames"] += sum(e.op == "error" for e in expects)

    run()


# -- / (compatibility) -------------------------------------------------------------


UNNAMED = "<unnamed>"
"""RootCase.target of a frame that names no run: it follows the host's last named run."""
ABSENT = object()
"""RootCase.data of a frame without ``data``."""


@dataclass
class RootCase:
    """A root-path frame and its outcome: pong, an error, or stored into ``target``."""

    message: str | bytes
    outcome: str
    """"pong", "refused", "stored", "either" (refused with a code in ``codes``, or stored),
    "pong_or_refused"."""
    codes: frozenset[str] = frozenset()
    target: str | None = None
    kind: str | None = None
    data: Any = ABSENT
    timestamp: str | None = None
    close: int | None = None

    def __repr__(self) -> str:
        text = repr(self.message)
        return (
            f"RootCase({text[:400]}{'...' if len(text) > 400 else ''}, {self.outcome}, {set(self.codes)}, "
            f"target={self.target}, close={self.close})"
        )


FLOAT_RUN_ID = 1e-7
"""A float run id on the root path: it names run "1e-07", which no subscribe query of this module
names (they do name "1.5": a root frame with run_id 1.5 gave that run events, and a subscription
to it a backlog the query fuzz did not expect, depending on test order)."""


def int_run(env: Env) -> int:
    """A fresh integer run id: the root path turns it into the run named by its digits."""
    return 10**12 + next(env.serial)  # fixed width: generated data must not depend on the count


_LONE = re.compile("[\ud800-\udfff]")


def as_repaired(value: Any) -> Any:
    """What the root path stores for a value: non-finite numbers (and integers past a double)
    as null, lone surrogates in strings and keys as U+FFFD. In place, without recursion: the
    values nest up to ~1100 deep."""

    def scalar(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > sys.float_info.max:
            return None
        return _LONE.sub("\ufffd", item) if isinstance(item, str) else item

    top = [value]
    stack: list[Any] = [top]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            items = [(scalar(k), v) for k, v in container.items()]
            container.clear()
            container.update(items)
        for key in list(container) if isinstance(container, dict) else range(len(container)):
            item = container[key]
            if isinstance(item, dict | list):
                stack.append(item)
            else:
                container[key] = scalar(item)
    return top[0]


def sent_value(value: Any) -> Any:
    """A value as the relay decodes what ``dump`` wrote, then repairs it."""
    return as_repaired(json.loads(dump(value)))


@st.composite
def root_frames(draw: st.DrawFn, run: str, int_run_id: int) -> RootCase:
    form = draw(st.sampled_from(["legacy"] * 8 + ["junk_text", "junk_json", "binary", "oversize", "array"]))
    ascii_only = draw(st.booleans())
    if form == "junk_text":
        text = draw(st.text(max_size=200).filter(lambda t: not _json_with_key(t, "type")))
        return root_finish(RootCase(text, "refused", ROOT_CODES))
    if form == "junk_json":
        value = draw(JSON.filter(lambda v: not (isinstance(v, dict) and "type" in v)))
        return root_finish(
            RootCase(dump(value, ascii_only), "refused", frozenset({"missing_type", "not_object"}))
        )
    if form == "binary":
        return root_finish(RootCase(draw(st.binary(max_size=100)), "refused", frozenset({"binary_frame"})))
    if form == "oversize":
        size = draw(st.sampled_from([MAX_FRAME + 1, MAX_FRAME + 50, HARD_LIMIT + 1]))
        return root_finish(RootCase(json.dumps({"type": "x", "data": {"pad": "x" * size}}), "refused"))
    if form == "array":
        frames = [{"type": "ping"}, {"type": "custom", "data": {"run_id": run}}][: draw(st.integers(0, 2))]
        return root_finish(RootCase(json.dumps(frames), "refused", frozenset({"not_object"})))
    must: set[str] = set()
    may: set[str] = set()
    kind_variant = draw(
        st.sampled_from(["known"] * 3 + ["custom"] * 3 + ["not_text", "empty", "long", "hostile", "ping"])
    )
    kind: Any
    data: Any = {}
    if kind_variant == "known":
        kind = draw(st.sampled_from(KINDS))
        data = copy.deepcopy(BASE_DATA[kind])
    elif kind_variant == "custom":
        kind = draw(st.text(min_size=1, max_size=64).filter(lambda s: s != "ping" and s not in EVENT_TYPES))
        data = draw(st.dictionaries(st.text(max_size=8).map(lambda k: "x_" + k), JSON, max_size=4))
    elif kind_variant == "not_text":
        kind = draw(st.sampled_from([3, None, [], {}, True]))
        must.add("missing_type")
    elif kind_variant == "empty":
        kind = ""  # a string: accepted, as any other
    elif kind_variant == "long":
        kind = "t" * draw(st.integers(65, 300))
    elif kind_variant == "hostile":
        kind = Raw('"\\udc00"')  # a lone surrogate: stored as U+FFFD
    else:
        kind = "ping"
    frame: dict[str, Any] = {"type": kind}
    target: str | None = UNNAMED
    data_variant = draw(st.sampled_from(["dict"] * 6 + ["absent", "not_dict", "null"]))
    if data_variant == "dict":
        run_variant = draw(st.sampled_from(["run"] * 5 + ["absent", "int", "invalid", "not_text", "null"]))
        if run_variant == "run":
            data["run_id"], target = run, run
        elif run_variant == "int":
            number = int_run_id if draw(st.booleans()) else -int_run_id
            data["run_id"], target = number, str(number)
        elif run_variant in ("invalid", "not_text"):
            value = (
                draw(BAD_RUN_IDS)
                if run_variant == "invalid"
                else draw(st.sampled_from([FLOAT_RUN_ID, [], {}, True]))
            )
            data["run_id"] = value
            target = root_run_name(value) or UNNAMED  # "" names no run
        elif run_variant == "null":
            data["run_id"] = None
        if kind_variant == "known" and draw(st.integers(0, 3)) == 0:
            name = draw(st.sampled_from(sorted(BASE_DATA[kind])))
            # a value fedrelay's schema refuses on /publish: kept as sent here
            data[name] = draw(st.sampled_from(WRONG[FIELD_KIND[name]]) | JSON)
        for key in draw(st.lists(EXTRA_KEYS.filter(lambda k: k not in data), max_size=3, unique=True)):
            data[key] = extra_value(draw)
        frame["data"] = data
    elif data_variant in ("not_dict", "null"):
        frame["data"] = (
            draw(st.sampled_from([[], "d", 3, True, [1, {"run_id": run}]]))
            if data_variant == "not_dict"
            else None
        )
    timestamp = None
    ts_variant = draw(st.sampled_from(["absent"] * 2 + ["text", "other"]))
    if ts_variant == "text":  # kept as sent, even when it is no date: the root path passes it on
        frame["timestamp"] = timestamp = draw(st.text(max_size=30) | st.just("2026-11-28T05:40:00Z"))
    elif ts_variant == "other":
        frame["timestamp"] = draw(st.sampled_from([5, None, [], {"t": 1}]))
    if draw(st.integers(0, 3)) == 0:
        frame[draw(st.text(max_size=8).map(lambda k: "x_" + k))] = draw(JSON)  # ignored
    text = dump(frame, ascii_only)
    raws = list(raws_in(frame))
    whole = {r.must for r in raws if r.must and r.whole}  # the frame cannot be parsed at all
    deep = {r.may for r in raws if r.may}  # the whole frame may be refused before anything else
    if whole:
        return root_finish(RootCase(text, "refused", frozenset(whole | deep)))
    if kind == "ping":
        return root_finish(RootCase(text, "pong_or_refused" if deep else "pong", frozenset(deep)))
    if must:
        return root_finish(RootCase(text, "refused", frozenset(must | may | deep)))
    if len(dump(frame, ascii_only=False).encode()) > MAX_FRAME - 1024 - 600:
        may.add("too_large")
    outcome = "either" if may or deep else "stored"
    stored_data = sent_value(frame["data"]) if "data" in frame else ABSENT
    return root_finish(
        RootCase(text, outcome, frozenset(may | deep), target, sent_value(kind), stored_data, timestamp)
    )


def root_finish(case: RootCase) -> RootCase:
    size = utf8_len(case.message)
    if size > HARD_LIMIT:
        case.close = 1009
    elif size > MAX_FRAME:
        case.outcome, case.codes = "refused", frozenset({"too_large"})
    return case


def unnamed_target(env: Env) -> str:
    """Where a frame that names no run goes: the run the last root frame named, while it runs."""
    if env.last_root_run is None:
        return "default"
    status, body = env.relay.get(f"/api/runs/{env.last_root_run}")
    running = status == 200 and json.loads(body)["status"] in ("running", "stalled")
    return env.last_root_run if running else "default"


def root_example(env: Env, run: str, case: RootCase, open_channel: ChannelFactory, shape: Shape) -> None:
    """Send one fuzzed root frame: it is answered (pong or a legacy error) or stored as sent."""
    n = env.next()
    newlines = 1000 + n % 30_000
    marker = f"line {newlines + 1} column 1"  # the bad_json detail of "\n" * newlines + "x"
    target = unnamed_target(env) if case.target == UNNAMED else case.target
    with open_channel("/") as ch:
        try:
            ch.send(shape(case.message))
            env.tally["root_frames"] += 1
            ch.send(json.dumps({"type": "fz_sentinel", "data": {"run_id": run, "n": n}}))
            ch.send("\n" * newlines + "x")
            errors: list[dict] = []
            pongs = 0
            while True:
                msg = json.loads(ch.recv())
                if msg == {"type": "pong"}:
                    pongs += 1
                elif isinstance(msg, dict) and set(msg) == {"type", "data"} and msg["type"] == "error":
                    if marker in msg["data"].get("detail", ""):
                        break
                    errors.append(check_legacy_error(msg))
                else:  # a live event from another connection: a /publish one, in the legacy shape
                    assert set(msg) == {"type", "timestamp", "data"} and "seq" in msg["data"], msg
        except Closed as closed:
            closed_as_expected(env, closed, case.close, case)
            return
        if isinstance(ch, RawChannel):
            assert ch.pongs == ch.pings_sent, "pings between fragments were not answered"
    assert case.close is None, f"expected close {case.close}: {case!r}"
    env.tally["error_frames"] += len(errors)
    stored_here = env.stored_before_sentinel(run, lambda e: e["type"] == "fz_sentinel")
    env.root_seen[run] = len(stored_here) + 1
    env.last_root_run = run
    elsewhere: list[dict] = []
    if target not in (None, run):
        elsewhere = env.events_of(target, env.root_seen[target])
        env.root_seen[target] += len(elsewhere)
    stored = stored_here + elsewhere
    if case.outcome == "pong" or (case.outcome == "pong_or_refused" and pongs):
        assert pongs == 1 and not errors and not stored, (pongs, errors, stored, case)
        return
    assert pongs == 0, f"a pong for a frame that is no ping: {case!r}"
    if case.outcome in ("refused", "pong_or_refused") or (case.outcome == "either" and errors):
        assert len(errors) == 1 and not stored, (errors, stored, case)
        if case.codes:
            assert errors[0]["code"] in case.codes, (errors, case)
        return
    assert not errors, f"a valid root frame was refused: {errors} {case!r}"
    assert len(stored) == 1, f"stored {stored!r:.2000} for {case!r} (expected in {target})"
    got = stored[0]
    assert (got["type"], got["run_id"], got["via"]) == (case.kind, target, "root"), (got, case)
    assert got.get("data", ABSENT) == case.data, (got, case)
    if case.timestamp is not None:
        assert got["timestamp"] == case.timestamp, (got, case)
    env.tally["events_stored_checked"] += 1


def test_root_frames_are_answered_or_stored_as_sent(env: Env) -> None:
    """Legacy ``{type, timestamp, data}`` frames, pings and junk on ``/``."""

    @fuzz(300)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        run_id = env.fresh("fz-r")
        case = data.draw(root_frames(run_id, int_run(env)), label="frame")
        root_example(env, run_id, case, env.lib, as_is)

    run()


# -- HTTP --------------------------------------------------------------------------


def http_get(port: int, target: bytes, head: bytes | None = None) -> tuple[int, dict[str, str], bytes] | None:
    """One request written by hand, any target or bytes; None if the relay closed without answering."""
    request = (
        head if head is not None else b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
    )
    data = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                data += chunk
    if not data:
        return None
    head_part, sep, body = bytes(data).partition(b"\r\n\r\n")
    assert sep, f"an incomplete response: {bytes(data[:300])!r}"
    lines = head_part.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    return int(lines[0].split(" ", 2)[1]), headers, body


PATH_ALPHABET = st.characters(codec="ascii", categories=["L", "N", "P", "S"], exclude_characters="?# ")
HTTP_RUN_IDS = st.one_of(
    st.just(KNOWN),
    st.just(KNOWN),
    st.just(STEADY),
    st.from_regex(r"nx-[A-Za-z0-9._:-]{1,20}", fullmatch=True),
    st.sampled_from(
        ["", "..", "%2e%2e", "%00", "%ff", "a%20b", "a" * 129, "fz-known%0A", "*", "%F0%9F%98%80"]
    ),
    st.text(PATH_ALPHABET, max_size=20).filter(lambda s: "/" not in s),
)
HTTP_PATHS = st.one_of(
    st.sampled_from(
        [
            "/healthz", "/metrics", "/api/runs", "/", "/api", "/api/", "/api/runs/", "//healthz", "/healthz/",
            "/HEALTHZ", "*", "/static/", "/static/index.html", "/static/../../../etc/passwd",
            "/static/%2e%2e/x",
            "/static/vendor", "/static/vendor/", "/publish", "/subscribe", "http://127.0.0.1/healthz",
        ]
    ),
    HTTP_RUN_IDS.map(lambda r: f"/api/runs/{r}"),
    HTTP_RUN_IDS.map(lambda r: f"/api/runs/{r}/events"),
    HTTP_RUN_IDS.map(lambda r: f"/api/runs/{r}/events"),
    HTTP_RUN_IDS.map(lambda r: f"/api/runs/{r}/events/more"),
    st.text(PATH_ALPHABET, max_size=60).map(lambda s: "/static/" + s),
    st.integers(250, 5000).map(lambda n: "/static/" + "a" * n),
    st.text(PATH_ALPHABET, max_size=40).map(lambda s: "/" + s),
    st.sampled_from(["\x00", "a\x00b", "\t", "\x7f", "\x1b"]).map(lambda c: "/static/" + c),
)  # fmt: skip
HTTP_VALUES = st.one_of(
    st.integers(0, 20).map(str),
    st.integers(0, 10**18).map(str),
    st.integers(-5, -1).map(str),
    st.sampled_from(
        [
            "",
            "1.5",
            "1e3",
            "+1",
            " 1",
            "0x10",
            "NaN",
            "Infinity",
            "9" * 19,
            "9" * 400,
            "\u0663",
            "\uff11",
            "1_000",
            "running",
            "completed,running",
            " stalled , failed",
            "federated",
            "centralized",
            KNOWN[:5],
        ]
    ),
    st.sampled_from(["%", "%zz", "%00", "%ff", "0" * 20 + "3", "10000", "10001"]),
    st.text(max_size=10),
)


@st.composite
def http_targets(draw: st.DrawFn) -> str:
    path = draw(HTTP_PATHS)
    segments = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 4)) == 0:
            segments.append(draw(JUNK_SEGMENTS))
            continue
        key = draw(st.sampled_from([*["since", "limit"] * 2, "token", "run_id", "x", *RUNS_LISTING_KEYS]))
        value = draw(HTTP_VALUES)
        raw = RAW_SAFE.fullmatch(value) is not None and draw(st.booleans())
        segments.append(f"{key}={value if raw else urllib.parse.quote(value, safe='')}")
    query = ("?" + "&".join(segments)) if segments or draw(st.booleans()) else ""
    fragment = "#" + draw(st.text(PATH_ALPHABET, max_size=10)) if draw(st.integers(0, 9)) == 0 else ""
    return path + query + fragment


def whole(text: str | None, default: int) -> int | None:
    """A count in a query: ASCII digits only, at most 18 of them (the relay's bound)."""
    if text is None:
        return default
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def check_http(target: str, status: int, headers: dict[str, str], body: bytes) -> None:
    """Never a 5xx; a 4xx says why, in JSON on the API; routes answer what the protocol says."""
    assert status < 500, f"{status} for {target!r}: {body[:300]!r}"
    assert int(headers["content-length"]) == len(body), headers
    ctype = headers.get("content-type", "")
    payload: Any = None
    if ctype == "application/json":
        payload = json.loads(body)
        if status >= 400:
            assert set(payload) == {"error", "detail"} and all(
                isinstance(v, str) for v in payload.values()
            ), payload
    elif status >= 400:  # the handshake gate's and the library's own answers are text
        assert ctype.startswith("text/plain") and body.strip(), (status, headers, body[:300])
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        assert status in (200, 400, 404), (status, target)  # a gate may refuse control characters
        return
    url = urllib.parse.urlsplit(target)
    path = url.path
    params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    if path == "/healthz":
        assert status == 200 and payload["status"] == "ok", (status, payload)
    elif path == "/metrics":
        assert status == 200 and b"fedrelay_connections" in body
    elif path == "/api/runs":
        check_runs_listing(params, status, payload)
    elif path.startswith("/api/"):
        check_api(path, params, status, payload)
    elif path == "/":
        assert status == 200 and ctype.startswith("text/html")
    elif path.startswith("/static/"):
        assert status in (200, 404), (status, target)
    else:
        assert status == 404, (status, target)


RUNS_LISTING_KEYS = ("cursor", "status", "mode", "q", "updated_since")
LISTED_STATUSES = {"running", "stalled", "completed", "failed", "stopped"}


def check_runs_listing(params: dict[str, list[str]], status: int, payload: Any) -> None:
    """``/api/runs`` as protocol.md words it: a page newest first, 400 for a value it refuses."""

    def first(key: str) -> str | None:
        values = params.get(key)
        return values[0] if values else None

    limit = first("limit")
    bad = limit is not None and (whole(limit, 0) is None or not 0 < len(limit) <= 9 or int(limit) < 1)
    if (statuses := first("status")) is not None:
        named = {part.strip() for part in statuses.split(",") if part.strip()}
        bad = bad or not named or not named <= LISTED_STATUSES
    bad = bad or first("mode") not in (None, "federated", "centralized")
    bad = bad or len(first("q") or "") > 200
    if (since := first("updated_since")) is not None:
        try:
            bad = bad or not math.isfinite(float(since))
        except ValueError:
            bad = True
    if "cursor" in params:  # a random string is almost never a cursor this relay handed out
        assert status in (200, 400), (status, params, payload)
        return
    if bad:
        assert status == 400, (status, params, payload)
        return
    assert status == 200 and set(payload) == {"runs", "next_cursor"}, (status, params, payload)
    assert len(payload["runs"]) <= min(int(limit) if limit else 100, 1000), params
    if not any(key in params for key in RUNS_LISTING_KEYS):
        listed = [r["run_id"] for r in payload["runs"]]
        assert KNOWN in listed or payload["next_cursor"] is not None, (params, payload)


def check_api(path: str, params: dict[str, list[str]], status: int, payload: Any) -> None:
    parts = path.split("/")[2:]
    if not (parts[:1] == ["runs"] and (len(parts) == 2 or (len(parts) == 3 and parts[2] == "events"))):
        assert status == 404, (status, path)
        return
    run_id = parts[1]
    if RUN_ID_RE.fullmatch(run_id) is None:
        assert status == 400, (status, path)
        return
    if run_id not in (KNOWN, STEADY):
        assert status == 404, (status, path)
        return
    if len(parts) == 2:
        assert status == 200 and payload["run_id"] == run_id, (status, payload)
        if run_id == KNOWN:
            assert payload["last_seq"] == KNOWN_LEN, payload
        return
    since = whole(params["since"][0] if params.get("since") else None, 0)
    limit = whole(params["limit"][0] if params.get("limit") else None, 1000)
    if since is None or limit is None or limit < 1:
        assert status == 400, (status, path, params)
        return
    assert status == 200, (status, path, params, payload)
    seqs = [e["seq"] for e in payload["events"]]
    assert seqs == list(range(since + 1, since + 1 + len(seqs))) and len(seqs) <= min(limit, 10_000)
    assert payload["next_since"] == (seqs[-1] if seqs else since), payload
    if run_id == KNOWN:
        assert seqs == list(range(since + 1, min(KNOWN_LEN, since + min(limit, 10_000)) + 1)), (seqs, params)


def test_http_paths_and_queries_never_get_a_5xx_or_a_dropped_connection(env: Env) -> None:
    """Random targets on /api/runs/{id}[/events], /healthz, /metrics, /static and elsewhere."""

    @fuzz(500)
    @given(target=http_targets())
    def run(target: str) -> None:
        env.next()
        answer = http_get(env.relay.port, target.encode())
        env.tally["http_requests"] += 1
        assert answer is not None, f"the relay closed the connection without answering {target!r}"
        check_http(target, *answer)

    run()


MALFORMED_PARTS = st.sampled_from(
    [
        b"GET /healthz?\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /\xc3\xa9t\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-J: \xff\xfe\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 10_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # a TLS hello
    ]
)


def test_malformed_http_requests_are_refused_without_a_5xx(env: Env) -> None:
    """Requests the HTTP parser refuses (or reads leniently): an answer below 500, or (the websockets
    library's choice for some of them) a closed connection; never a 5xx, and the relay goes on."""

    @fuzz(60)
    @given(request=MALFORMED_PARTS | st.binary(min_size=1, max_size=200).map(lambda b: b + b"\r\n\r\n"))
    def run(request: bytes) -> None:
        env.next()
        answer = http_get(env.relay.port, b"", head=request)
        env.tally["http_malformed"] += 1
        if answer is None:
            env.tally["http_malformed_closed_unanswered"] += 1
            return
        status, _, body = answer
        assert status < 500, (status, request[:100], body[:200])  # lenient parsing may answer 200

    run()


# -- after every test, and at the end: no leak, and the steady stream whole ------------


def assert_nothing_leaked(env: Env) -> None:
    """Once a test's connections are closed, the relay holds what it held before the fuzz."""
    pid = env.relay.proc.pid if env.relay.proc else 0
    base = env.baseline

    def settled() -> Usage | None:
        now = usage(pid)
        if now.fds > base.fds + FD_SLACK or now.threads > base.threads + THREAD_SLACK:
            return None
        return now if connection_gauges(env.relay) == env.gauges else None

    try:
        now = wait_until(settled, TIMEOUT * 1.5, interval=0.05, what="fds, threads and connections to settle")
    except TimeoutError:
        now = usage(pid)
        pytest.fail(
            f"leak: {now} now, {base} before the fuzz; gauges {connection_gauges(env.relay)} vs {env.gauges}"
        )
    env.tally["fds_before"], env.tally["fds_after"] = base.fds, now.fds
    env.tally["threads_before"], env.tally["threads_after"] = base.threads, now.threads


def assert_the_steady_stream_flows(env: Env) -> None:
    """The steady stream delivers new events after this test's fuzz: it overlapped the test."""
    steady = env.steady
    assert steady.failure is None, repr(steady.failure)
    seen = len(steady.received)
    wait_until(lambda: len(steady.received) > seen, TIMEOUT, what="the steady stream to deliver again")


def check_the_steady_stream(env: Env) -> None:
    """All through the fuzz, run ``steady`` lost nothing, duplicated nothing, reordered nothing."""
    steady = env.steady
    steady.stop()
    sent, got = steady.sent, steady.received
    ids = [e.get("id") for e in got]
    lost = len(set(range(1, len(sent) + 1)) - set(ids))
    duplicated = len(ids) - len(set(ids))
    seqs = [e.get("seq") for e in got]
    out_of_order = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
    mismatched = sum(
        1
        for e in got
        if not (isinstance(e.get("id"), int) and 1 <= e["id"] <= len(sent))
        or comparable(e, drop_timestamp=False) != sent[e["id"] - 1]
        or e.get("producer") != STEADY_PRODUCER
    )
    stored = stored_events(env.relay, STEADY)
    stored_mismatched = len(stored) != len(sent) or any(
        comparable(e, drop_timestamp=False) != s or e["seq"] != s["id"]
        for e, s in zip(stored, sent, strict=False)
    )
    tally = env.tally
    ws_frames = sum(
        tally[k]
        for k in (
            "publish_frames",
            "root_frames",
            "subscriber_frames",
            "invalid_utf8_messages",
            "protocol_violations",
        )
    )
    figures: dict[str, Any] = dict(sorted(tally.items()))
    figures.update(
        seed=SEED,
        scale=SCALE,
        frames=ws_frames,
        http_requests=tally["http_requests"] + tally["http_malformed"],
        steady_events=len(sent),
        steady_received=len(got),
        lost=lost,
        duplicated=duplicated,
        out_of_order=out_of_order,
        mismatched=mismatched + int(stored_mismatched),
        closes={str(k): v for k, v in sorted(env.closes.items())},
        wall_s=round(time.monotonic() - env.started, 1),
    )
    record("fuzz", **figures)
    assert steady.failure is None, repr(steady.failure)
    assert steady.producer_replies == [], steady.producer_replies[:5]
    assert (lost, duplicated, out_of_order, mismatched) == (0, 0, 0, 0)
    assert seqs == list(range(1, len(sent) + 1))
    assert [c["op"] for c in steady.controls] == ["subscribed", "pong"], steady.controls
    assert not stored_mismatched, "the store does not hold exactly what was sent"
