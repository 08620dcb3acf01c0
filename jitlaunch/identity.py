"""Who an instance runs as: a service's ``user`` and ``group``, resolved when it is needed.

Config parsing stays pure (a name or a number is kept as written); the names are looked up
in the system's user and group databases here, at boot and by ``jitlaunch check``, so that a
user created after the config was written works without a restart.

The supplementary groups of an instance are the user's own groups (``getgrouplist``), or
none for a numeric user without a passwd entry: never the daemon's (root's) groups.

:func:`enter_problem` and :func:`execute_problem` say whether a user could enter a directory
or run a file, by the classic permission bits along the path (owner, group, other; root
passes everything but a file with no execute bit at all). They do not read ACLs: a path an
ACL opens is reported as closed; one an ACL closes fails at run time instead.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BootFailed

if TYPE_CHECKING:
    from .config import Table


class UnknownIdentity(BootFailed):
    """A service's ``user`` or ``group`` does not exist on this host."""


#: The variables :meth:`Identity.environment` sets: the daemon's own must not reach a child
#: that runs as another user.
USER_VARS = ("USER", "LOGNAME", "HOME")


@dataclass(frozen=True)
class Identity:
    """Resolved user and groups. ``label`` is the user as configured, for messages."""

    label: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    #: From the passwd entry (None for a numeric user without one).
    name: str | None = None
    home: str | None = None

    def environment(self) -> dict[str, str]:
        """``USER``, ``LOGNAME`` and ``HOME`` for a child running as this user, as login and
        systemd's ``User=`` set them. Without a passwd entry, ``USER`` and ``LOGNAME`` are the
        uid and there is no ``HOME``: the caller drops the daemon's own (see :data:`USER_VARS`)."""
        if self.name is None:
            return {"USER": str(self.uid), "LOGNAME": str(self.uid)}
        return {"USER": self.name, "LOGNAME": self.name, "HOME": self.home or "/"}

    def popen_kwargs(self) -> dict[str, Any]:
        """The ``subprocess.Popen`` arguments that make a child run as this identity: the
        user, its group and exactly its supplementary groups. Nothing when this process
        already is that user and is not root (a non-root daemon cannot switch anyway)."""
        if self.uid == os.geteuid() != 0:
            return {} if self.gid == os.getegid() else {"group": self.gid}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def __str__(self) -> str:
        return f"{self.label} (uid {self.uid}, gid {self.gid})"


def parse_user_group(t: Table) -> tuple[str | int | None, str | int | None]:
    """A backend table's ``user`` and ``group``: each a name or a number, kept as written
    (pure: nothing is looked up here). ``group`` needs ``user``."""
    out: list[str | int | None] = []
    for key, what in (("user", "a user name or uid"), ("group", "a group name or gid")):
        value = written = t.raw(key)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)  # a number as a string ("²" is a name: int() refuses it)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and 0 <= value < 2**32 - 1):
            out.append(value)
        elif isinstance(value, str) and value.strip() and ":" not in value:
            out.append(value)
        else:
            raise t.error(key, f"expected {what}, got {written!r}")
    if out[1] is not None and out[0] is None:
        raise t.error("group", "needs user: set the user the instances run as too")
    return out[0], out[1]


def resolve(user: str | int, group: str | int | None = None) -> Identity:
    """Look ``user`` (a name or a uid) and ``group`` (a name or a gid; by default the user's
    primary group) up. Raises :class:`UnknownIdentity` naming what is missing."""
    if isinstance(user, int):
        try:
            entry: pwd.struct_passwd | None = pwd.getpwuid(user)
        except KeyError:
            entry = None
        if entry is None and group is None:
            raise UnknownIdentity(
                f"user {user} has no entry in the passwd database, so it has no primary group: "
                "set group too")
        uid = user
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise UnknownIdentity(f"user {user!r} does not exist on this host") from None
        uid = entry.pw_uid
    if group is None:
        assert entry is not None
        gid = entry.pw_gid
    elif isinstance(group, int):
        gid = group
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise UnknownIdentity(f"group {group!r} does not exist on this host") from None
    groups = tuple(os.getgrouplist(entry.pw_name, gid)) if entry is not None else (gid,)
    if entry is None:
        return Identity(str(user), uid, gid, groups)
    return Identity(str(user), uid, gid, groups, entry.pw_name, entry.pw_dir)


def _may(st: os.stat_result, ident: Identity, bit: int) -> bool:
    """``bit`` is the "other" bit (S_IXOTH, S_IROTH, S_IWOTH); owner and group are shifted."""
    if ident.uid == 0:
        return True
    if st.st_uid == ident.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == ident.gid or st.st_gid in ident.groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _path_problem(path: Path, ident: Identity) -> str | None:
    """Why ``ident`` cannot reach ``path``: search permission on each directory above it,
    as written and with symbolic links resolved (the kernel walks both)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # 3.11 raises RuntimeError for a symlink loop
        return f"{path}: {exc}"
    for walk in dict.fromkeys((path.absolute(), resolved)):
        here = Path(walk.anchor or "/")
        for part in walk.parts[1:-1]:
            here = here / part
            if problem := _enter_dir_problem(here, ident):
                return problem
    return None


def _enter_dir_problem(path: Path, ident: Identity) -> str | None:
    """Why ``ident`` cannot enter the directory ``path`` itself, or None."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if not _may(st, ident, stat.S_IXOTH):
        return f"{ident} may not enter {path}"
    return None


def enter_problem(path: Path, ident: Identity) -> str | None:
    """None if ``ident`` may make ``path`` its working directory, else why not."""
    path = path.absolute()
    return _path_problem(path, ident) or _enter_dir_problem(path, ident)


def execute_problem(path: Path, ident: Identity | None) -> str | None:
    """None if ``ident`` (None: this process) may run the file ``path``, else why not."""
    path = path.absolute()
    if not path.exists():
        return f"{path} does not exist"
    if ident is None:
        if path.is_dir() or not os.access(path, os.X_OK):
            return f"{path} is not an executable file"
        return None
    if problem := _path_problem(path, ident):
        return problem
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        return f"{path} is not an executable file"
    if not _may(st, ident, stat.S_IXOTH):
        return f"{ident} may not run {path}"
    return None
