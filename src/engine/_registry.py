"""Implementations found by name, imported only when first used.

``engine`` never imports ``offload`` (nor asyncssh or botocore) at import
time: a backend kind named in a config table (``backend = "ssh"``) and
the code bundler are looked up here, by module path, when a run first
needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    from types import ModuleType

    from ._config import Config

__all__ = ["BACKENDS", "BLOB_STORES", "backend_class", "blob_store_class", "build_target", "bundler"]

#: Backend kinds (the ``backend`` key of an offload table) -> ``module:class``.
BACKENDS = {
    "local": "offload._local:Local",
    "ssh": "offload._ssh:SSH",
    "batch": "offload._batch:Batch",
}

#: Blob store URI schemes -> ``module:class`` (local folders and ``file://`` are built in).
#: ``mirror://`` is an SSH host's copy of an engine's local store, which
#: ``offload.SSH`` names for the workers it starts.
BLOB_STORES = {"s3": "offload._s3:S3BlobStore", "mirror": "offload._mirror:MirrorBlobStore"}


def _load(path: str, what: str) -> Any:
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise MissingDependency(
            f"{what} needs {exc.name}, which is not installed; install shoal with its "
            f"dependencies (pip install shoal)"
        ) from exc
    return getattr(module, name) if name else module


def backend_class(kind: str) -> Any:
    """The backend class of a kind (``"local"``, ``"ssh"``, ``"batch"``)."""
    path = BACKENDS.get(kind)
    if path is None:
        raise ConfigError(f"unknown offload backend {kind!r}; backends are {', '.join(BACKENDS)}")
    return _load(path, f"the {kind!r} offload backend")


def blob_store_class(uri: str) -> Any:
    """The blob store class for a URI's scheme (``s3://bucket/prefix``)."""
    scheme = uri.partition("://")[0]
    path = BLOB_STORES.get(scheme)
    if path is None:
        raise ConfigError(
            f"blob store {uri!r} has an unknown scheme; use s3://bucket/prefix, "
            "a file:// URI or a directory path"
        )
    return _load(path, f"the {scheme}:// blob store")


def build_target(name: str, table: Any, config: Config) -> Any:
    """The backend object a config table describes (validated when the config was read)."""
    cls = backend_class(table.backend)
    try:
        return cls(**table.options())
    except ConfigError as exc:
        where = f" in {config.source}" if config.source else ""
        raise ConfigError(f"offload target {name!r}{where}: {exc}") from None


def bundler() -> ModuleType:
    """The module that finds tasks' import paths and packs code bundles (``offload._bundle``)."""
    module: ModuleType = _load("offload._bundle", "offloading a task")
    return module
