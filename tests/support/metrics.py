"""A relay's /metrics, parsed: ``{"name{label=...}": value}``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.relay_process import RelayProcess


def scrape(relay: RelayProcess) -> dict[str, float]:
    status, body = relay.get("/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
