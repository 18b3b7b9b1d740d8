"""Every `curl` example in the docs, run against a real daemon as a reader would run it.

A reader copies an example into a shell and replaces what the text says to replace: a job
id where it says `<id>`, a pid of theirs for `1234`, the node's address for NODE_IP. The
test makes exactly those replacements (`READER_FILLS_IN`), points the examples at the test
daemon's port, runs each with bash from a directory laid out as the checkout after `make
run` (`.governor/token`), and checks the answer: curl runs with `--fail-with-body` (a
shim earlier on PATH), so an HTTP error fails the example, and an answer that is JSON must
not be an `{"error": ...}`. An example with a placeholder the test does not know fails,
so a new example is either runnable or taught here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, DaemonProcess

DOCS = [REPO / "README.md"]
#: what the docs' examples assume: the daemon of `make run`
DOC_PORT = "127.0.0.1:9474"


def code_blocks(text: str) -> Iterator[str]:
    """Each code block of a Markdown text: fenced, or indented four spaces."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            yield "\n".join(lines[i + 1:j])
            i = j + 1
            continue
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            yield "\n".join(x[4:] for x in lines[i:j]).strip("\n")
            i = j
            continue
        i += 1


def commands(block: str) -> Iterator[str]:
    """The shell commands of an indented block, a line each with its continuations."""
    pending = ""
    for line in block.splitlines():
        pending += line
        if line.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            yield pending.strip()
        pending = ""


def is_script(block: str) -> bool:
    """A block that is one script (a loop, a variable carried across lines), run whole."""
    return bool(re.search(r"^\s*(for|while|if)\b|\$\(curl", block, re.M))


def examples() -> list[tuple[str, str]]:
    """(where, shell text) of every example that calls curl."""
    found = []
    for doc in DOCS:
        for number, block in enumerate(code_blocks(doc.read_text())):
            if "curl " not in block:
                continue
            where = f"{doc.name} block {number}"
            if is_script(block):
                found.append((where, block))
                continue
            lines = list(commands(block))
            # a variable the block sets (TOKEN=$(cat ...)) is set for each of its commands
            setup = [line for line in lines if re.match(r"^[A-Z_]+=", line)]
            for command in lines:
                if command.startswith("curl "):
                    found.append((where, "\n".join([*setup, command])))
    return found


#: what the reader fills in, as the text around each example says
READER_FILLS_IN: dict[str, str] = {
    "<id>": "{job_id}",                  # "a job's id", from the registration's answer
    '"pid":1234': '"pid":{pid}',         # a process of the reader's own
    "http://NODE_IP:9474": "http://{port}",  # the node a DaemonSet's pod runs on
    "./one-step.sh": "true",             # one step of the reader's own job
    "seq 1000": "seq 3",                 # the job's step count
}
#: what is left in an example after the reader's part that would still need a human
PLACEHOLDER = re.compile(r"<[a-z_]+>|\b[A-Z]+_IP\b|\bPOD\b")


def runnable(text: str, job_id: str, pid: int, port: str) -> str:
    for needle, value in READER_FILLS_IN.items():
        text = text.replace(needle, value.format(job_id=job_id, pid=pid, port=port))
    text = text.replace(DOC_PORT, port)
    left = PLACEHOLDER.search(text)
    assert left is None, f"the test does not know how to fill in {left.group(0)!r}: {text}"
    return text


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    """A `curl` earlier on PATH that fails on an HTTP error, printing the body as well."""
    real = shutil.which("curl")
    if real is None:
        pytest.skip("curl is not installed (Debian: curl)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(f'#!/bin/sh\nexec {real} --fail-with-body --max-time 40 "$@"\n')
    (bin_dir / "curl").chmod(0o755)
    return bin_dir


def test_every_curl_example_in_the_docs_works(
        tmp_path: Path, daemon: Callable[..., DaemonProcess], shim: Path) -> None:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (Debian: jq), which the shell examples use")
    found = examples()
    assert len(found) >= 6, f"the docs' curl examples were not found: {found}"
    d = daemon({"daemon": {"interval": 0.25}, "sources": {"nvml": "off"}})
    checkout = tmp_path / "checkout"
    (checkout / ".governor").mkdir(parents=True)
    assert d.token_path is not None
    shutil.copy(d.token_path, checkout / ".governor" / "token")
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        job = d.register(name="doc-example", mode="cooperative")
        port = f"127.0.0.1:{d.port}"
        env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
        for where, example in found:
            script = runnable(example, str(job["id"]), sleeper.pid, port)
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", script],
                                    cwd=checkout, env=env, capture_output=True, text=True,
                                    timeout=120)
            said = f"{where}: {example}\n-> rc {result.returncode}: {result.stdout}{result.stderr}"
            assert result.returncode == 0, said
            assert result.stdout.strip() or example.rstrip().endswith("$ID"), said
            try:
                answer = json.loads(result.stdout)
            except ValueError:
                continue
            assert not (isinstance(answer, dict) and "error" in answer), said
            if '"pid":' in example:
                # the registration's job is the reader's: leave the daemon as it was
                assert d.call("DELETE", f"/v1/jobs/{answer['id']}").status_code == 204
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_shell_loop_registers_and_unregisters_its_job(
        tmp_path: Path, daemon: Callable[..., DaemonProcess], shim: Path) -> None:
    """The cooperative loop "Without Python" gets a real id (not `null`, which polled
    /v1/jobs/null/directive forever when curl's form-encoded body was refused), runs its
    steps, and leaves no job behind."""
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (Debian: jq), which the shell examples use")
    loops = [text for _, text in examples() if "directive?wait=30&since=$version" in text]
    assert len(loops) == 1
    d = daemon({"daemon": {"interval": 0.25}, "sources": {"nvml": "off"}})
    checkout = tmp_path / "checkout"
    (checkout / ".governor").mkdir(parents=True)
    assert d.token_path is not None
    shutil.copy(d.token_path, checkout / ".governor" / "token")
    script = runnable(loops[0], "-", 0, f"127.0.0.1:{d.port}")
    script = script.replace("jq -r .id)", "jq -r .id); echo \"registered $ID\"", 1)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=checkout,
                            env={**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    registered = re.search(r"registered (\S+)", result.stdout)
    assert registered is not None and re.fullmatch(r"[0-9a-f]{8}", registered.group(1)), \
        result.stdout
    events = d.get("/v1/events").json()["events"]
    whats = [(e["what"], (e.get("job") or {}).get("id")) for e in events]
    assert ("register", registered.group(1)) in whats
    assert ("unregister", registered.group(1)) in whats
    assert d.get("/v1/jobs").json() == []


@pytest.mark.parametrize("content_type", [
    None, "application/x-www-form-urlencoded", "text/plain", "application/json"])
def test_a_change_is_read_as_json_whatever_its_content_type(
        daemon: Callable[..., DaemonProcess], content_type: str | None) -> None:
    """`curl -d` sends application/x-www-form-urlencoded: the body of a change is JSON
    whatever the header says, and a body that is not JSON is a 400 that says so."""
    d = daemon({"daemon": {"interval": 0.25}, "sources": {"nvml": "off"}})
    headers = {} if content_type is None else {"Content-Type": content_type}
    answer = d.call("POST", "/v1/jobs", headers=headers,
                    content=b'{"name":"form","mode":"cooperative"}')
    assert answer.status_code == 201, answer.text
    assert answer.json()["name"] == "form"
    broken = d.call("POST", "/v1/jobs", headers=headers, content=b"name=form&mode=cooperative")
    assert broken.status_code == 400
    assert broken.json() == {"error": "The request body is not valid JSON."}
