"""Every metric governor samples: its name, help text and label names.

One table is the single source of truth: samplers create readings against it, the
Prometheus collector renders from it, and the config validator checks a rule's
`metric` against it, so a typo in a rule is caught at load time, not at 3 a.m.
Names here carry no `governor_` prefix: that is how rules refer to them.
"""

from __future__ import annotations

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


_SPECS = (
    MetricSpec("cpu_utilization_ratio", "Share of time each CPU core was busy.", ("cpu",)),
    MetricSpec(
        "cpu_temperature_celsius",
        "CPU temperature sensors: coretemp, k10temp, zenpower chips and CPU thermal zones.",
        ("chip", "sensor"),
    ),
    MetricSpec(
        "hwmon_temperature_celsius",
        "Every other hwmon temperature and thermal zone (NVMe, ACPI, board, Wi-Fi...).",
        ("chip", "sensor"),
    ),
    MetricSpec("memory_used_ratio", "Share of memory in use (1 - MemAvailable/MemTotal).", ()),
    MetricSpec(
        "pressure_stall_ratio",
        "Pressure stall information: share of time stalled, averaged over 10 s (PSI avg10/100).",
        ("resource", "kind"),
    ),
    MetricSpec(
        "load_average_tasks",
        "Load average: runnable and uninterruptible tasks, averaged over the window.",
        ("window",),
    ),
    MetricSpec("gpu_info", "NVIDIA GPU identity; value 1.", ("gpu", "uuid", "name"), "gpu"),
    MetricSpec("gpu_utilization_ratio", "Share of time the GPU was busy.", ("gpu",), "gpu"),
    MetricSpec("gpu_temperature_celsius", "GPU core temperature.", ("gpu",), "gpu"),
    MetricSpec("gpu_power_watts", "GPU power draw.", ("gpu",), "gpu"),
    MetricSpec("gpu_power_limit_watts", "GPU enforced power limit.", ("gpu",), "gpu"),
    MetricSpec("gpu_memory_used_bytes", "GPU memory in use.", ("gpu",), "gpu"),
    MetricSpec("gpu_memory_total_bytes", "GPU memory installed.", ("gpu",), "gpu"),
    MetricSpec("gpu_sm_clock_hertz", "GPU streaming-multiprocessor clock.", ("gpu",), "gpu"),
    MetricSpec(
        "gpu_clock_event_active",
        "1 while NVML reports this clock event (throttle) reason for the GPU, else 0.",
        ("gpu", "reason"),
        "gpu",
    ),
    MetricSpec(
        "accelerator_utilization_ratio",
        "Share of time an accelerator (amdgpu, NPUs under /sys/class/accel) was busy.",
        ("device", "driver"),
        "device",
    ),
    MetricSpec(
        "accelerator_temperature_celsius",
        "Accelerator temperature sensors (amdgpu edge, junction, mem...).",
        ("device", "driver", "sensor"),
        "device",
    ),
    MetricSpec(
        "accelerator_power_watts", "Accelerator power draw.", ("device", "driver"), "device"
    ),
    MetricSpec(
        "accelerator_memory_used_bytes",
        "Accelerator memory in use (amdgpu VRAM).",
        ("device", "driver"),
        "device",
    ),
    MetricSpec(
        "accelerator_memory_total_bytes",
        "Accelerator memory installed (amdgpu VRAM).",
        ("device", "driver"),
        "device",
    ),
)

#: readings samplers may produce, by name without the prefix
SAMPLED: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
