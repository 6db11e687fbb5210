"""One request and its response through the proxy: the Exchange record and its lifecycle as an
explicit state machine. The phases and every legal move between them are in one table
(TRANSITIONS); ``Exchange.move`` is the only way a phase changes, and an illegal move raises.
No I/O here: the client and upstream protocols drive it.

    READING ──► ROUTING ──► CONNECTING ──► SENT ──► HEAD_PENDING ──► STREAMING ──► DONE
                 │  ▲  ▲        │          │  ▲         │
                 ▼  │  └────────┴──────────┘  │ (retry: back to ROUTING, see retry.py)
                HELD                         100-continue
    An Upgrade request goes     ROUTING ──► UPGRADE_PENDING ──► TUNNEL (backend sent 101)
                                                         └──────► STREAMING (backend declined)
    Any phase may end in DONE (answered by the proxy, or the client went away).
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Final

from stablenet.model import Endpoint

if TYPE_CHECKING:
    from stablenet.proxy.client import ClientConnection
    from stablenet.proxy.upstream import UpstreamConnection


class Phase(enum.IntEnum):
    READING = 0  # the request head is being read
    ROUTING = 1  # head complete: choosing a service and an endpoint
    HELD = 2  # no endpoint to try now: waiting for one (bounded by the hold timeout)
    CONNECTING = 3  # opening a connection to the chosen endpoint; nothing written yet
    SENT = 4  # the request (or part of it) was written; no response byte reached the client
    UPGRADE_PENDING = 5  # an Upgrade request was written; the backend has not agreed yet
    HEAD_PENDING = 6  # the response head arrived and is held back until its first body byte
    STREAMING = 7  # response bytes reached the client
    TUNNEL = 8  # the backend agreed to the upgrade: bytes pass unchanged both ways
    DONE = 9


_P = Phase
TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    _P.READING: frozenset({_P.ROUTING, _P.DONE}),
    _P.ROUTING: frozenset({_P.HELD, _P.CONNECTING, _P.SENT, _P.UPGRADE_PENDING, _P.DONE}),
    _P.HELD: frozenset({_P.ROUTING, _P.DONE}),
    _P.CONNECTING: frozenset({_P.ROUTING, _P.SENT, _P.UPGRADE_PENDING, _P.DONE}),
    _P.SENT: frozenset({_P.ROUTING, _P.HEAD_PENDING, _P.STREAMING, _P.DONE}),
    _P.UPGRADE_PENDING: frozenset({_P.TUNNEL, _P.STREAMING, _P.DONE}),
    _P.HEAD_PENDING: frozenset({_P.ROUTING, _P.STREAMING, _P.DONE}),
    _P.STREAMING: frozenset({_P.DONE}),
    _P.TUNNEL: frozenset({_P.DONE}),
    _P.DONE: frozenset(),
}
# The phases as plain ints, which is what an Exchange holds and the request path compares: mypyc
# turns these into machine integers, where an Enum member is an object looked up on its class.
# Phase(ex.phase) names one; tests check that both agree.
READING: Final = 0
ROUTING: Final = 1
HELD: Final = 2
CONNECTING: Final = 3
SENT: Final = 4
UPGRADE_PENDING: Final = 5
HEAD_PENDING: Final = 6
STREAMING: Final = 7
TUNNEL: Final = 8
DONE: Final = 9
# The table as bit masks indexed by phase: the check on the request path is one AND.
_ALLOWED: Final[tuple[int, ...]] = tuple(
    sum(1 << int(to) for to in TRANSITIONS[phase]) for phase in Phase
)


class IllegalMove(Exception):
    """A bug in the proxy: a phase change the table does not allow."""


# Request body framing
BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
# Response framing towards the client
OUT_RAW: Final = 0
OUT_CHUNKED: Final = 1
OUT_UNTIL_CLOSE: Final = 2


class Exchange:
    """One request and its response, from the first request byte to the last response byte."""

    __slots__ = (
        "conn",
        "phase",
        "method",
        "url",
        "version",
        "headers",
        "host",
        "xff",
        "cookie",
        "conn_tokens",
        "upgrade",
        "body_mode",
        "error",
        "head",
        "head_done",
        "body_done",
        "buffered",
        "buffered_size",
        "replayable",
        "early",
        "early_size",
        "service",
        "endpoint",
        "upstream",
        "refused",
        "sent_to",
        "sends",
        "reported",
        "retry_delay",
        "pending_head",
        "hold_started",
        "fresh_only",
        "race_retried",
        "started",
        "hold_deadline",
        "hold_handle",
        "client_saw",
        "status",
        "out_mode",
        "head_request",
        "keep_alive",
        "client_keep_alive",
        "sticky",
        "counted",
        "te_seen",
        "cl_seen",
    )

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.phase = READING
        self.method = ""
        self.url = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.cookie: bytes | None = None
        self.conn_tokens: list[bytes] | None = None
        self.upgrade: bytes | None = None
        self.body_mode = BODY_NONE
        self.error: tuple[int, str] | None = None
        self.head = b""
        self.head_done = False
        self.body_done = False
        self.buffered: list[bytes] = []  # request body kept for a retry (up to REPLAY_LIMIT)
        self.buffered_size = 0
        self.replayable = True
        self.early: list[bytes] = []  # client bytes after an Upgrade request, held until 101
        self.early_size = 0
        self.service = ""
        self.endpoint: Endpoint | None = None
        self.upstream: UpstreamConnection | None = None
        # Made when first needed (most requests never fail anywhere):
        self.refused: set[tuple[str, str, int, float]] | None = None  # connect failed: later
        self.sent_to: set[tuple[str, str, int, float]] | None = None  # reached, failed: never
        self.sends = 0  # attempts that wrote the request to a backend
        self.reported = False  # a failure of this request already reached passive health
        self.retry_delay = 0.0
        self.pending_head: bytes | None = None
        self.hold_started = 0.0
        self.fresh_only = False
        self.race_retried = False
        self.started = 0.0
        self.hold_deadline = 0.0
        self.hold_handle: asyncio.TimerHandle | None = None
        self.client_saw = False  # some response byte (even a 100 Continue) reached the client
        self.status = 0
        self.out_mode = OUT_RAW
        self.head_request = False
        self.keep_alive = True  # this response keeps the client connection
        self.client_keep_alive = True  # what the request allows, whatever a response said
        self.sticky: str | None = None
        self.counted = False  # the balancer counts this exchange as in flight on ``endpoint``
        self.te_seen = b""  # the Transfer-Encoding field as sent, for the strict framing check
        self.cl_seen = False

    def move(self, to: int) -> None:
        """Change phase, as TRANSITIONS allows; anything else is a bug and raises."""
        if not _ALLOWED[self.phase] >> to & 1:
            raise IllegalMove(f"exchange {Phase(self.phase).name} -> {Phase(to).name}")
        self.phase = to

    @property
    def done(self) -> bool:
        return self.phase == DONE
