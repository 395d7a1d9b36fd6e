"""Driving the federation health grid in a real Chromium page (Playwright): what it shows, scrolling
it, and measuring it. Shared by the dashboard tests and ``bench/dashboard_grid.py``."""

from __future__ import annotations

from typing import Any

STATE = "window.fedrelayDashboard"
LETTERS = {"finished": "f", "straggler": "s", "failed": "x", "silent": "q", "running": "r"}
COLORS = {
    "finished": (5, 150, 105),
    "straggler": (217, 119, 6),
    "failed": (220, 38, 38),
    "silent": (124, 58, 237),
    "running": (147, 197, 253),
    "none": (238, 242, 247),
}
"""healthgrid.js's colours, as RGB."""


def wait(page, condition: str, timeout: float = 30.0, arg: Any = None) -> None:
    page.wait_for_function(condition, arg=arg, timeout=timeout * 1000, polling=50)


def expected_letters(cells: dict[tuple[int, str], str], client: str, rounds: int) -> str:
    """A row's data-cells as the generator decided it: one letter per round, "." not sampled."""
    return "".join(LETTERS[cells[(r, client)]] if (r, client) in cells else "." for r in range(1, rounds + 1))


def visible(page) -> dict[str, Any]:
    """The grid's DOM rows (client id, letters) and its first visible row and round."""
    return page.evaluate(f"() => {STATE}.health.visible()")


def scroll_grid(page, top: int | None = None, left: int | None = None) -> dict[str, Any]:
    """Scroll the grid's viewport and wait for the frame that redraws it; returns ``visible``."""
    return page.evaluate(
        """([top, left]) => new Promise((done) => {
            const grid = document.querySelector('[data-testid=health-grid]');
            const draws = window.fedrelayDashboard.health.visible().draws;
            if (top !== null) grid.scrollTop = top;
            if (left !== null) grid.scrollLeft = left;
            const check = () => {
                const now = window.fedrelayDashboard.health.visible();
                if (now.draws > draws) done(now); else requestAnimationFrame(check);
            };
            requestAnimationFrame(check);
        })""",
        [top, left],
    )


def pixel(page, x: float, y: float) -> tuple[int, int, int]:
    """The grid canvas's colour at a viewport point (CSS pixels)."""
    return tuple(
        page.evaluate(
            """([x, y]) => {
                const canvas = document.querySelector('[data-testid=health-canvas]');
                const box = canvas.getBoundingClientRect();
                const dpr = canvas.width / box.width;
                const px = canvas.getContext('2d').getImageData(
                    Math.floor((x - box.left) * dpr), Math.floor((y - box.top) * dpr), 1, 1).data;
                return [px[0], px[1], px[2]];
            }""",
            [x, y],
        )
    )


def frame_times(page, frames: int = 240, step: int = 90) -> dict[str, Any]:
    """Scroll the grid by ``step`` pixels every animation frame, down then back up, and return the
    time between frames (ms) as the page saw it: what a user scrolling would feel."""
    return page.evaluate(
        """([frames, step]) => new Promise((done) => {
            const grid = document.querySelector('[data-testid=health-grid]');
            const deltas = [];
            let last = null;
            let n = 0;
            let direction = 1;
            const tick = (now) => {
                if (last !== null) deltas.push(now - last);
                last = now;
                if (n++ >= frames) {
                    const sorted = [...deltas].sort((a, b) => a - b);
                    const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
                    done({frames: deltas.length, p50: at(0.5), p95: at(0.95), max: sorted[sorted.length - 1],
                          domRows: document.querySelectorAll('[data-testid=health-row]').length});
                    return;
                }
                const bottom = grid.scrollHeight - grid.clientHeight;
                const next = grid.scrollTop + step * direction;
                if (next > bottom || next < 0) direction *= -1;
                grid.scrollTop += step * direction;
                requestAnimationFrame(tick);
            };
            requestAnimationFrame(tick);
        })""",
        [frames, step],
    )
