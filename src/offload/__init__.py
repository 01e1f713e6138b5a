"""Remote execution for shoal: backends that run actions elsewhere, and their storage.

``engine`` never imports this package at import time; backends and stores
are resolved by name when a run first needs them.

- :class:`Local`: warm worker processes on this machine (``python -m
  offload.worker`` over pipes).
- :class:`Batch`: AWS Batch jobs (array jobs for fan-outs), re-attached
  by job id after a crash.
- :class:`SSH` and :class:`Host`: a pool of hosts reached over SSH.
- The infrastructure failures a backend reports, all
  :class:`engine.OffloadError`: :class:`WorkerLost`, :class:`HostLost`,
  :class:`Reclaimed`, :class:`SubmitFailed`.  The engine retries them
  within the target's own ``retries=``, without using up the task's.
- A target set up wrongly, not retried: :class:`HostKeyError` (a host key
  that cannot be verified), :class:`AuthenticationFailed` (a login refused).
"""

import importlib
from typing import TYPE_CHECKING, Any

from engine.extend import HostLost as HostLost
from engine.extend import Reclaimed as Reclaimed
from engine.extend import SubmitFailed as SubmitFailed
from engine.extend import WorkerLost as WorkerLost

__all__ = [
    "SSH",
    "AuthenticationFailed",
    "Batch",
    "Host",
    "HostKeyError",
    "HostLost",
    "Local",
    "Reclaimed",
    "SubmitFailed",
    "WorkerLost",
]

# Imported on first use (PEP 562): `import offload` stays cheap for the
# programs that only need one backend or a blob store.
_LAZY = {
    "Batch": "._batch",
    "Local": "._local",
    "SSH": "._ssh",
    "Host": "._ssh",
    "HostKeyError": "._errors",
    "AuthenticationFailed": "._errors",
}

if TYPE_CHECKING:
    from ._batch import Batch as Batch
    from ._errors import AuthenticationFailed as AuthenticationFailed
    from ._errors import HostKeyError as HostKeyError
    from ._local import Local as Local
    from ._ssh import SSH as SSH
    from ._ssh import Host as Host


def _claim(value: Any) -> None:
    """Make a public class say it is ``offload``'s (pickles, reprs and tracebacks name it so)."""
    if isinstance(value, type):
        value.__module__ = __name__


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    _claim(value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


for _name in __all__:
    if _name not in _LAZY:
        _claim(globals()[_name])
del _name
