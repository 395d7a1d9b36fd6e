"""Generated ``log`` events (what ``forward_logs`` sends), for the log panel's tests and screenshot."""

from __future__ import annotations

from typing import Any

LEVELS = (("info", 20), ("warning", 30), ("error", 40))
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/client.py", line 42, in train\n'
    "    loss = step(batch)\n"
    "RuntimeError: {message}"
)


def log_event(
    run_id: str,
    i: int,
    message: str,
    *,
    level: tuple[str, int] = ("info", 20),
    client: int | str | None = None,
    rnd: int | None = None,
    logger: str = "app.client",
    exception: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One record as a ClientApp's (``client`` set) or the ServerApp's forwarder sends it."""
    data: dict[str, Any] = {"level": level[0], "levelno": level[1], "logger": logger, "message": message}
    if client is not None:
        data["client_id"] = client
    if rnd is not None:
        data["round"] = rnd
    if exception is not None:
        data["exception"] = exception
    data.update(extra)
    source = {"role": "client" if client is not None else "server", "client_id": client}
    return {"type": "log", "run_id": run_id, "id": i, "source": source, "data": data}


def flood(
    run_id: str, count: int, *, clients: int = 10, per_round: int = 100, first_id: int = 1
) -> list[dict[str, Any]]:
    """``count`` records: client ``k % clients``, round ``1 + k // per_round``, levels cycling
    info / warning / error, every error with a traceback."""
    events = []
    for k in range(count):
        level = LEVELS[k % len(LEVELS)]
        client = k % clients
        rnd = 1 + k // per_round
        message = f"client {client} round {rnd}: record {k}"
        exception = TRACEBACK.format(message=f"step {k} failed") if level[0] == "error" else None
        events.append(
            log_event(run_id, first_id + k, message, level=level, client=client, rnd=rnd, exception=exception)
        )
    return events
