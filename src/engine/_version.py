"""The installed shoal's version (workers must run the same one as the engine that talks to them)."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["VERSION"]

try:
    #: The installed shoal's version; workers must run the same one.
    VERSION: str = version("shoal")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0+unknown"
