"""The errors shoal raises, all rooted at :class:`EngineError`.

The tree::

    EngineError
    ├── InputError (also TypeError)        a call's arguments do not fit the task
    ├── ConfigError (also ValueError)      a bad option, setting or config file
    ├── ResourceError                      asked for more CPU/GPU slots than exist
    ├── RunFailed                          Run.result of a run that failed; __cause__
    │                                      is the task's own exception
    ├── RunNotFound (also LookupError)     no run with that id in the journal
    ├── RunInUse                           another process runs or resumes that run
    ├── ImportFailed                       a run's root task can no longer be imported
    ├── ActionTimeout (also TimeoutError)  an attempt ran past its task's timeout
    ├── EncodeError (also TypeError)       a result can be neither encoded nor pickled
    ├── JournalError                       the journal cannot be read or written
    │   ├── JournalCorrupt                 not a shoal journal, truncated or damaged
    │   ├── JournalVersionError            written by a newer shoal
    │   └── JournalBusy                    another process holds the write lock
    ├── MissingDependency (also ImportError) an optional extra is not installed
    ├── WorkerCrashed                      a parallel_map worker process died
    ├── BlobError                          the blob store failed
    │   ├── BlobNotFound (also LookupError)
    │   └── BlobCorrupt                    a blob's content does not match its digest
    └── OffloadError                       a remote backend failed
        ├── RemoteError                    the remote task raised; carries its traceback
        └── (infrastructure, exported by ``offload``; retried by the target's
            own ``retries=``, not the task's)
            ├── WorkerLost                 the worker process running an attempt died
            ├── HostLost                   the host running an attempt went away
            ├── Reclaimed                  a spot instance was reclaimed under a job
            └── SubmitFailed               the backend could not start the attempt

Every message says what happened, to what (task, action, file, host), and
what to do next.  Third-party errors are mapped to these at the boundary
where the third-party library is called.
"""

from __future__ import annotations

__all__ = [
    "ActionTimeout",
    "BlobCorrupt",
    "BlobError",
    "BlobNotFound",
    "ConfigError",
    "EncodeError",
    "EngineError",
    "HostLost",
    "ImportFailed",
    "InputError",
    "JournalBusy",
    "JournalCorrupt",
    "JournalError",
    "JournalVersionError",
    "MissingDependency",
    "OffloadError",
    "Reclaimed",
    "RemoteError",
    "ResourceError",
    "RunFailed",
    "RunInUse",
    "RunNotFound",
    "SubmitFailed",
    "WorkerCrashed",
    "WorkerLost",
]


class EngineError(Exception):
    """Root of every error shoal raises itself."""


class InputError(EngineError, TypeError):
    """Arguments of a task call do not match the task's signature or annotations."""


class ConfigError(EngineError, ValueError):
    """An option, setting or configuration file is invalid."""


class ResourceError(EngineError):
    """An action asks for more local resource slots than the machine has."""


class RunFailed(EngineError):
    """Raised by ``Run.result`` when the run failed; ``__cause__`` is the task's error."""

    def __init__(self, message: str, *, run_id: str = "") -> None:
        super().__init__(message)
        self.run_id = run_id

    def __reduce__(self) -> tuple[type[RunFailed], tuple[str], dict[str, str]]:
        return (type(self), (str(self),), {"run_id": self.run_id})


class RunNotFound(EngineError, LookupError):
    """No run with the given id exists in the journal."""


class RunInUse(EngineError):
    """A run cannot be started or resumed here: another process owns it now."""


class ImportFailed(EngineError):
    """A run's root task could not be imported again (for resume)."""


class ActionTimeout(EngineError, TimeoutError):
    """An attempt of an action ran longer than its task's ``timeout``."""


class EncodeError(EngineError, TypeError):
    """A value can be neither msgspec-encoded nor pickled, so it cannot be journaled."""


class JournalError(EngineError):
    """The journal could not be read or written."""


class UnusableFolder(JournalError):
    """Shoal's home (or the journal's folder) cannot be used as it is: a file, unwritable, or open to others.

    A problem of the setup, not of a run (the command line reports it as a
    usage error, exit code 2).  Not exported: catch :class:`JournalError`.
    """


class JournalCorrupt(JournalError):
    """The journal file is not a shoal journal, or it is truncated or damaged."""


class JournalVersionError(JournalError):
    """The journal was written by a newer version of shoal."""


class JournalBusy(JournalError):
    """Another process holds the journal's write lock for too long."""


class MissingDependency(EngineError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class WorkerCrashed(EngineError):
    """A ``parallel_map`` worker process died while working on a chunk of items."""


class BlobError(EngineError):
    """The blob store could not store or fetch an object."""


class BlobNotFound(BlobError, LookupError):
    """No object with that key or digest is in the blob store."""


class BlobCorrupt(BlobError):
    """A blob read back does not hash to its digest: it was changed or damaged after it was stored."""


class OffloadError(EngineError):
    """A remote execution backend failed (connection, submission, lost host)."""


class RemoteError(OffloadError):
    """A task raised on a remote worker; the message carries the remote traceback."""

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str], dict[str, str]]:
        return (
            type(self),
            (str(self),),
            {"remote_type": self.remote_type, "remote_traceback": self.remote_traceback},
        )


class InfrastructureError(OffloadError):
    """An attempt failed for a reason that is not the task's own (see the tree above).

    Retried within the target's ``retries=`` budget, with backoff, without
    using up the task's ``retries``.  Not exported: catch the subclasses,
    or :class:`OffloadError`.
    """


class WorkerLost(InfrastructureError):
    """The worker process running an attempt died (killed, out of memory, crashed)."""


class HostLost(InfrastructureError):
    """The host running an attempt went away (connection lost, keepalives unanswered)."""


class Reclaimed(InfrastructureError):
    """The spot instance running a job was reclaimed."""


class SubmitFailed(InfrastructureError):
    """The backend could not start the attempt (no worker could start, submission refused)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process, as text.

    Attached as the ``__cause__`` of that exception when it is raised again
    here (a ``parallel_map`` worker's, an offloaded attempt's), so that a
    traceback shows where over there it happened.  Not exported: it is
    only ever a cause.
    """

    def __init__(self, tb: str, *, where: str = "") -> None:
        super().__init__(tb)
        self.tb = tb
        #: The host and pid it was raised in, when known.
        self.where = where

    def __str__(self) -> str:
        if self.where:
            return f"raised on {self.where}:\n\n{self.tb.rstrip()}"
        return f'\n"""\n{self.tb}"""'
