"""The sampler table and the catalog assembled from it: every sampler declares metrics the
catalog has, the catalog has no metric no sampler declares, names are unique, and
build_samplers follows the table (its order, the [sources] switches and their log lines)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from governor.catalog import EXPOSED_FIRST, SAMPLED, MetricSpec, assemble
from governor.config import SourcesConfig
from governor.sampling.registry import SAMPLERS, SamplerSpec, build_samplers, declared_metrics
from tests.support.daemon import REPO


def test_sampler_names_are_unique() -> None:
    names = [spec.name for spec in SAMPLERS]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda spec: spec.name)
def test_every_sampler_declares_metrics_that_are_in_the_catalog(spec: SamplerSpec) -> None:
    declared = spec.declared()
    assert declared, f"{spec.name} declares no metrics"
    assert all(isinstance(metric, MetricSpec) for metric in declared)
    names = [metric.name for metric in declared]
    assert len(names) == len(set(names)), f"{spec.name} declares a name twice: {names}"
    for metric in declared:
        assert SAMPLED[metric.name] == metric, metric.name


def test_the_catalog_has_no_metric_that_no_sampler_declares() -> None:
    declared = {metric.name for spec in SAMPLERS for metric in spec.declared()}
    assert set(SAMPLED) == declared
    assert len(SAMPLED) == len(declared_metrics())


def test_the_catalog_keeps_the_exposition_order() -> None:
    """The order tests/golden/metrics.prom and the dashboards were made against."""
    assert tuple(SAMPLED)[:len(EXPOSED_FIRST)] == EXPOSED_FIRST
    rest = [m.name for m in declared_metrics() if m.name not in EXPOSED_FIRST]
    assert list(SAMPLED)[len(EXPOSED_FIRST):] == rest


def test_a_name_declared_twice_must_be_the_same_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    from governor.sampling import cpu, registry

    clash = MetricSpec("cpu_utilization_ratio", "another help", ("cpu",))
    monkeypatch.setattr(cpu, "CLASH", (clash,), raising=False)
    monkeypatch.setattr(registry, "SAMPLERS", (
        *SAMPLERS, SamplerSpec("clash", "governor.sampling.cpu:from_context",
                               "governor.sampling.cpu:CLASH")))
    with pytest.raises(ValueError, match="cpu_utilization_ratio"):
        declared_metrics()


def test_exposed_first_names_only_declared_metrics() -> None:
    with pytest.raises(ValueError, match="EXPOSED_FIRST"):
        assemble((MetricSpec("cpu_utilization_ratio", "h", ("cpu",)),))


def test_build_samplers_follows_the_table(tmp_path: Path) -> None:
    sources = SourcesConfig(sysfs_root=str(tmp_path), procfs_root=str(tmp_path), nvml="off")
    samplers = build_samplers(sources)
    try:
        assert [s.name for s in samplers] == ["cpu", "hwmon", "amdgpu", "accel"]
    finally:
        for sampler in samplers:
            sampler.close()


def test_nvml_off_is_logged_and_an_unset_simulate_is_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sources = SourcesConfig(sysfs_root=str(tmp_path), procfs_root=str(tmp_path), nvml="off")
    with caplog.at_level(logging.INFO, logger="governor.sampling.registry"):
        for sampler in build_samplers(sources):
            sampler.close()
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("governor.sampling.registry", "INFO", 'nvml: off (sources.nvml = "off")')]


def test_every_sampler_is_built_in_the_tables_order_and_the_simulated_one_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every switch on: one sampler per entry, named as the table names it (the name is
    the sampler_up label), and the simulated GPUs said to be made up."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text('[[gpu]]\nheat = 1.0\ncool = 0.1\n')
    sources = SourcesConfig(sysfs_root=str(tmp_path), procfs_root=str(tmp_path),
                            simulate=str(scenario))
    with caplog.at_level(logging.WARNING, logger="governor.sampling.registry"):
        samplers = build_samplers(sources)
    try:
        assert [s.name for s in samplers] == [spec.name for spec in SAMPLERS]
    finally:
        for sampler in samplers:
            sampler.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"simulated GPUs from {scenario} (sources.simulate): their readings are made up"]


def test_importing_the_config_assembles_nothing() -> None:
    """The CLI imports governor.config: that must load no sampler (nor NVML) until the
    catalog is first read."""
    code = ("import sys, governor.config; "
            "print(sorted(m for m in sys.modules if m.startswith('governor.sampling') "
            "or m == 'pynvml'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
