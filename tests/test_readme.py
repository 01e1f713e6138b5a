"""The README's tour of the API runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_api_tour_runs(tmp_path: Path) -> None:
    text = README.read_text()
    start = text.index("```python\nimport asyncio, engine") + len("```python\n")
    code = text[start : text.index("```", start)]
    script = tmp_path / "tour.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    # 0..9 squared is 285; cubes shifted by one add 2,025 + 10.  Actions: main,
    # 10 squares and 10 shifts (the 10 parallel_map items are not actions).
    assert out.stdout.split() == ["succeeded", "2320", "21", "2320"]
    assert (tmp_path / ".shoal" / "shoal.db").is_file()


def test_the_testing_example_passes_under_the_plugin(pytester: pytest.Pytester) -> None:
    text = README.read_text()
    section = text[text.index("## Testing your flows") :]
    start = section.index("```python\n") + len("```python\n")
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_example=section[start : section.index("```", start)])
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
