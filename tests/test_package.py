"""The Debian package, built from this checkout by scripts/build-deb: lintian finds nothing
unexplained, it ships what jitlaunch(8) lists (the conffile, the units, the unikernel, the man
page), and its code runs on Debian 12's own python3 packages (no PyPI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT
from .systemd_ns import SystemdNamespace, available, systemd_namespace

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
                 "/usr/share/man/man5/jitlaunch.toml.5.gz",
                 "/usr/share/doc/jitlaunch/configuration.md.gz",
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


# ---- installed for real, under a systemd of the test's own ------------------------------------


def _in_root(ns: SystemdNamespace, *argv: str, timeout: float = 120.0) -> str:
    return ns.run(list(argv), timeout=timeout).stdout


def _jitlaunch_procs(ns: SystemdNamespace) -> list[str]:
    """Processes of the namespace that are jitlaunch's daemon or an instance (QEMU, demo)."""
    out = ns.run(["ps", "-eo", "args="], check=False).stdout
    return [line for line in out.splitlines()
            if ("jitlaunch" in line and "ps -eo" not in line) or "qemu-system" in line]


def test_installed_upgraded_removed_and_purged_under_systemd(deb: Path, tmp_path: Path) -> None:
    """In a throw-away overlay of this machine under a systemd of its own: apt installs the
    package (its dependencies come from Debian, already on the host); the packaged units
    run the packaged config, which answers DNS and boots the bundled unikernel on a lookup;
    `jitlaunch status` works for a member of the jitlaunch group; an upgrade keeps an edited
    conffile and a drop-in; remove leaves nothing running; purge leaves nothing."""
    if (why := available()) is not None:
        pytest.skip(why)
    newer = subprocess.run([str(ROOT / "scripts" / "build-deb"), "--no-lint", "--version",
                            "99.0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert newer.returncode == 0, newer.stdout + newer.stderr
    upgrade = ROOT / "dist" / "jitlaunch_99.0_amd64.deb"
    try:
        with systemd_namespace({}, keep=(ROOT,)) as ns:
            # The packaged config's public address, on the namespace's own loopback.
            _in_root(ns, "ip", "addr", "add", "192.0.2.10/32", "dev", "lo")
            # A host image's policy-rc.d (a container's "start no service") would stop the
            # maintainer scripts from stopping and restarting the units, as Debian policy asks.
            _in_root(ns, "rm", "-f", "/usr/sbin/policy-rc.d")
            out = _in_root(ns, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install",
                           "-y", "--no-install-recommends", str(deb))
            assert "installed, not started" in out, out
            assert ns.show("jitlaunch.service", "ActiveState") == "inactive"
            ns.systemctl("enable", "--now", "jitlaunch.socket", "jitlaunch.service")
            ns.wait_for(lambda: ns.show("jitlaunch.service", "ActiveState") == "active",
                        what="jitlaunch.service active")
            answer = ns.run(["dig", "+short", "+time=20", "+tries=1", "@127.0.0.1",
                             "www.apps.example.org"], namespaces="-n").stdout.split()
            assert answer == ["192.0.2.10"], answer
            page = ns.run(["curl", "-s", "-m", "30", "http://192.0.2.10/"],
                          namespaces="-n", timeout=60).stdout
            assert "jitlaunch hello unikernel" in page, page
            _in_root(ns, "useradd", "--no-create-home", "-G", "jitlaunch", "operator1")
            status = ns.run(["jitlaunch", "status"], user="operator1").stdout
            assert "hello" in status and "ready" in status, status

            # Upgrade: the admin's edit of the conffile and a drop-in both survive.
            conf = _in_root(ns, "cat", "/etc/jitlaunch/jitlaunch.toml")
            ns.write("/etc/jitlaunch/jitlaunch.toml", conf + "\n# edited by the admin\n")
            ns.write("/etc/systemd/system/jitlaunch.service.d/local.conf",
                     "[Service]\nEnvironment=ADMIN_DROPIN=1\n")
            ns.systemctl("daemon-reload")
            _in_root(ns, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                     "-o", "Dpkg::Options::=--force-confdef", "-o",
                     "Dpkg::Options::=--force-confold", str(upgrade))
            assert _in_root(ns, "dpkg-query", "-W", "-f=${Version}", "jitlaunch") == "99.0"
            assert "# edited by the admin" in _in_root(ns, "cat", "/etc/jitlaunch/jitlaunch.toml")
            assert "ADMIN_DROPIN=1" in ns.show("jitlaunch.service", "Environment")
            ns.wait_for(lambda: ns.show("jitlaunch.service", "ActiveState") == "active",
                        what="jitlaunch.service active after the upgrade")
            answer = ns.run(["dig", "+short", "+time=20", "+tries=1", "@127.0.0.1",
                             "www.apps.example.org"], namespaces="-n").stdout.split()
            assert answer == ["192.0.2.10"], answer

            # Remove: nothing of jitlaunch runs; purge: nothing of it is left.
            _in_root(ns, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "remove", "-y",
                     "jitlaunch")
            assert _jitlaunch_procs(ns) == []
            assert ns.cgroup_pids("jitlaunch.service") == []
            _in_root(ns, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y",
                     "jitlaunch")
            left = ns.run(["sh", "-c", "ls -d /etc/jitlaunch /var/lib/jitlaunch "
                           "/usr/lib/jitlaunch /usr/bin/jitlaunch 2>/dev/null; "
                           "getent group jitlaunch"], check=False).stdout
            assert left == "", left
    finally:
        upgrade.unlink(missing_ok=True)
