"""Screenshots of the dashboard for the docs, from the real page served by a real relay.

Run from the repository root (needs Chromium and Playwright, as the dashboard tests do):

    .venv/bin/python docs/screenshots/take.py

It starts a relay on a temporary database, streams a federated run (20 rounds, 12 clients, one
client failing in a round, the last round caught with a straggler) and a centralized run that
stops early, then saves federated.png and centralized.png next to this script.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from playwright.sync_api import sync_playwright  # noqa: E402
from tests.support.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.support.relay_process import RelayProcess  # noqa: E402
from tests.support.training import BackgroundProducer, centralized_run, federated_run  # noqa: E402


def shoot(page, url: str, last_seq: int, path: Path) -> None:
    page.goto(url)
    page.wait_for_function(f"() => window.fedrelayDashboard.lastSeq === {last_seq}", timeout=30_000)
    page.wait_for_function("() => Object.keys(window.fedrelayDashboard.charts).length > 0", timeout=30_000)
    page.wait_for_timeout(700)  # let the last throttled render and the charts settle
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelayProcess(Path(tmp) / "relay.db").start()
        try:
            fed = federated_run("flwr-8121", rounds=20, clients=12, fail=(7, 9), partial_rounds=17, seed=3)
            cen = centralized_run("lightning-0412", max_epochs=40, stop_at=27, patience=5, seed=5)
            BackgroundProducer(relay.url, cen, pace=0, batch=500, name="trainer").start().join()
            BackgroundProducer(relay.url, fed, pace=0, batch=500, name="server").start().join()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
                page.goto(relay.http + "/")
                page.wait_for_selector("[data-testid=run-row]")
                shoot(page, f"{relay.http}/#/runs/flwr-8121", len(fed), HERE / "federated.png")
                shoot(page, f"{relay.http}/#/runs/lightning-0412", len(cen), HERE / "centralized.png")
                browser.close()
        finally:
            relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
