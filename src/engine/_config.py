"""Configuration: ``[tool.shoal]`` in pyproject.toml, or ``shoal.toml``.

Looked up from the working directory upwards; the first ``shoal.toml``, or
the first ``pyproject.toml`` that has a ``[tool.shoal]`` table, wins.
``SHOAL_CONFIG`` names a file explicitly.  Keyword arguments to
:class:`Engine` override the file; environment variables (``SHOAL_HOME``,
``SHOAL_BLOB_STORE``) fill in what neither sets.

Example::

    [tool.shoal]
    store = ".shoal/shoal.db"        # or "memory"
    max_concurrency = 1000
    blob_store = "s3://my-bucket/shoal"

    [tool.shoal.offload.gpu]
    backend = "ssh"
    hosts = ["gpu1", "gpu2"]
"""

# No `from __future__ import annotations`: msgspec resolves Config's
# annotations in the module named by __module__ ("engine").
import os
from pathlib import Path
from typing import Any

import msgspec

from ._errors import ConfigError

__all__ = ["Config", "load_config"]


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings read from a config file; every field is optional."""

    home: str | None = None
    store: str | None = None
    max_concurrency: int | None = None
    blob_store: str | None = None
    cache: bool = True
    offload: dict[str, dict[str, Any]] = {}
    #: The file these settings came from, if any.
    source: str | None = None


def _find(start: Path) -> tuple[Path, dict[str, Any]] | None:
    for folder in (start, *start.parents):
        candidate = folder / "shoal.toml"
        if candidate.is_file():
            return candidate, _read(candidate)
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            table = _read(candidate).get("tool", {}).get("shoal")
            if table is not None:
                return candidate, table
    return None


def _read(path: Path) -> dict[str, Any]:
    import tomllib  # only when a config file exists: keeps `import engine` fast

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix or remove it") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration (see the module docstring for where from)."""
    if path is None and os.environ.get("SHOAL_CONFIG"):
        path = os.environ["SHOAL_CONFIG"]
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        data = _read(file)
        if file.name == "pyproject.toml":
            data = data.get("tool", {}).get("shoal", {})
        found: tuple[Path, dict[str, Any]] | None = (file, data)
    else:
        found = _find(Path.cwd())
    if found is None:
        return Config()
    file, data = found
    try:
        config = msgspec.convert({**data, "source": str(file)}, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid shoal settings in {file}: {exc}") from None
    if config.home is not None and not Path(config.home).is_absolute():
        config = msgspec.structs.replace(config, home=str(file.parent / config.home))
    if config.store not in (None, "memory") and not Path(config.store).is_absolute():
        config = msgspec.structs.replace(config, store=str(file.parent / config.store))
    return config
