"""The Debian package, built from this checkout by scripts/build-deb: lintian finds nothing
unexplained, it ships what jitlaunch(8) lists (the conffile, the units, the unikernel, the man
page), and its code runs on Debian 12's own python3 packages (no PyPI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

DEBIAN_PYTHON = Path("/usr/bin/python3")


def _missing() -> str | None:
    for tool in ("dpkg-buildpackage", "dh", "pandoc", "lintian"):
        if shutil.which(tool, path="/usr/bin:/bin") is None:
            return f"{tool} is not installed (scripts/setup installs the package build tools)"
    return None


@pytest.fixture(scope="module")
def deb() -> Path:
    if (why := _missing()) is not None:
        pytest.skip(why)
    out = subprocess.run([str(ROOT / "scripts" / "build-deb")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr  # lintian's errors and warnings fail it
    version = subprocess.run(["dpkg-parsechangelog", "-S", "Version"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
    path = ROOT / "dist" / f"jitlaunch_{version}_amd64.deb"
    assert path.is_file()
    return path


def test_the_package_ships_its_files_and_keeps_the_config(deb: Path, tmp_path: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in ("/usr/bin/jitlaunch", "/etc/jitlaunch/jitlaunch.toml",
                 "/lib/systemd/system/jitlaunch.service", "/lib/systemd/system/jitlaunch.socket",
                 "/usr/lib/jitlaunch/images/hello.elf", "/usr/share/man/man8/jitlaunch.8.gz",
                 "/usr/share/doc/jitlaunch/examples/production.toml"):
        assert path in files, path
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/jitlaunch/jitlaunch.toml"]
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    assert "python3-trio (>= 0.22)" in depends and "python3-prometheus-client (>= 0.16)" in depends
    unit = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    assert b"ExecStart=/usr/bin/jitlaunch run --config /etc/jitlaunch/jitlaunch.toml" in unit


def test_the_packaged_code_runs_on_debian_python_packages(deb: Path, tmp_path: Path) -> None:
    """The unpacked package, run by Debian's /usr/bin/python3 with only Debian's python3-*
    packages: `jitlaunch check` accepts the packaged config (which names the packaged
    unikernel's path)."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (Debian's python3)")
    probe = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import trio, dnslib, prometheus_client, pyroute2"],
        capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-trio, -dnslib, -prometheus-client, -pyroute2 are not "
                    f"installed: {probe.stderr.strip()[-200:]}")
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    out = subprocess.run(
        [str(DEBIAN_PYTHON), "-I", "-c",
         f"import sys; sys.path.insert(0, {str(root / 'usr/lib/python3/dist-packages')!r}); "
         "import trio; assert trio.__version__.startswith('0.22'), trio.__version__; "
         "from jitlaunch.cli import main; sys.argv = ['jitlaunch', 'check', '--config-only', "
         f"{str(root / 'etc/jitlaunch/jitlaunch.toml')!r}]; sys.exit(main())"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout
