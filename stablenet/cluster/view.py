"""What this host knows of the others: the records under ``<prefix>/hosts/`` as last read and
watched, and which hosts still count while etcd cannot be reached. Pure: keys and values in,
endpoints out, time as a parameter.

Failure rules (the README states them too):
* connected: every host in etcd counts; a host whose lease expires is deleted by etcd and the
  watch says so.
* cut off (some member could not be reached at all): this host keeps its last view of host H
  until H's lease would have expired, ``contact + ttl(H)`` after the last exchange with etcd,
  then drops H; local endpoints are never touched.
* etcd down (every member tried answered, refusing or unable to serve): no lease can expire
  while no member runs (and etcd extends leases when a leader is elected again), so the last
  view is kept whole until etcd is back."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stablenet.cluster.etcd import Event, KeyValue
from stablenet.cluster.layout import HostInfo, parse_endpoint, parse_info, parse_key
from stablenet.model import Endpoint


@dataclass(frozen=True, slots=True)
class Link:
    """This host's contact with etcd. ``contact``: the time (monotonic) of the last exchange
    that succeeded; ``refused``: while not connected, whether etcd answered (down) rather than
    stayed silent (cut off)."""

    connected: bool = False
    contact: float = 0.0
    refused: bool = False

    def describe(self) -> str:
        if self.connected:
            return "connected"
        if self.contact == 0.0:
            return "never reached"
        return "down (members refuse or cannot serve)" if self.refused else "unreachable"


class RemoteView:
    """Other hosts' endpoints, by host and container id, from a full read and watch events."""

    def __init__(self, hosts_prefix: str, own_host: str, default_ttl: int) -> None:
        self.hosts_prefix = hosts_prefix
        self.own_host = own_host
        self.default_ttl = default_ttl
        self.revision = 0  # the store revision this view reflects
        self.malformed = 0  # records that could not be read (counted, skipped)
        self._endpoints: dict[str, dict[str, Endpoint]] = {}
        self._info: dict[str, HostInfo] = {}

    def reset(self, revision: int, kvs: Iterable[KeyValue]) -> None:
        """A full read replaces everything."""
        self._endpoints = {}
        self._info = {}
        for kv in kvs:
            self._put(kv.key, kv.value)
        self.revision = revision

    def apply(self, revision: int, events: Iterable[Event]) -> None:
        for event in events:
            if event.kind == "put":
                self._put(event.key, event.value)
            else:
                self._delete(event.key)
        self.revision = max(self.revision, revision)

    def _put(self, key: str, value: bytes) -> None:
        parsed = parse_key(self.hosts_prefix, key)
        if parsed is None or parsed[0] == self.own_host:
            return
        host, kind, cid = parsed
        if kind == "info":
            info = parse_info(value)
            if info is None:
                self.malformed += 1
            else:
                self._info[host] = info
            return
        ep = parse_endpoint(host, value)
        if ep is None:
            self.malformed += 1
            return
        self._endpoints.setdefault(host, {})[cid] = ep

    def _delete(self, key: str) -> None:
        parsed = parse_key(self.hosts_prefix, key)
        if parsed is None or parsed[0] == self.own_host:
            return
        host, kind, cid = parsed
        if kind == "info":
            self._info.pop(host, None)
            return
        eps = self._endpoints.get(host)
        if eps is not None:
            eps.pop(cid, None)
            if not eps:
                del self._endpoints[host]

    @property
    def hosts(self) -> dict[str, HostInfo | None]:
        """Every host with something under the prefix, and its info when it wrote one."""
        names = set(self._info) | set(self._endpoints)
        return {name: self._info.get(name) for name in sorted(names)}

    def ttl(self, host: str) -> int:
        info = self._info.get(host)
        return info.ttl if info is not None else self.default_ttl

    def expired(self, link: Link, now: float) -> tuple[frozenset[str], float | None]:
        """Hosts to drop now, and the next time (monotonic) another one would be dropped."""
        if link.connected or link.refused or link.contact == 0.0:
            return frozenset(), None
        dropped = set()
        upcoming = None
        for host in self.hosts:
            deadline = link.contact + self.ttl(host)
            if deadline <= now:
                dropped.add(host)
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        return frozenset(dropped), upcoming

    def endpoints(self, dropped: frozenset[str] = frozenset()) -> tuple[Endpoint, ...]:
        return tuple(
            ep
            for host, eps in sorted(self._endpoints.items())
            if host not in dropped
            for _, ep in sorted(eps.items())
        )
