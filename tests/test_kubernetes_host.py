"""What the Kubernetes source reads of the node, piece by piece: the generated pod-resources
code against governor's api.proto and that against the kubelet's own, the kubelet's
directory and cgroup names, its PodList, NVML's GPU and MIG UUIDs (the C fake, through
the real pynvml), and the source's decisions on a List it is given."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from governor.config import ConfigError, KubernetesConfig, parse_config
from governor.host import kubernetes as host
from governor.host.nvml import UuidIndex, strip_replica
from governor.jobs.sources.base import NOTHING
from governor.jobs.sources.kubernetes import KubernetesSource
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import REPO
from tests.support.fake_nvml import h100
from tests.support.kubelet import KUBELET_PROTO, PodsServer, cluster_signed, self_signed

PROTO_DIR = REPO / "governor" / "host" / "podresources"
MIG = "MIG-11111111-2222-3333-4444-555555555551"


def test_the_committed_generated_code_is_what_grpcio_tools_makes_of_the_proto(
        tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    package = tmp_path / "governor" / "host" / "podresources"
    package.mkdir(parents=True)
    shutil.copy(PROTO_DIR / "api.proto", package / "api.proto")
    made = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
         "--grpc_python_out=.", "governor/host/podresources/api.proto"],
        cwd=tmp_path, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    for name in ("api_pb2.py", "api_pb2_grpc.py"):
        assert (package / name).read_text() == (PROTO_DIR / name).read_text(), (
            f"{name} is not what grpcio-tools generates from api.proto: regenerate it "
            "(governor/host/podresources/__init__.py says how)")


@pytest.mark.skipif(not KUBELET_PROTO.is_file(),
                    reason=f"the kubelet's own api.proto is not in the shared fixtures "
                           f"({KUBELET_PROTO})")
def test_governors_definition_reads_the_kubelets_wire_format() -> None:
    """governor's api.proto keeps only what it reads; each of its messages and fields must
    be the kubelet's: the same full name, number, type and repetition (what decides the
    bytes on the wire), and its call the kubelet's List."""
    from google.protobuf import descriptor_pb2

    from governor.host.podresources import api_pb2
    from tests.support.kubelet import compile_messages

    kubelet = compile_messages(KUBELET_PROTO)
    governor = api_pb2.DESCRIPTOR.message_types_by_name
    assert governor, "governor's definition has messages"
    for name, mine in governor.items():
        theirs = kubelet[name].DESCRIPTOR
        assert mine.full_name == theirs.full_name
        for field in mine.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{name}.{field.name} is not the kubelet's"
            if field.type == field.TYPE_MESSAGE:
                assert field.message_type.full_name == other.message_type.full_name
            assert ((field.number, field.type, field.is_repeated)
                    == (other.number, other.type, other.is_repeated)), f"{name}.{field.name}"
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    as_proto = descriptor_pb2.ServiceDescriptorProto()
    service.CopyToProto(as_proto)
    assert [m.name for m in as_proto.method] == ["List"]


def test_the_fake_kubelet_serves_from_the_kubelets_own_definition_where_it_has_it() -> None:
    from tests.support.kubelet import PROTO

    assert (KUBELET_PROTO if KUBELET_PROTO.is_file() else PROTO_DIR / "api.proto") == PROTO


def test_pod_cgroup_paths_follow_both_drivers() -> None:
    uid = "0e4bd3b1-5c6f-4b9c-9c2d-1f0e8a7b6c5d"
    cgroupfs = host.pod_cgroup_paths(uid, "cgroupfs")
    assert cgroupfs == [f"kubepods/pod{uid}", f"kubepods/burstable/pod{uid}",
                        f"kubepods/besteffort/pod{uid}"]
    escaped = uid.replace("-", "_")
    assert host.pod_cgroup_paths(uid, "systemd") == [
        f"kubepods.slice/kubepods-pod{escaped}.slice",
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice",
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"]
    assert host.pod_cgroup_paths(uid, "auto")[:3] == cgroupfs
    assert len(host.pod_cgroup_paths(uid, "auto")) == 6


def test_a_pods_cgroup_is_found_in_the_hierarchy_the_kubelet_used(tmp_path: Path) -> None:
    uid = "9a8b7c6d-0000-1111-2222-333344445555"
    hybrid = tmp_path / "hybrid"
    pod_dir = hybrid / "freezer" / "kubepods" / "besteffort" / f"pod{uid}"
    pod_dir.mkdir(parents=True)
    (hybrid / "unified").mkdir()
    assert host.pod_cgroup(hybrid, uid) is None, "no cgroup.procs: not a cgroup yet"
    (pod_dir / "cgroup.procs").write_text("")
    assert host.pod_cgroup(hybrid, uid) == pod_dir
    assert host.pod_cgroup(hybrid, uid, "systemd") is None
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    slice_dir = v2 / "kubepods.slice" / f"kubepods-pod{uid.replace('-', '_')}.slice"
    slice_dir.mkdir(parents=True)
    (slice_dir / "cgroup.procs").write_text("")
    assert host.hierarchy_dirs(v2) == [v2]
    assert host.pod_cgroup(v2, uid) == slice_dir


def test_uids_come_from_the_log_directory_names(tmp_path: Path) -> None:
    for name in ("research_train-0_aaaa-1", "research_train-0_bbbb-2", "web_serve-0_cccc-3",
                 "not-a-pod-dir", "a_b"):
        (tmp_path / name).mkdir()
    found = host.pod_uids(tmp_path)
    assert sorted(found[("research", "train-0")]) == ["aaaa-1", "bbbb-2"]
    assert found[("web", "serve-0")] == ["cccc-3"]
    assert len(found) == 2
    assert host.pod_uids(tmp_path / "absent") == {}


def test_a_pod_list_gives_uid_priority_class_and_annotations() -> None:
    document = {"kind": "PodList", "apiVersion": "v1", "items": [
        {"metadata": {"name": "a", "namespace": "ns", "uid": "u1",
                      "annotations": {"governor/exempt": "true"}},
         "spec": {"priorityClassName": "system-node-critical", "priority": 2000001000}},
        {"metadata": {"name": "b", "namespace": "ns", "uid": "u2"}, "spec": {}},
    ]}
    pods = host.parse_pod_list(document)
    assert pods[("ns", "a")] == host.PodMeta("u1", "system-node-critical",
                                             {"governor/exempt": "true"})
    assert pods[("ns", "b")] == host.PodMeta("u2")
    with pytest.raises(ValueError):
        host.parse_pod_list({"kind": "Status"})


def test_nvml_matches_gpu_and_mig_uuids_and_indices(
        c_nvml: CNvmlState, monkeypatch: pytest.MonkeyPatch) -> None:
    c_nvml.write({"gpus": [h100(0), h100(1, mig=["MIG-0", MIG])]})
    with c_nvml.loaded_into_pynvml(monkeypatch):
        index = UuidIndex()
        try:
            assert index.index(str(h100(1)["uuid"])) == 1
            assert index.index(str(h100(0)["uuid"]) + "::7") == 0
            assert index.index(MIG) == 1
            assert index.index("1") == 1
            with pytest.raises(LookupError, match="NVML has no device GPU-nope"):
                index.index("GPU-nope")
        finally:
            index.close()
    assert strip_replica("GPU-1::2") == "GPU-1"


def test_a_destroyed_mig_device_is_not_found(
        c_nvml: CNvmlState, monkeypatch: pytest.MonkeyPatch) -> None:
    c_nvml.write({"gpus": [h100(0, mig=[MIG])]})
    with c_nvml.loaded_into_pynvml(monkeypatch):
        import pynvml
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(MIG)
            assert pynvml.nvmlDeviceIsMigDeviceHandle(handle)
            parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
            assert pynvml.nvmlDeviceGetIndex(parent) == 0
            assert not pynvml.nvmlDeviceIsMigDeviceHandle(parent)
            with pytest.raises(pynvml.NVMLError_InvalidArgument):
                pynvml.nvmlDeviceGetIndex(handle)  # a MIG device is not a GPU
            with pytest.raises(pynvml.NVMLError_InvalidArgument):
                pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(parent)
            c_nvml.write({"gpus": [h100(0)]})
            with pytest.raises(pynvml.NVMLError_NotFound):
                pynvml.nvmlDeviceGetHandleByUUID(MIG)
            with pytest.raises(pynvml.NVMLError_InvalidArgument):
                pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        finally:
            pynvml.nvmlShutdown()


class _Gpus(UuidIndex):
    """NVML's answers for a source that is given its List: uuids "GPU-N" are gpuN."""

    def index(self, device_id: str) -> int:
        device_id = strip_replica(device_id)
        if not device_id.startswith("GPU-"):
            raise LookupError(f"NVML has no device {device_id}")
        return int(device_id.removeprefix("GPU-"))


def _source(tmp_path: Path, pods: list[host.PodDevices], **settings: object) -> KubernetesSource:
    logs, root = tmp_path / "logs", tmp_path / "cgroup"
    (root / "freezer").mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    for pod in pods:
        uid = f"uid-{pod.name}"
        (logs / f"{pod.namespace}_{pod.name}_{uid}").mkdir(exist_ok=True)
        directory = root / "freezer" / "kubepods" / f"pod{uid}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text("")
    config = KubernetesConfig.model_validate(
        {"discover": True, "pod_logs_dir": str(logs), "cgroup_root": str(root), **settings})
    return KubernetesSource(config, lister=lambda: list(pods), gpus=_Gpus())


def test_priority_is_the_class_s_else_the_namespace_s_else_the_default(tmp_path: Path) -> None:
    source = _source(tmp_path, [], default_priority=3, namespace_priority={"ns": 10},
                     priority_class_priority={"high": 99})
    assert source.priority("ns", "high") == 99
    assert source.priority("ns", "") == 10
    assert source.priority("other", "low") == 3


def test_a_poll_with_nothing_new_is_nothing_and_a_pod_gone_is_ended(tmp_path: Path) -> None:
    a = host.PodDevices("ns", "a", (("nvidia.com/gpu", "GPU-0"),))
    b = host.PodDevices("ns", "b", (("nvidia.com/gpu", "GPU-1"), ("nvidia.com/gpu", "GPU-0")))
    nic = host.PodDevices("ns", "nic", (("example.com/nic", "GPU-3"),))
    pods = [a, b, nic]
    source = _source(tmp_path, pods)
    changes = source.poll()
    assert [(r.scheduler_id, r.devices) for r in changes.started] == [
        ("ns/a", ("gpu0",)), ("ns/b", ("gpu0", "gpu1"))]
    assert source.poll() is NOTHING
    pods.remove(a)
    assert source.poll().ended == ("ns/a",)
    assert source.poll() is NOTHING


def test_kube_system_is_exempt_even_when_the_config_leaves_it_out(tmp_path: Path) -> None:
    pods = [host.PodDevices("kube-system", "k", (("nvidia.com/gpu", "GPU-0"),)),
            host.PodDevices("ns", "n", (("nvidia.com/mig-1g.10gb", "GPU-1"),))]
    source = _source(tmp_path, pods, exempt_namespaces=["other"])
    assert [r.scheduler_id for r in source.poll().started] == ["ns/n"]
    assert "kube-system" in source.exempt_namespaces
    assert {"system-node-critical", "system-cluster-critical"} <= source.exempt_classes


def test_a_pod_that_cannot_be_matched_yet_is_a_problem_asked_again_later(
        tmp_path: Path) -> None:
    now = [0.0]
    pods = [host.PodDevices("ns", "m", (("nvidia.com/gpu", "weird-id"),))]
    source = _source(tmp_path, pods)
    source._clock = lambda: now[0]
    first = source.poll()
    assert not first.started and "ns/m" in first.problems[0]
    pods[0] = host.PodDevices("ns", "m", (("nvidia.com/gpu", "GPU-2"),))
    assert not source.poll().started, "not asked again before its retry time"
    now[0] = 5.0
    assert [r.devices for r in source.poll().started] == [("gpu2",)]


def test_a_kubelets_own_certificate_verifies_it_when_given_as_the_ca(tmp_path: Path) -> None:
    """README's way for a kubelet without serverTLSBootstrap: its self-signed certificate
    (/var/lib/kubelet/pki/kubelet.crt) as the CA file."""
    cert, key = self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    server = PodsServer(tls=(cert, key), token="sa-token").start()
    try:
        server.add("ns", "a", "uid-a", priority_class="urgent")
        pods = host.KubeletPods(server.url, token_file=str(token), ca_file=str(cert)).pods()
        assert pods[("ns", "a")] == host.PodMeta("uid-a", "urgent", {})
        with pytest.raises(host.KubeletError, match="HTTP 401"):
            host.KubeletPods(server.url, token_file=str(tmp_path / "absent"),
                             ca_file=str(cert)).pods()
    finally:
        server.stop()


def test_the_token_goes_only_to_a_kubelet_the_ca_verifies(tmp_path: Path) -> None:
    """The kubelet's certificate, signed by the cluster's CA for this host's name as
    serverTLSBootstrap gets one, is checked before a byte of the request is sent: a CA
    that did not sign it, no CA (the system's trust store), or another name, and the
    kubelet never sees the token. Only the explicit opt-out sends it unverified."""
    ca, cert, key = cluster_signed(tmp_path)
    other_ca, _, _ = cluster_signed(tmp_path, "other")
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    server = PodsServer(tls=(cert, key)).start()
    try:
        server.add("ns", "a", "uid-a", priority_class="urgent")
        # the URL says 127.0.0.1; the certificate names this host, as a kubelet's does
        pods = host.KubeletPods(server.url, token_file=str(token), ca_file=str(ca)).pods()
        assert pods[("ns", "a")] == host.PodMeta("uid-a", "urgent", {})
        assert server.tokens == ["Bearer sa-token"]
        refused: list[dict[str, str]] = [
            {"ca_file": str(other_ca)}, {"ca_file": ""},
            {"ca_file": str(ca), "server_name": "another-node"}]
        for settings in refused:
            with pytest.raises(host.KubeletError, match="the token was not sent"):
                host.KubeletPods(server.url, token_file=str(token), **settings).pods()
        with pytest.raises(host.KubeletError, match=r"cannot be used.*the token was not sent"):
            host.KubeletPods(server.url, token_file=str(token),
                             ca_file=str(tmp_path / "absent.crt")).pods()
        assert server.tokens == ["Bearer sa-token"], "a kubelet not verified got the token"
        assert host.KubeletPods(server.url, token_file=str(token), ca_file="",
                                verify=False).pods()
        assert server.tokens == ["Bearer sa-token"] * 2, "the opt-out sends it unverified"
    finally:
        server.stop()


def test_the_config_verifies_the_kubelet_against_the_cluster_ca_by_default() -> None:
    config = KubernetesConfig()
    assert config.kubelet_ca_file == host.SERVICE_ACCOUNT_CA
    assert config.kubelet_tls_server_name == ""
    assert config.kubelet_insecure_skip_tls_verify is False
    assert config.exempt_annotation_namespaces == []


def test_a_loopback_kubelet_is_checked_for_this_hosts_name() -> None:
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert host.kubelet_server_name(loopback) == socket.gethostname()
    for other in ("10.0.0.7", "gpu-node-3.example"):
        assert host.kubelet_server_name(other) == other


@pytest.mark.parametrize(("settings", "problem"), [
    ({"kubelet_url": "http://127.0.0.1:10255"},
     "kubernetes.kubelet_url: over http the service account's token would travel in clear "
     'text: use https (the kubelet\'s port 10250), or kubelet_token_file = "" to send none'),
    ({"kubelet_url": "127.0.0.1:10250"},
     "kubernetes.kubelet_url: '127.0.0.1:10250' is not a URL like https://127.0.0.1:10250"),
])
def test_a_kubelet_url_that_would_leak_the_token_is_refused(
        settings: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"kubernetes": settings}, "test.toml")
    assert caught.value.lines() == [f"test.toml: {problem}"]
    parse_config({"kubernetes": {"kubelet_url": "http://127.0.0.1:10255",
                                 "kubelet_token_file": ""}})


def test_a_source_whose_kubelet_is_not_verified_governs_nothing_and_sends_no_token(
        tmp_path: Path) -> None:
    ca, cert, key = cluster_signed(tmp_path)
    other_ca, _, _ = cluster_signed(tmp_path, "other")
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    server = PodsServer(tls=(cert, key)).start()
    try:
        server.add("ns", "a", "uid-a")
        pods = [host.PodDevices("ns", "a", (("nvidia.com/gpu", "GPU-0"),))]
        source = _source(tmp_path, pods, kubelet_url=server.url,
                         kubelet_token_file=str(token), kubelet_ca_file=str(other_ca))
        changes = source.poll()
        assert not changes.started and "the token was not sent" in changes.problems[0]
        assert server.tokens == []
        source = _source(tmp_path, pods, kubelet_url=server.url,
                         kubelet_token_file=str(token), kubelet_ca_file=str(ca))
        assert [r.scheduler_id for r in source.poll().started] == ["ns/a"]
        assert server.tokens == ["Bearer sa-token"]
    finally:
        server.stop()


@pytest.fixture
def pods_server() -> Iterator[PodsServer]:
    """The kubelet's /pods over plain http, asked with no token (the config allows that
    and nothing else over http)."""
    server = PodsServer().start()
    yield server
    server.stop()


def _annotated(tmp_path: Path, server: PodsServer, **settings: object) -> list[str]:
    """The pods a fresh source governs of three, one per namespace, each annotated
    governor/exempt: "true"."""
    pods = [host.PodDevices(ns, "p", (("nvidia.com/gpu", "GPU-0"),))
            for ns in ("research", "infra", "web")]
    server.items.clear()
    for pod in pods:
        server.add(pod.namespace, "p", "uid-p", annotations={"governor/exempt": "true"})
    source = _source(tmp_path, pods, kubelet_url=server.url, kubelet_token_file="",
                     **settings)
    return [r.scheduler_id for r in source.poll().started]


def test_the_annotation_exempts_only_in_the_namespaces_the_config_lists(
        tmp_path: Path, pods_server: PodsServer) -> None:
    """A pod's author does not decide whether it is governed: the annotation counts only
    where the administrator lets it."""
    assert _annotated(tmp_path, pods_server) == ["infra/p", "research/p", "web/p"]
    assert _annotated(tmp_path, pods_server,
                      exempt_annotation_namespaces=["infra"]) == ["research/p", "web/p"]
    assert _annotated(tmp_path, pods_server, exempt_annotation_namespaces=["*"]) == []


def test_exempt_namespaces_and_priority_classes_exempt(
        tmp_path: Path, pods_server: PodsServer) -> None:
    classes = {"a": "", "b": "batch-exempt", "c": "system-node-critical", "d": "",
               "e": "urgent"}
    pods = [host.PodDevices("infra" if name == "a" else "research", name,
                            (("nvidia.com/gpu", "GPU-0"),)) for name in classes]
    for pod in pods:
        pods_server.add(pod.namespace, pod.name, f"uid-{pod.name}",
                        priority_class=classes[pod.name])
    source = _source(tmp_path, pods, kubelet_url=pods_server.url, kubelet_token_file="",
                     exempt_namespaces=["infra"], exempt_priority_classes=["batch-exempt"])
    assert [r.scheduler_id for r in source.poll().started] == ["research/d", "research/e"]
