"""The event contract: envelope and typed payloads, one model per event type.

Validation is strict on the fields each type knows (a round is an int, not
the string "3") and permissive on the rest of ``data``: trainers log
arbitrary metrics, and the relay keeps them as sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from ..names import EVENT_TYPES as EVENT_TYPES  # declared without pydantic, for emitters
from ..names import RUN_ID_PATTERN as RUN_ID_PATTERN
from ..names import RUN_ID_RE as RUN_ID_RE

Number = StrictInt | StrictFloat
MetricValue = Number | None
Metrics = dict[StrictStr, MetricValue]
Round = Annotated[StrictInt, Field(ge=0)]
Count = Annotated[StrictInt, Field(ge=0)]


def _iso_timestamp(value: str) -> str:
    """Keep the producer's text, but only if it parses as ISO-8601."""
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("timestamp must be an ISO-8601 date-time") from None
    return value


Timestamp = Annotated[StrictStr, AfterValidator(_iso_timestamp)]
RunId = Annotated[StrictStr, Field(pattern=RUN_ID_PATTERN)]


class Payload(BaseModel):
    """Base of every ``data`` model: known fields typed, extra fields kept."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class TrainingStart(Payload):
    experiment_name: StrictStr | None = None
    training_mode: Literal["federated", "centralized"] | None = None
    num_rounds: Count | None = None
    num_clients: Count | None = None
    local_epochs: Count | None = None
    max_epochs: Count | None = None
    config: dict[StrictStr, Any] | None = None


class RoundStart(Payload):
    round: Round
    total_rounds: Count | None = None
    participating_clients: list[StrictStr | StrictInt] | Count | None = None


class ClientProgress(Payload):
    round: Round
    client_id: StrictStr | StrictInt
    local_epoch: Count | None = None
    metrics: Metrics | None = None


class ClientComplete(Payload):
    round: Round
    client_id: StrictStr | StrictInt
    num_examples: Count | None = None
    metrics: Metrics | None = None


class RoundEnd(Payload):
    round: Round
    total_rounds: Count | None = None
    fit_metrics: Metrics | None = None
    eval_metrics: Metrics | None = None
    server_metrics: Metrics | None = None
    duration: Number | None = None


class EpochStart(Payload):
    epoch: Count
    phase: StrictStr | None = None


class EpochEnd(Payload):
    epoch: Count
    phase: StrictStr | None = None
    metrics: Metrics | None = None


class EarlyStopping(Payload):
    epoch: Count | None = None
    metric_name: StrictStr | None = None
    best_metric_value: Number | None = None
    patience: Count | None = None
    reason: StrictStr | None = None


class TrainingEnd(Payload):
    status: Literal["completed", "failed", "stopped"] = "completed"
    best_round: Count | None = None
    best_epoch: Count | None = None
    best_metric_name: StrictStr | None = None
    best_metric_value: Number | None = None
    training_duration: Number | None = None


class Status(Payload):
    message: StrictStr | None = None
    level: StrictStr | None = None


class Error(Payload):
    message: StrictStr
    detail: StrictStr | None = None
    client_id: StrictStr | StrictInt | None = None
    round: Round | None = None


class Log(Payload):
    """One Python ``logging`` record forwarded from a training process.

    ``message`` and ``exception`` may have been cut to a size cap: ``truncated`` then maps each
    cut field to its original length in characters. ``dropped`` counts the records the
    producer's rate limit dropped since its previous ``log`` event.
    """

    level: StrictStr
    message: StrictStr
    levelno: Count | None = None
    logger: StrictStr | None = None
    exception: StrictStr | None = None
    client_id: StrictStr | StrictInt | None = None
    round: Round | None = None
    epoch: Count | None = None
    file: StrictStr | None = None
    line: Count | None = None
    function: StrictStr | None = None
    process: Count | None = None
    dropped: Count | None = None
    truncated: dict[StrictStr, Count] | None = None


class Source(BaseModel):
    """Who produced an event: the Flower server, a client, or a trainer."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["server", "client", "trainer"]
    client_id: StrictStr | StrictInt | None = None


class EventBase(BaseModel):
    """Fields every event shares; the relay adds ``seq`` and ``producer``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    run_id: RunId
    timestamp: Timestamp | None = None
    source: Source | None = None
    id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)] | None = None
    # Set by the relay on what it stores and sends; a producer's values
    # are overwritten.
    seq: Annotated[StrictInt, Field(ge=1)] | None = None
    producer: StrictStr | None = None


class TrainingStartEvent(EventBase):
    type: Literal["training_start"]
    data: TrainingStart


class RoundStartEvent(EventBase):
    type: Literal["round_start"]
    data: RoundStart


class ClientProgressEvent(EventBase):
    type: Literal["client_progress"]
    data: ClientProgress


class ClientCompleteEvent(EventBase):
    type: Literal["client_complete"]
    data: ClientComplete


class RoundEndEvent(EventBase):
    type: Literal["round_end"]
    data: RoundEnd


class EpochStartEvent(EventBase):
    type: Literal["epoch_start"]
    data: EpochStart


class EpochEndEvent(EventBase):
    type: Literal["epoch_end"]
    data: EpochEnd


class EarlyStoppingEvent(EventBase):
    type: Literal["early_stopping"]
    data: EarlyStopping


class TrainingEndEvent(EventBase):
    type: Literal["training_end"]
    data: TrainingEnd


class StatusEvent(EventBase):
    type: Literal["status"]
    data: Status


class ErrorEvent(EventBase):
    type: Literal["error"]
    data: Error


class LogEvent(EventBase):
    type: Literal["log"]
    data: Log


Event = Annotated[
    TrainingStartEvent
    | RoundStartEvent
    | ClientProgressEvent
    | ClientCompleteEvent
    | RoundEndEvent
    | EpochStartEvent
    | EpochEndEvent
    | EarlyStoppingEvent
    | TrainingEndEvent
    | StatusEvent
    | ErrorEvent
    | LogEvent,
    Field(discriminator="type"),
]

__all__ = [
    "EVENT_TYPES",
    "RUN_ID_PATTERN",
    "RUN_ID_RE",
    "Event",
    "EventBase",
    "Source",
]
