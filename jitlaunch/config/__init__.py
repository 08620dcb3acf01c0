"""Configuration: TOML (tomllib) into frozen dataclasses.

- :mod:`.model`: the values (:class:`Config`, :class:`ServiceConfig`, ...), frozen
  dataclasses that compare by value;
- :mod:`.reader`: the typed TOML reader (:class:`Table`) and small value parsers;
- :mod:`.parse`: :func:`parse_config`, pure: text, backends' settings parsers and a
  :class:`ParseEnv` in, a Config or a ConfigError out;
- :mod:`.load`: :func:`load_config` (reads the file) and :func:`process_env` (reads the
  environment).

The dependency is one way: ``jitlaunch.backends`` imports this package, never the reverse;
the backends' settings parsers (``jitlaunch.backends.SETTINGS``) are passed in.
"""

from .load import load_config, process_env
from .model import (
    ANSWER_MODES,
    STOP_MODES,
    Config,
    DaemonConfig,
    DnsConfig,
    Endpoint,
    HostConfig,
    MetricsConfig,
    ProxyConfig,
    RrlConfig,
    ServiceConfig,
    WakeConfig,
    Zone,
)
from .parse import ParseEnv, default_state_dir, parse_config
from .reader import Table
from .service import SettingsParser

__all__ = [
    "ANSWER_MODES",
    "STOP_MODES",
    "Config",
    "DaemonConfig",
    "DnsConfig",
    "Endpoint",
    "HostConfig",
    "MetricsConfig",
    "ParseEnv",
    "ProxyConfig",
    "RrlConfig",
    "ServiceConfig",
    "SettingsParser",
    "Table",
    "WakeConfig",
    "Zone",
    "default_state_dir",
    "load_config",
    "parse_config",
    "process_env",
]
