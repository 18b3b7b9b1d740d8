"""Every metric governor samples: its name, help text and label names.

Each sampler declares the metrics it produces beside its code (a module-level `METRICS`
in governor/sampling/<source>.py), and the sampler table in governor/sampling/registry.py
names where each declaration is. `SAMPLED` is those declarations put together, the single
source of truth for the rest of the daemon: samplers create readings against it, the
Prometheus collector renders from it, and the config validator checks a rule's `metric`
against it, so a typo in a rule is caught at load time, not at 3 a.m.
Names here carry no `governor_` prefix: that is how rules refer to them.

`MetricSpec` lives here, in a module that imports nothing of governor's, so that the
sampler modules can declare their metrics with it while `snapshot.py`, which they import,
reads the catalog. `SAMPLED` is assembled on first use, not at import: assembling imports
the sampler modules, which import `snapshot.py`, which imports this module; and
`import governor.config` (the CLI's) stays as cheap as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

PREFIX = "governor_"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    help: str
    labels: tuple[str, ...]
    #: the label naming the device a reading belongs to ("gpu" or "device"), if any;
    #: a rule on such a metric touches only the jobs bound to that device
    device_label: str | None = None


#: Families the exposition has always listed first, in this order; every other metric
#: follows in the sampler table's order. Only so that the exposition stays byte-identical
#: to the one dashboards and tests/golden/metrics.prom were made against, in which the
#: CPU sampler's utilization came before the hwmon temperatures and its other metrics
#: after them. A new sampler's metrics need no entry here.
EXPOSED_FIRST = ("cpu_utilization_ratio", "cpu_temperature_celsius", "hwmon_temperature_celsius")


def assemble(declared: tuple[MetricSpec, ...]) -> dict[str, MetricSpec]:
    """The catalog, by name, in exposition order: `EXPOSED_FIRST`, then `declared`'s order
    (the sampler table's). Raises ValueError for a name in EXPOSED_FIRST that no sampler
    declares, so a removed metric cannot leave the order silently stale."""
    by_name = {spec.name: spec for spec in declared}
    missing = [name for name in EXPOSED_FIRST if name not in by_name]
    if missing:
        raise ValueError(f"EXPOSED_FIRST names metrics no sampler declares: {missing}")
    return {name: by_name[name] for name in (*EXPOSED_FIRST, *by_name)}


class _Catalog(Mapping[str, MetricSpec]):
    """A read-only mapping that assembles the catalog from the sampler table the first
    time it is read (see the module's docstring for why not at import)."""

    __slots__ = ("_specs",)

    def __init__(self) -> None:
        self._specs: dict[str, MetricSpec] | None = None

    def _table(self) -> dict[str, MetricSpec]:
        specs = self._specs
        if specs is None:
            # here, not at the top: the sampler modules import snapshot.py, which imports
            # this module (two threads racing build the same table; either one is kept)
            from governor.sampling.registry import declared_metrics

            specs = self._specs = assemble(declared_metrics())
        return specs

    def __getitem__(self, name: str) -> MetricSpec:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __contains__(self, name: object) -> bool:
        return name in self._table()


#: readings samplers may produce, by name without the prefix, in exposition order
SAMPLED: Mapping[str, MetricSpec] = _Catalog()
