"""A relay's /metrics, parsed: ``{"name{label=...}": value}``, labels sorted by name."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.support.relay_process import RelayProcess
from tests.support.waiting import until


def parse(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, keyed as ``name{k="v",...}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def scrape(relay: RelayProcess) -> dict[str, float]:
    """The relay's /metrics now (a blocking HTTP request)."""
    status, body = relay.get("/metrics")
    assert status == 200
    return parse(body.decode())


def metric(relay: RelayProcess, name: str) -> float:
    """One sample by its full key; a labelled counter that never moved is absent, so 0."""
    return scrape(relay).get(name, 0.0)


async def wait_for_metric(relay: RelayProcess, name: str, at_least: float, timeout: float = 15.0) -> float:
    """Await ``name`` reaching ``at_least``; each scrape runs off the event loop, and one that a
    busy relay answers too slowly counts as not yet."""

    async def value() -> float | None:
        try:
            found = (await asyncio.to_thread(scrape, relay)).get(name, 0.0)
        except OSError:
            return None
        return found if found >= at_least else None

    return await until(value, timeout, interval=0.02, what=f"{name} >= {at_least}")
