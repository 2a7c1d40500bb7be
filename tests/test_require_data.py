"""ECGTWIN_REQUIRE_DATA=1 (set by .ci/run) turns a missing ../shared/data from a skip into a failure.

Each case runs pytest in a subprocess on a tiny test file beside a copy of tests/conftest.py, so that the
fixtures under test are the repository's own, with ECGTWIN_SHARED_DATA pointing where there is no data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS = '''
def test_needs_shared_data(shared_data):
    assert shared_data.is_dir()


def test_needs_ptbxl(ptbxl_root):
    assert ptbxl_root.is_dir()
'''


def run_pytest(tmp_path: Path, data: Path, require: str | None) -> subprocess.CompletedProcess:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(CONFTEST, project / "conftest.py")
    (project / "test_data.py").write_text(TESTS)
    (project / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ECGTWIN_REQUIRE_DATA", "PYTEST_ADDOPTS")}
    env.update({"ECGTWIN_SHARED_DATA": str(data), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    if require is not None:
        env["ECGTWIN_REQUIRE_DATA"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
                           "-c", str(project / "pytest.ini"), "--rootdir", str(project), str(project)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("require", [None, "0"])
def test_missing_data_skips_by_default(tmp_path, require):
    result = run_pytest(tmp_path, tmp_path / "missing", require)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout and "failed" not in result.stdout
    assert "real PhysioNet records not found" in result.stdout


def test_missing_data_fails_when_required(tmp_path):
    result = run_pytest(tmp_path, tmp_path / "missing", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stdout.lower() and "skipped" not in result.stdout
    assert "ECGTWIN_REQUIRE_DATA=1 requires the real records" in result.stdout


def test_missing_subset_fails_when_required(tmp_path):
    """The folder is there but PTB-XL is not: the shared_data test passes, the ptbxl_root one fails."""
    (tmp_path / "data").mkdir()
    result = run_pytest(tmp_path, tmp_path / "data", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "PTB-XL subset not found" in result.stdout
