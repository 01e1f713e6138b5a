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
from ._api import resume as resume
from ._api import run as run
from ._api import runs as runs
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
from ._run import Run as Run
from ._task import Task as Task
from ._task import task as task
from ._trace import trace as trace

__all__ = [
    "ActionEvent",
    "ActionTimeout",
    "BlobCorrupt",
    "BlobError",
    "BlobNotFound",
    "BlobStore",
    "Config",
    "ConfigError",
    "DataFrame",
    "Dir",
    "EncodeError",
    "Engine",
    "EngineError",
    "Environment",
    "EventStream",
    "File",
    "ImportFailed",
    "InputError",
    "JournalBusy",
    "JournalCorrupt",
    "JournalError",
    "JournalVersionError",
    "LocalBlobStore",
    "MapResults",
    "MissingDependency",
    "OffloadError",
    "ParallelIterator",
    "RemoteError",
    "ResourceError",
    "Resources",
    "Retry",
    "Run",
    "RunFailed",
    "RunNotFound",
    "Task",
    "TaskCounts",
    "WorkerCrashed",
    "aresume",
    "arun",
    "current_action",
    "current_run",
    "get_run",
    "group",
    "map",
    "parallel_imap",
    "parallel_map",
    "resume",
    "run",
    "runs",
    "task",
    "trace",
]

# Imported on first use (PEP 562), so that `import engine` stays fast for
# the many programs that never touch the process pool or the blob store.
_LAZY = {
    "BlobStore": "._blobs",
    "LocalBlobStore": "._blobs",
    "DataFrame": "._files",
    "Dir": "._files",
    "File": "._files",
    "ParallelIterator": "._parallel",
    "parallel_imap": "._parallel",
    "parallel_map": "._parallel",
}

if TYPE_CHECKING:
    from ._blobs import BlobStore as BlobStore
    from ._blobs import LocalBlobStore as LocalBlobStore
    from ._files import DataFrame as DataFrame
    from ._files import Dir as Dir
    from ._files import File as File
    from ._parallel import ParallelIterator as ParallelIterator
    from ._parallel import parallel_imap as parallel_imap
    from ._parallel import parallel_map as parallel_map


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


for _name in ("MapResults", "Run"):
    globals()[_name].__module__ = "engine"
del _name
