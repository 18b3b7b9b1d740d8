"""Pods governed as jobs, against a fake kubelet and real cgroups (tests/support/kubelet.py):
the real daemon lists the pods through a real gRPC pod-resources server built from the
kubelet's own api.proto where the shared fixtures have it, finds each pod's uid in its log
directory and its cgroup in the kubelet's layout on this machine's real hierarchies,
matches its GPUs through the C fake NVML (real pynvml), and freezes exactly the pod on a
hot GPU.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess, wait_for
from tests.support.fake_nvml import h100
from tests.support.kubelet import (
    CGROUP_ROOT,
    KubeletPod,
    PodResourcesServer,
    PodsServer,
    cgroups_missing,
    cluster_signed,
    pod,
)

pytestmark = pytest.mark.skipif(cgroups_missing() is not None, reason=str(cgroups_missing()))

Start = Callable[..., DaemonProcess]
GPU = "nvidia.com/gpu"
MIG_UUIDS = ["MIG-11111111-2222-3333-4444-555555555550",
             "MIG-11111111-2222-3333-4444-555555555551"]


def gpus(hot: int | None = None) -> dict[str, Any]:
    state = {"gpus": [h100(0, temperature=60), h100(1, temperature=60, mig=MIG_UUIDS)]}
    if hot is not None:
        state["gpus"][hot]["temperature"] = 95
    return state


def uuid(index: int) -> str:
    return str(h100(index)["uuid"])


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[tuple[PodResourcesServer, Path]]:
    """The pod-resources socket, and the pods' log directory."""
    server = PodResourcesServer(tmp_path / "kubelet.sock").start()
    logs = tmp_path / "pods"
    logs.mkdir()
    yield server, logs
    server.stop()


@pytest.fixture
def pods() -> Iterator[list[KubeletPod]]:
    """The pods a test makes, removed after it, the last made first (an earlier pod may
    have made the `kubepods` levels a later one's cgroup sits in)."""
    made: list[KubeletPod] = []
    yield made
    for made_pod in reversed(made):
        made_pod.remove()


def config(socket: Path, logs: Path, **settings: Any) -> dict[str, Any]:
    rule = {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 85.0,
            "for": 0, "clear_below": 75.0, "action": "pause"}
    return {"daemon": {"interval": 0.25},
            "kubernetes": {"discover": True, "pod_resources_socket": str(socket),
                           "pod_logs_dir": str(logs), "cgroup_root": str(CGROUP_ROOT),
                           "namespace_priority": {"research": 20}, "default_priority": 5,
                           **settings},
            "rules": [rule]}


def pod_jobs(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {j["scheduler_id"]: j for j in d.get("/v1/jobs").json()
            if j.get("source") == "kubernetes"}


def kill_and_see_it_thawed(d: DaemonProcess, pod: KubeletPod, why: str) -> None:
    """kill -9 of the daemon: its guardian thaws the frozen pod within 3 s."""
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 3
    while pod.progress(0.2) == 0 and time.monotonic() < deadline:
        pass
    assert pod.progress() > 0, why


def test_two_pods_are_bound_to_their_gpus_and_a_pod_that_goes_is_unregistered(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState) -> None:
    server, logs = kubelet
    c_nvml.write(gpus())
    train = KubeletPod("research", "train-0", logs)
    serve = KubeletPod("web", "serve-0", logs, driver="systemd", qos="guaranteed")
    pods += [train, serve]
    # GPU 1 through the time-slicing plugin's replica id; a pod with no GPU is no job
    server.set_pods(pod("research", "train-0", (GPU, uuid(0))),
                    pod("web", "serve-0", (GPU, uuid(1) + "::3")),
                    pod("web", "nginx-0", ("example.com/nic", "nic0")))
    d = daemon(config(server.socket, logs), c_nvml=c_nvml)
    jobs = wait_for(lambda: len(pod_jobs(d)) == 2 and pod_jobs(d), 5.0, "two pod jobs", d)
    assert jobs["research/train-0"]["devices"] == ["gpu0"]
    assert jobs["web/serve-0"]["devices"] == ["gpu1"]
    assert jobs["research/train-0"]["name"] == "research/train-0"
    assert jobs["research/train-0"]["priority"] == 20
    assert jobs["web/serve-0"]["priority"] == 5
    assert jobs["research/train-0"]["mode"] == "cgroup"
    assert jobs["research/train-0"]["cgroup"] == str(train.pod_dirs["freezer"])
    assert jobs["web/serve-0"]["cgroup"] == str(serve.pod_dirs["freezer"])
    metrics = d.metrics()
    assert 'governor_gpu_pod_info{gpu="1",namespace="web",pod="serve-0"} 1.0' in metrics
    assert 'namespace="research"' in metrics and 'pod="train-0"' in metrics

    server.set_pods(pod("web", "serve-0", (GPU, uuid(1) + "::3")))
    wait_for(lambda: list(pod_jobs(d)) == ["web/serve-0"], 5.0, "train-0 unregistered", d)
    assert 'pod="train-0"' not in d.metrics()


def test_a_mig_device_binds_its_pod_to_the_parent_gpu(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState) -> None:
    server, logs = kubelet
    c_nvml.write(gpus())
    pods.append(KubeletPod("research", "mig-0", logs, qos="besteffort"))
    server.set_pods(pod("research", "mig-0", ("nvidia.com/mig-1g.10gb", MIG_UUIDS[1])))
    d = daemon(config(server.socket, logs), c_nvml=c_nvml)
    job = wait_for(lambda: pod_jobs(d).get("research/mig-0"), 5.0, "the MIG pod's job", d)
    assert job["devices"] == ["gpu1"]
    assert "nvmlDeviceGetDeviceHandleFromMigDeviceHandle" in c_nvml.calls()


def test_a_pod_whose_gpu_nvml_does_not_know_is_a_problem_until_it_does(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState) -> None:
    server, logs = kubelet
    c_nvml.write({"gpus": [h100(0, temperature=60)]})
    pods.append(KubeletPod("research", "late-0", logs))
    server.set_pods(pod("research", "late-0", (GPU, uuid(1))))
    d = daemon(config(server.socket, logs), c_nvml=c_nvml)
    wait_for(lambda: "NVML has no device " + uuid(1) in d.log(), 5.0, "the problem logged", d)
    assert pod_jobs(d) == {}
    c_nvml.write(gpus())
    job = wait_for(lambda: pod_jobs(d).get("research/late-0"), 10.0, "the pod's job", d)
    assert job["devices"] == ["gpu1"]


LAYOUTS = [("cgroupfs", "burstable", "v1"), ("systemd", "besteffort", "v1"),
           ("cgroupfs", "guaranteed", "v2"), ("systemd", "burstable", "v2")]


def _layout_missing(hierarchies: str) -> str | None:
    if hierarchies == "v1" and not (CGROUP_ROOT / "freezer").is_dir():
        return "no cgroup v1 freezer on this machine"
    if hierarchies == "v2" and not ((CGROUP_ROOT / "cgroup.controllers").is_file()
                                    or (CGROUP_ROOT / "unified" / "cgroup.procs").is_file()):
        return "no cgroup v2 hierarchy on this machine"
    return None


@pytest.mark.parametrize(("driver", "qos", "hierarchies"), LAYOUTS,
                         ids=[f"{d}-{q}-{h}" for d, q, h in LAYOUTS])
def test_a_hot_gpu_freezes_exactly_the_pod_on_it_and_kill_9_thaws_it(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState, driver: str, qos: str, hierarchies: str) -> None:
    if (why := _layout_missing(hierarchies)) is not None:
        pytest.skip(why)
    server, logs = kubelet
    c_nvml.write(gpus())
    hot = KubeletPod("research", "hot-0", logs, driver=driver, qos=qos,
                     hierarchies=hierarchies)
    pods.append(hot)
    cool = KubeletPod("research", "cool-0", logs, driver=driver, qos=qos,
                      hierarchies=hierarchies)
    pods.append(cool)
    server.set_pods(pod("research", "hot-0", (GPU, uuid(0))),
                    pod("research", "cool-0", (GPU, uuid(1))))
    d = daemon(config(server.socket, logs, cgroup_driver=driver), c_nvml=c_nvml)
    jobs = wait_for(lambda: len(pod_jobs(d)) == 2 and pod_jobs(d), 5.0, "two pod jobs", d)
    held = "freezer" if hierarchies == "v1" else "v2"
    assert jobs["research/hot-0"]["cgroup"] == str(hot.pod_dirs[held])

    c_nvml.write(gpus(hot=0))
    wait_for(lambda: pod_jobs(d)["research/hot-0"]["state"] == "paused", 5.0, "paused", d)
    time.sleep(0.3)  # the freeze has settled
    assert hot.progress() == 0, "the pod on the hot GPU is frozen"
    assert cool.progress() > 0, "the pod on the cool GPU keeps running"
    assert pod_jobs(d)["research/cool-0"]["state"] == "running"

    c_nvml.write(gpus())
    wait_for(lambda: pod_jobs(d)["research/hot-0"]["state"] == "running", 5.0, "resumed", d)
    assert hot.progress() > 0, "cooling thaws it"

    c_nvml.write(gpus(hot=0))
    wait_for(lambda: pod_jobs(d)["research/hot-0"]["state"] == "paused", 5.0, "paused", d)
    time.sleep(0.3)
    assert hot.progress() == 0
    kill_and_see_it_thawed(d, hot, "the guardian thawed the pod when the daemon died")


def test_the_hosts_cgroup_tree_mounted_elsewhere_is_held_there(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState, tmp_path: Path) -> None:
    """The DaemonSet's shape: the host's /sys/fs/cgroup seen again at /host/cgroup, and
    `cgroup_root` naming that. The daemon runs in a mount namespace of its own where the
    host's tree is bind-mounted (private: nothing propagates back to the host's mounts)."""
    if shutil.which("unshare") is None or (why := _layout_missing("v1")) is not None:
        pytest.skip(why or "no unshare(1)")
    server, logs = kubelet
    c_nvml.write(gpus())
    hot = KubeletPod("research", "elsewhere-0", logs, driver="systemd")
    pods.append(hot)
    server.set_pods(pod("research", "elsewhere-0", (GPU, uuid(0))))
    host_cgroup = tmp_path / "host-cgroup"
    host_cgroup.mkdir()
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount --rbind /sys/fs/cgroup "{host_cgroup}" && exec "$0" "$@"']
    d = daemon(config(server.socket, logs, cgroup_root=str(host_cgroup)), c_nvml=c_nvml,
               prefix=prefix)
    job = wait_for(lambda: pod_jobs(d).get("research/elsewhere-0"), 5.0, "the pod's job", d)
    relative = hot.pod_dirs["freezer"].relative_to(CGROUP_ROOT)
    assert job["cgroup"] == str(host_cgroup / relative)
    assert not (host_cgroup / "freezer").exists(), "the bind mount is the daemon's alone"
    c_nvml.write(gpus(hot=0))
    wait_for(lambda: pod_jobs(d)["research/elsewhere-0"]["state"] == "paused", 5.0,
             "paused", d)
    time.sleep(0.3)
    assert hot.progress() == 0
    assert (hot.pod_dirs["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
    kill_and_see_it_thawed(d, hot, "the guardian thawed it through the same mount")


def test_signal_hold_stops_the_pods_processes(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState) -> None:
    server, logs = kubelet
    c_nvml.write(gpus())
    hot = KubeletPod("research", "sig-0", logs)
    pods.append(hot)
    server.set_pods(pod("research", "sig-0", (GPU, uuid(0))))
    d = daemon(config(server.socket, logs, hold="signal"), c_nvml=c_nvml)
    job = wait_for(lambda: pod_jobs(d).get("research/sig-0"), 5.0, "the pod's job", d)
    assert job["mode"] == "signal"
    c_nvml.write(gpus(hot=0))
    wait_for(lambda: _state(hot.pid) == "T", 5.0, "the pod's process stopped", d)
    c_nvml.write(gpus())
    wait_for(lambda: _state(hot.pid) != "T", 5.0, "the pod's process continued", d)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_exempt_namespaces_are_never_held_without_the_kubelets_metadata(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState) -> None:
    server, logs = kubelet
    c_nvml.write(gpus())
    system = KubeletPod("kube-system", "dcgm-0", logs)
    infra = KubeletPod("infra", "monitor-0", logs)
    normal = KubeletPod("research", "train-0", logs)
    pods += [system, infra, normal]
    server.set_pods(pod("kube-system", "dcgm-0", (GPU, uuid(0))),
                    pod("infra", "monitor-0", (GPU, uuid(0))),
                    pod("research", "train-0", (GPU, uuid(0))))
    # the operator's list leaves out kube-system: it is exempt all the same
    d = daemon(config(server.socket, logs, exempt_namespaces=["infra"]), c_nvml=c_nvml)
    wait_for(lambda: "research/train-0" in pod_jobs(d), 5.0, "the research pod's job", d)
    c_nvml.write(gpus(hot=0))
    wait_for(lambda: pod_jobs(d)["research/train-0"]["state"] == "paused", 5.0, "paused", d)
    time.sleep(0.5)
    assert list(pod_jobs(d)) == ["research/train-0"]
    assert system.progress() > 0 and infra.progress() > 0


@pytest.fixture
def cluster_ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The cluster's CA, and the kubelet's serving certificate and key it signed."""
    return cluster_signed(tmp_path)


@pytest.fixture
def pods_server(cluster_ca: tuple[Path, Path, Path]) -> Iterator[PodsServer]:
    """The kubelet's /pods, over https with its certificate from the cluster's CA."""
    _, cert, key = cluster_ca
    server = PodsServer(tls=(cert, key)).start()
    yield server
    server.stop()


def test_exempt_priority_classes_and_listed_annotations_are_never_held(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState, pods_server: PodsServer, cluster_ca: tuple[Path, Path, Path],
        tmp_path: Path) -> None:
    """Exemption is the administrator's: by priority class, and by the annotation only
    in the namespaces the config lets it count in (`trusted`); in `research` a pod that
    annotates itself exempt is held like any other."""
    server, logs = kubelet
    c_nvml.write(gpus())
    made = {
        ("research", "node-critical"): "system-node-critical",
        ("research", "cluster-critical"): "system-cluster-critical",
        ("research", "batch-exempt"): "infra",
        ("trusted", "annotated"): "",
        ("research", "annotated"): "",
        ("research", "urgent"): "urgent",
        ("research", "plain"): "",
    }
    made_pods = {key: KubeletPod(*key, logs) for key in made}
    pods += made_pods.values()
    for (namespace, name), made_pod in made_pods.items():
        pods_server.add(namespace, name, made_pod.uid, priority_class=made[namespace, name],
                        annotations={"governor/exempt": "true" if name == "annotated"
                                     else "false"})
    server.set_pods(*(pod(namespace, name, (GPU, uuid(0))) for namespace, name in made))
    token = tmp_path / "token-sa"
    token.write_text("sa-token-1\n")
    d = daemon(config(server.socket, logs, kubelet_url=pods_server.url,
                      kubelet_token_file=str(token), kubelet_ca_file=str(cluster_ca[0]),
                      exempt_priority_classes=["infra"],
                      exempt_annotation_namespaces=["trusted"],
                      priority_class_priority={"urgent": 90}), c_nvml=c_nvml)
    governed = ["research/annotated", "research/plain", "research/urgent"]
    jobs = wait_for(lambda: len(pod_jobs(d)) == 3 and pod_jobs(d), 5.0, "three pod jobs", d)
    assert sorted(jobs) == governed
    assert jobs["research/urgent"]["priority"] == 90, "the class's priority beats the namespace's"
    assert jobs["research/plain"]["priority"] == 20
    assert "Bearer sa-token-1" in pods_server.tokens
    c_nvml.write(gpus(hot=0))
    wait_for(lambda: pod_jobs(d)["research/annotated"]["state"] == "paused", 5.0, "paused", d)
    time.sleep(0.5)
    for key in made:
        if "/".join(key) not in governed:
            assert made_pods[key].progress() > 0, f"{key} is never held"
    assert sorted(pod_jobs(d)) == governed


def test_by_default_a_kubelet_the_cluster_ca_does_not_verify_gets_no_token(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState, pods_server: PodsServer, tmp_path: Path) -> None:
    """With the default `kubelet_ca_file` (the service account's ca.crt: absent here, or a
    real cluster's CA, which did not sign this kubelet's certificate), something answering
    at the kubelet's URL (a port squatter while the kubelet restarts) learns nothing: the
    token is not sent, and the pods stay unregistered (one might be exempt)."""
    server, logs = kubelet
    c_nvml.write(gpus(hot=0))
    made = KubeletPod("research", "train-0", logs)
    pods.append(made)
    pods_server.add("research", "train-0", made.uid)
    server.set_pods(pod("research", "train-0", (GPU, uuid(0))))
    token = tmp_path / "token-sa"
    token.write_text("sa-token-1\n")
    d = daemon(config(server.socket, logs, kubelet_url=pods_server.url,
                      kubelet_token_file=str(token)), c_nvml=c_nvml)
    wait_for(lambda: "the token was not sent" in d.log(), 5.0, "the problem logged", d)
    assert pod_jobs(d) == {} and pods_server.tokens == []
    assert made.progress() > 0


def test_a_pod_whose_metadata_the_kubelet_cannot_give_is_not_held(
        kubelet: tuple[PodResourcesServer, Path], pods: list[KubeletPod], daemon: Start,
        c_nvml: CNvmlState, pods_server: PodsServer,
        cluster_ca: tuple[Path, Path, Path]) -> None:
    server, logs = kubelet
    c_nvml.write(gpus(hot=0))
    made = KubeletPod("research", "unknown-0", logs)
    pods.append(made)
    pods_server.add("research", "unknown-0", made.uid)
    pods_server.up = False
    server.set_pods(pod("research", "unknown-0", (GPU, uuid(0))))
    d = daemon(config(server.socket, logs, kubelet_url=pods_server.url,
                      kubelet_ca_file=str(cluster_ca[0])), c_nvml=c_nvml)
    wait_for(lambda: "priority class and annotations are unknown" in d.log(), 5.0,
             "the problem logged", d)
    assert pod_jobs(d) == {}
    assert made.progress() > 0
    pods_server.up = True
    wait_for(lambda: "research/unknown-0" in pod_jobs(d), 10.0, "the pod's job", d)
