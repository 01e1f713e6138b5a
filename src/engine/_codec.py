"""Encoding of values for digests and for the journal.

Values are msgpack-encoded with msgspec.  A value msgspec cannot encode
falls back to pickle and is marked as such (``PICKLE``).  Digests are
computed over a deterministic encoding (dict keys and sets sorted), so the
same inputs give the same digest in every process, whatever the hash seed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from ._errors import EncodeError

__all__ = ["MSGPACK", "PICKLE", "decode_value", "digest", "digest_bytes", "encode_value"]

MSGPACK: Final = "msgpack"
PICKLE: Final = "pickle"
#: Kinds of recorded output stored in the journal itself (not in the blob store).
INLINE_KINDS: Final = frozenset((MSGPACK, PICKLE))

_det_encoder = msgspec.msgpack.Encoder(order="deterministic")
_encoder = msgspec.msgpack.Encoder()
_any_decoder = msgspec.msgpack.Decoder()


def digest(*parts: Any) -> str:
    """A 32-hex-digit digest of ``parts``, stable across processes."""
    return digest_bytes(*parts).hex()


def digest_bytes(*parts: Any) -> bytes:
    """The 16-byte digest behind :func:`digest`."""
    try:
        data = _det_encoder.encode(parts)
    except (TypeError, ValueError):
        # Not msgspec-encodable (an arbitrary object): pickle is the best
        # stable-enough identity we have; it is stable for a given program.
        import pickle

        try:
            data = pickle.dumps(parts, protocol=5)
        except Exception:
            data = repr(parts).encode()
    return hashlib.blake2b(data, digest_size=16).digest()


def encode_value(value: Any, *, what: str) -> tuple[str, bytes]:
    """Encode a value for the journal: (kind, bytes).

    ``what`` names the value in the error (``"output of task 'x'"``).
    """
    try:
        return MSGPACK, _encoder.encode(value)
    except (TypeError, ValueError, OverflowError):
        pass
    import pickle  # the fallback only: keeps `import engine` fast

    try:
        return PICKLE, pickle.dumps(value, protocol=5)
    except Exception as exc:
        raise EncodeError(
            f"the {what} ({type(value).__qualname__}) can be neither msgspec-encoded nor "
            f"pickled ({exc}); return plain data, a msgspec Struct or dataclass, or an "
            f"engine.File for large or opaque data"
        ) from exc


def decode_value(kind: str, data: bytes, type: Any = Any) -> Any:
    """Decode what :func:`encode_value` produced, typed when ``type`` is known."""
    if kind == PICKLE:
        import pickle

        return pickle.loads(data)
    if type is Any:
        return _any_decoder.decode(data)
    try:
        return msgspec.msgpack.decode(data, type=type)
    except (TypeError, msgspec.ValidationError):
        return _any_decoder.decode(data)
