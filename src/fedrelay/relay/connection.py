"""The relay's connection class: what one TCP connection may cost before and after its handshake.

- From accept to close it holds one slot of its client address (``--max-connections-per-ip``).
- Until its request is complete it also holds one of ``HANDSHAKES_PER_ADDRESS`` handshake slots,
  and may send at most ``REQUEST_BYTES_MAX`` bytes: an unfinished request costs at most that
  much memory, for at most the handshake timeout.
- With TLS, the TCP connection is counted at accept and the TLS handshake runs here
  (``loop.start_tls``), under the same slots: asyncio only calls ``connection_made`` once the
  handshake is done, so a server given ``ssl=`` cannot count the connections still in theirs.
- Once a closing handshake has started, the TCP connection gets ``close_timeout`` to end. websockets
  sets that deadline when the peer sends its close frame but enforces it only when the relay next
  sends something (in practice the next keepalive ping): a peer that answered the handshake and
  kept its socket open held its slot, and the relay's shutdown, until then, or for ever with
  ``--ping-interval 0``. Here a timer aborts it at the deadline, or up to ``CLOSE_DRAIN_MAX``
  later while bytes queued before the close frame still wait for the peer (websockets' own
  ``close()`` waits on those without limit).
- With permessage-deflate, a few KiB on the wire can inflate to megabytes. websockets decodes
  every complete frame of a socket read before its read-ahead limit (``max_queue`` frames) can
  stop it, so one 256 KiB read of deflated frames could become gigabytes. Here a compressed
  connection's reads are fed to the protocol in steps that can inflate to at most about one
  frame, and the rest waits, still compressed, until the read-ahead queue has room again.

The relay's gate (gate.py) owns the counters and the decisions; this class only reports events of
the connection's life to it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any, ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

if TYPE_CHECKING:
    from .server import Relay

log = logging.getLogger("fedrelay.relay")

REQUEST_BYTES_MAX = 32 * 1024
"""Bytes a client may send before its request is complete (request line and headers):
browsers send a few KiB, cookies for localhost included."""
HANDSHAKES_PER_ADDRESS = 256
"""Connections of one client address whose request is not complete yet; more are closed at
accept. Clients open at most a few at a time; a load generator opening 1,000 subscribers
does it 50 at a time."""
READ_AHEAD_FRAMES = 4
"""Frames websockets reads ahead of the relay on one connection (``max_queue``)."""
DEFLATE_RATIO_MAX = 1032
"""Deflate's largest expansion: one byte on the wire becomes at most this many."""
UNREAD_BACKLOG_FACTOR = 4
"""A connection is cut once this many times ``max_queue_bytes`` wait unread for it (as
``subscribe.HARD_QUEUE_FACTOR`` cuts a subscriber at once)."""
TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a connection gets for its TLS handshake (asyncio's default waits 60 s)."""
TLS_SHUTDOWN_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0
"""Seconds for the TCP connection to end once a closing handshake has begun (websockets'
``close_timeout``)."""
CLOSE_DRAIN_MAX = 15.0
"""Seconds a closing connection may last while bytes queued before its close frame still wait
for the peer (a subscriber cut as a slow consumer reads the rest, then the close code); with
nothing queued, CLOSE_TIMEOUT."""


class RelayConnection(ServerConnection):
    """A connection that reports to its relay and bounds what it reads before the relay asks."""

    relay: Relay
    """Set on the subclass each relay makes (serve() takes a class, not an instance)."""
    tls: ClassVar[ssl.SSLContext | None] = None
    """The server's TLS context, on that subclass too: the TLS handshake runs here, counted."""
    address: str = ""
    over_limit: bool = False
    handshaking: bool = False
    """Holds a handshake slot of its address: its request is not complete yet."""
    request_bytes: int = 0
    api_slot: bool = False
    """Holds an API-read slot of its address until it closes (its answer is written or dropped)."""
    over_since: float | None = None
    """When its send queue went over ``max_queue_bytes`` (None: under it)."""
    _configured: bool = False
    _cut: bool = False
    _feed_step: int = 0
    """Bytes of a compressed connection's reads fed to the protocol at a time (0: whole reads)."""
    _held: bytearray | None = None
    """Compressed bytes read but not fed yet, while the read-ahead queue is full."""

    _tcp: asyncio.BaseTransport | None = None
    """With TLS, the TCP transport (``transport`` is the TLS one, once the handshake is done)."""
    _before_tls: bytearray | None = None
    """With TLS, bytes read before start_tls took the transport over (a ClientHello's start)."""
    _early: bytearray | None = None
    """With TLS, what arrived between the end of the TLS handshake and ``connection_made``."""
    _early_eof: bool = False
    _accepted: bool = False
    """With TLS: the TCP connection was counted (``connection_made`` comes again with TLS on)."""
    _tls_up: bool = False
    """With TLS: the WebSocket connection runs on the TLS transport (its ``connection_made`` ran)."""
    _released: bool = False
    _close_deadline: float | None = None
    _close_timer: asyncio.TimerHandle | None = None
    """Aborts the TCP connection at ``close_deadline`` if the peer has not closed it by then."""
    _close_began: float = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.tls is not None and not self._accepted:
            # The TCP connection, just accepted: it takes its address's slots before any TLS work.
            self._accepted = True
            self._tcp = transport
            self.relay.gate.opened(self, transport)
            if not transport.is_closing():
                self._before_tls = bytearray()
                self.relay._track(self._start_tls(transport, self.tls))
            return
        super().connection_made(transport)
        if self.tls is None:
            self.relay.gate.opened(self, transport)

    async def _start_tls(self, tcp: asyncio.BaseTransport, context: ssl.SSLContext) -> None:
        """The TLS handshake, then the WebSocket connection on top of it. A handshake that fails,
        times out or is cancelled gives the slots back (asyncio has closed the TCP transport).

        uvloop starts reading right after ``connection_made`` (pausing there does nothing), so the
        first bytes of a ClientHello may reach this protocol before start_tls takes the transport
        over. They are handed to the TLS protocol after its ``connection_made`` and before the
        transport reads again: start_tls's first step schedules those two calls, and the feed is
        scheduled one pass later, behind them, in the same pass (both loops run callbacks FIFO).
        """
        loop = asyncio.get_running_loop()
        if tcp.is_closing():
            self._release()
            return
        handshake = asyncio.ensure_future(
            loop.start_tls(
                tcp,  # type: ignore[arg-type]
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        )
        loop.call_soon(loop.call_soon, self._feed_client_hello, tcp)
        try:
            secure = await handshake
        except asyncio.CancelledError:  # the relay is stopping
            handshake.cancel()
            tcp.abort()  # type: ignore[attr-defined]
            self._release()
            raise
        except Exception:  # a peer that never finished, or spoke no TLS: nothing to log
            tcp.abort()  # type: ignore[attr-defined]
            self._release()
            return
        if self._released or secure is None or secure.is_closing():  # lost as the handshake ended
            if secure is not None:
                secure.abort()
            self._release()
            return
        early, self._early = self._early, None
        self._tls_up = True
        self.connection_made(secure)
        if early:
            self.data_received(bytes(early))
        if self._early_eof:
            self.eof_received()

    def _feed_client_hello(self, tcp: asyncio.BaseTransport) -> None:
        """What this protocol read before start_tls took the transport: to the TLS protocol."""
        before, self._before_tls = self._before_tls, None
        self._early = bytearray()  # from now on, only what the TLS protocol decrypts comes here
        tls = tcp.get_protocol()
        if not before or tls is self or tcp.is_closing():
            return
        view = memoryview(before)
        while view:  # the TLS protocol is a BufferedProtocol, as transports feed it
            buffer = memoryview(tls.get_buffer(len(view)))  # type: ignore[attr-defined]
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls.buffer_updated(size)  # type: ignore[attr-defined]
            view = view[size:]

    def eof_received(self) -> bool | None:
        if self.tls is not None and not self._tls_up:
            if self._tcp is not None and self._tcp.get_protocol() is not self:
                self._early_eof = True  # from the TLS protocol, handshake done: connection_made is next
                return True  # keep the transport open until then
            return None  # the TCP connection's, before TLS: it closes, connection_lost frees the slots
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tls is not None and not self._tls_up:  # closed before its TLS handshake was done
            self._release()
            return
        super().connection_lost(exc)
        self._held = None
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.relay.gate.closed(self)

    def data_received(self, data: bytes) -> None:
        if self._configured and not self._feed_step:
            super().data_received(data)  # the common case: an open, uncompressed connection
            self._check_unread()
            return
        if self._before_tls is not None:  # TLS not started yet: bytes for the TLS handshake
            if len(self._before_tls) + len(data) > REQUEST_BYTES_MAX:
                self._tcp.abort()  # type: ignore[union-attr]  # no ClientHello is that long
                return
            self._before_tls += data
            return
        if self._early is not None:  # TLS is up, connection_made not called yet: keep it until then
            self._early += data[: REQUEST_BYTES_MAX + 1 - len(self._early)]  # past it: a 431 anyway
            return
        if self.handshaking:
            self.request_bytes += len(data)
            if self.request_bytes > REQUEST_BYTES_MAX:
                self.relay.gate.request_too_large(self)
                return
        elif not self._configured and self.protocol.state is State.OPEN:
            self._configure()
        if self._held is not None:  # the transport delivered more before it paused
            self._held += data
        elif self._feed_step:
            self._feed(data)
        else:
            super().data_received(data)
        if self._configured:
            self._check_unread()

    @property
    def close_deadline(self) -> float | None:  # type: ignore[override]
        """When the TCP connection must have ended, once a closing handshake has begun.

        websockets sets it (whichever side began) and checks it only in its next send; setting it
        here also starts the timer that enforces it. websockets also sets it on a connection
        already lost (its ``close()`` on the way out): no timer then.
        """
        return self._close_deadline

    @close_deadline.setter
    def close_deadline(self, deadline: float | None) -> None:
        self._close_deadline = deadline
        if deadline is None or self._close_timer is not None or self.connection_lost_waiter.done():
            return
        self._close_began = self.loop.time()
        self._close_timer = self.loop.call_at(deadline, self._close_overdue)

    def _close_overdue(self) -> None:
        """Abort, unless bytes queued before the close frame still wait for the peer: then up to
        CLOSE_DRAIN_MAX (websockets' ``close()`` waits on them without limit)."""
        if self.connection_lost_waiter.done():
            return
        last = self._close_began + CLOSE_DRAIN_MAX
        if self.transport.get_write_buffer_size() and self.loop.time() < last:
            self._close_deadline = last
            self._close_timer = self.loop.call_at(last, self._close_overdue)
            return
        log.debug("%s did not end its connection by the close deadline: aborted", self.address)
        self.transport.abort()

    def _check_unread(self) -> None:
        """Cut a peer whose unread backlog is past the hard bound, whatever queued it.

        The relay checks what it writes itself (events, replies), but websockets answers every
        ping with a pong on its own: a peer that sends pings and never reads made the relay
        queue them without end (15 s of pings: +367 MiB).
        """
        queued = self.transport.get_write_buffer_size()
        if self._cut or queued <= UNREAD_BACKLOG_FACTOR * self.relay.config.max_queue_bytes:
            return
        self._cut = True
        self.relay.metrics.slow_consumers.inc()
        log.warning(
            "cut %s: %d bytes queued for it unread (over %d x --max-queue-bytes), pongs for its pings "
            "or replies to its frames",
            self.address,
            queued,
            UNREAD_BACKLOG_FACTOR,
        )
        self.transport.abort()

    def _configure(self) -> None:
        """Once the handshake is done: a compressed connection gets its decompressed frame limit
        and stepped reads (frames cannot be parsed with extensions before this point)."""
        self._configured = True
        if self.protocol.extensions:
            limit = self.relay.config.max_frame_bytes
            set_max_message_size(self.protocol, limit)
            self._feed_step = max(256, limit // DEFLATE_RATIO_MAX)
            self.recv_messages.resume = self._resume_reading

    def _feed(self, data: bytes | bytearray) -> None:
        """Feed ``data`` in steps; once the read-ahead queue is full, keep the rest compressed."""
        step = self._feed_step
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            super().data_received(bytes(view[offset : offset + step]))
            offset += step
            if self.recv_messages.paused and offset < len(view):
                self._held = bytearray(view[offset:])
                return

    def _resume_reading(self) -> None:
        """The read-ahead queue has room: feed what was held, then let the socket be read."""
        asyncio.get_running_loop().call_soon(self._feed_held)

    def _feed_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._feed(held)
            self._check_unread()
        if self._held is None and not self.recv_messages.paused and not self.transport.is_closing():
            self.transport.resume_reading()


def set_max_message_size(protocol: Any, size: int) -> None:
    """The protocol's limit on an incoming message, which websockets 16 renamed."""
    if hasattr(protocol, "max_message_size"):
        protocol.max_message_size = size
    else:  # websockets 15
        protocol.max_size = size
