"""What a job imports needs only httpx: governor.client in a fresh interpreter where the
daemon's dependencies cannot be imported, and its settings read from a config file as
the daemon's own config reads it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from governor.client import ApiClient, ClientError, ClientSettings, Job, SettingsError
from governor.config import find_config, load_config

ROOT = Path(__file__).resolve().parent.parent

#: the daemon's dependencies (and the CLI's), none of which a job may need
BLOCKED = ("fastapi", "uvicorn", "pydantic", "pydantic_core", "prometheus_client", "psutil",
           "starlette", "rich", "pynvml")

SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: governor.client must not need it")
        return None


sys.meta_path.insert(0, Blocker())
"""

PROBE = """
import json, os, sys

import governor.client
from governor.client import ApiClient, ClientError, ClientSettings, DistributedCheckpoint, Job

try:
    import pydantic  # noqa: F401
except ImportError:
    blocked = True
else:
    blocked = False

os.environ["GOVERNOR_CONFIG"] = sys.argv[1]
os.environ["GOVERNOR_URL"] = "http://127.0.0.1:1"
os.environ["GOVERNOR_JOB_ID"] = "j1"
found = ClientSettings.find()
with ApiClient(found) as client:
    url, where = client.url, client.where
# a job started by `governor launch` with no daemon: it runs on, fail-open
job = Job.from_env()
job_url = job._client.url
job.close()
print(json.dumps({
    "blocked": blocked, "url": url, "where": where, "token_file": found.token_file,
    "job_url": job_url,
    "leaked": sorted(m for m in sys.modules
                     if m == "governor.config" or m.split(".")[0] in BLOCKED_NAMES),
}))
""".replace("BLOCKED_NAMES", repr(BLOCKED))


def test_client_imports_without_the_daemons_dependencies(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    config = tmp_path / "governor.toml"
    config.write_text('[api]\nlisten = "[::1]:9555"\ntoken_file = "/run/tok"\n'
                      'allow_unauthenticated = false\n\n[daemon]\ninterval = "2s"\n')
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", PROBE, str(config)], env=env,
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["blocked"], "the import blocker did not load"
    assert seen["url"] == "http://[::1]:9555"
    assert seen["where"] == "http://[::1]:9555"
    assert seen["token_file"] == "/run/tok"
    assert seen["job_url"] == "http://127.0.0.1:1"
    assert seen["leaked"] == []


@pytest.mark.parametrize("api", [
    {},
    {"listen": "0.0.0.0:9600", "token_file": "", "socket": "/run/governor/api.sock"},
    {"listen": "[::]:9601", "token_file": "tok"},
])
def test_client_settings_agree_with_the_daemons_config(tmp_path: Path,
                                                       api: dict[str, str]) -> None:
    config = tmp_path / "governor.toml"
    config.write_text("[api]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in api.items()))
    assert ClientSettings.load(config) == load_config(config).api.client_settings()


def test_client_settings_with_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    config = tmp_path / "governor.toml"
    config.write_text(f'[api]\nlisten = "127.0.0.1:9443"\ntls_cert = "{cert}"\n'
                      f'tls_key = "{key}"\n')
    settings = ClientSettings.load(config)
    assert settings == load_config(config).api.client_settings()
    assert settings.url == "https://127.0.0.1:9443"
    # governor launch names an http address: the job drops TLS for it
    plain = settings.at("127.0.0.1", 9444, scheme="http")
    assert plain.url == "http://127.0.0.1:9444" and plain.token_file == settings.token_file


def test_the_defaults_have_one_source() -> None:
    assert ClientSettings() == load_config(None).api.client_settings()


def test_client_and_daemon_find_the_same_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GOVERNOR_CONFIG", raising=False)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "governor.toml").write_text('[api]\nlisten = "127.0.0.1:9602"\n')
    if not Path("/etc/governor/governor.toml").is_file():
        assert ClientSettings.find().port == 9602
    assert ClientSettings.find() == load_config(find_config(None)).api.client_settings()
    monkeypatch.setenv("GOVERNOR_CONFIG", str(tmp_path / "elsewhere.toml"))
    (tmp_path / "elsewhere.toml").write_text('[api]\nlisten = "127.0.0.1:9603"\n')
    assert ClientSettings.find().port == 9603


@pytest.mark.parametrize(("text", "message"), [
    ('[api]\nlisten = "nowhere"\n', "api.listen: 'nowhere' is not host:port"),
    ("[api]\ntoken_file = 3\n", "api.token_file: should be a string (got 3)"),
    ("api = 1\n", "api: should be a table"),
    ("[api\n", "not valid TOML"),
])
def test_a_bad_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "governor.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=re.escape(message)):
        ClientSettings.load(config)
    # a job is told as a ClientError, as for any other failure to reach the daemon
    with pytest.raises(ClientError, match=re.escape(message)):
        Job.register("probe", config=config)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="no such file"):
        Job.register("probe", config=tmp_path / "absent.toml")


def test_api_client_prefers_an_existing_socket(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    absent = ClientSettings(socket=str(sock))
    with ApiClient(absent) as client:
        assert client.socket is None and client.where == "http://127.0.0.1:9474"
    sock.touch()
    with ApiClient(absent) as client:
        assert client.socket == client.where == str(sock)
        assert client.url == "http://127.0.0.1:9474"
