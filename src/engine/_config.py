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

    [tool.shoal.offload.gpu]         # a target named "gpu" (in shoal.toml: [offload.gpu])
    backend = "ssh"                  # "local", "ssh" or "batch"
    hosts = ["gpu1", "gpu2"]         # the rest: the backend's keyword arguments

An unknown key, or a value of the wrong type or out of range, is a
:class:`ConfigError` naming the file and the key (and the keys there are);
in a target table, the table too.  Each target table becomes a
:class:`LocalTarget`, :class:`SSHTarget` or :class:`BatchTarget`, chosen
by its ``backend`` key.
"""

# No `from __future__ import annotations`: msgspec resolves Config's
# annotations in the module named by __module__ ("engine").
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar

import msgspec

from ._errors import ConfigError

__all__ = ["BatchTarget", "Config", "LocalTarget", "SSHTarget", "Target", "load_config"]

# -- offload targets -----------------------------------------------------------------

Count = Annotated[int, msgspec.Meta(ge=1)]
Retries = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

#: The name that, in an offload map, means "run in this process": no target may take it.
IN_PROCESS = "local"


class Target(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="backend"):
    """A named offload target from a config table; its ``backend`` key picks the subclass.

    The fields are the backend's keyword arguments, with the backend's
    defaults; :meth:`options` gives those to pass to its constructor.
    """

    #: The ``backend`` value of this kind of table (the backend's own ``kind``).
    backend: ClassVar[str]

    def options(self) -> dict[str, Any]:
        """The keyword arguments for the backend's constructor: the keys the table set.

        A key left out, or set to its default, is not passed, so the
        constructor's own default applies.
        """
        options: dict[str, Any] = {}
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            if field.required:
                options[field.name] = value
                continue
            default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
            if value != default:
                options[field.name] = value
        return options


class LocalTarget(Target, frozen=True, tag="local"):
    """``backend = "local"``: ``offload.Local``, worker processes on this machine.

    ``python = ""`` (the default) means the interpreter running shoal.
    """

    backend: ClassVar[str] = "local"

    workers: Count = 2
    python: str = ""
    env: dict[EnvName, str] = {}
    retries: Retries = 3
    concurrency: Count = 1


class SSHTarget(Target, frozen=True, tag="ssh"):
    """``backend = "ssh"``: ``offload.SSH``, warm workers on hosts reached over SSH.

    A host is ``"name"``, ``"user@name"`` or ``"name:port"``.  Host keys
    are checked against ``known_hosts``; ``known_hosts = ""`` (no file)
    turns the check off and is refused unless ``insecure_no_host_check =
    true`` says so too.  ``workers`` unset: as many as each host has CPUs.
    """

    backend: ClassVar[str] = "ssh"

    hosts: Annotated[list[NonEmpty], msgspec.Meta(min_length=1)]
    known_hosts: str = "~/.ssh/known_hosts"
    client_keys: list[NonEmpty] | None = None
    username: NonEmpty | None = None
    workers: Count | None = None
    python: NonEmpty = "python3"
    remote_dir: NonEmpty = "~/.cache/shoal"
    env: dict[EnvName, str] = {}
    connect_timeout: Seconds = 10.0
    keepalive_interval: Seconds = 5.0
    keepalive_count_max: Count = 3
    retries: Retries = 3
    insecure_no_host_check: bool = False
    concurrency: Count = 1
    #: The most ranks of gangs (``nodes=``) on one host at once.
    ranks_per_host: Count = 1

    def __post_init__(self) -> None:
        if not self.known_hosts and not self.insecure_no_host_check:
            raise ValueError(
                'known_hosts = "" turns host key checks off; name a known_hosts file, or say '
                "insecure_no_host_check = true as well"
            )

    def options(self) -> dict[str, Any]:
        options = super().options()
        if options.get("known_hosts") == "":
            options["known_hosts"] = None  # what the backend takes for "no file"
        return options


class BatchTarget(Target, frozen=True, tag="batch"):
    """``backend = "batch"``: ``offload.Batch``, AWS Batch jobs.

    ``image`` (a job definition is registered for it) or
    ``job_definition`` (an existing one) must be given; ``storage`` is an
    ``s3://bucket/prefix`` (unset: the engine's S3 blob store).
    """

    backend: ClassVar[str] = "batch"

    job_queue: NonEmpty
    image: NonEmpty | None = None
    job_definition: NonEmpty | None = None
    storage: Annotated[str, msgspec.Meta(pattern=r"^s3://[^/]+")] | None = None
    python: NonEmpty = "python"
    region: NonEmpty | None = None
    endpoint_url: NonEmpty | None = None
    array: bool = True
    # AWS Batch takes array jobs of 2 to 10,000 children.
    max_array_size: Annotated[int, msgspec.Meta(ge=2, le=10_000)] = 10_000
    poll_interval: Seconds = 5.0
    retries: Retries = 3
    job_role_arn: NonEmpty | None = None
    env: dict[EnvName, str] = {}
    # Where rank 0 of a gang listens on the main node of its multi-node job.
    master_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 29500

    def __post_init__(self) -> None:
        if self.image is None and self.job_definition is None:
            raise ValueError(
                "a batch target needs image (a job definition is registered for it) or "
                "job_definition (an existing one)"
            )


#: Target kinds by their ``backend`` value.
TARGETS: dict[str, type[Target]] = {cls.backend: cls for cls in (LocalTarget, SSHTarget, BatchTarget)}
AnyTarget = LocalTarget | SSHTarget | BatchTarget


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings read from a config file; every field is optional.

    ``home``: the folder for the journal and the local blob store
    (``$SHOAL_HOME`` otherwise, then ``./.shoal``); ``store``: the journal
    (a SQLite path, or ``"memory"``); ``max_concurrency``: the engine-wide
    limit; ``blob_store``: a folder or ``s3://bucket/prefix``; ``cache``:
    whether tasks with ``cache=`` look up the cache (``Engine(cache=...)``
    and ``run(..., cache=...)`` override it); ``offload``: named targets,
    each a :class:`LocalTarget`, :class:`SSHTarget` or :class:`BatchTarget`;
    ``bundle_exclude``: gitignore patterns for files to keep out of the code
    bundle that offloaded tasks import from (relative to the bundled folder).
    """

    home: str | None = None
    store: str | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    blob_store: str | None = None
    cache: bool = True
    # Invariant: no key is IN_PROCESS ("local" means "run in this process").
    offload: dict[str, AnyTarget] = {}
    #: Patterns (gitignore syntax) of project files left out of code bundles.
    bundle_exclude: tuple[str, ...] = ()
    #: The file these settings came from, if any (the file of the targets too).
    source: str | None = None

    def __post_init__(self) -> None:
        # load_config refuses such a table, naming the file; this covers a
        # Config made in code.
        if IN_PROCESS in self.offload:
            raise ConfigError(
                f"Config offload=: no target may be named {IN_PROCESS!r}, which means \"run in this "
                f"process\" in an offload map; name it otherwise"
            )

    def target_table(self, name: str, *, with_file: bool = True) -> str:
        """Where target ``name`` is (or would be) configured, for messages.

        ``[tool.shoal.offload.gpu] in /path/pyproject.toml``, or
        ``[offload.gpu] in /path/shoal.toml``; without a file (or
        ``with_file=False``), the table alone.
        """
        if self.source is None:
            return _table(name, pyproject=False)
        table = _table(name, pyproject=Path(self.source).name == "pyproject.toml")
        return f"{table} in {self.source}" if with_file else table


#: The keys a config file may set.
KEYS = ("home", "store", "max_concurrency", "blob_store", "cache", "offload", "bundle_exclude")


def _table(name: str, *, pyproject: bool) -> str:
    """A target's TOML table header, its name quoted where TOML needs it."""
    bare = name.replace("-", "").replace("_", "").isalnum() and name.isascii()
    key = name if bare else msgspec.json.encode(name).decode()
    return f"[{'tool.shoal.' if pyproject else ''}offload.{key}]"


def _hint(word: str, choices: list[str]) -> str:
    import difflib  # only for a bad config: keeps `import engine` fast

    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _targets(tables: Any, file: Path) -> None:
    """Check each ``[offload.NAME]`` table, raising a :class:`ConfigError` that names file, table and key.

    Values that are not tables are left to the check of the whole file
    (it names ``offload[...]`` and :func:`_bad_value` adds the table).
    """
    if not isinstance(tables, dict):
        return
    pyproject = file.name == "pyproject.toml"
    for name, table in tables.items():
        where = _table(name, pyproject=pyproject)
        lead = f"config file {file}: {where}"
        if name == IN_PROCESS:
            raise ConfigError(
                f"{lead}: no target may be named {IN_PROCESS!r}, which means \"run in this process\" "
                f"in an offload map (for worker processes on this machine, give the table another "
                f'name and backend = "local")'
            )
        if not isinstance(table, dict):
            continue
        kinds = list(TARGETS)
        if "backend" not in table:
            choices = " | ".join(f'"{k}"' for k in kinds)
            raise ConfigError(
                f"{lead} has no backend key; say which backend runs this target: backend = {choices}"
            )
        kind = table["backend"]
        cls = TARGETS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            hint = _hint(kind, kinds) if isinstance(kind, str) else ""
            raise ConfigError(
                f"{lead}: unknown backend {kind!r}.{hint} Backends are: {', '.join(kinds)}; fix it there"
            )
        keys = ["backend", *cls.__struct_fields__]
        unknown = [key for key in table if key not in keys]
        if unknown:
            raise ConfigError(
                f"{lead}: unknown key {unknown[0]!r} for backend {kind!r}.{_hint(unknown[0], keys)} "
                f"Its keys are: {', '.join(keys)}; fix it there"
            )
        try:
            msgspec.convert(table, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{lead}: {_bad_target_value(str(exc), table, kind)}; fix it there") from None


def _bad_target_value(problem: str, table: dict[str, Any], kind: str) -> str:
    """msgspec's complaint about one target table, in terms of its keys."""
    missing = problem.partition("Object missing required field `")[2]
    if missing:
        return f"missing key {missing.rstrip('`')!r}, which a {kind!r} target needs"
    expected, sep, where = problem.rpartition(" - at `$.")
    of_key = ""
    if not sep:
        # A bad dict key: "... - at `key` in `$.env`".
        expected, sep, where = problem.rpartition(" - at `key` in `$.")
        of_key = "key in "
    if not sep:
        return problem  # a check of several keys together, which says which
    path = where.rstrip("`")
    key = path.split(".")[0].split("[")[0]
    shown = f" = {table[key]!r}" if key in table else ""
    at = f" (at {path})" if path != key else ""
    return f"invalid {of_key}{key}{shown}: {expected}{at}"


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
        key = unknown[0]
        hint = _hint(key, list(KEYS))
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


def _bad_value(problem: str, data: dict[str, Any], file: Path) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.max_concurrency`" as "max_concurrency = 0: ..."."""
    expected, sep, where = problem.rpartition(" - at `$.")
    if not sep:
        return f"invalid shoal setting: {problem}"
    path = where.rstrip("`")
    key = path.split(".")[0].split("[")[0]
    shown = f" = {data[key]!r}" if path == key and key in data else ""
    message = f"invalid shoal setting {path}{shown}: {expected}"
    tables = data.get("offload")
    if path.startswith("offload[...]") and isinstance(tables, dict):
        # msgspec does not name the key of a dict: find the table that is not one.
        for name, table in tables.items():
            if not isinstance(table, dict):
                where = _table(name, pyproject=file.name == "pyproject.toml")
                message += f" ({where} = {table!r} must be a table with a backend key and its options)"
                break
    return message


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
    _targets(data.get("offload"), file)
    try:
        config = msgspec.convert({**data, "source": str(file)}, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config file {file}: {_bad_value(str(exc), data, file)}; fix it there") from None
    if config.home is not None and not Path(config.home).is_absolute():
        config = msgspec.structs.replace(config, home=str(file.parent / config.home))
    if config.store not in (None, "memory") and not Path(config.store).is_absolute():
        config = msgspec.structs.replace(config, store=str(file.parent / config.store))
    blobs = config.blob_store
    if blobs and "://" not in blobs and not Path(blobs).is_absolute():
        # A folder, like home and store: relative to the file that names it.
        config = msgspec.structs.replace(config, blob_store=str(file.parent / blobs))
    return config
