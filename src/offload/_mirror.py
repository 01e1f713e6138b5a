"""A host's copy of an engine's local blob store: what SSH workers read and write ``File``s with.

An engine whose blob store is a folder on its own machine sends its
attempts' ``File``/``Dir`` blobs to each SSH host it uses (see
:mod:`offload._ssh_blobs`), into ``<remote_dir>/blobs``, laid out as a
:class:`engine.LocalBlobStore` lays out its folder.  The workers on that
host are started with ``SHOAL_BLOB_STORE`` naming a :class:`MirrorBlobStore`
of that folder::

    mirror:///home/me/.cache/shoal/blobs?of=file%3A%2F%2F%2Fhome%2Fme%2Fproj%2F.shoal%2Fblobs

It keeps its blobs in the host's folder, and speaks for the engine's
store: its ``uri`` is the engine's (``of=``), and so are the URIs of the
blobs it files.  A reference made on either side therefore names the
same blob on both: a ``File`` received as an argument is read from the
host's copy (the engine sent it there first), and one made by the attempt
names the blob by the URI it will have in the engine's store once the
engine has brought it back, before the result is delivered.
"""

from __future__ import annotations

from urllib.parse import parse_qs, quote, unquote, urlsplit

from engine import ConfigError, LocalBlobStore
from engine.extend import check_digest

__all__ = ["SCHEME", "MirrorBlobStore", "mirror_uri"]

#: The blob store URI scheme of a host's copy (registered in ``engine._registry``).
SCHEME = "mirror"


def mirror_uri(root: str, origin: str) -> str:
    """The ``SHOAL_BLOB_STORE`` setting of a copy at ``root`` (absolute, on the host) of the store ``origin``."""
    return f"{SCHEME}://{quote(root)}?of={quote(origin, safe='')}"


class MirrorBlobStore(LocalBlobStore):
    """A local folder of blobs that stands for another machine's local blob store (see the module)."""

    def __init__(self, spec: str) -> None:
        parts = urlsplit(spec)
        origin = parse_qs(parts.query).get("of", [""])[0]
        if parts.scheme != SCHEME or not parts.path.startswith("/") or not origin.startswith("file://"):
            raise ConfigError(
                f"blob store {spec!r} is not a blob store copy: offload.SSH names one as "
                f"{SCHEME}:///ABSOLUTE/FOLDER?of=file%3A%2F%2F%2F... for the workers it starts; "
                f"set SHOAL_BLOB_STORE to a folder or an s3:// URI instead"
            )
        super().__init__(unquote(parts.path))
        self.origin = origin.rstrip("/")

    def __repr__(self) -> str:
        return f"MirrorBlobStore({str(self.root)!r}, of={self.origin!r})"

    @property
    def uri(self) -> str:
        return self.origin

    def object_uri(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.origin}/{digest[:2]}/{digest}"
