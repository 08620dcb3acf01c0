"""Domain XML for one instance, pure: every value comes in as an argument and is escaped.

The bundled unikernel is a PVH ELF that only QEMU's ``microvm`` machine boots directly
(``pc`` and ``q35`` accept the XML but the guest prints nothing). libvirt 9.0 puts a PCI USB
controller and a memory balloon into every domain unless told otherwise, and microvm has no
PCI bus ("No PCI buses available"), hence ``<controller type='usb' model='none'/>`` and
``<memballoon model='none'/>``. User networking: libvirt 9.0 ignores slirp's
``<portForward>`` and rejects ``<backend type='passt'/>``, so the NIC with its host forwards
is passed to QEMU directly in ``<qemu:commandline>`` (a virtio-net *device*, on virtio-mmio).
Bridge networking is libvirt's own ``<interface type='bridge'>``: libvirt makes the tap
(``vnetN``), attaches it to our bridge and removes it with the domain; the NIC is virtio on
virtio-mmio, with our MAC. The serial console goes to a file that the backend reads for the
READY line, or (``console = "stream"``, for a remote host) to a pty that libvirt relays to
us (``virDomainOpenConsole``, see :mod:`.stream`).
"""

from __future__ import annotations

import string
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .settings import LibvirtSettings

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def user_net_args(host_ports: dict[int, int], guest_ports: dict[int, int], mac: str) -> list[str]:
    """QEMU arguments for user networking forwarding 127.0.0.1:``host_ports[front]`` to the
    guest's ``guest_ports[front]``, with one virtio-net device of MAC ``mac``."""
    fwd = [f"hostfwd=tcp:127.0.0.1:{host_ports[f]}-:{guest_ports[f]}" for f in host_ports]
    return ["-netdev", ",".join(["user", "id=n0", *fwd]),
            "-device", f"virtio-net-device,netdev=n0,mac={mac}"]


def domain_xml(
    settings: LibvirtSettings, *, name: str, domain_type: str, cmdline: str, console: Path,
    mac: str, qemu_args: list[str], bridge: str | None = None, pty: bool = False,
) -> str:
    """The XML of a transient domain ``name`` (``domain_type`` ``kvm`` or ``qemu``, i.e.
    TCG), from the user's template when the service has one (``${name}`` and the other
    TEMPLATE_FIELDS, XML-escaped; ``qemu_args`` are then not used), else microvm as the
    module's docstring says: with ``bridge``, a NIC of MAC ``mac`` on that bridge (and
    ``qemu_args`` unused), else ``qemu_args`` passed to QEMU (user networking). The serial
    console is the file ``console``, or with ``pty`` a pty (``console`` is then the local
    log that the backend writes, only a template's placeholder)."""
    if settings.template is not None:
        values = {
            "name": name, "memory": str(settings.memory), "cpus": str(settings.cpus),
            "kernel": str(settings.kernel), "cmdline": cmdline, "mac": mac,
            "console": str(console), "domain_type": domain_type,
            "bridge": bridge or settings.bridge,
        }
        return string.Template(settings.template).substitute(
            {k: escape(v, {"'": "&apos;", '"': "&quot;"}) for k, v in values.items()})
    nic = ""
    if bridge is not None:
        qemu_args = []
        nic = f"""    <interface type='bridge'>
      <mac address={quoteattr(mac)}/>
      <source bridge={quoteattr(bridge)}/>
      <model type='virtio'/>
      <address type='virtio-mmio'/>
    </interface>
"""
    args = "".join(f"    <qemu:arg value={quoteattr(a)}/>\n" for a in qemu_args)
    if args:
        args = f"  <qemu:commandline>\n{args}  </qemu:commandline>\n"
    if pty:
        serial = """    <serial type='pty'/>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
"""
    else:
        serial = f"""    <serial type='file'>
      <source path={quoteattr(str(console))}/>
    </serial>
"""
    return f"""<domain type={quoteattr(domain_type)} xmlns:qemu={quoteattr(QEMU_NS)}>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{settings.memory}</memory>
  <vcpu>{settings.cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>{escape(str(settings.kernel))}</kernel>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
{serial}{nic}  </devices>
{args}</domain>
"""
