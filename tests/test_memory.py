"""Memory over a daemon's life (issue 15): the round machinery, built in process as
`Daemon` builds it, runs thousands of rounds, and no allocation site may grow with them.

A leak of one small object a round is ~50 bytes a round, 4 MB a day at 1 s; the
footprint bench once found ~750 bytes a round (the fake NVML's log of every call).
Snapshots taken by line after the rounds that fill every cache, then twice more a
thousand rounds apart, show such a site gaining bytes in both stretches, while what a
round replaces (the snapshot, its readings, the published view) does not grow. A site
must grow in both to count: a table that is resized once (the interpreter's interned
strings, which the paths a round builds churn) grows in one stretch only, a leak in
every one."""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from governor.config import parse_config
from governor.jobs.registry import ROOT, JobRequest
from governor.service.daemon import Daemon
from tests.support import fake_nvml
from tests.support.fake_nvml import h100

REPO = Path(__file__).resolve().parent.parent

#: rounds before the first snapshot: every series, rule state and cache has been made
WARM_ROUNDS = 500
#: of those, the last ones traced: what a round replaces (the snapshot, the cached
#: exposition) is then traced in both snapshots, and shows no growth
TRACED_WARM_ROUNDS = 50
#: rounds between one snapshot and the next
STRETCH = 1000
#: bytes a line may gain per round: less than one new object a round
PER_ROUND = 16
#: a scrape every this many rounds, as Prometheus would at a 1 s interval and 10 ms rounds
SCRAPE_EVERY = 10

#: what only the command's other verbs use: a running daemon never imports them
CLI_ONLY = ("httpx", "rich", "pygments", "governor.client.rest", "governor.client.cooperative",
            "governor.cli.top", "governor.cli.report", "governor.cli.launch",
            "governor.sampling.simulated")
#: what only `[kubernetes] discover` needs (gRPC and protobuf are a few MB resident): a
#: daemon with discovery off never imports them
KUBERNETES_ONLY = ("grpc", "google.protobuf", "governor.host.podresources",
                   "governor.host.kubernetes", "governor.jobs.sources.kubernetes")

#: the daemon as `governor run` starts it, short of listening: what it has imported then
STARTED = """
import json, sys
from pathlib import Path

import governor.cli.main  # what `python -m governor` runs: the command
from governor.api.app import create_app
from governor.api.auth import Authenticator
from governor.config import load_config
from governor.service.daemon import Daemon

daemon = Daemon(load_config(Path(sys.argv[1])), Path(sys.argv[1]))
try:
    daemon.loop.run_once()
    create_app(daemon, Authenticator("token", False), allowed_hosts=["*"])
    daemon.metrics.render()
    print(json.dumps(sorted(sys.modules)))
finally:
    daemon.close()
"""

RULES = [
    # the footprint bench's rules, which never trip
    {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 200.0, "action": "pause"},
    {"name": "cpu-hot", "metric": "cpu_temperature_celsius", "above": 200.0,
     "action": "slow", "speed": 0.5},
    {"name": "memory", "metric": "memory_used_ratio", "above": 0.999, "action": "pause"},
    # and one that holds gpu1's jobs every round
    {"name": "gpu-busy", "metric": "gpu_utilization_ratio", "above": 0.9, "for": 0,
     "action": "pause"},
]


def test_no_allocation_site_grows_round_by_round(
        tmp_path: Path, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    children.extend(subprocess.Popen(["sleep", "600"]) for _ in range(4))
    # gpu0 names its job's process (bound by NVML), gpu1 is bound by registration
    # the Python fake, in process: the per-round leak this test was written for lived in
    # it (a log of every call), and the benchmarks that still run on it must not grow
    state = tmp_path / "nvml.json"
    state.write_text(json.dumps({"gpus": [h100(0, pids=[children[0].pid]),
                                          h100(1, utilization=100)]}))
    monkeypatch.setenv("GOVERNOR_NVML_MODULE", "tests.support.fake_nvml")
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    monkeypatch.setattr(fake_nvml, "_driver", None)  # one built from this test's state
    config = parse_config({
        "daemon": {"interval": 1.0, "state_dir": str(tmp_path / "state")},
        "api": {"token_file": str(tmp_path / "token")},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree),
                    "nvml": "required"},
        "rules": RULES,
    })
    daemon = Daemon(config)
    try:
        for i, child in enumerate(children):
            devices = ("gpu1",) if i % 2 else ()
            daemon.controller.register(JobRequest(name=f"job{i}", pid=child.pid,
                                                  devices=devices), ROOT)

        def rounds(count: int) -> None:
            for _ in range(count):
                daemon.loop.run_once()
                if daemon.loop.rounds % SCRAPE_EVERY == 0:
                    daemon.metrics.render()

        rounds(WARM_ROUNDS - TRACED_WARM_ROUNDS)
        tracemalloc.start()
        try:
            rounds(TRACED_WARM_ROUNDS)
            snapshots = [snapshot()]
            for _ in range(2):
                rounds(STRETCH)
                snapshots.append(snapshot())
        finally:
            tracemalloc.stop()
        held = [job.state for job in daemon.controller.view.jobs]
    finally:
        daemon.close()

    assert held.count("paused") == 2, f"the round did not go through the policy: {held}"
    first, second = (growth(*pair) for pair in itertools.pairwise(snapshots))
    grown = [f"{site}: +{first[site] / STRETCH:.0f}, then +{second[site] / STRETCH:.0f} "
             f"bytes a round" for site in first
             if first[site] > PER_ROUND * STRETCH and second.get(site, 0) > PER_ROUND * STRETCH]
    assert not grown, "allocation sites that grow with the rounds:\n" + "\n".join(grown)


def snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])


def growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> dict[str, int]:
    """Bytes gained between two snapshots, by the line that allocated them."""
    return {str(stat.traceback[0]): stat.size_diff
            for stat in after.compare_to(before, "lineno")}


def test_the_daemon_imports_nothing_the_cli_alone_needs(tmp_path: Path, sys_tree: Path,
                                                        proc_tree: Path) -> None:
    """httpx and rich are a sixth of the daemon's resident memory; the command that starts
    it imports them only for the verbs that talk to a daemon."""
    config = tmp_path / "governor.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[api]\ntoken_file = "{tmp_path / "token"}"\n'
                      f'[sources]\nsysfs_root = "{sys_tree}"\nprocfs_root = "{proc_tree}"\n')
    env = {key: value for key, value in os.environ.items()
           if key not in ("GOVERNOR_NVML_MODULE", "FAKE_NVML_STATE")}
    result = subprocess.run([sys.executable, "-c", STARTED, str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "governor.cli.main" in loaded and "fastapi" in loaded
    assert not [name for name in loaded if name.split(".")[0] in CLI_ONLY or name in CLI_ONLY]
    assert not [name for name in loaded if any(name == lazy or name.startswith(lazy + ".")
                                               for lazy in KUBERNETES_ONLY)]
