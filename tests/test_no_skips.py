"""The suite's guard against silent skips (tests/support/no_skips.py), run by a separate pytest
on scratch test files: every way of not running a test must fail the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRATCH = textwrap.dedent(
    """
    import pytest

    def test_passes():
        pass

    def test_skips():
        pytest.skip("no tool here")

    @pytest.mark.skipif(True, reason="never on this machine")
    def test_skipif():
        pass

    @pytest.fixture
    def unavailable():
        pytest.skip("a fixture says no")

    def test_skips_in_a_fixture(unavailable):
        pass

    @pytest.mark.xfail(reason="known bug")
    def test_xfails():
        assert False

    @pytest.mark.xfail(reason="known bug")
    def test_xpasses():
        pass
    """
)
SKIPPED_MODULE = textwrap.dedent(
    """
    import pytest

    pytest.importorskip("no_such_module_anywhere")

    def test_never_collected():
        pass
    """
)


def run_guarded(tmp_path: Path, name: str, source: str) -> tuple[int, dict[str, str], str]:
    """Exit code, outcome per test (from the JUnit XML) and output of ``pytest`` with the guard."""
    (tmp_path / name).write_text(source)
    junit = tmp_path / f"{name}.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.support.no_skips", "-p", "no:randomly",
         "-p", "no:cacheprovider", f"--junitxml={junit}", "-q", name],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = kinds[0] if kinds else "passed"
    return done.returncode, outcomes, done.stdout + done.stderr


def test_a_skip_an_xfail_or_an_xpass_fails_the_run(tmp_path):
    code, outcomes, out = run_guarded(tmp_path, "test_scratch.py", SCRATCH)
    assert code == 1, out
    assert outcomes == {
        "test_passes": "passed",
        "test_skips": "failure",
        "test_skipif": "error",  # skipped at setup: an error of the setup phase
        "test_skips_in_a_fixture": "error",
        "test_xfails": "failure",
        "test_xpasses": "failure",
    }, out
    assert "no tool here: this suite allows no skipped or xfailed test" in out


def test_a_module_skipped_at_import_fails_collection(tmp_path):
    code, outcomes, out = run_guarded(tmp_path, "test_scratch_module.py", SKIPPED_MODULE)
    assert code == 2, out  # interrupted: an error during collection
    assert "skipped at collection" in out and "no_such_module_anywhere" in out
    assert "skipped" not in outcomes.values()
