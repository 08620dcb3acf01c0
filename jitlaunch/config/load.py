"""Reading a configuration: the one part of :mod:`jitlaunch.config` that touches the file
system and the process environment. Parsing itself (:mod:`.parse`) is pure."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError
from .model import Config
from .parse import ParseEnv, parse_config
from .service import SettingsParser


def process_env() -> ParseEnv:
    """This process's :class:`ParseEnv`, from ``os.environ`` and the effective uid."""
    return ParseEnv(
        is_root=os.geteuid() == 0,
        home=Path.home(),
        cwd=_cwd(),
        state_directory=os.environ.get("STATE_DIRECTORY") or None,
        xdg_state_home=os.environ.get("XDG_STATE_HOME") or None,
    )


def _cwd() -> Path:
    try:
        return Path.cwd()
    except OSError:  # the current directory was removed
        return Path(".")


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    backends: Mapping[str, SettingsParser],
    env: ParseEnv | None = None,
    regular_only: bool = False,
) -> Config:
    """Read and parse a config file; ``None`` loads the default configuration shipped in
    the package. ``backends`` is the settings parsers by backend name (pass
    ``jitlaunch.backends.SETTINGS``); ``env`` defaults to :func:`process_env`. Raises
    ConfigError naming the file when it cannot be read. ``regular_only`` (the daemon): a
    FIFO, device or directory is refused at once instead of read (a FIFO would block until
    someone writes to it)."""
    env = process_env() if env is None else env
    if path is None:
        # Relative paths in the default config are relative to the package directory.
        package_dir = Path(__file__).resolve().parent.parent
        text = (package_dir / "default.toml").read_text()
        return parse_config(text, "<default config>", package_dir, backends=backends, env=env)
    name = os.fspath(path)
    try:
        text = _read_regular(name) if regular_only else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, f"cannot read the file: {exc}") from None
    base_dir = Path(name).resolve().parent
    return parse_config(text, name, base_dir, backends=backends, env=env)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK:
          "a block device", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


def _read_regular(name: str) -> str:
    # O_NONBLOCK: opening a FIFO does not wait for a writer; the fstat then refuses it.
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise ConfigError(name, f"cannot read the file: it is "
                                    f"{_KINDS.get(kind, 'not a regular file')}; the daemon "
                                    "reads a regular file only")
        os.set_blocking(fd, True)
        with open(fd, encoding="utf-8", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)
