"""Configuration: one frozen settings object, the default catalogue and logging setup."""

from config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
