"""The wire contract: events, control frames, validation. No I/O."""

from .compat import root_event, root_run_name, root_view
from .control import (
    Ack,
    ErrorFrame,
    Gap,
    Hello,
    Ping,
    Pong,
    RelayControl,
    Subscribe,
    Subscribed,
    SubscriberControl,
    Unsubscribe,
    Unsubscribed,
)
from .events import EVENT_TYPES, RUN_ID_PATTERN, RUN_ID_RE, Event, EventBase, Source
from .wire import (
    Refused,
    encode,
    parse_json,
    split_frame,
    validate_event,
)

__all__ = [
    "EVENT_TYPES",
    "RUN_ID_PATTERN",
    "RUN_ID_RE",
    "Ack",
    "ErrorFrame",
    "Event",
    "EventBase",
    "Gap",
    "Hello",
    "Ping",
    "Pong",
    "Refused",
    "RelayControl",
    "Source",
    "Subscribe",
    "Subscribed",
    "SubscriberControl",
    "Unsubscribe",
    "Unsubscribed",
    "encode",
    "parse_json",
    "root_event",
    "root_run_name",
    "root_view",
    "split_frame",
    "validate_event",
]
