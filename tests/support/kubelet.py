"""A fake kubelet, as much of one as governor reads on a node:

- `PodResourcesServer`: the pod-resources API (`PodResourcesLister`, v1), a real gRPC
  server on a unix socket answering `List` from the pods a test sets. Its messages are
  built by grpcio-tools, when the tests run, from the kubelet's own api.proto
  (KUBELET_PROTO: a data file of the shared fixtures, another project's code and so not in
  this repository), into a descriptor pool of its own; where that file is absent, from
  governor's definition (governor/host/podresources/api.proto), and `PROTO` says which.
- `PodsServer`: the kubelet's `GET /pods`, a PodList JSON as the kubelet serves it,
  recording the bearer tokens it was sent.
- `KubeletPod`: a pod as the kubelet leaves it on the node: its log directory
  `<namespace>_<name>_<uid>` and its cgroup, in the layout of either cgroup driver, on the
  host's real cgroup hierarchies, with a real busy process in a container cgroup under it.
  Every directory it made is removed on `remove()`, also after a failure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
#: the kubelet's own definition, k8s.io/kubelet pkg/apis/podresources/v1/api.proto
KUBELET_PROTO = Path(os.environ.get(
    "GOVERNOR_KUBELET_PROTO",
    REPO.parent / "shared" / "fixtures" / "kubelet-podresources" / "api.proto"))
#: governor's definition of the part it reads, what the daemon's client is generated from
GOVERNOR_PROTO = REPO / "governor" / "host" / "podresources" / "api.proto"
#: the definition the fake kubelet serves from
PROTO = KUBELET_PROTO if KUBELET_PROTO.is_file() else GOVERNOR_PROTO


def compile_messages(proto: Path) -> dict[str, Any]:
    """Every message of the proto's package `v1`, as classes of a descriptor pool of their
    own: the daemon's generated classes (the same full names, from governor's file) live in
    the default pool of the same process, and one pool refuses a name defined twice."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        if protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}",
                        proto.name]) != 0:
            raise RuntimeError(f"grpcio-tools could not compile {proto}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    messages = pool.FindFileByName(proto.name).message_types_by_name
    return {name: message_factory.GetMessageClass(descriptor)
            for name, descriptor in messages.items()}


V1 = compile_messages(PROTO)

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: the v1 hierarchies the kubelet makes a pod's cgroup in that governor reads
V1_HIERARCHIES = ("freezer", "cpu", "cpuacct")
SPIN = "while True: pass"


def pod(namespace: str, name: str, *devices: tuple[str, str]) -> Any:
    """A pod of a List answer; each device a (resource name, device id), one container."""
    container = V1["ContainerResources"](name="main")
    for resource, device_id in devices:
        container.devices.append(V1["ContainerDevices"](resource_name=resource,
                                                        device_ids=[device_id]))
    return V1["PodResources"](name=name, namespace=namespace, containers=[container])


class _Lister:
    def __init__(self) -> None:
        self.pods: list[Any] = []
        self.lists = 0
        self.lock = threading.Lock()

    def list(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.lists += 1
            return V1["ListPodResourcesResponse"](pod_resources=list(self.pods))


class PodResourcesServer:
    """The kubelet's pod-resources socket: `/v1.PodResourcesLister/List`."""

    def __init__(self, socket: Path):
        self.socket = socket
        self._lister = _Lister()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "v1.PodResourcesLister", {"List": grpc.unary_unary_rpc_method_handler(
                self._lister.list,
                request_deserializer=V1["ListPodResourcesRequest"].FromString,
                response_serializer=V1["ListPodResourcesResponse"].SerializeToString)}),))
        self._server.add_insecure_port(f"unix:{socket}")

    def start(self) -> PodResourcesServer:
        self._server.start()
        return self

    def set_pods(self, *pods: Any) -> None:
        with self._lister.lock:
            self._lister.pods = list(pods)

    @property
    def lists(self) -> int:
        return self._lister.lists

    def stop(self) -> None:
        self._server.stop(grace=None).wait()


class PodsServer:
    """The kubelet's `GET /pods` on 127.0.0.1: plain HTTP, or HTTPS with the given
    certificate and key (the kubelet's serving certificate); `token`, when set, is the
    only bearer token answered (401 otherwise, as the kubelet's authentication does)."""

    def __init__(self, tls: tuple[Path, Path] | None = None, token: str = "") -> None:
        self.items: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.up = True
        self.token = token
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.tokens.append(self.headers.get("Authorization", ""))
                if outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                    self.send_error(401)
                    return
                if self.path != "/pods" or not outer.up:
                    self.send_error(404 if outer.up else 503)
                    return
                body = json.dumps({"kind": "PodList", "apiVersion": "v1",
                                   "metadata": {}, "items": outer.items}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> PodsServer:
        self._thread.start()
        return self

    def add(self, namespace: str, name: str, uid: str, *, priority_class: str = "",
            annotations: dict[str, str] | None = None) -> None:
        """A pod as the kubelet's PodList shows it (the fields governor reads, and some
        around them)."""
        spec: dict[str, Any] = {"containers": [{"name": "main", "image": "cuda:12"}],
                                "nodeName": "node1"}
        if priority_class:
            spec["priorityClassName"] = priority_class
            spec["priority"] = 1000
        self.items.append({
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                         "annotations": annotations or {},
                         "creationTimestamp": "2026-12-03T18:00:00Z"},
            "spec": spec, "status": {"phase": "Running", "qosClass": "Burstable"}})

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class KubeletPod:
    """A pod's traces on the node: log directory, kubelet-shaped cgroup, busy process.

    `driver` is "cgroupfs" or "systemd"; `qos` "guaranteed", "burstable" or "besteffort";
    `hierarchies` "v1" (freezer, cpu, cpuacct) or "v2" (the v2 hierarchy under
    `cgroup_root`: `unified` on a hybrid host)."""

    def __init__(self, namespace: str, name: str, logs_dir: Path, *, driver: str = "cgroupfs",
                 qos: str = "burstable", hierarchies: str = "v1",
                 cgroup_root: Path = CGROUP_ROOT, cgroups: bool = True):
        self.namespace, self.name = namespace, name
        self.uid = str(uuid.uuid4())
        self.log_dir = logs_dir / f"{namespace}_{name}_{self.uid}"
        self.created: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.pod_dirs: dict[str, Path] = {}
        self.log_dir.mkdir(parents=True)
        if not cgroups:
            return
        try:
            self._make_cgroups(driver, qos, hierarchies, cgroup_root)
        except BaseException:
            self.remove()
            raise

    def _make_cgroups(self, driver: str, qos: str, hierarchies: str, root: Path) -> None:
        level = "" if qos == "guaranteed" else qos
        escaped = self.uid.replace("-", "_")
        container = uuid.uuid4().hex
        if driver == "cgroupfs":
            parts = ["kubepods", *([level] if level else []), f"pod{self.uid}", container]
        else:
            parts = ["kubepods.slice",
                     *([f"kubepods-{level}.slice"] if level else []),
                     f"kubepods-{level + '-' if level else ''}pod{escaped}.slice",
                     f"cri-containerd-{container}.scope"]
        if hierarchies == "v1":
            tops = [root / name for name in V1_HIERARCHIES]
            names = list(V1_HIERARCHIES)
        else:
            top = root if (root / "cgroup.controllers").is_file() else root / "unified"
            tops, names = [top], ["v2"]
        leaves = []
        for name, top in zip(names, tops, strict=True):
            directory = top
            for part in parts:
                directory = directory / part
                if not directory.exists():
                    directory.mkdir()
                    self.created.append(directory)
            self.pod_dirs[name] = directory.parent
            leaves.append(directory)
        self.proc = subprocess.Popen([sys.executable, "-c", SPIN])
        for leaf in leaves:
            (leaf / "cgroup.procs").write_text(str(self.proc.pid))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_ticks(self) -> int:
        """The busy process's CPU time so far, in clock ticks (utime + stime)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def progress(self, seconds: float = 0.6) -> int:
        """The CPU ticks the busy process gains in `seconds`."""
        before = self.cpu_ticks()
        time.sleep(seconds)
        return self.cpu_ticks() - before

    def remove(self) -> None:
        """Thaw, kill the process and remove every directory this pod made, deepest first."""
        for name, directory in self.pod_dirs.items():
            with contextlib.suppress(OSError):
                if name == "freezer":
                    (directory / "freezer.state").write_text("THAWED")
                elif name == "v2":
                    (directory / "cgroup.freeze").write_text("0")
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for directory in reversed(self.created):
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break  # another pod's cgroup is still in it: that pod removes it
                    time.sleep(0.02)  # a killed process leaves its cgroup a moment later
        for child in sorted(self.log_dir.glob("*"), reverse=True):
            child.unlink()
        with contextlib.suppress(OSError):
            self.log_dir.rmdir()


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the fake kubelet")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def self_signed(folder: Path, name: str = "kubelet",
                san: str = "") -> tuple[Path, Path]:
    """A self-signed certificate and its key, as a kubelet makes for itself without
    serverTLSBootstrap: for this host's name (`san` instead, when given, e.g.
    "IP:127.0.0.1"); skips the test without openssl."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-addext",
             f"subjectAltName={san or 'DNS:' + socket.gethostname()}",
             "-keyout", str(key), "-out", str(cert))
    return cert, key


def cluster_signed(folder: Path, name: str = "kubelet",
                   san: str = "") -> tuple[Path, Path, Path]:
    """A cluster CA, and a kubelet serving certificate it signed with its key, as
    serverTLSBootstrap gets one: for this host's name (`san` instead, when given). The
    CA is what a pod finds at /var/run/secrets/kubernetes.io/serviceaccount/ca.crt."""
    ca, ca_key = folder / f"{name}-ca.crt", folder / f"{name}-ca.key"
    cert, key, csr = (folder / f"{name}.crt", folder / f"{name}.key",
                      folder / f"{name}.csr")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", f"/CN={name}-ca", "-keyout", str(ca_key), "-out", str(ca))
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj",
             f"/O=system:nodes/CN=system:node:{socket.gethostname()}",
             "-addext", f"subjectAltName={san or 'DNS:' + socket.gethostname()}",
             "-keyout", str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "1", "-copy_extensions", "copy",
             "-out", str(cert))
    return ca, cert, key


def cgroups_missing() -> str | None:
    """Why this machine cannot host kubelet-shaped cgroups; None if it can."""
    if os.geteuid() != 0:
        return "not root: cannot make cgroups"
    if not ((CGROUP_ROOT / "freezer").is_dir()
            or (CGROUP_ROOT / "cgroup.controllers").is_file()):
        return "no cgroup v1 freezer nor cgroup v2 at /sys/fs/cgroup"
    return None
