"""Private folders: shoal's home, its blob store and its download cache.

Everything shoal keeps on disk (the journal, blobs, downloaded copies) is
read back and trusted later, so every folder it creates is owner-only
(0700, whatever the umask), and an existing folder that other users can
write into is refused: anyone who can write there could replace what a
later run reads.  Errors from the file system are mapped to the caller's
error class with the path and what to do, instead of a raw
``PermissionError`` traceback.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from ._errors import EngineError

__all__ = ["private_dir"]


def private_dir(path: Path, what: str, error: type[EngineError]) -> Path:
    """Create ``path`` (and missing parents) owner-only, or check the existing folder.

    A folder that appears meanwhile (another process made it) is checked
    on the next call, not this one.

    ``what`` names the folder in messages ("shoal home", "blob store");
    ``error`` is the class raised when the folder cannot be used.  Runs
    on whichever thread the caller is on: it is blocking file-system work.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise error(f"{what} {path} cannot be used: {exc.strerror}; {_advice(path)}") from None
    if st is None:
        try:
            # One level at a time, top down: ``mkdir(parents=True)`` would
            # give the missing parents the umask's mode.  Existing folders
            # above (``/tmp``, a project folder) are the user's, left alone.
            missing = [path]
            while not os.path.lexists(missing[-1].parent) and missing[-1].parent != missing[-1]:
                missing.append(missing[-1].parent)
            for folder in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    folder.mkdir(mode=0o700)
                    # mkdir's mode is filtered by the umask: set it exactly.
                    os.chmod(folder, 0o700)
        except NotADirectoryError:
            raise error(
                f"{what} {path} cannot be created: a part of that path is a file, not a folder; "
                f"{_advice(path)}"
            ) from None
        except OSError as exc:
            raise error(f"{what} {path} cannot be created: {exc.strerror}; {_advice(path)}") from None
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a file, not a folder; {_advice(path)}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise error(
            f"{what} {path} can be written by other users (mode {stat.S_IMODE(st.st_mode):04o}), "
            f"so what shoal reads back from it could have been replaced; make it private "
            f"(chmod 700 {path}) or point SHOAL_HOME at a folder of your own"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise error(f"{what} {path} is not writable by this user; {_advice(path)}")
    return path


def _advice(path: Path) -> str:
    return f"set SHOAL_HOME (or Engine(home=...)) to a writable folder of your own, or fix {path}"
