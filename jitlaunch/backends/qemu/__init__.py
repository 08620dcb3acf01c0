"""The qemu backend: ``qemu-system-x86_64 -M microvm`` booting a kernel image directly.

An instance is one QEMU process. Its serial console goes to a pipe that jitlaunch reads: the
guest's ``READY <ip>:<port>`` line is readiness (``ready = "tcp"`` probes the port instead, for
images that print nothing), every byte is appended to the service's log, and a KVM
``emulation failure`` in QEMU's output fails the boot with that cause instead of hanging.
QEMU is controlled over QMP on a unix socket in ``<state_dir>/run``.

Launch: each guest gets its own MAC (:func:`instance_mac`). With user networking a start
returns once QMP answers, which QEMU does only after binding its host forwards; a forward's
port taken by someone else since free_port() chose it makes QEMU exit at once, and the launch
is retried with new ports (HOSTFWD_ATTEMPTS), invisibly to the supervisor. When QEMU exits,
its console is read to EOF (bounded) before the exit is reported, and the report quotes its
last words (:func:`last_words`) and names the log.

Accelerator: ``accel = "auto"`` uses KVM when /dev/kvm opens and TCG otherwise; if a kernel
hits a KVM emulation failure under ``auto``, later boots of that kernel use TCG. Program:
``binary = "auto"`` runs Debian's reduced build ``qemu-system-x86_64-microvm`` (KVM only, no
user networking, half the memory) where it applies, else ``qemu-system-x86_64``
(:func:`.settings.choose_binary`). Both choices are logged for every instance. Guest RAM is a
private memfd mapping, so that transparent huge pages do not make a guest that touches a few
pages cost 2 MiB (``hugepages``, :func:`.argv.build_argv`).

Stop modes: ``destroy`` (QMP quit, SIGKILL after the grace period), ``shutdown``
(system_powerdown, SIGKILL after the grace period), ``pause`` (QMP stop; the next start is a
QMP cont) and ``save`` (the state is migrated to a file in ``<state_dir>/saved``, QEMU quits;
the next start runs QEMU with ``-incoming`` from it and removes the file; it survives a
restart of the daemon, and a changed kernel image, QEMU setting or QEMU version invalidates it).

Warm pool: ``pool = N`` keeps N instances booted to their READY line and then paused (QMP
stop): kernel loaded, network attached, listener up. A start takes one and resumes it (QMP
cont), so it is ready at once, and the pool refills in the background. (Pausing before the
first instruction, ``-S``, would save only QEMU's own start-up, not the guest's boot.)

Leftovers: at start the backend kills QEMU processes whose pid files lie in its run directory
and whose command line carries our marker, and removes stale sockets, pid files and the
saved states of services no longer configured from an earlier run.

The package: :mod:`.settings` (the service's table, pure), :mod:`.argv` (QEMU's command
line, pure), :mod:`.usernet` (reading slirp's ``info usernet``), :mod:`.handle` (one
instance) and :mod:`.backend`; the console scanner, the warm pool, QMP and bridge networking
are shared with the libvirt backend (``backends/console.py``, ``pool.py``, ``qmp.py``,
``bridge.py``).
"""

from __future__ import annotations

from ..vm import kvm_usable
from .backend import QemuBackend
from .handle import QemuHandle
from .settings import STOP_MODES, QemuSettings, parse_settings

__all__ = ["STOP_MODES", "QemuBackend", "QemuHandle", "QemuSettings", "kvm_usable", "parse_settings"]
