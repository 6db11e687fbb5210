"""The controller's state directory: what must survive a restart of stablenet (scale overrides,
containers the operator stopped or removed, backoff and breaker), written atomically as one JSON
file, and the lock that lets one stablenet act on an engine at a time."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
STATE_FILE = "controller.json"
LOCK_FILE = "controller.lock"


@dataclass(slots=True)
class ServiceState:
    scale: int | None = None  # `stablenet scale` override of the label's count
    released: int = 0  # slots the operator gave up by removing containers
    held: list[str] = field(default_factory=list)  # container ids the operator stopped
    parked: list[str] = field(default_factory=list)  # stopped by the autoscaler, kept
    streak: int = 0  # failures in a row (the backoff)
    failed_replacements: int = 0  # replacements that never got ready, in a row (the breaker)
    last_failure: float = 0.0  # unix time
    degraded: str | None = None

    def is_default(self) -> bool:
        return self == ServiceState()


@dataclass(slots=True)
class State:
    services: dict[str, ServiceState] = field(default_factory=dict)
    seen_until: float = 0.0  # events up to this unix time were taken into account
    # What events taught, kept for after a restart: containers that failed (id -> why), and
    # containers the operator killed whose die may come later.
    failed: dict[str, str] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)

    def service(self, name: str) -> ServiceState:
        return self.services.setdefault(name, ServiceState())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seen_until": self.seen_until,
            "failed": dict(sorted(self.failed.items())),
            "killed": sorted(self.killed),
            "services": {
                name: asdict(svc)
                for name, svc in sorted(self.services.items())
                if not svc.is_default()
            },
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Any) -> State:
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        services = {}
        for name, raw in (data.get("services") or {}).items():
            known = {k: v for k, v in raw.items() if k in ServiceState.__dataclass_fields__}
            services[str(name)] = ServiceState(**known)
        failed = {str(k): str(v) for k, v in (data.get("failed") or {}).items()}
        killed = [str(cid) for cid in data.get("killed") or ()]
        return cls(services, float(data.get("seen_until") or 0.0), failed, killed)


class StateDir:
    """One directory: the state file and the lock."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def prepare(self) -> None:
        """Create the directory (0700). Raises OSError with the path in it."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def lock(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def holder(self) -> str:
        """The pid written by whoever holds the lock, for messages."""
        with contextlib.suppress(OSError):
            return (self.path / LOCK_FILE).read_text().strip() or "?"
        return "?"

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> State:
        """The saved state; an unreadable file is set aside (not lost) and a fresh one used."""
        path = self.path / STATE_FILE
        try:
            return State.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return State()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            aside = path.with_suffix(".broken")
            with contextlib.suppress(OSError):
                path.replace(aside)
            logger.error("controller state %s is unreadable (%s); kept as %s", path, exc, aside)
            return State()

    def save(self, data: bytes) -> None:
        """Write ``State.encode()`` atomically: a reader (or a crash) sees the old file or the
        new one."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".controller.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path / STATE_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
