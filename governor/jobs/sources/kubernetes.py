"""The pods on this node that hold a GPU, found through the kubelet and registered as
governor jobs named "namespace/pod" (CONTRACT section 7).

A poll is one pod-resources `List` over the kubelet's unix socket, compared with the pods
known. Only a new pod costs more: its uid from its log directory (a listing of
/var/log/pods), its cgroup (a few `stat`s), its GPUs matched to NVML indices, and, when
`kubelet_url` is set, one `GET /pods` for its annotations and priority class.

Exempt pods (kube-system and the other exempt namespaces, the system priority classes
and the exempt ones, the `governor/exempt: "true"` annotation in the namespaces the
config lets it count in) are never registered, so nothing can ever hold them: not a rule,
not an operator's pause through the API. Which pods are exempt is the administrator's
decision, in the config; a pod's own annotation is honoured only where the config says. When
the kubelet's metadata is asked for and cannot be had, a pod is not registered either
(it might be exempt) and a problem says why; it is asked for again later.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable

from governor.config import Config, KubernetesConfig
from governor.host import kubernetes as host
from governor.host.nvml import UuidIndex
from governor.jobs.model import Mode
from governor.jobs.registry import JobRequest
from governor.jobs.sources.base import NOTHING, Changes

log = logging.getLogger(__name__)

HOLD_MODES = {"cgroup": Mode.CGROUP, "signal": Mode.SIGNAL}
#: always exempt, whatever the config lists (the issue: never hold these)
ALWAYS_EXEMPT_NAMESPACES = frozenset({"kube-system"})
ALWAYS_EXEMPT_CLASSES = frozenset({"system-node-critical", "system-cluster-critical"})
EXEMPT_ANNOTATION = "governor/exempt"
#: a pod that could not be made into a request is asked for again after RETRY_FIRST
#: seconds, then twice as long each time up to RETRY_MAX (a kubelet that is down must not
#: cost a timed-out request every round)
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


class KubernetesSource:
    name = "kubernetes"

    def __init__(self, config: KubernetesConfig, *,
                 lister: Callable[[], list[host.PodDevices]] | None = None,
                 gpus: UuidIndex | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.mode = HOLD_MODES[config.hold]
        self._client: host.PodResourcesClient | None = None
        self._lister = lister
        self._gpus = gpus or UuidIndex()
        self._kubelet = (host.KubeletPods(
            config.kubelet_url, token_file=config.kubelet_token_file,
            ca_file=config.kubelet_ca_file, server_name=config.kubelet_tls_server_name,
            verify=not config.kubelet_insecure_skip_tls_verify)
            if config.kubelet_url else None)
        self.exempt_namespaces = ALWAYS_EXEMPT_NAMESPACES | set(config.exempt_namespaces)
        self.exempt_classes = ALWAYS_EXEMPT_CLASSES | set(config.exempt_priority_classes)
        self.annotation_namespaces = frozenset(config.exempt_annotation_namespaces)
        #: "namespace/pod" of the pods registered or found exempt
        self._known: set[str] = set()
        #: "namespace/pod" -> (when to ask again, the delay before that, the problem)
        self._retry: dict[str, tuple[float, float, str]] = {}
        self._list_problem = ""
        #: the last List, as the client returned it (the same object while unchanged)
        self._last_pods: list[host.PodDevices] | None = None
        self._clock = clock

    # ---- the JobSource protocol ----

    def poll(self) -> Changes:
        try:
            pods = self._list()
        except host.KubeletError as exc:
            self._list_problem = str(exc)
            return Changes(problems=(self._list_problem,))  # keep the known pods
        self._list_problem = ""
        now = self._clock()
        if pods is self._last_pods and all(at > now for at, _, _ in self._retry.values()):
            return Changes(problems=self._problems()) if self._retry else NOTHING
        self._last_pods = pods
        holding = {f"{pod.namespace}/{pod.name}": pod for pod in pods
                   if self._gpu_ids(pod)}
        ended = tuple(sorted(self._known - holding.keys()))
        self._known.difference_update(ended)
        self._retry = {sid: v for sid, v in self._retry.items() if sid in holding}
        new = [sid for sid in sorted(holding) if sid not in self._known
               and (sid not in self._retry or self._retry[sid][0] <= now)]
        if not new:
            return Changes(ended=ended, problems=self._problems()) if ended or self._retry \
                else NOTHING
        started: list[JobRequest] = []
        metadata: dict[tuple[str, str], host.PodMeta] | None = None
        metadata_problem = ""
        if self._kubelet is not None:
            try:
                metadata = self._kubelet.pods()
            except host.KubeletError as exc:
                metadata_problem = str(exc)
        uids = host.pod_uids(self.config.pod_logs_dir)
        for sid in new:
            pod = holding[sid]
            try:
                request = self._request(pod, metadata, metadata_problem, uids)
            except LookupError as exc:
                pending = self._retry.get(sid)
                delay = RETRY_FIRST if pending is None else min(2 * pending[1], RETRY_MAX)
                self._retry[sid] = (now + delay, delay, f"pod {sid}: {exc}")
                continue
            self._retry.pop(sid, None)
            if request is None:
                self._known.add(sid)
                log.info("pod %s is exempt: it is never held", sid)
                continue
            self._known.add(sid)
            started.append(request)
        # an exempt pod was never registered: its end is nobody's business
        return Changes(tuple(started), ended, self._problems())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._gpus.close()

    # ---- one pod ----

    def _request(self, pod: host.PodDevices,
                 metadata: dict[tuple[str, str], host.PodMeta] | None, metadata_problem: str,
                 uids: dict[tuple[str, str], list[str]]) -> JobRequest | None:
        """The registration of a pod; None when it is exempt; LookupError saying what is
        missing (asked for again later)."""
        key, sid = (pod.namespace, pod.name), f"{pod.namespace}/{pod.name}"
        if pod.namespace in self.exempt_namespaces:
            return None
        meta: host.PodMeta | None = None
        if self._kubelet is not None:
            if metadata is None:
                raise LookupError(f"its priority class and annotations are unknown, so it "
                                  f"is not governed yet ({metadata_problem})")
            meta = metadata.get(key)
            if meta is None:
                raise LookupError("the kubelet's /pods does not list it yet")
            if meta.priority_class in self.exempt_classes or self._annotated_exempt(
                    pod.namespace, meta):
                return None
        devices = self._devices(pod)
        candidates = [meta.uid] if meta is not None and meta.uid else uids.get(key, [])
        if not candidates:
            raise LookupError(f"no log directory {pod.namespace}_{pod.name}_<uid> under "
                              f"{self.config.pod_logs_dir} names its uid yet")
        cgroup = None
        for uid in candidates:
            cgroup = host.pod_cgroup(self.config.cgroup_root, uid, self.config.cgroup_driver)
            if cgroup is not None:
                break
        if cgroup is None:
            raise LookupError(f"no cgroup of pod uid {', '.join(candidates)} under "
                              f"{self.config.cgroup_root} ({self.config.cgroup_driver} "
                              "driver layouts)")
        return JobRequest(
            name=sid, cgroup=str(cgroup), mode=self.mode, devices=devices,
            priority=self.priority(pod.namespace, meta.priority_class if meta else ""),
            source="kubernetes", scheduler_id=sid, user=None)

    def _annotated_exempt(self, namespace: str, meta: host.PodMeta) -> bool:
        """The pod asks to be exempt, in a namespace whose pods the administrator lets
        decide that (`exempt_annotation_namespaces`); elsewhere the annotation is any
        pod author's say and is ignored."""
        if not ({namespace, "*"} & self.annotation_namespaces):
            return False
        return meta.annotations.get(EXEMPT_ANNOTATION, "").lower() == "true"

    def _gpu_ids(self, pod: host.PodDevices) -> list[str]:
        return [device for resource, device in pod.devices
                if any(fnmatch.fnmatchcase(resource, pattern)
                       for pattern in self.config.resources)]

    def _devices(self, pod: host.PodDevices) -> tuple[str, ...]:
        indices: set[int] = set()
        for device_id in self._gpu_ids(pod):
            indices.add(self._gpus.index(device_id))  # LookupError: not matched yet
        return tuple(f"gpu{i}" for i in sorted(indices))

    def priority(self, namespace: str, priority_class: str) -> int:
        """A priority class's priority, else the namespace's, else the default."""
        if priority_class and priority_class in self.config.priority_class_priority:
            return self.config.priority_class_priority[priority_class]
        if namespace in self.config.namespace_priority:
            return self.config.namespace_priority[namespace]
        return self.config.default_priority

    # ---- helpers ----

    def _list(self) -> list[host.PodDevices]:
        if self._lister is not None:
            return self._lister()
        if self._client is None:
            self._client = host.PodResourcesClient(self.config.pod_resources_socket)
        return self._client.list()

    def _problems(self) -> tuple[str, ...]:
        return tuple(self._retry[sid][2] for sid in sorted(self._retry))


def from_config(config: Config) -> KubernetesSource:
    """The Kubernetes source's entry in governor/jobs/sources/__init__.py."""
    return KubernetesSource(config.kubernetes)
