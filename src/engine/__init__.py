"""shoal's in-process engine: tasks, actions, runs, and the scheduler that drives them.

    import engine

    @engine.task(retries=2)
    async def square(x: int) -> int:
        return x * x

    @engine.task
    async def main(n: int = 10) -> int:
        return sum(await engine.map(square, range(n)))

    run = engine.run(main, n=10)
    assert run.result == 285
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._api import aresume as aresume
from ._api import arun as arun
from ._api import get_run as get_run
from ._api import latest_run as latest_run
from ._api import report as report
from ._api import resume as resume
from ._api import run as run
from ._api import runs as runs
from ._cluster import Cluster as Cluster
from ._cluster import cluster as cluster
from ._config import Config as Config
from ._context import current_action as current_action
from ._context import current_run as current_run
from ._engine import Engine as Engine
from ._environment import Environment as Environment
from ._errors import ActionTimeout as ActionTimeout
from ._errors import BlobCorrupt as BlobCorrupt
from ._errors import BlobError as BlobError
from ._errors import BlobNotFound as BlobNotFound
from ._errors import ConfigError as ConfigError
from ._errors import EncodeError as EncodeError
from ._errors import EngineError as EngineError
from ._errors import ImportFailed as ImportFailed
from ._errors import InputError as InputError
from ._errors import JournalBusy as JournalBusy
from ._errors import JournalCorrupt as JournalCorrupt
from ._errors import JournalError as JournalError
from ._errors import JournalVersionError as JournalVersionError
from ._errors import MissingDependency as MissingDependency
from ._errors import OffloadError as OffloadError
from ._errors import RemoteError as RemoteError
from ._errors import ResourceError as ResourceError
from ._errors import RunFailed as RunFailed
from ._errors import RunInUse as RunInUse
from ._errors import RunNotFound as RunNotFound
from ._errors import WorkerCrashed as WorkerCrashed
from ._events import ActionEvent as ActionEvent
from ._events import EventStream as EventStream
from ._events import TaskCounts as TaskCounts
from ._map import MapResults as MapResults
from ._map import group as group
from ._map import map as map
from ._options import Resources as Resources
from ._options import Retry as Retry
from ._records import ActionRecord as ActionRecord
from ._records import AttemptInfo as AttemptInfo
from ._records import ErrorInfo as ErrorInfo
from ._records import RunSummary as RunSummary
from ._records import TaskSummary as TaskSummary
from ._run import Run as Run
from ._task import Task as Task
from ._task import task as task
from ._trace import trace as trace

__all__ = [
    "ActionEvent",
    "ActionRecord",
    "ActionTimeout",
    "AttemptInfo",
    "BlobCorrupt",
    "BlobError",
    "BlobNotFound",
    "BlobReader",
    "BlobStore",
    "Cluster",
    "Config",
    "ConfigError",
    "DataFrame",
    "Dir",
    "DirEntry",
    "EncodeError",
    "Engine",
    "EngineError",
    "Environment",
    "ErrorInfo",
    "EventStream",
    "File",
    "ImportFailed",
    "InputError",
    "JournalBusy",
    "JournalCorrupt",
    "JournalError",
    "JournalVersionError",
    "LocalBlobStore",
    "LogLine",
    "MapResults",
    "MissingDependency",
    "OffloadError",
    "ParallelIterator",
    "RecordedAction",
    "RecordedAttempt",
    "RecordedRun",
    "RemoteError",
    "ResourceError",
    "Resources",
    "Retry",
    "Run",
    "RunFailed",
    "RunInUse",
    "RunNotFound",
    "RunSummary",
    "Task",
    "TaskCounts",
    "TaskSummary",
    "WorkerCrashed",
    "aresume",
    "arun",
    "cluster",
    "current_action",
    "current_run",
    "get_run",
    "group",
    "latest_run",
    "map",
    "parallel_imap",
    "parallel_map",
    "report",
    "resume",
    "run",
    "runs",
    "task",
    "trace",
]

# Imported on first use (PEP 562), so that `import engine` stays fast for
# the many programs that never touch the process pool or the blob store.
_LAZY = {
    "LogLine": "._client",
    "RecordedAction": "._client",
    "RecordedAttempt": "._client",
    "RecordedRun": "._client",
    "BlobReader": "._blobs",
    "BlobStore": "._blobs",
    "LocalBlobStore": "._blobs",
    "DataFrame": "._files",
    "Dir": "._files",
    "DirEntry": "._files",
    "File": "._files",
    "ParallelIterator": "._parallel",
    "parallel_imap": "._parallel",
    "parallel_map": "._parallel",
}

if TYPE_CHECKING:
    from ._blobs import BlobReader as BlobReader
    from ._blobs import BlobStore as BlobStore
    from ._blobs import LocalBlobStore as LocalBlobStore
    from ._client import LogLine as LogLine
    from ._client import RecordedAction as RecordedAction
    from ._client import RecordedAttempt as RecordedAttempt
    from ._client import RecordedRun as RecordedRun
    from ._files import DataFrame as DataFrame
    from ._files import Dir as Dir
    from ._files import DirEntry as DirEntry
    from ._files import File as File
    from ._parallel import ParallelIterator as ParallelIterator
    from ._parallel import parallel_imap as parallel_imap
    from ._parallel import parallel_map as parallel_map


def _claim(value: Any) -> None:
    """Make a public class say it is ``engine``'s (pickles, reprs and tracebacks name it so).

    The one place where ``__module__`` is set: a class gets the public name
    exactly when it is exported here, so every class that claims ``engine``
    can be found there by pickle.  (msgspec resolves a Struct's annotations
    in its ``__module__``, so those modules keep real classes in their
    annotations, not strings.)
    """
    if isinstance(value, type):
        value.__module__ = __name__


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    loaded = importlib.import_module(module, __name__)
    # Every name of that module at once, so that a class reached through
    # another (a Dir's DirEntry) is claimed as well.
    for other, where in _LAZY.items():
        if where == module:
            value = getattr(loaded, other)
            _claim(value)
            globals()[other] = value
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


for _name in __all__:
    if _name not in _LAZY:
        _claim(globals()[_name])
del _name
