"""The public surface: every exported name exists, is documented and says it is engine's."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import engine


@pytest.mark.parametrize("name", engine.__all__)
def test_every_public_name_exists_and_is_documented(name: str) -> None:
    obj = getattr(engine, name)
    assert inspect.getdoc(obj), f"engine.{name} has no docstring"


@pytest.mark.parametrize(
    "name", [n for n in engine.__all__ if isinstance(getattr(engine, n), type)]
)
def test_public_classes_belong_to_the_engine_package(name: str) -> None:
    assert getattr(engine, name).__module__ == "engine"


def test_error_tree_has_one_root() -> None:
    errors = [getattr(engine, n) for n in engine.__all__ if n.endswith(("Error", "Failed", "Crashed", "Timeout", "Corrupt", "Busy", "NotFound"))]
    assert errors
    for cls in errors:
        assert issubclass(cls, engine.EngineError), cls
    assert issubclass(engine.InputError, TypeError)
    assert issubclass(engine.ActionTimeout, TimeoutError)


def test_errors_pickle_with_their_public_name() -> None:
    import pickle

    err = engine.RunFailed("run x failed", run_id="x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is engine.RunFailed and back.run_id == "x" and str(back) == "run x failed"


def test_import_engine_does_not_import_heavy_packages() -> None:
    code = (
        "import sys, engine; heavy = [m for m in ('rich', 'typer', 'aiobotocore', 'botocore', "
        "'asyncssh', 'offload', 'sqlite3') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
