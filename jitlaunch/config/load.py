"""Reading a configuration: the one part of :mod:`jitlaunch.config` that touches the file
system and the process environment. Parsing itself (:mod:`.parse`) is pure."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError
from .model import Config
from .parse import ParseEnv, SettingsParser, parse_config


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
) -> Config:
    """Read and parse a config file; ``None`` loads the default configuration shipped in
    the package. ``backends`` is the settings parsers by backend name (pass
    ``jitlaunch.backends.SETTINGS``); ``env`` defaults to :func:`process_env`. Raises
    ConfigError naming the file when it cannot be read."""
    env = process_env() if env is None else env
    if path is None:
        # Relative paths in the default config are relative to the package directory.
        package_dir = Path(__file__).resolve().parent.parent
        text = (package_dir / "default.toml").read_text()
        return parse_config(text, "<default config>", package_dir, backends=backends, env=env)
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, f"cannot read the file: {exc}") from None
    base_dir = Path(name).resolve().parent
    return parse_config(text, name, base_dir, backends=backends, env=env)
