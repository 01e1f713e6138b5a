"""Errors of the SSH backend that are not infrastructure failures.

Both say that the target is set up wrongly, so they are *not* retried (a
retry would fail the same way, or worse, talk to a host that cannot be
trusted): they fail the attempt, and the run, at once.  A host that cannot
be reached, or whose connection drops, is :class:`offload.HostLost`
instead, which the engine retries on the target's ``retries=`` budget::

    engine.OffloadError
    ├── HostKeyError            the host's key is not in known_hosts, or differs
    └── AuthenticationFailed    the host refused every client key offered
"""

from __future__ import annotations

from engine import OffloadError

__all__ = ["AuthenticationFailed", "HostKeyError"]


class HostKeyError(OffloadError):
    """A host's key could not be verified against ``known_hosts``: unknown, changed, or no file.

    ``host`` is the host as the target names it (``name:port``) and
    ``known_hosts`` the file it was checked against.
    """

    def __init__(self, message: str, *, host: str = "", known_hosts: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.known_hosts = known_hosts

    def __reduce__(self) -> tuple[type[HostKeyError], tuple[str], dict[str, str]]:
        return (type(self), (str(self),), {"host": self.host, "known_hosts": self.known_hosts})


class AuthenticationFailed(OffloadError):
    """A host refused the login: none of the client keys offered was accepted for that user."""

    def __init__(self, message: str, *, host: str = "", username: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.username = username

    def __reduce__(self) -> tuple[type[AuthenticationFailed], tuple[str], dict[str, str]]:
        return (type(self), (str(self),), {"host": self.host, "username": self.username})


# Named as ``offload``'s wherever they are raised (tracebacks, pickles), even
# before ``offload.HostKeyError`` is first looked up (it is imported lazily).
for _cls in (HostKeyError, AuthenticationFailed):
    _cls.__module__ = "offload"
del _cls
