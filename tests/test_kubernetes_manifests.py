"""deploy/kubernetes/: valid for the Kubernetes versions we claim, and coherent with the
daemon it runs.

The manifests are checked against Kubernetes' own OpenAPI schemas (kubernetes-validate,
strict: an unknown or misspelt field fails, as `kubectl apply`'s server-side field
validation would), for the oldest and the newest version the package ships. The
PodMonitor, a custom resource, is checked against the Prometheus operator's CRD schema
where a copy of it is beside the repository, and always against the DaemonSet it scrapes.
Then the pieces are held to each other: the ConfigMap's governor.toml loads through
governor's own loader; every host path the DaemonSet mounts is read by that config, and
every path the config names lies under a mount, at the host path the kubelet really
uses; probes, scrape annotations and the PodMonitor name the port the API listens on;
and a real daemon run on that config answers the probes' and the scrape's paths while
refusing a change without the token.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from governor.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
#: the overlay for kubelets before 1.33 (nodes/proxy). A sibling, not a subfolder:
#: kustomize refuses an overlay inside the base it builds on (a cycle)
BEFORE_1_33 = REPO / "deploy" / "kubernetes-before-1.33"
KUSTOMIZATIONS = (DEPLOY, BEFORE_1_33)
#: the PodMonitor CRD of prometheus-operator (example/prometheus-operator-crd/
#: monitoring.coreos.com_podmonitors.yaml, v0.93.0 when this was written): a data file
#: from another project, so it is not committed here but kept in the shared fixtures
PODMONITOR_CRD = Path(os.environ.get(
    "GOVERNOR_PODMONITOR_CRD",
    REPO.parent / "shared" / "fixtures" / "prometheus-operator"
    / "monitoring.coreos.com_podmonitors.yaml"))
#: the oldest and the newest Kubernetes whose schemas kubernetes-validate ships
VERSIONS = (all_versions()[0], all_versions()[-1])
#: the kinds that are not Kubernetes' own, each checked by a test of its own below
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
#: where the kubelet keeps what the daemon reads, on the host (its defaults), and the
#: host's own trees: each config key that names a host path, and the host path it is
HOST_PATHS = {
    "sources.sysfs_root": "/sys",
    "sources.procfs_root": "/proc",
    "kubernetes.cgroup_root": "/sys/fs/cgroup",
    "kubernetes.pod_resources_socket": "/var/lib/kubelet/pod-resources/kubelet.sock",
    "kubernetes.pod_logs_dir": "/var/log/pods",
}
#: what the daemon writes: the only mounts that may be read-write
WRITTEN = {"daemon.state_dir", "kubernetes.cgroup_root"}
#: paths the pod brings without a volume of ours: the service account's token
POD_PATHS = ("/var/run/secrets/kubernetes.io/serviceaccount",)
#: every config key whose value is a path (a key added to Config that ends in one of
#: these suffixes is picked up by `_path_keys` too)
PATH_SUFFIXES = ("_dir", "_root", "_file", "socket", "tls_cert", "tls_key", "tls_ca",
                 "simulate", "conf")


# ---- reading the manifests ----

def _documents(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _documents(DEPLOY) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {DEPLOY}, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _config_text() -> str:
    text: str = _one("ConfigMap")["data"]["governor.toml"]
    return text


def _config(tmp_path: Path) -> Config:
    path = tmp_path / "governor.toml"
    path.write_text(_config_text())
    return load_config(path)


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _path_keys(config: Config) -> dict[str, str]:
    """Every path-valued key of the config, dotted, with its value ("" for unset)."""
    keys: dict[str, str] = {}
    for section, values in config.model_dump().items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, str) and key.endswith(PATH_SUFFIXES):
                keys[f"{section}.{key}"] = value
    return keys


def _mounts() -> dict[str, dict[str, Any]]:
    """mountPath -> {"volume": the volume, "readOnly": bool}."""
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    return {m["mountPath"]: {"volume": volumes[m["name"]], "readOnly": m.get("readOnly", False)}
            for m in _container()["volumeMounts"]}


def _under(path: str, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(directory))


def _mount_of(path: str) -> str | None:
    """The deepest mountPath that `path` lies under, if any."""
    under = [m for m in _mounts() if _under(path, m)]
    return max(under, key=len) if under else None


def _host_path(path: str) -> str | None:
    """Where a container path is on the host, through a hostPath mount; None if it is
    not under one."""
    mount = _mount_of(path)
    if mount is None or "hostPath" not in _mounts()[mount]["volume"]:
        return None
    rest = PurePosixPath(path).relative_to(mount)
    return str(PurePosixPath(_mounts()[mount]["volume"]["hostPath"]["path"]) / rest)


def _port(name_or_number: str | int) -> int:
    """A probe's or scrape's port, by number or by the container port's name."""
    if isinstance(name_or_number, int):
        return name_or_number
    named = {p["name"]: p["containerPort"] for p in _container()["ports"] if "name" in p}
    assert name_or_number in named, f"no container port named {name_or_number!r}"
    return int(named[name_or_number])


# ---- schemas ----

@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_kubernetes_schemas(version: str) -> None:
    checked = 0
    for path, doc in [*_documents(DEPLOY), *_documents(BEFORE_1_33)]:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']} {doc['metadata']['name']} "
                        f"is not valid Kubernetes {version}: {exc.caught.message} "
                        f"(at {'.'.join(map(str, exc.caught.absolute_path))})")
        checked += 1
    assert checked >= 9  # namespace, quota, account, 2 roles, 2 bindings, config, daemonset


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The check above can fail: a misspelt field in the pod spec is refused."""
    daemonset = copy.deepcopy(_one("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["hostPIDs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)


def test_the_only_custom_resource_is_the_podmonitor() -> None:
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in _documents(DEPLOY)}
    assert kinds & CUSTOM_KINDS == CUSTOM_KINDS
    for api_version, kind in kinds - CUSTOM_KINDS:
        assert not api_version.startswith("monitoring.coreos.com"), kind


def _closed(schema: Any) -> Any:
    """The CRD's schema as the API server applies it with strict field validation
    (kubectl's default): an object with declared properties takes no others, unless the
    schema says it keeps unknown fields."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        closed["additionalProperties"] = False
    return closed


def _podmonitor_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(PODMONITOR_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _closed(version["schema"]["openAPIV3Schema"])
    validator: jsonschema.protocols.Validator = jsonschema.Draft7Validator(schema)
    return validator


needs_crd = pytest.mark.skipif(
    not PODMONITOR_CRD.is_file(),
    reason=f"the PodMonitor CRD is not at {PODMONITOR_CRD} (shared fixtures, or "
           "$GOVERNOR_PODMONITOR_CRD)")


@needs_crd
def test_the_podmonitor_validates_against_the_operators_crd() -> None:
    podmonitor = _one("PodMonitor")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in _podmonitor_validator().iter_errors(podmonitor)]
    assert errors == []


@needs_crd
def test_the_crd_check_rejects_an_unknown_field() -> None:
    podmonitor = copy.deepcopy(_one("PodMonitor"))
    podmonitor["spec"]["podMetricsEndpoints"][0]["scrapeInterval"] = "15s"  # it is `interval`
    assert list(_podmonitor_validator().iter_errors(podmonitor))


def test_the_podmonitor_selects_the_daemonsets_pods_on_the_api_port(tmp_path: Path) -> None:
    daemonset, podmonitor = _one("DaemonSet"), _one("PodMonitor")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert podmonitor["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    # job="governor", which the alerts (GovernorDown) and the dashboards select
    assert labels[podmonitor["spec"]["jobLabel"]] == "governor"
    config = _config(tmp_path)
    for endpoint in podmonitor["spec"]["podMetricsEndpoints"]:
        assert _port(endpoint["port"]) == config.api.port
        assert endpoint["path"] == "/metrics"


# ---- kustomize ----

@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_the_kustomization_lists_every_file(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    files = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(r for r in listed if r.endswith(".yaml")) == files
    assert not [p for p in directory.iterdir() if p.is_dir()], "kustomize builds no subfolder"
    for resource in listed:
        assert (directory / resource).exists(), resource
    if directory != DEPLOY:  # an overlay builds on the whole deployment
        assert [r for r in listed if (directory / r).resolve() == DEPLOY] != []
    assert not any(_under(str(k), str(directory)) for k in KUSTOMIZATIONS if k != directory)
    assert {i["name"] for i in kustomization.get("images", [])} <= {
        c["image"].split(":")[0] for c in _pod_spec()["containers"]}


def test_before_1_33_kubelets_get_nodes_proxy_and_only_there() -> None:
    def rules(directory: Path) -> set[tuple[str, str]]:
        return {(resource, verb)
                for _, doc in _documents(directory) if doc["kind"] == "ClusterRole"
                for rule in doc["rules"] for resource in rule["resources"]
                for verb in rule["verbs"]}

    assert rules(DEPLOY) == {("nodes/pods", "get")}
    assert rules(BEFORE_1_33) == {("nodes/proxy", "get")}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomize_builds_the_documents_we_checked(directory: Path) -> None:
    """`kubectl kustomize` (what `kubectl apply -k` runs first) builds each directory,
    offline, into exactly the objects the tests above check, the image set."""
    built = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                           text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d is not None]
    expected = [doc for _, doc in _documents(DEPLOY)]
    if directory == BEFORE_1_33:
        expected += [doc for _, doc in _documents(BEFORE_1_33)]

    def names(objects: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
                      for o in objects)

    assert names(docs) == names(expected)
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    tag = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["images"][0]["newTag"]
    assert daemonset["spec"]["template"]["spec"]["containers"][0]["image"] == f"governor:{tag}"


# ---- the config and the mounts ----

def test_the_configmap_loads_through_governors_loader(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.kubernetes.discover is True
    assert config.kubernetes.kubelet_url == "https://127.0.0.1:10250"
    assert {"kube-system", "governor"} <= set(config.kubernetes.exempt_namespaces)
    assert {"system-node-critical", "system-cluster-critical"} <= set(
        config.kubernetes.exempt_priority_classes)
    assert config.rules, "the deployment's config has no rule: it would govern nothing"


def test_the_configmap_sends_the_token_only_to_a_kubelet_the_cluster_ca_verifies(
        tmp_path: Path) -> None:
    """The service account's token goes to the kubelet only over https, verified against
    the cluster's CA that the service account mount brings (automounted), and exemption
    by annotation is the administrator's: it counts in no namespace until listed."""
    k8s = _config(tmp_path).kubernetes
    assert k8s.kubelet_url.startswith("https://")
    assert k8s.kubelet_ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert _under(k8s.kubelet_token_file, POD_PATHS[0])
    assert _under(k8s.kubelet_ca_file, POD_PATHS[0])
    assert _pod_spec()["automountServiceAccountToken"] is True
    assert k8s.kubelet_insecure_skip_tls_verify is False
    assert k8s.exempt_annotation_namespaces == []


def test_the_daemon_reads_the_configmap_where_it_is_mounted() -> None:
    command = _container()["command"]
    config_path = command[command.index("--config") + 1]
    mount = _mount_of(config_path)
    assert mount is not None
    volume = _mounts()[mount]["volume"]
    assert volume["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert PurePosixPath(config_path).relative_to(mount).as_posix() in _one("ConfigMap")["data"]
    # the image's entrypoint is the same command, for a plain `podman run` of it
    entrypoint = [json.loads(line.removeprefix("ENTRYPOINT"))
                  for line in (REPO / "Containerfile").read_text().splitlines()
                  if line.startswith("ENTRYPOINT")]
    assert entrypoint == [command]


def test_every_host_mount_is_read_by_the_config(tmp_path: Path) -> None:
    config = _config(tmp_path)
    values = [v for v in _path_keys(config).values() if v]
    for mount, info in _mounts().items():
        if "hostPath" in info["volume"]:
            assert any(_under(value, mount) for value in values), (
                f"{mount} is mounted from the host but no config key reads it")


def test_every_path_the_config_names_is_under_a_mount(tmp_path: Path) -> None:
    config = _config(tmp_path)
    for key, value in _path_keys(config).items():
        if not value:
            continue
        assert value.startswith("/"), f"{key} = {value!r} is relative to the container's cwd"
        assert _mount_of(value) is not None or any(_under(value, p) for p in POD_PATHS), (
            f"{key} = {value!r} lies under no mount: it would be the container's, not the "
            "host's, and lost with the container")


def test_each_host_path_key_reaches_the_hosts_own_path(tmp_path: Path) -> None:
    config = _config(tmp_path)
    for key, host in HOST_PATHS.items():
        assert _host_path(_get(config, key)) == host, key
    # the state outlives the container on the node: a restarted daemon finds the journal
    assert _host_path(config.daemon.state_dir) is not None
    assert _under(config.api.token_file, config.daemon.state_dir)


def test_only_what_the_daemon_writes_is_mounted_read_write(tmp_path: Path) -> None:
    config = _config(tmp_path)
    writable = {_mount_of(_get(config, key)) for key in WRITTEN}
    for mount, info in _mounts().items():
        assert info["readOnly"] is (mount not in writable), mount


def test_a_wrong_mount_is_caught(tmp_path: Path) -> None:
    """The checks above can fail: /sys mounted at /host/sysfs leaves sysfs_root under
    no host mount."""
    config = _config(tmp_path)
    daemonset = _one("DaemonSet")
    for mount in daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]:
        if mount["mountPath"] == "/host/sys":
            mount["mountPath"] = "/host/sysfs"
    mounts = [m["mountPath"] for m in
              daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert not any(_under(config.sources.sysfs_root, m) for m in mounts)


# ---- the API: probes, scrapes, and what is open ----

def test_probes_and_scrape_annotations_name_the_api_port(tmp_path: Path) -> None:
    config = _config(tmp_path)
    container = _container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert _port(get["port"]) == config.api.port, probe
        assert get.get("scheme", "HTTP") == ("HTTPS" if config.api.tls else "HTTP")
    annotations = _one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.api.port
    assert annotations["prometheus.io/path"] == "/metrics"
    # hostNetwork: the node's port is the container's, and the API listens on every
    # address of the node
    assert _pod_spec()["hostNetwork"] is True
    ports = [p for p in container["ports"] if p["containerPort"] == config.api.port]
    assert ports and all(p.get("hostPort", p["containerPort"]) == p["containerPort"]
                         for p in ports)
    assert config.api.host in {"0.0.0.0", "::"}


def test_a_daemon_on_this_config_answers_probes_and_scrapes(
        tmp_path: Path, sys_tree: Path, proc_tree: Path, daemon: Any) -> None:
    """The ConfigMap's config, run for real with only the host's trees and the port
    moved to this test's: /healthz and /metrics answer a caller that names the node by
    address (as the kubelet's probes and Prometheus do), and a change without the
    token is refused."""
    config = tomllib.loads(_config_text())
    config["sources"].update(sysfs_root=str(sys_tree), procfs_root=str(proc_tree))
    # the pod-resources socket and the kubelet are the source's tests' business
    config.pop("kubernetes")
    config["api"].pop("listen")
    config["api"].pop("token_file")
    config["daemon"].pop("state_dir")
    d = daemon(config)
    node = {"Host": f"10.0.0.7:{d.port}"}
    assert d.get("/healthz", headers=node).status_code == 200
    scrape = d.get("/metrics", headers=node)
    assert scrape.status_code == 200
    assert "governor_sampler_up" in scrape.text
    refused = httpx.post(d.url + "/v1/jobs", json={"name": "x", "pid": os.getpid()},
                         headers=node, timeout=10)
    assert refused.status_code == 401
