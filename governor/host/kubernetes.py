"""What the node's kubelet knows of its pods, read on the node with no cluster permission.

- Which pod holds which device: the kubelet's pod-resources API (v1 `List`, gRPC over the
  unix socket under /var/lib/kubelet/pod-resources/). One `List` a poll. grpc is imported
  here, when the first client is made, so a daemon with `[kubernetes] discover` off never
  loads it (tests/test_memory.py).
- A pod's uid: the kubelet's log directory of the pod, `<namespace>_<name>_<uid>` under
  /var/log/pods (kubelet `BuildPodLogsDirectory`, pkg/kubelet/kuberuntime/helpers.go:
  `filepath.Join(podLogsRootDirectory, strings.Join([]string{podNamespace, podName,
  string(podUID)}, "_"))`). Neither a namespace nor a pod name may contain "_" (both are
  DNS names), so the three parts split cleanly. Readable by root on the node, with no token.
- A pod's annotations and priority class, when the operator gives the kubelet's URL: the
  kubelet's `GET /pods` (a PodList), with the service account's token. That needs RBAC
  (README); the pod-resources socket and the log directories need none. The token goes
  only to a kubelet whose certificate the CA verifies (the cluster's, which every pod has
  mounted), unless the operator opts out, and never over plain http.
- A pod's cgroup: the directory the kubelet made for it, under either cgroup driver.

Nothing here decides anything: the Kubernetes job source does.
"""

from __future__ import annotations

import http.client
import importlib
import ipaddress
import json
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: the kubelet's default gRPC client limit for pod-resources answers (16 MiB), not grpc's 4
MAX_MESSAGE = 16 * 1024 * 1024
LIST_TIMEOUT = 5.0
KUBELET_TIMEOUT = 5.0
#: the cluster's CA, mounted in every pod with its service account's token
SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
#: the QoS levels of a pod's cgroup: Guaranteed pods sit directly under kubepods
QOS_LEVELS = ("", "burstable", "besteffort")


class KubeletError(Exception):
    """The kubelet could not be asked; the message is one line saying why."""


@dataclass(frozen=True, slots=True)
class PodDevices:
    """One pod of a pod-resources `List`: the devices its containers were allocated."""

    namespace: str
    name: str
    #: (resource name, device id), e.g. ("nvidia.com/gpu", "GPU-7b6...")
    devices: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class PodMeta:
    """What the kubelet's /pods says of a pod that decides how it is governed."""

    uid: str
    priority_class: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


class PodResourcesClient:
    """A channel to the kubelet's pod-resources socket, kept open between polls."""

    def __init__(self, socket: str, *, timeout: float = LIST_TIMEOUT):
        import grpc  # lazily: only a daemon with Kubernetes discovery pays for it

        # the generated module carries no types
        api_pb2: Any = importlib.import_module("governor.host.podresources.api_pb2")
        method = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"].methods_by_name["List"]
        self._grpc = grpc
        self._response = api_pb2.ListPodResourcesResponse
        self._request = api_pb2.ListPodResourcesRequest().SerializeToString()
        self.socket = socket
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix:{os.path.abspath(socket)}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        # "/v1.PodResourcesLister/List", answered as bytes: when they are the last
        # poll's, nothing is parsed again (the generated stub would parse every answer)
        self._list = self._channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=None, response_deserializer=None)
        self._last: tuple[bytes, list[PodDevices]] | None = None

    def list(self) -> list[PodDevices]:
        """Every pod the kubelet has resources for, with its devices: the same list object
        as the last call's when the kubelet's answer is the same. KubeletError when the
        socket does not answer."""
        try:
            raw = self._list(self._request, timeout=self.timeout)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise KubeletError(f"pod-resources List on {self.socket}: "
                               f"{getattr(code, 'name', code)}: {detail}") from None
        if self._last is not None and self._last[0] == raw:
            return self._last[1]
        response = self._response.FromString(raw)
        pods = [PodDevices(pod.namespace, pod.name, tuple(
            (devices.resource_name, device_id)
            for container in pod.containers for devices in container.devices
            for device_id in devices.device_ids)) for pod in response.pod_resources]
        self._last = (raw, pods)
        return pods

    def close(self) -> None:
        self._channel.close()


def pod_uids(logs_dir: str | Path) -> dict[tuple[str, str], list[str]]:
    """(namespace, pod) -> the uids of its log directories (a pod deleted and made again
    under its name has two for a while); {} when the directory cannot be read."""
    found: dict[tuple[str, str], list[str]] = {}
    try:
        names = os.listdir(logs_dir)
    except OSError:
        return found
    for name in names:
        parts = name.split("_")
        if len(parts) == 3 and all(parts):
            found.setdefault((parts[0], parts[1]), []).append(parts[2])
    return found


def pod_cgroup_paths(uid: str, driver: Literal["auto", "cgroupfs", "systemd"]) -> list[str]:
    """Where the kubelet puts a pod's cgroup, relative to a hierarchy's root, for each QoS
    class: cgroupfs `kubepods/<qos>/pod<uid>` (Guaranteed: `kubepods/pod<uid>`), systemd
    `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, "-" as "_">.slice`
    (kubelet pkg/kubelet/cm/cgroup_manager_linux.go and qos_container_manager_linux.go)."""
    paths: list[str] = []
    if driver in ("auto", "cgroupfs"):
        paths += [f"kubepods/{qos}/pod{uid}" if qos else f"kubepods/pod{uid}"
                  for qos in QOS_LEVELS]
    if driver in ("auto", "systemd"):
        escaped = uid.replace("-", "_")
        paths += [f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{escaped}.slice"
                  if qos else f"kubepods.slice/kubepods-pod{escaped}.slice"
                  for qos in QOS_LEVELS]
    return paths


def hierarchy_dirs(cgroup_root: str | Path) -> list[Path]:
    """The hierarchies of the host's cgroup tree mounted at `cgroup_root` that a pod's
    cgroup is looked for in, best first: the root itself on a cgroup v2 host; on a v1 or
    hybrid host the freezer (the kubelet runs in v1 mode there, and makes its cgroups in
    every v1 controller), then v2's `unified`."""
    root = Path(cgroup_root)
    if (root / "cgroup.controllers").is_file():
        return [root]
    return [d for d in (root / "freezer", root / "unified") if d.is_dir()]


def pod_cgroup(cgroup_root: str | Path, uid: str,
               driver: Literal["auto", "cgroupfs", "systemd"] = "auto") -> Path | None:
    """The directory of a pod's cgroup under the host's cgroup tree; None until the
    kubelet has made it."""
    for hierarchy in hierarchy_dirs(cgroup_root):
        for path in pod_cgroup_paths(uid, driver):
            directory = hierarchy / path
            if (directory / "cgroup.procs").is_file():
                return directory
    return None


def kubelet_server_name(host: str) -> str:
    """The name a kubelet's serving certificate is checked against when the config gives
    none: the URL's host, except a loopback address (the node's own kubelet, reached through
    hostNetwork), which no kubelet's certificate names: then this host's name, which under
    hostNetwork is the node's, and which the kubelet puts in its certificate (self-signed,
    or from serverTLSBootstrap with the node's addresses)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return socket.gethostname() if loopback else host


class _HTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose certificate is checked for `server_name` rather than for
    the host connected to. The handshake, and with it the check, comes before a byte of
    the request: a kubelet that fails it is never sent the token."""

    def __init__(self, host: str, port: int | None, *, server_name: str,
                 context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._tls = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


class KubeletPods:
    """The kubelet's `GET /pods`, read with a bearer token, over https verified against
    `ca_file` ("" = the system's trust store) for `server_name` ("" =
    `kubelet_server_name` of the URL's host). `verify=False` skips the check: the token
    then goes to whoever answers at the URL. Over plain http no token is sent at all."""

    def __init__(self, url: str, *, token_file: str = "", ca_file: str = "",
                 server_name: str = "", verify: bool = True,
                 timeout: float = KUBELET_TIMEOUT):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"kubelet URL {url!r} is not http(s)://host[:port]")
        self.url = url
        self._parsed = parsed
        self.token_file = token_file
        self.ca_file = ca_file
        self.verify = verify
        self.server_name = server_name or kubelet_server_name(parsed.hostname)
        self.timeout = timeout
        self._context: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        """Made at the first request, and again at each until the CA file can be read:
        a CA missing or unreadable is a problem of the source, asked again, not a crash."""
        if self._context is None:
            if self.verify:
                try:
                    self._context = ssl.create_default_context(cafile=self.ca_file or None)
                except (OSError, ssl.SSLError) as exc:
                    raise KubeletError(
                        f"GET {self.url}/pods: the CA file {self.ca_file!r} that verifies "
                        f"the kubelet cannot be used: {exc}; the token was not sent") from None
            else:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                self._context = context
        return self._context

    def pods(self) -> dict[tuple[str, str], PodMeta]:
        """(namespace, pod) -> its metadata. KubeletError when the kubelet does not
        answer with a PodList."""
        path = self._parsed.path.rstrip("/") + "/pods"
        headers = {"Accept": "application/json"}
        connection: http.client.HTTPConnection
        if self._parsed.scheme == "https":
            token = self._token()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            connection = _HTTPSConnection(
                self._parsed.hostname or "", self._parsed.port, timeout=self.timeout,
                context=self._tls_context(), server_name=self.server_name)
        else:
            connection = http.client.HTTPConnection(
                self._parsed.hostname or "", self._parsed.port, timeout=self.timeout)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except ssl.SSLCertVerificationError as exc:
            raise KubeletError(
                f"GET {self.url}/pods: the kubelet's certificate is not verified for "
                f"{self.server_name!r} by {self.ca_file or 'the system trust store'} "
                f"({exc}); the token was not sent (README, On Kubernetes: the kubelet's "
                "serving certificate)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise KubeletError(f"GET {self.url}{'/pods'}: {exc}") from None
        finally:
            connection.close()
        if response.status != 200:
            raise KubeletError(f"GET {self.url}/pods: HTTP {response.status} "
                               f"{body[:200].decode(errors='replace')!r}")
        try:
            return parse_pod_list(json.loads(body))
        except (ValueError, TypeError, AttributeError) as exc:
            raise KubeletError(f"GET {self.url}/pods: not a PodList: {exc}") from None

    def _token(self) -> str:
        """Read each time: a projected service account token is replaced hourly."""
        if not self.token_file:
            return ""
        try:
            return Path(self.token_file).read_text().strip()
        except OSError:
            return ""


def parse_pod_list(document: Any) -> dict[tuple[str, str], PodMeta]:
    """The pods of a PodList JSON document, by (namespace, name)."""
    if not isinstance(document, dict) or not isinstance(document.get("items"), list):
        raise ValueError("no items")
    found: dict[tuple[str, str], PodMeta] = {}
    for item in document["items"]:
        metadata, spec = item.get("metadata") or {}, item.get("spec") or {}
        namespace, name = str(metadata.get("namespace", "")), str(metadata.get("name", ""))
        if not namespace or not name:
            continue
        annotations = metadata.get("annotations") or {}
        found[(namespace, name)] = PodMeta(
            uid=str(metadata.get("uid", "")),
            priority_class=str(spec.get("priorityClassName") or ""),
            annotations={str(k): str(v) for k, v in annotations.items()})
    return found

