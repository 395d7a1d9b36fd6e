"""A TCP port that never answers a connect: a listener whose accept queue is full.

Linux drops the SYNs of a listener whose backlog is full, so a client's connect hangs until its
own timeout, as it does towards a host that drops packets (a firewall, a dead route), without
root or a network namespace.
"""

from __future__ import annotations

import contextlib
import socket


class Blackhole:
    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)  # fills the queue
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.1", self.port))
        except TimeoutError:
            pass
        else:  # pragma: no cover - a kernel that does not drop SYNs: the tests need another way
            raise RuntimeError("this kernel answers connects to a full accept queue")
        finally:
            probe.close()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def close(self) -> None:
        for sock in (self.filler, self.listener):
            with contextlib.suppress(OSError):
                sock.close()
