"""Prometheus metrics, one registry per relay so tests can run several."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "fedrelay_connections", "Open WebSocket connections", ["endpoint"], registry=r
        )
        self.connections_opened = Counter(
            "fedrelay_connections_opened", "WebSocket connections opened", ["endpoint"], registry=r
        )
        self.subscriptions = Counter(
            "fedrelay_subscriptions",
            "Subscriptions to a named run, by how they began: live (the backlog from memory), "
            "catch_up (paged from the store), waiting (no event yet, or since past the committed seq)",
            ["start"],
            registry=r,
        )
        self.events_in = Counter("fedrelay_events_in", "Events accepted from producers", registry=r)
        self.events_out = Counter("fedrelay_events_out", "Events written to subscribers", registry=r)
        self.duplicates = Counter(
            "fedrelay_duplicates", "Resent events dropped as already stored", registry=r
        )
        self.rejected = Counter(
            "fedrelay_rejected", "Frames or events refused, by reason", ["code"], registry=r
        )
        self.slow_consumers = Counter(
            "fedrelay_slow_consumers", "Subscribers cut for a full send queue", registry=r
        )
        self.handshakes_refused = Counter(
            "fedrelay_handshakes_refused", "Handshakes refused, by reason", ["reason"], registry=r
        )
        self.store_reads = Counter(
            "fedrelay_store_reads",
            "Store reads by queue (catch_up, api) and outcome (done; skipped: the reader had gone)",
            ["queue", "outcome"],
            registry=r,
        )
        self.producer_refusals = Counter(
            "fedrelay_producer_refusals",
            "Producer connections refused for a name in use, or an id stored with another body",
            ["reason"],
            registry=r,
        )
        self.store_commits = Counter("fedrelay_store_commits", "Store transactions committed", registry=r)
        self.store_lag = Gauge("fedrelay_store_lag_events", "Events accepted but not yet stored", registry=r)
        self.store_failing = Gauge("fedrelay_store_failing", "1 while store commits fail", registry=r)
        self.runs = Gauge("fedrelay_runs", "Runs known to the relay", registry=r)
        self.producers = Gauge(
            "fedrelay_producers", "Producer names whose dedup position the relay keeps", registry=r
        )
        self.producers_forgotten = Counter(
            "fedrelay_producers_forgotten",
            "Producer positions forgotten after --forget-producers-after of idleness",
            registry=r,
        )
        # Alerts (docs/alerts.md): by the webhook's host, never its URL (the path is a secret).
        self.alerts_fired = Counter(
            "fedrelay_alerts_fired", "Alert conditions this relay claimed, by kind", ["alert"], registry=r
        )
        self.alerts_repeated = Counter(
            "fedrelay_alerts_repeated",
            "Alert conditions found again that were claimed before (after a restart, or by another relay)",
            registry=r,
        )
        self.alerts_sent = Counter(
            "fedrelay_alerts_sent", "Alerts a webhook accepted (2xx)", ["webhook"], registry=r
        )
        self.alert_attempts_failed = Counter(
            "fedrelay_alert_attempts_failed",
            "Failed alert deliveries (each retried later, or dropped), by reason",
            ["webhook", "reason"],
            registry=r,
        )
        self.alerts_dropped = Counter(
            "fedrelay_alerts_dropped",
            "Alerts never delivered: queue_full, expired (give_up_after), rejected (3xx/4xx), backlog",
            ["webhook", "reason"],
            registry=r,
        )
        self.alerts_queued = Gauge(
            "fedrelay_alerts_queued", "Alerts waiting for delivery", ["webhook"], registry=r
        )

    def bind(
        self,
        *,
        store_lag: Callable[[], float],
        store_failing: Callable[[], float],
        runs: Callable[[], float],
        producers: Callable[[], float],
    ) -> None:
        """Gauges read live state at scrape time instead of being kept in sync."""
        self.store_lag.set_function(store_lag)
        self.store_failing.set_function(store_failing)
        self.runs.set_function(runs)
        self.producers.set_function(producers)

    def render(self) -> bytes:
        return generate_latest(self.registry)
