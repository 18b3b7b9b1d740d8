"""Where the daemon is and how to prove who we are: the `[api]` section of the daemon's
config file, read with the standard library only.

A job imports the client without the daemon's dependencies (pydantic, FastAPI...), so it
cannot load the daemon's `Config`. It reads the few keys it needs here; the daemon's
`ApiConfig` takes its defaults and the search order from this module, so both sides
find the same file and agree on what an absent key means. The daemon validates the
whole file; this only checks the types of what it reads.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_SEARCH", "DEFAULT_LISTEN", "DEFAULT_SOCKET", "DEFAULT_TOKEN_FILE",
           "ClientSettings", "SettingsError", "find_config_file", "parse_listen"]

#: the TCP address the daemon listens on when `api.listen` is not set
DEFAULT_LISTEN = "127.0.0.1:9474"
#: where the daemon writes its token when `api.token_file` is not set
DEFAULT_TOKEN_FILE = ".governor/token"
#: no unix socket unless `api.socket` names one
DEFAULT_SOCKET = ""
#: where the config is looked for after --config and $GOVERNOR_CONFIG
CONFIG_SEARCH = (Path("/etc/governor/governor.toml"), Path("config/governor.toml"))


class SettingsError(ValueError):
    """The config file cannot tell the client where the daemon is; one sentence."""


def parse_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9474) from "127.0.0.1:9474"; IPv6 as "[::1]:9474"."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f'{listen!r} is not host:port, like "127.0.0.1:9474"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'{listen!r}: write an IPv6 address in brackets, like "[::1]:9474"')
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range 1-65535")
    return host, number


def find_config_file(explicit: str | os.PathLike[str] | None,
                     search: Sequence[Path] = CONFIG_SEARCH) -> Path | None:
    """--config, else $GOVERNOR_CONFIG, else the first of `search` that is a file, else
    None (built-in defaults)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("GOVERNOR_CONFIG")
    if env:
        return Path(env)
    for candidate in search:
        if candidate.is_file():
            return candidate
    return None


_DEFAULT_HOST, _DEFAULT_PORT = parse_listen(DEFAULT_LISTEN)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to reach one daemon: its TCP address, its unix socket ("" for none), the
    token file, and the TLS files ("" without TLS: `tls_cert` is what the daemon
    serves, `tls_ca` what signed it)."""

    host: str = _DEFAULT_HOST
    port: int = _DEFAULT_PORT
    token_file: str = DEFAULT_TOKEN_FILE
    socket: str = DEFAULT_SOCKET
    tls_cert: str = ""
    tls_ca: str = ""
    #: the config file these came from ("" for the built-in defaults), named when the
    #: daemon refuses the token: a CLI that found another config than the daemon's
    #: (/etc/governor before config/) would otherwise fail with no clue why
    config_file: str = field(default="", compare=False)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def url(self) -> str:
        """The daemon's TCP address as a URL; a wildcard listen address means this
        machine."""
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}"

    @classmethod
    def from_api(cls, api: Mapping[str, Any], source: str = "<config>") -> ClientSettings:
        """From the `[api]` table of a config file; keys the client does not use are the
        daemon's to check."""
        values: dict[str, str] = {}
        for key in ("listen", "token_file", "socket", "tls_cert", "tls_ca"):
            value = api.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise SettingsError(f"{source}: api.{key}: should be a string "
                                    f"(got {value!r})")
            values[key] = value
        try:
            host, port = parse_listen(values.pop("listen", DEFAULT_LISTEN))
        except ValueError as exc:
            raise SettingsError(f"{source}: api.listen: {exc}") from None
        config_file = "" if source == "<config>" else source
        return cls(host=host, port=port, config_file=config_file, **values)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None) -> ClientSettings:
        """From the config file at `path`; the defaults when `path` is None."""
        if path is None:
            return cls()
        source = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise SettingsError(f"{source}: no such file") from None
        except OSError as exc:
            raise SettingsError(f"{source}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{source}: not valid TOML: {exc}") from None
        api = data.get("api", {})
        if not isinstance(api, dict):
            raise SettingsError(f"{source}: api: should be a table")
        return cls.from_api(api, source)

    @classmethod
    def find(cls, explicit: str | os.PathLike[str] | None = None) -> ClientSettings:
        """From the config found as the CLI and the daemon find it."""
        return cls.load(find_config_file(explicit))

    def at(self, host: str, port: int, *, scheme: str, socket: str = "") -> ClientSettings:
        """These settings, pointed at another address of the same daemon (the one
        `governor launch` names in GOVERNOR_URL): the token file stays, TLS stays for
        https and goes for http."""
        tls = {"tls_cert": "", "tls_ca": ""} if scheme == "http" else {}
        return replace(self, host=host, port=port, socket=socket, **tls)
