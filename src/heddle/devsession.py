"""The ``heddle dev`` session file: where a running ``heddle dev`` serves, for clients started beside it.

``heddle dev`` writes ``.heddle/dev.json`` in its directory; :class:`heddle.settings.Settings`
reads it when neither ``NATS_URL`` nor ``VALKEY_URL`` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

__all__ = ["DEV_SESSION_FILE", "DevSession"]

DEV_SESSION_FILE = os.path.join(".heddle", "dev.json")


@dataclass(frozen=True)
class DevSession:
    """Where a running ``heddle dev`` serves, as it wrote to ``.heddle/dev.json`` in its directory.

    Clients and ``heddle`` commands started in that directory use these URLs when
    neither NATS_URL nor VALKEY_URL is set, so other shells need not export them.
    A file whose ``heddle dev`` has exited (its pid is gone) is ignored. Only the
    current directory is looked at, never its parents: a session applies to the
    project it was started in and nowhere else.

    Attributes:
        nats_url: The embedded nats-server's URL.
        valkey_url: The embedded valkey-server's URL.
        pid: Process id of the ``heddle dev`` that wrote the file.
        path: Absolute path of the file.
    """

    nats_url: str
    valkey_url: str
    pid: int
    path: str

    @staticmethod
    def path_in(directory: str | None = None) -> str:
        """The session file's absolute path in ``directory`` (default: the current one)."""
        return os.path.abspath(os.path.join(directory or os.getcwd(), DEV_SESSION_FILE))

    @property
    def alive(self) -> bool:
        """Whether the ``heddle dev`` that wrote the file still runs."""
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            return True
        return True

    @classmethod
    def read(cls, directory: str | None = None) -> DevSession | None:
        """The session file in ``directory``, whether its ``heddle dev`` runs or not; None if absent or unreadable."""
        try:
            path = cls.path_in(directory)
            with open(path, "rb") as f:
                data = json.loads(f.read(64 * 1024))
            return cls(str(data["nats_url"]), str(data["valkey_url"]), int(data["pid"]), path)
        except (OSError, ValueError, KeyError, TypeError):
            # No file, a cwd that was deleted, or a half-written or foreign file: no session.
            return None

    @classmethod
    def find(cls, directory: str | None = None) -> DevSession | None:
        """The running session of ``directory``: None without a file or when its ``heddle dev`` has exited."""
        session = cls.read(directory)
        return session if session is not None and session.alive else None

    def write(self) -> None:
        """Write the file (atomically: a reader never sees half of it)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{self.pid}.tmp"
        with open(tmp, "w") as f:
            json.dump({"nats_url": self.nats_url, "valkey_url": self.valkey_url, "pid": self.pid}, f)
            f.write("\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Remove the file if it is still this session's."""
        current = DevSession.read(os.path.dirname(os.path.dirname(self.path)))
        if current is not None and current.pid == self.pid:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
