"""The benchmark commands bench/README.md documents work as written: ``python3
bench/<name>/run.py`` re-executes itself under the repository's .venv (where jitlaunch and
dnslib are), and without one it exits 2 naming what is missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

README = (ROOT / "bench" / "README.md").read_text()
#: Every ``<interpreter> bench/<name>/run.py`` the README names, as written.
DOCUMENTED = sorted(set(re.findall(r"`((?:python3|\.venv/bin/python) bench/\w+/run\.py)", README)))
#: The interpreter the venv was made from: it lacks the venv's packages.
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")


def _argv(command: str) -> list[str]:
    interpreter, script = command.split()
    if interpreter == "python3":
        found = shutil.which("python3")
        if found is None:
            pytest.skip("no python3 on PATH")
        return [found, script]
    return [str(ROOT / interpreter), script]


def test_the_readme_documents_every_benchmark() -> None:
    scripts = {p.parent.name for p in (ROOT / "bench").glob("*/run.py")}
    assert {c.split()[1].split("/")[1] for c in DOCUMENTED} == scripts
    assert "python3 bench/dns_qps/run.py" in DOCUMENTED


@pytest.mark.parametrize("command", DOCUMENTED)
def test_documented_command_starts(command: str) -> None:
    """As written, it gets as far as its argument parser (every import done)."""
    res = subprocess.run([*_argv(command), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    if "libvirt" in command and res.returncode == 2:
        # libvirt-python (scripts/setup's libvirt extra) did not build here: said, not a crash.
        assert res.stderr.startswith("libvirt: missing Python module(s) libvirt for "), res.stderr
        assert subprocess.run([str(ROOT / ".venv/bin/python"), "-c", "import libvirt"],
                              capture_output=True, timeout=60).returncode != 0
        return
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: run.py")


def test_another_interpreter_runs_it_under_the_venv() -> None:
    """A throwaway benchmark that prints its interpreter's prefix and its arguments."""
    probe = ROOT / "bench" / f"_probe_interpreter_{os.getpid()}"
    probe.mkdir()
    try:
        (probe / "run.py").write_text(
            "import sys\nfrom pathlib import Path\n"
            "sys.path.insert(0, str(Path(__file__).resolve().parent.parent))\n"
            "import common  # noqa: F401\nprint(sys.prefix, sys.argv[1:])\n")
        res = subprocess.run([BASE_PYTHON, f"bench/{probe.name}/run.py", "a", "--b"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(probe)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{ROOT / '.venv'} ['a', '--b']\n"


def test_without_the_venv_what_is_missing_is_named_and_exit_2() -> None:
    has_dnslib = subprocess.run([BASE_PYTHON, "-c", "import dnslib"], capture_output=True,
                                timeout=60).returncode == 0
    if has_dnslib:
        pytest.skip(f"{BASE_PYTHON} has dnslib: nothing is missing")
    # The mark the re-exec sets stands for "no .venv to go to".
    env = dict(os.environ, JITLAUNCH_BENCH_VENV="1")
    res = subprocess.run([BASE_PYTHON, "bench/dns_qps/run.py", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.startswith("dns_qps: missing Python module(s) dnslib")
    assert "run scripts/setup" in res.stderr and "Traceback" not in res.stderr
