"""Producer side: publish training events to a fedrelay relay.

Depends on websockets and pydantic only; never imports the relay or torch.

    from fedrelay.emitters import get_emitter
    em = get_emitter()                      # FEDRELAY_URL or ws://127.0.0.1:8765
    em.emit("round_end", {"round": 3, "fit_metrics": {"loss": 0.31}})
"""

from .client import Emitter
from .config import default_spool_dir
from .logs import LogForwarder, forward_logs
from .shared import get_emitter
from .sync import SyncReport, sync_spool

__all__ = [
    "Emitter",
    "LogForwarder",
    "SyncReport",
    "default_spool_dir",
    "forward_logs",
    "get_emitter",
    "sync_spool",
]
