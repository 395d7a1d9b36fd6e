"""The committed fedrelay.d.ts is what the schema generates today."""

from __future__ import annotations

from pathlib import Path

from fedrelay.schemas.events import EVENT_TYPES
from fedrelay.schemas.typescript import render_typescript

COMMITTED = Path(__file__).resolve().parents[1] / "src/fedrelay/relay/static/fedrelay.d.ts"


def test_committed_declarations_are_current():
    assert COMMITTED.read_text() == render_typescript(), (
        "src/fedrelay/relay/static/fedrelay.d.ts is stale: regenerate it with "
        "`python -m fedrelay.schemas.typescript > src/fedrelay/relay/static/fedrelay.d.ts`"
    )


def test_declarations_cover_every_event_and_keep_extra_fields():
    ts = render_typescript()
    for kind in EVENT_TYPES:
        assert f'type: "{kind}";' in ts
    assert "export interface RoundEndData {" in ts and "export interface ErrorData {" in ts
    assert "  fit_metrics?: { [key: string]: number | null } | null;" in ts
    assert "  [key: string]: unknown;" in ts  # payloads keep arbitrary extra fields
    assert "export interface Gap {" in ts and "resume_from: number;" in ts
    assert "export function subscribe(options: SubscribeOptions): Subscription;" in ts
