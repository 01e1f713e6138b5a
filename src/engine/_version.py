"""The installed shoal's version (workers must run the same one as the engine that talks to them).

Read from the installed distribution's ``METADATA``, found on ``sys.path``
as ``importlib.metadata`` finds it (the first ``shoal-*.dist-info``), but
without importing ``importlib.metadata``: that import is a good part of the
time a worker takes to start, and every worker start is on the way to a
first result.  Any other layout (an egg, a zip) is left to
``importlib.metadata``.
"""

import os
import sys

__all__ = ["VERSION"]


def _from_dist_info() -> str | None:
    for entry in sys.path:
        folder = entry or "."
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.lower().startswith("shoal-") and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(folder, name, "METADATA"), encoding="utf-8") as fh:
                        for line in fh:
                            if line.startswith("Version:"):
                                return line.split(":", 1)[1].strip()
                            if not line.strip():
                                break  # the end of the headers
                except OSError:
                    continue
    return None


def _version() -> str:
    found = _from_dist_info()
    if found is not None:
        return found
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shoal")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


#: The installed shoal's version; workers must run the same one.
VERSION: str = _version()
