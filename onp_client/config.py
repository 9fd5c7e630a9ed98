"""Where the client finds its server URL and API key.

Order: explicit arguments (CLI flags) > environment (``ONP_SERVER``, ``ONP_API_KEY``) >
the config file that ``onp login`` writes (``$ONP_CONFIG`` or
``$XDG_CONFIG_HOME/onp/config.toml``, default ``~/.config/onp/config.toml``) > defaults
(``http://127.0.0.1:8000`` and, for ``onp serve``'s embedded mode, the key it left in
``$ONP_DATA_DIR/api-key``). The key file is written with mode 0600 because it is a secret.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8000"


def config_path() -> Path:
    if os.environ.get("ONP_CONFIG"):
        return Path(os.environ["ONP_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "onp" / "config.toml"


@dataclass(frozen=True)
class ClientConfig:
    server: str
    key: str | None
    source: str  # where the key came from, for `onp login --show` and error messages


def read_config_file(path: Path | None = None) -> dict[str, str]:
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return {k: str(v) for k, v in data.items() if k in ("server", "key")}


def write_config_file(server: str, key: str, path: Path | None = None) -> Path:
    """Write ``server`` and ``key`` (TOML basic strings: JSON escaping is a valid subset for these)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# written by `onp login`\nserver = {json.dumps(server)}\nkey = {json.dumps(key)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def _embedded_key() -> str | None:
    path = Path(os.environ.get("ONP_DATA_DIR", "var")) / "api-key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def resolve(server: str | None = None, key: str | None = None) -> ClientConfig:
    """The effective server and key (see the module docstring for the order)."""
    file = read_config_file()
    url = server or os.environ.get("ONP_SERVER") or file.get("server") or DEFAULT_SERVER
    if key:
        return ClientConfig(url.rstrip("/"), key, "--key")
    if os.environ.get("ONP_API_KEY"):
        return ClientConfig(url.rstrip("/"), os.environ["ONP_API_KEY"], "ONP_API_KEY")
    if file.get("key"):
        return ClientConfig(url.rstrip("/"), file["key"], str(config_path()))
    embedded = _embedded_key()
    return ClientConfig(url.rstrip("/"), embedded, "var/api-key" if embedded else "none")
