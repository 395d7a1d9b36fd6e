"""Reading the dashboard's state in a real Chromium page (Playwright), for the dashboard tests.

The page exposes its model as ``window.fedrelayDashboard``; these helpers wait on it and read
chart point counts and the run summary from it or from the DOM.
"""

from __future__ import annotations

from typing import Any

STATE = "window.fedrelayDashboard"
ROUND_CHARTS = (
    "Object.fromEntries(Object.entries(window.fedrelayDashboard.charts || {})"
    ".filter(([k]) => k.startsWith('round:')))"
)


def wait(page: Any, condition: str, timeout: float = 30.0, arg: Any = None) -> None:
    """Wait until the JavaScript ``condition`` holds on the page (polled every 50 ms)."""
    page.wait_for_function(condition, arg=arg, timeout=timeout * 1000, polling=50)


def round_points(page: Any) -> dict[str, int]:
    """Points per round chart ("round:loss", ...), as the page counts them."""
    return page.evaluate(f"() => {ROUND_CHARTS}")


def all_points(page: Any) -> dict[str, list]:
    """Every metric chart's points (per round or epoch), series by series, from the page's model."""
    return page.evaluate(
        f"() => Object.fromEntries(Object.keys({STATE}.charts).filter(k => /^(round|epoch):/.test(k))"
        f".map(k => [k, {STATE}.points(k)]))"
    )


def summary_items(page: Any) -> dict[str, str]:
    """The run summary as label -> text, one entry per <dt>/<dd> pair: a label's value is
    checked on its own, not searched for in the whole summary's text."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('[data-testid=summary] > div')]
            .map(d => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]))"""
    )
