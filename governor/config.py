"""The TOML config, validated: unknown keys and wrong types are errors naming the key.

`load_config` returns a frozen `Config` or raises `ConfigError` with every problem at
once, each as (key, message), so `governor check-config` can print them all and the
daemon can refuse to start, or refuse a reload, with the key named.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from governor.catalog import SAMPLED
from governor.client.settings import (
    CONFIG_SEARCH,
    DEFAULT_LISTEN,
    DEFAULT_SOCKET,
    DEFAULT_TOKEN_FILE,
    ClientSettings,
    find_config_file,
    parse_listen,
)
from governor.jobs.services import DEFAULT_PROTECTED_EXECUTABLES, DEFAULT_PROTECTED_UNITS

#: the client's search order: a job finds the file the daemon reads
DEFAULT_SEARCH = CONFIG_SEARCH
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION = 30 * 86400.0


def parse_duration(value: object) -> float:
    """Seconds from a number or a string with a unit: 1.5, "250ms", "5s", "2m", "1h"."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like \"5s\"")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f'{value!r} is not a duration: use seconds or a unit, like "250ms", "5s", "2m"'
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string like \"5s\"")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration is a finite number of seconds, not {seconds}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError("a duration cannot be longer than 30 days")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration, for messages: 0.25 -> "250ms", 2 -> "2s", 90 -> "90s",
    120 -> "2m"."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _label_value(value: object) -> object:
    """`match = { gpu = 0 }` means gpu="0": label values are strings, numbers are welcome."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


LabelValue = Annotated[str, BeforeValidator(_label_value)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    # allow_inf_nan: TOML has `nan` and `inf`, and no key means either: a NaN line never
    # trips (every comparison with it is false) and a NaN target makes NaN speeds
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DaemonConfig(_Section):
    interval: Duration = 1.0
    state_dir: str = ".governor"
    #: how long one sampler may take in a round; unset: 80% of the interval
    sampler_timeout: Duration | None = None

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if not 0.01 <= value <= 3600:
            raise ValueError("must be between 10ms and 1h")
        return value

    @field_validator("sampler_timeout")
    @classmethod
    def _timeout(cls, value: float | None) -> float | None:
        if value is not None and value < 0.001:
            raise ValueError("must be at least 1ms")
        return value

    @property
    def effective_sampler_timeout(self) -> float:
        if self.sampler_timeout is not None:
            return min(self.sampler_timeout, self.interval)
        return 0.8 * self.interval


def _existing_file(value: str) -> str:
    """"" or a path that names a file. A file this user may not look at passes: the CLI
    reads the daemon's config without the right to see the daemon's private key."""
    if not value:
        return value
    try:
        if stat.S_ISDIR(os.stat(value).st_mode):
            raise ValueError(f"{value} is a directory, not a file")
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"no such file: {value}") from None
    except PermissionError:
        pass
    return value


class ApiConfig(_Section):
    # the defaults are the client's (governor.client.settings), so a job that reads the
    # file without pydantic agrees with the daemon about a key that is not set
    listen: str = DEFAULT_LISTEN
    token_file: str = DEFAULT_TOKEN_FILE
    allow_unauthenticated: bool = False
    socket: str = DEFAULT_SOCKET
    #: Host header values accepted (DNS rebinding guard); empty: this machine's names
    allowed_hosts: list[str] = Field(default_factory=list)
    #: TLS for the TCP listener: a PEM certificate (chain) and its private key, or neither
    tls_cert: str = ""
    tls_key: str = ""
    #: what the CLI verifies the daemon's certificate against; "": tls_cert itself
    tls_ca: str = ""
    #: the largest request body answered (413 above it, before it is read)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: how long a client has to send a request's headers (and its body) before the
    #: connection is closed
    header_timeout: Duration = 10.0
    #: open connections per listener (TCP, the unix socket each); more are closed at once
    max_connections: int = Field(default=1024, ge=1, le=100_000)
    #: the unix socket's connections one user other than root may hold at once (root is
    #: always let in), so one member of the socket's group cannot fill it
    max_connections_per_user: int = Field(default=64, ge=1, le=100_000)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("header_timeout")
    @classmethod
    def _header_timeout(cls, value: float) -> float:
        if not 0.1 <= value <= 300:
            raise ValueError("must be between 100ms and 5m")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host.strip() or any(c in host for c in "/ \t"):
                raise ValueError(f"{host!r} is not a host name, an address or \"*\"")
        return value

    @field_validator("tls_cert", "tls_key", "tls_ca")
    @classmethod
    def _tls_file(cls, value: str) -> str:
        return _existing_file(value)

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if self.tls_cert and not self.tls_key:
            raise ValueError("tls_key: is needed with api.tls_cert (the certificate's "
                             "private key)")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_cert: is needed with api.tls_key (the key's certificate)")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("tls_ca: applies only with api.tls_cert; without it the API "
                             "is served without TLS")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]

    def client_settings(self) -> ClientSettings:
        """What the CLI's REST client needs of this section (governor.client must not
        import the daemon's config, so the daemon's side does the translating)."""
        return ClientSettings(host=self.host, port=self.port, token_file=self.token_file,
                              socket=self.socket, tls_cert=self.tls_cert, tls_ca=self.tls_ca)


class SourcesConfig(_Section):
    sysfs_root: str = "/sys"
    procfs_root: str = "/proc"
    nvml: Literal["auto", "off", "required"] = "auto"
    #: a scenario file for the simulated GPUs (the demo); "" = no simulated GPUs
    simulate: str = ""

    @field_validator("simulate")
    @classmethod
    def _scenario(cls, value: str) -> str:
        """Checked at load, so a bad scenario is named by `check-config` and refused by a
        starting daemon, as any other bad key."""
        if value:
            from governor.sampling.simulated import ScenarioError, load_scenario

            try:
                load_scenario(value)
            except ScenarioError as exc:
                raise ValueError(str(exc)) from None
        return value


class JobsConfig(_Section):
    #: cgroup mode: "auto" freezes through v2 where it is mounted and limits CPU through
    #: whichever hierarchy has the cpu controller; "v2" or "v1" use that version only
    cgroup_version: Literal["auto", "v1", "v2"] = "auto"
    #: signal mode: the period of the stop/continue duty cycle that slows a job
    slow_period: Duration = 0.1
    #: a job whose process exited is listed as "gone" this long, then forgotten
    forget_gone_after: Duration = 60.0
    #: how many jobs one user (a uid over the unix socket) may have registered at once;
    #: root and token holders are not limited
    max_per_user: int = Field(default=64, ge=1, le=100_000)
    #: a cooperative job with no process (mode "cooperative", no pid) that has not polled
    #: its directive for this long is unregistered; 0: never
    cooperative_expire_after: Duration = 600.0
    #: the node's services, never held (refused at registration, left out of a held tree,
    #: a cgroup holding one never frozen): a root process whose executable is named so
    #: (/proc/PID/exe's file name, or its whole path for an entry with a "/")...
    protected_executables: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROTECTED_EXECUTABLES))
    #: ...or that runs in one of these systemd units (from /proc/PID/cgroup)
    protected_units: list[str] = Field(default_factory=lambda: list(DEFAULT_PROTECTED_UNITS))

    @field_validator("slow_period")
    @classmethod
    def _period(cls, value: float) -> float:
        if not 0.01 <= value <= 10:
            raise ValueError("must be between 10ms and 10s")
        return value

    @field_validator("protected_executables")
    @classmethod
    def _executables(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry or ("/" in entry and not entry.startswith("/")):
                raise ValueError(f"{entry!r} is neither an executable's file name nor "
                                 "its absolute path")
        return value

    @field_validator("protected_units")
    @classmethod
    def _units(cls, value: list[str]) -> list[str]:
        for entry in value:
            if "/" in entry or not entry.endswith((".service", ".scope")):
                raise ValueError(f"{entry!r} is not a systemd service or scope name "
                                 "like ssh.service")
        return value


class AuditConfig(_Section):
    #: the audit log (state_dir/audit.jsonl) is rotated before it would grow past this
    max_bytes: int = Field(default=10_000_000, ge=4096)
    #: rotated files kept: audit.jsonl.1 ... audit.jsonl.<keep>; older ones are dropped
    keep: int = Field(default=3, ge=1, le=100)
    #: events written in full per user (a uid over the unix socket) and per job's
    #: deferral reports in each window; the rest are counted, and summed up in one
    #: "suppressed" event when the window closes
    per_user_events: int = Field(default=20, ge=1, le=100_000)
    per_user_window: Duration = 60.0

    @field_validator("per_user_window")
    @classmethod
    def _window(cls, value: float) -> float:
        if not 1 <= value <= 86400:
            raise ValueError("must be between 1s and 1 day")
        return value


class PolicyConfig(_Section):
    #: how long a cooperative job may put off a pause or slow while it is inside a
    #: critical section (a checkpoint write); 0: never
    max_defer: Duration = 30.0

    @field_validator("max_defer")
    @classmethod
    def _max_defer(cls, value: float) -> float:
        if value > 3600:
            raise ValueError("must be between 0 and 1h")
        return value


class RuleConfig(_Section):
    name: str = Field(min_length=1)
    metric: str
    match: dict[str, LabelValue] = Field(default_factory=dict)
    above: float | None = None
    below: float | None = None
    for_: Duration = Field(default=0.0, alias="for")
    clear_below: float | None = None
    clear_above: float | None = None
    clear_for: Duration = 0.0
    action: Literal["slow", "pause", "power_cap", "hold"] = "pause"
    speed: float | None = Field(default=None, gt=0, lt=1)
    #: action "hold" (CONTRACT section 8): the value each series is held at
    target: float | None = None
    #: action "hold": the lowest speed the loop may set; 0 allows a pause
    min_speed: float = Field(default=0.0, ge=0, lt=1)
    #: action "hold": what the loop sets, the jobs' speed or the GPU's power limit
    via: Literal["speed", "power_limit"] = "speed"
    power_cap_watts: float | None = Field(default=None, gt=0)
    max_priority: int | None = None
    on_missing: Literal["hold", "trip", "clear"] = "hold"
    #: false: a cooperative job acts on this rule at once, even inside a critical section
    defer: bool = True

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        name = value.removeprefix("governor_")
        if name not in SAMPLED:
            raise ValueError(
                f"unknown metric {value!r}; one of: {', '.join(sorted(SAMPLED))}"
            )
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        labels = SAMPLED[self.metric].labels
        for key in self.match:
            if key not in labels:
                raise ValueError(
                    f"match.{key}: {self.metric} has no label {key!r}"
                    + (f"; its labels: {', '.join(labels)}" if labels else "; it has no labels")
                )
        if self.action == "hold":
            return self._consistent_hold()
        if (self.above is None) == (self.below is None):
            raise ValueError("above: give exactly one of `above` or `below`")
        if self.above is not None:
            if self.clear_above is not None:
                raise ValueError("clear_above: a rule with `above` clears with `clear_below`")
            if self.clear_below is not None and self.clear_below > self.above:
                raise ValueError(
                    f"clear_below: {self.clear_below:g} is above the trip line `above` "
                    f"({self.above:g}); hysteresis clears below it"
                )
        if self.below is not None:
            if self.clear_below is not None:
                raise ValueError("clear_below: a rule with `below` clears with `clear_above`")
            if self.clear_above is not None and self.clear_above < self.below:
                raise ValueError(
                    f"clear_above: {self.clear_above:g} is below the trip line `below` "
                    f"({self.below:g}); hysteresis clears above it"
                )
        # `speed` and `power_cap_watts` may sit beside another action (the contract's own
        # example does): they are simply not used then.
        if self.action == "slow" and self.speed is None:
            raise ValueError('speed: action "slow" needs `speed` (0 < speed < 1)')
        if self.action == "power_cap":
            if self.power_cap_watts is None:
                raise ValueError('power_cap_watts: action "power_cap" needs `power_cap_watts`')
            if SAMPLED[self.metric].device_label != "gpu":
                raise ValueError(
                    'action: "power_cap" needs a per-GPU metric (gpu_...), '
                    f"not {self.metric}"
                )
        return self

    def _consistent_hold(self) -> Self:
        """A hold rule has a target and no lines: it never trips, so `above`, `below` and
        their clear lines mean nothing for it and are refused rather than ignored."""
        if self.target is None:
            raise ValueError('target: action "hold" needs `target`, the value to hold')
        for key in ("above", "below", "clear_above", "clear_below"):
            if getattr(self, key) is not None:
                raise ValueError(f'{key}: a rule with action "hold" has a `target`, '
                                 "not trip lines")
        if self.via == "power_limit" and SAMPLED[self.metric].device_label != "gpu":
            raise ValueError('via: "power_limit" needs a per-GPU metric (gpu_...), '
                             f"not {self.metric}")
        return self

    @property
    def holds(self) -> bool:
        """A closed-loop rule (action "hold"), which has a target instead of trip lines."""
        return self.action == "hold"

    @property
    def trips_above(self) -> bool:
        return self.above is not None

    @property
    def threshold(self) -> float:
        """The trip line; a hold rule's target (it has no trip line)."""
        value = self.above if self.above is not None else self.below
        if value is None and self.target is not None:
            return self.target
        assert value is not None
        return value

    @property
    def clear_threshold(self) -> float:
        """Where the rule clears: `clear_below`/`clear_above`, else the trip threshold."""
        value = self.clear_below if self.above is not None else self.clear_above
        return self.threshold if value is None else value


class SlurmConfig(_Section):
    """`[slurm]` (CONTRACT section 7): the Slurm jobs on this node, found and governed."""

    #: every Slurm job running on this node is a job, bound to the GPUs Slurm gave it
    discover: bool = False
    #: how a pause holds a Slurm job: "suspend" (scontrol suspend: the whole job, on every
    #: node), or "signal" / "cgroup" (this node's processes, or the job's cgroup, only)
    hold: Literal["suspend", "signal", "cgroup"] = "suspend"
    #: the slurm.conf to use; "" = $SLURM_CONF, else Slurm's default
    conf: str = ""
    #: the Slurm nodes this daemon governs; [] = every slurmd on this host (one, unless
    #: Slurm runs several on a host: multiple-slurmd)
    nodes: list[str] = Field(default_factory=list)
    default_priority: int = 0
    qos_priority: dict[str, int] = Field(default_factory=dict)
    partition_priority: dict[str, int] = Field(default_factory=dict)


class KubernetesConfig(_Section):
    """`[kubernetes]` (CONTRACT section 7): the pods on this node that hold a GPU, found
    through the kubelet's node-local APIs and governed as jobs named "namespace/pod"."""

    #: every pod on this node that holds a GPU is a job, bound to the GPUs the kubelet
    #: allocated it, unregistered when the pod goes
    discover: bool = False
    #: how a pause holds a pod: "cgroup" (freeze, or a CPU quota on, the pod's cgroup) or
    #: "signal" (its processes)
    hold: Literal["cgroup", "signal"] = "cgroup"
    #: the kubelet's pod-resources socket (v1 List: which pod holds which device)
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    #: the kubelet's pod log directories, "<namespace>_<pod>_<uid>": a pod's uid, read
    #: on the node without any permission
    pod_logs_dir: str = "/var/log/pods"
    #: the kubelet's API, for the pods' annotations and priority classes (GET /pods);
    #: "" = not read: then only the namespaces below exempt a pod
    kubelet_url: str = ""
    #: the bearer token sent to the kubelet (the pod's service account token); sent only
    #: over https, to a kubelet whose certificate is verified
    kubelet_token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    #: the CA that verifies the kubelet's serving certificate: the cluster's, mounted in
    #: every pod; "" = the system's trust store. A kubelet's own self-signed certificate
    #: (no serverTLSBootstrap) is not signed by it: README says what to do then
    kubelet_ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    #: the name the kubelet's certificate must carry; "" = the URL's host, or this host's
    #: name when the URL's host is a loopback address (the node's own kubelet)
    kubelet_tls_server_name: str = ""
    #: true: the kubelet's certificate is not verified, and the token goes to whoever
    #: answers at kubelet_url
    kubelet_insecure_skip_tls_verify: bool = False
    #: where the host's cgroup tree is mounted (in the DaemonSet, the host's
    #: /sys/fs/cgroup mounted read-write)
    cgroup_root: str = "/sys/fs/cgroup"
    #: the kubelet's cgroup driver: "auto" finds the pod's cgroup under either layout
    cgroup_driver: Literal["auto", "cgroupfs", "systemd"] = "auto"
    #: the extended resources that are GPUs (MIG devices, "nvidia.com/mig-*", are matched
    #: to their parent GPU)
    resources: list[str] = Field(default_factory=lambda: ["nvidia.com/gpu", "nvidia.com/mig-*"])
    default_priority: int = 0
    namespace_priority: dict[str, int] = Field(default_factory=dict)
    priority_class_priority: dict[str, int] = Field(default_factory=dict)
    #: pods never held; kube-system is always among them
    exempt_namespaces: list[str] = Field(default_factory=lambda: ["kube-system"])
    #: priority classes never held; the two system classes are always among them
    exempt_priority_classes: list[str] = Field(
        default_factory=lambda: ["system-node-critical", "system-cluster-critical"])
    #: the namespaces whose pods may exempt themselves with the annotation
    #: `governor/exempt: "true"`; "*" = every namespace. Elsewhere it is ignored: a pod's
    #: author does not decide whether it is governed
    exempt_annotation_namespaces: list[str] = Field(default_factory=list)

    @field_validator("kubelet_url")
    @classmethod
    def _kubelet_url(cls, value: str) -> str:
        if value:
            parsed = urllib.parse.urlsplit(value)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"{value!r} is not a URL like https://127.0.0.1:10250")
        return value

    @model_validator(mode="after")
    def _token_over_tls(self) -> Self:
        if self.kubelet_url.startswith("http:") and self.kubelet_token_file:
            raise ValueError('kubelet_url: over http the service account\'s token would '
                             'travel in clear text: use https (the kubelet\'s port 10250), '
                             'or kubelet_token_file = "" to send none')
        return self


class Config(_Section):
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    rules: list[RuleConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Self:
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(
                    f"rules[{index}].name: another rule is named {rule.name!r}; "
                    "rule names must be unique"
                )
            seen.add(rule.name)
        return self


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__(self.lines()[0] if problems else source)

    def lines(self) -> list[str]:
        return [f"{self.source}: {p}" for p in self.problems]


def _child(node: Any, item: int | str) -> Any:
    if isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
        return node[item]
    if isinstance(node, dict) and item in node:
        return node[item]
    return None


def _key(loc: tuple[int | str, ...], data: Any) -> str:
    """`rules[0].for` from pydantic's loc, leaving out the names it gives validator steps."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(node, dict) and item not in node and parts and not _is_field(item):
            continue
        else:
            parts.append(f".{item}" if parts else str(item))
        node = _child(node, item)
    return "".join(parts)


def _is_field(name: str) -> bool:
    return not ("[" in name or "(" in name or name.startswith("function-"))


_KEY_PREFIX = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)*): (.+)$", re.DOTALL)


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    message = re.sub(r" or instance of \w+", "", message).replace("Input should be", "should be")
    if kind in {"float_type", "int_type", "string_type", "bool_type", "dict_type", "list_type",
                "literal_error", "model_type", "finite_number"}:
        message += f" (got {error['input']!r})"
    return message


def _problems(exc: ValidationError, data: dict[str, Any]) -> Iterator[Problem]:
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = _key(loc, data)
        message = _message(error)
        # whole-rule checks lead their message with the key they are about
        if error["type"] == "value_error" and (m := _KEY_PREFIX.match(message)):
            key = f"{key}.{m.group(1)}" if key else m.group(1)
            message = m.group(2)
        # name the rule, so "rules[3]" can be found in a long file
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            rules = data.get("rules")
            if isinstance(rules, list) and loc[1] < len(rules) and isinstance(rules[loc[1]], dict):
                name = rules[loc[1]].get("name")
                if isinstance(name, str):
                    key += f' (rule "{name}")'
        yield Problem(key, message)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, list(_problems(exc, data))) from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """The config at `path`; built-in defaults when `path` is None."""
    if path is None:
        return Config()
    return parse_config(_read_toml(path), str(path))


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's TOML; ConfigError when it is missing, unreadable or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), [Problem("", "no such file")]) from None
    except OSError as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read: {exc.strerror}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [Problem("", f"not valid TOML: {exc}")]) from None


def state_dir_despite(path: str | os.PathLike[str] | None) -> str:
    """`daemon.state_dir` of a config file whose other keys may be wrong: release-all
    (systemd's ExecStopPost, after a crash) must free the jobs even when someone broke a
    rule in the file since the daemon started. Raises ConfigError only when the state
    directory itself cannot be known (unreadable file, not TOML, a bad [daemon] section)."""
    if path is None:
        return DaemonConfig().state_dir
    daemon = _read_toml(path).get("daemon", {})
    state_dir = daemon.get("state_dir", DaemonConfig().state_dir) if isinstance(
        daemon, dict) else None
    if not isinstance(state_dir, str) or not state_dir:
        raise ConfigError(str(path), [Problem("daemon.state_dir", "must be a path")])
    return state_dir


def find_config(explicit: str | None) -> Path | None:
    """--config, else $GOVERNOR_CONFIG, else /etc/governor/governor.toml, else
    config/governor.toml in the working directory, else None (built-in defaults).
    The client's own search (governor.client.settings), so a job finds the same file."""
    return find_config_file(explicit, DEFAULT_SEARCH)
