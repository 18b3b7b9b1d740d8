"""10. Kubernetes discovery: what the source's poll costs a round, and what gRPC costs the
daemon's memory.

The fake kubelet's pod-resources server (tests/support/kubelet.py: a real gRPC server from
the kubelet's own api.proto where the shared fixtures have it) runs in a process of its
own, listing PODS pods with one GPU each (device ids in the NVIDIA plugin's `index`
form, so no NVML is involved: its matching runs once per new pod anyway). The source
(`KubernetesSource`) polls it from this process, with a log directory and a cgroup tree
in the kubelet's shapes for those pods (plain files: the source only reads names there).
Measured with `time.process_time()` (every thread of this process, gRPC's included; not
the server's):

- the first poll (every pod new: its uid, its cgroup, its request);
- POLLS polls that find nothing new, as every round in steady state: one `List` each,
  whose answer is the same bytes as the last one, so nothing is parsed;
- the same with the answer parsed every time, as when a kubelet lists its pods in
  another order at each call (Go's map order);
- the resident memory a process gains by importing grpc and the generated code and
  opening the channel (what a daemon with `[kubernetes] discover = true` pays; one without
  imports none of it, tests/test_memory.py).

Target: a steady-state poll <= 1 ms of CPU with 100 pods (a round costs about 2 ms,
benchmark 1; at a 1 s interval 1 ms is 0.1% of a CPU).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, Row
from governor.config import KubernetesConfig
from governor.jobs.sources.kubernetes import KubernetesSource

PODS = 100
POLLS = 1000
TARGET_MS = 1.0

SERVER = """
import sys
from pathlib import Path
from tests.support.kubelet import PodResourcesServer, pod
server = PodResourcesServer(Path(sys.argv[1])).start()
server.set_pods(*(pod("bench", f"pod-{i}", ("nvidia.com/gpu", str(i % 8)))
                  for i in range(int(sys.argv[2]))))
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""

MEMORY = """
import os, sys
def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
import governor.jobs.sources, governor.host.kubernetes  # what the daemon has anyway
before = rss()
from governor.host.kubernetes import PodResourcesClient
client = PodResourcesClient(sys.argv[1])
print(rss() - before)
"""


def _tree(root: Path, pods: int) -> tuple[Path, Path]:
    logs, cgroups = root / "pods", root / "cgroup"
    for i in range(pods):
        uid = f"00000000-0000-0000-0000-{i:012d}"
        (logs / f"bench_pod-{i}_{uid}").mkdir(parents=True)
        directory = cgroups / "freezer" / "kubepods" / "burstable" / f"pod{uid}"
        directory.mkdir(parents=True)
        (directory / "cgroup.procs").write_text("")
    return logs, cgroups


def run(quick: bool) -> list[Row]:
    polls = 100 if quick else POLLS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        logs, cgroups = _tree(root, PODS)
        socket = root / "kubelet.sock"
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(socket), str(PODS)],
                                  cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            config = KubernetesConfig(discover=True, pod_resources_socket=str(socket),
                                      pod_logs_dir=str(logs), cgroup_root=str(cgroups),
                                      cgroup_driver="cgroupfs")
            source = KubernetesSource(config)
            began = time.process_time()
            first = source.poll()
            first_ms = (time.process_time() - began) * 1000
            assert len(first.started) == PODS, first.problems[:3]
            began = time.process_time()
            wall = time.monotonic()
            for _ in range(polls):
                assert not source.poll()
            steady_ms = (time.process_time() - began) * 1000 / polls
            wall_ms = (time.monotonic() - wall) * 1000 / polls
            client = source._client
            assert client is not None
            began = time.process_time()
            for _ in range(polls):
                client._last = None  # as if the answer's bytes differed every time
                assert not source.poll()
            parsed_ms = (time.process_time() - began) * 1000 / polls
            source.close()
            memory = subprocess.run([sys.executable, "-c", MEMORY, str(socket)], cwd=REPO,
                                    capture_output=True, text=True, check=True)
            rss_kib = int(memory.stdout.split()[-1])
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
    return [Row(f"10. kubernetes poll, {PODS} pods, nothing new (CPU per poll)",
                f"{steady_ms:.3f} ms", target=f"<= {TARGET_MS} ms",
                passed=steady_ms <= TARGET_MS,
                details={"pods": PODS, "polls": polls, "steady_cpu_ms": steady_ms,
                         "steady_parsed_cpu_ms": parsed_ms,
                         "steady_wall_ms": wall_ms, "first_poll_cpu_ms": first_ms,
                         "grpc_rss_kib": rss_kib}),
            Row(f"10. kubernetes poll, {PODS} pods, nothing new, answer parsed (CPU per poll)",
                f"{parsed_ms:.3f} ms", target=f"<= {TARGET_MS} ms",
                passed=parsed_ms <= TARGET_MS),
            Row(f"10. kubernetes first poll, {PODS} new pods (CPU)", f"{first_ms:.1f} ms"),
            Row("10. kubernetes: grpc + channel, resident memory added",
                f"{rss_kib / 1024:.1f} MiB")]
