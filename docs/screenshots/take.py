"""Screenshots of the dashboard for the docs, from the real page served by a real relay.

Run from the repository root (needs Chromium and Playwright, as the dashboard tests do):

    .venv/bin/python docs/screenshots/take.py

It starts a relay on a temporary database, streams a federated run (20 rounds, 12 clients, one
client failing in a round, the last round caught with a straggler), a centralized run that
stops early, a generated federation of 200 clients x 40 rounds (failures, silent clients,
stragglers) and a second federated run with other settings, then saves next to this script:
federated.png and centralized.png (the run pages), health.png (the federation health view of the
200-client run, a failed cell picked) and compare.png (the two federated runs side by side).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from playwright.sync_api import sync_playwright  # noqa: E402
from tests.support.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.support.federation_run import generated_run, publish_blocking  # noqa: E402
from tests.support.relay_process import RelayProcess  # noqa: E402
from tests.support.training import BackgroundProducer, centralized_run, federated_run  # noqa: E402


def shoot(page, url: str, last_seq: int, path: Path) -> None:
    page.goto(url)
    page.wait_for_function(f"() => window.fedrelayDashboard.lastSeq === {last_seq}", timeout=30_000)
    page.wait_for_function("() => Object.keys(window.fedrelayDashboard.charts).length > 0", timeout=30_000)
    page.wait_for_timeout(700)  # let the last throttled render and the charts settle
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def shoot_health(page, url: str, last_seq: int, failed: tuple[int, str], path: Path) -> None:
    """The health view with a failed cell picked (its detail shown) and its round's durations."""
    page.goto(url)
    page.wait_for_function(f"() => window.fedrelayDashboard.lastSeq === {last_seq}", timeout=60_000)
    page.wait_for_function(
        "() => window.fedrelayDashboard.health && window.fedrelayDashboard.health.rounds > 0"
    )
    page.wait_for_timeout(700)
    rnd, client = failed
    point = page.evaluate("([c, r]) => window.fedrelayDashboard.health.reveal(c, r)", [client, rnd])
    page.mouse.click(point["x"], point["y"])
    page.wait_for_timeout(300)
    page.get_by_test_id("health").screenshot(path=str(path))
    print(f"wrote {path}")


def shoot_compare(page, url: str, path: Path) -> None:
    page.goto(url)
    page.wait_for_function(
        "() => window.fedrelayDashboard.view === 'compare' && "
        "window.fedrelayDashboard.statuses.every(s => s === 'completed')",
        timeout=30_000,
    )
    page.wait_for_timeout(700)
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelayProcess(Path(tmp) / "relay.db").start()
        try:
            fed = federated_run("flwr-8121", rounds=20, clients=12, fail=(7, 9), partial_rounds=17, seed=3)
            cen = centralized_run("lightning-0412", max_epochs=40, stop_at=27, patience=5, seed=5)
            other = federated_run("flwr-8122", rounds=20, clients=12, seed=4)
            other[0]["data"]["config"] = {"strategy": "FedProx", "lr": 0.02, "proximal_mu": 0.1}
            other[0]["data"]["experiment_name"] = "pneumonia-federated-fedprox"
            done = federated_run("flwr-8120", rounds=20, clients=12, fail=(3, 5), seed=3)
            health = generated_run(
                "flwr-9001", clients=200, rounds=40, fail=0.02, silent=0.01, straggle=0.03, seed=8
            )
            BackgroundProducer(relay.url, cen, pace=0, batch=500, name="trainer").start().join()
            BackgroundProducer(relay.url, done, pace=0, batch=500, name="server0").start().join()
            BackgroundProducer(relay.url, other, pace=0, batch=500, name="server2").start().join()
            publish_blocking(relay.url, health, name="generated")
            BackgroundProducer(relay.url, fed, pace=0, batch=500, name="server").start().join()
            failed = next(
                key for key, state in sorted(health.cells.items()) if state == "failed" and key[0] >= 30
            )
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
                page.goto(relay.http + "/")
                page.wait_for_selector("[data-testid=run-row]")
                shoot(page, f"{relay.http}/#/runs/flwr-8121", len(fed), HERE / "federated.png")
                shoot(page, f"{relay.http}/#/runs/lightning-0412", len(cen), HERE / "centralized.png")
                shoot_health(
                    page, f"{relay.http}/#/runs/flwr-9001", len(health.events), failed, HERE / "health.png"
                )
                shoot_compare(page, f"{relay.http}/#/compare?runs=flwr-8120,flwr-8122", HERE / "compare.png")
                browser.close()
        finally:
            relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
