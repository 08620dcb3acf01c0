"""The VM backends' pure parts: the console scanner (fed one byte at a time too) and QEMU's
command line, tested without processes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from jitlaunch.backends.console import KVM_FAILURE, MAX_LINE, READY, ConsoleScanner
from jitlaunch.backends.qemu.argv import build_argv, tap_netdev, user_netdev
from jitlaunch.backends.qemu.settings import (
    FULL_BINARY,
    REDUCED_BINARY,
    choose_binary,
    parse_settings,
    saved_mac,
    saved_meta,
)
from jitlaunch.config import Table
from jitlaunch.errors import ConfigError

CONSOLE = (
    b"SeaBIOS? no: PVH entry\r\n"
    b"READYNESS is not a word\n"
    b"KVM internal error. Suberror: 1\n"
    b"READY 10.0.2.15:80\n"
    b"  \n"
    b"tail without newline"
)


def scan(chunks: list[bytes]) -> tuple[list[str], ConsoleScanner]:
    scanner = ConsoleScanner()
    events = []
    for chunk in chunks:
        events += scanner.feed(chunk)
    return events, scanner


def test_console_events_whole_and_byte_at_a_time() -> None:
    whole, s1 = scan([CONSOLE])
    assert whole == [KVM_FAILURE, READY]
    single, s2 = scan([CONSOLE[i : i + 1] for i in range(len(CONSOLE))])
    assert single == whole
    assert s1.last_lines() == s2.last_lines()
    assert s2.last_lines()[-1] == b"tail without newline"
    assert b"  " not in s2.last_lines()  # blank lines are not kept as last words


def test_console_random_splits_and_garbage_never_raise() -> None:
    rng = random.Random(11)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(CONSOLE)), rng.randint(0, 10)))
        parts = [CONSOLE[a:b] for a, b in zip([0, *cuts], [*cuts, len(CONSOLE)], strict=True)]
        assert scan(parts)[0] == [KVM_FAILURE, READY]
    garbage = bytes(rng.getrandbits(8) for _ in range(100_000)).replace(b"\n", b"")
    events, scanner = scan([garbage])
    assert events == [] and len(scanner.last_lines()[-1]) == MAX_LINE


def qemu_table(**extra: object) -> Table:
    return Table("/x/c.toml", {"kernel": "k.elf", **extra}, "qemu.", "svc")


def test_argv_user_networking() -> None:
    settings = parse_settings(qemu_table(extra_args=["-trace", "x"]), Path("/x"), (8080,))
    argv = build_argv(
        settings, binary="qemu-system-x86_64", accel="kvm", cmdline="ip=10.0.2.15/24",
        qmp_path=Path("/s/a,b.qmp"), pidfile=Path("/s/a.pid"), service="svc", number=3,
        netdev=user_netdev({8080: 41000}, {8080: 80}), mac="02:00:00:00:00:01",
        incoming=Path("/s/saved dir/svc.state"),
    )
    assert argv[:5] == ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm"]
    assert argv[argv.index("-kernel") + 1] == "/x/k.elf"
    assert argv[argv.index("-qmp") + 1] == "unix:/s/a,,b.qmp,server=on,wait=off"
    assert argv[argv.index("-name") + 1] == "jitlaunch:svc:3"
    assert argv[argv.index("-netdev") + 1] == "user,id=n0,hostfwd=tcp:127.0.0.1:41000-:80"
    assert "virtio-net-device,netdev=n0,mac=02:00:00:00:00:01" in argv
    assert argv[-4:] == ["-trace", "x", "-incoming", "exec:cat '/s/saved dir/svc.state'"]


def test_argv_tap() -> None:
    assert tap_netdev("jlt0001") == "tap,id=n0,ifname=jlt0001,script=no,downscript=no"
    settings = parse_settings(qemu_table(memory=64, cpus=2), Path("/x"), (80,))
    argv = build_argv(
        settings, binary="/opt/q", accel="tcg", cmdline="c", qmp_path=Path("/q"), pidfile=Path("/p"),
        service="s", number=1, netdev=tap_netdev("t"), mac="02:00:00:00:00:02",
    )
    assert argv[0] == "/opt/q"
    assert argv[argv.index("-m") + 1] == "64M" and argv[argv.index("-smp") + 1] == "2"
    assert "-incoming" not in argv
    # Guest RAM is a private memfd mapping of the same size (no transparent huge pages)...
    assert argv[argv.index("-object") + 1] == "memory-backend-memfd,id=jl-ram,size=64M,share=off"
    assert argv[argv.index("-machine") + 1] == "memory-backend=jl-ram"
    # ... unless hugepages = true: QEMU's own anonymous RAM.
    settings = parse_settings(qemu_table(hugepages=True), Path("/x"), (80,))
    argv = build_argv(
        settings, binary="q", accel="tcg", cmdline="c", qmp_path=Path("/q"), pidfile=Path("/p"),
        service="s", number=1, netdev=tap_netdev("t"), mac="02:00:00:00:00:02",
    )
    assert "-object" not in argv and "-machine" not in argv


def test_binary_choice() -> None:
    """auto: the reduced build with KVM, bridge networking, a microvm machine and no
    extra_args, when it is installed; the full QEMU otherwise; any other value as it is."""
    def pick(accel: str = "kvm", installed: bool = True, **keys: object) -> str:
        table = {"network": "bridge", "machine": "microvm,acpi=off", **keys}
        return choose_binary(parse_settings(qemu_table(**table), Path("/x"), (80,)), accel,
                             installed)

    assert pick() == REDUCED_BINARY
    assert pick(installed=False) == FULL_BINARY
    assert pick(accel="tcg") == FULL_BINARY
    assert pick(network="user") == FULL_BINARY
    assert pick(machine="q35") == FULL_BINARY
    assert pick(extra_args=["-device", "x"]) == FULL_BINARY
    assert pick(binary="qemu-system-x86_64") == FULL_BINARY
    assert pick(accel="tcg", binary="/usr/local/bin/qemu") == "/usr/local/bin/qemu"
    assert pick(binary=REDUCED_BINARY, network="bridge", accel="kvm") == REDUCED_BINARY


@pytest.mark.parametrize(("keys", "why"), [
    ({"network": "user"}, "has no user networking"),
    ({"network": "bridge", "accel": "tcg"}, "runs with KVM only"),
])
def test_forcing_the_reduced_build_where_it_cannot_run_is_a_config_error(
    keys: dict[str, str], why: str,
) -> None:
    for binary in (REDUCED_BINARY, f"/usr/bin/{REDUCED_BINARY}"):
        with pytest.raises(ConfigError) as err:
            parse_settings(qemu_table(binary=binary, **keys), Path("/x"), (80,))
        assert "qemu.binary" in str(err.value) and why in str(err.value)
        assert 'binary = "auto"' in str(err.value)
    # auto may resolve to either accelerator: fine at parse time.
    parse_settings(qemu_table(binary=REDUCED_BINARY, network="bridge"), Path("/x"), (80,))


def test_saved_state_is_restorable_by_the_same_qemu_version_only() -> None:
    """The digest leaves the program out (full and reduced builds of one version restore each
    other's states); a different QEMU version, other settings or no version refuse."""
    full = parse_settings(qemu_table(network="bridge"), Path("/x"), (80,))
    forced = parse_settings(qemu_table(network="bridge", binary=FULL_BINARY), Path("/x"), (80,))
    v = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    meta = saved_meta("img", forced, "kvm", "02:00:00:00:00:09", v)
    assert saved_mac(meta, "img", full, "kvm", v) == "02:00:00:00:00:09"
    assert saved_mac(meta, "img", full, "kvm", "QEMU emulator version 8.2.2") is None
    assert saved_mac(meta, "img", full, "kvm", "") is None
    assert saved_mac(meta, "img", full, "tcg", v) is None
    assert saved_mac(meta, "other", full, "kvm", v) is None
    bigger = parse_settings(qemu_table(network="bridge", hugepages=True), Path("/x"), (80,))
    assert saved_mac(meta, "img", bigger, "kvm", v) is None  # another RAM backend
    old = "image img\nqemu x\nmac 02:00:00:00:00:09\n"  # written before versions were kept
    assert saved_mac(old, "img", full, "kvm", v) is None


@pytest.mark.parametrize("ports", [{}, {80: 40000, 443: 40001}])
def test_user_netdev(ports: dict[int, int]) -> None:
    text = user_netdev(ports, {80: 8080, 443: 8443})
    assert text.count("hostfwd") == len(ports)
