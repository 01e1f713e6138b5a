"""Configuration: ``[tool.shoal]`` in pyproject.toml, or ``shoal.toml``.

Looked up from the working directory upwards; the first ``shoal.toml``, or
the first ``pyproject.toml`` that has a ``[tool.shoal]`` table, wins.
``SHOAL_CONFIG`` names a file explicitly.  Keyword arguments to
:class:`Engine` override the file; environment variables (``SHOAL_HOME``,
``SHOAL_BLOB_STORE``) fill in what neither sets.

Example::

    [tool.shoal]
    home = ".shoal"                  # journal and blobs (relative: to this file)
    store = ".shoal/shoal.db"        # or "memory"
    max_concurrency = 1000
    blob_store = "s3://my-bucket/shoal"
    cache = false                    # no cache lookups unless Engine(cache=True)
    bundle_exclude = ["data/", "*.ckpt"]  # kept out of the code bundle (gitignore syntax)

    [tool.shoal.offload.gpu]
    backend = "ssh"
    hosts = ["gpu1", "gpu2"]

An unknown key, or a value of the wrong type or out of range, is a
:class:`ConfigError` naming the file and the key (and the keys there are).
"""

# No `from __future__ import annotations`: msgspec resolves Config's
# annotations in the module named by __module__ ("engine").
import os
from pathlib import Path
from typing import Annotated, Any

import msgspec

from ._errors import ConfigError

__all__ = ["Config", "load_config"]


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings read from a config file; every field is optional.

    ``home``: the folder for the journal and the local blob store
    (``$SHOAL_HOME`` otherwise, then ``./.shoal``); ``store``: the journal
    (a SQLite path, or ``"memory"``); ``max_concurrency``: the engine-wide
    limit; ``blob_store``: a folder or ``s3://bucket/prefix``; ``cache``:
    whether tasks with ``cache=`` look up the cache (``Engine(cache=...)``
    and ``run(..., cache=...)`` override it); ``offload``: named targets;
    ``bundle_exclude``: gitignore patterns for files to keep out of the code
    bundle that offloaded tasks import from (relative to the bundled folder).
    """

    home: str | None = None
    store: str | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    blob_store: str | None = None
    cache: bool = True
    offload: dict[str, dict[str, Any]] = {}
    #: Patterns (gitignore syntax) of project files left out of code bundles.
    bundle_exclude: tuple[str, ...] = ()
    #: The file these settings came from, if any.
    source: str | None = None


#: The keys a config file may set.
KEYS = ("home", "store", "max_concurrency", "blob_store", "cache", "offload", "bundle_exclude")


def _find(start: Path) -> tuple[Path, Any] | None:
    for folder in (start, *start.parents):
        candidate = folder / "shoal.toml"
        if candidate.is_file():
            return candidate, _read(candidate)
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            table = _tool_table(_read(candidate))
            if table is not None:
                return candidate, table
    return None


def _tool_table(data: dict[str, Any]) -> Any:
    tool = data.get("tool")
    return tool.get("shoal") if isinstance(tool, dict) else None


def _check_keys(data: Any, file: Path) -> None:
    where = "[tool.shoal]" if file.name == "pyproject.toml" else "the file"
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file}: {where} must be a table of settings, got {data!r}")
    unknown = [key for key in data if key not in KEYS]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"config file {file}: unknown shoal setting {key!r} in {where}.{hint} "
            f"Settings are: {', '.join(KEYS)}."
        )


def _read(path: Path) -> dict[str, Any]:
    import tomllib  # only when a config file exists: keeps `import engine` fast

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix or remove it") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc


def _bad_value(problem: str, data: dict[str, Any]) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.max_concurrency`" as "max_concurrency = 0: ..."."""
    expected, sep, where = problem.rpartition(" - at `$.")
    if not sep:
        return f"invalid shoal setting: {problem}"
    path = where.rstrip("`")
    key = path.split(".")[0].split("[")[0]
    shown = f" = {data[key]!r}" if path == key and key in data else ""
    return f"invalid shoal setting {path}{shown}: {expected}"


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration (see the module docstring for where from)."""
    named_by = ""
    if path is None and os.environ.get("SHOAL_CONFIG"):
        path = os.environ["SHOAL_CONFIG"]
        named_by = " named by SHOAL_CONFIG"
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"config file {file}{named_by} does not exist"
                + ("; point SHOAL_CONFIG at an existing file, or unset it" if named_by else "")
            )
        data = _read(file)
        if file.name == "pyproject.toml":
            data = _tool_table(data) or {}
        found: tuple[Path, Any] | None = (file, data)
    else:
        found = _find(Path.cwd())
    if found is None:
        return Config()
    file, data = found
    _check_keys(data, file)
    try:
        config = msgspec.convert({**data, "source": str(file)}, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config file {file}: {_bad_value(str(exc), data)}; fix it there") from None
    if config.home is not None and not Path(config.home).is_absolute():
        config = msgspec.structs.replace(config, home=str(file.parent / config.home))
    if config.store not in (None, "memory") and not Path(config.store).is_absolute():
        config = msgspec.structs.replace(config, store=str(file.parent / config.store))
    blobs = config.blob_store
    if blobs and "://" not in blobs and not Path(blobs).is_absolute():
        # A folder, like home and store: relative to the file that names it.
        config = msgspec.structs.replace(config, blob_store=str(file.parent / blobs))
    return config
