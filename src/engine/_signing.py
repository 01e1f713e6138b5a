"""Authenticating pickled values that the journal keeps.

Most values are msgpack, which decodes to data and nothing else.  Values
msgspec cannot encode fall back to pickle, and unpickling runs whatever the
bytes say: a journal or blob that someone else could edit would run their
code on the next resume or cache hit.  So every pickled value shoal stores
carries an HMAC-SHA256 tag made with a secret that only the owner of the
home folder can read (``<home>/secret``, 32 random bytes, mode 0600,
created on first use), and a value whose tag does not verify is never
unpickled.

Layout of a signed value: ``b"s1" + tag (32 bytes) + pickle bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from typing import TYPE_CHECKING

from ._errors import JournalCorrupt, JournalError, UnusableFolder
from ._home import private_dir

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Signer", "Tampered"]

_MAGIC = b"s1"
_TAG = 32


class Tampered(JournalCorrupt):
    """A stored pickled value whose tag does not verify (edited, or signed by another home)."""


class Signer:
    """Signs and checks pickled values with the home folder's secret."""

    __slots__ = ("_key", "path")

    def __init__(self, key: bytes, path: Path | None = None) -> None:
        self._key = key
        self.path = path

    @classmethod
    def for_home(cls, home: Path) -> Signer:
        """The signer of ``home``, creating its secret file on first use (blocking)."""
        path = private_dir(home, "shoal home", UnusableFolder) / "secret"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise JournalError(
                f"the secret file {path} cannot be created: {exc.strerror}; set SHOAL_HOME to a "
                f"writable folder of your own"
            ) from None
        else:
            with contextlib.closing(os.fdopen(fd, "wb")) as fh:
                fh.write(os.urandom(32))
                fh.flush()
                os.fsync(fh.fileno())
        try:
            st = os.stat(path)
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise JournalError(
                    f"the secret file {path} can be read or written by other users (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); make it private with chmod 600 {path}"
                )
            with open(path, "rb") as fh:
                key = fh.read()
        except OSError as exc:
            raise JournalError(f"the secret file {path} cannot be read: {exc.strerror}") from None
        if len(key) < 32:
            # A crash between creating and writing it: nothing was signed
            # with it yet (signing reads it first), so start again.
            os.unlink(path)
            return cls.for_home(home)
        return cls(key, path)

    def sign(self, data: bytes) -> bytes:
        return _MAGIC + hmac.digest(self._key, data, hashlib.sha256) + data

    def open(self, data: bytes, what: str) -> bytes:
        """The pickle bytes of a signed value; raises :class:`Tampered` if the tag is wrong."""
        head = len(_MAGIC) + _TAG
        if len(data) < head or not data.startswith(_MAGIC):
            raise Tampered(
                f"{what} is a pickled value without a signature (edited, or written by an older "
                f"shoal); it is not unpickled"
            )
        body = data[head:]
        if not hmac.compare_digest(data[len(_MAGIC) : head], hmac.digest(self._key, body, hashlib.sha256)):
            raise Tampered(
                f"{what} is a pickled value whose signature does not match this home's secret "
                f"({self.path}): it was edited, or written under another SHOAL_HOME; it is not "
                f"unpickled"
            )
        return body
