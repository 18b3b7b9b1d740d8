"""The GPU power capper (governor/actuators/gpu_power.py) against the C fake NVML through
the real pynvml: a limit set, kept while the GPU heats up, restored, and undone from the
journal alone as release-all does. Root is not needed here: the check is handed in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from governor.actuators.gpu_power import PowerCapper, hold_key, undo_checked
from governor.policy.directives import PowerCap
from governor.safety.journal import Journal
from tests.support.c_nvml import CNvmlState
from tests.support.fake_nvml import h100

GPUS = {"gpus": [h100(0, power_min_mw=200000, power_max_mw=700000), h100(1)]}


@pytest.fixture
def nvml(c_nvml: CNvmlState, monkeypatch: pytest.MonkeyPatch) -> Iterator[CNvmlState]:
    c_nvml.write(GPUS)
    with c_nvml.loaded_into_pynvml(monkeypatch):
        yield c_nvml


def cap(gpu: str, watts: float) -> dict[str, PowerCap]:
    return {"rule": PowerCap(gpu=gpu, watts=watts, rules=("cap",), reasons=("cap tripped",))}


def enforced_mw(gpu: int) -> int:
    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetEnforcedPowerLimit(pynvml.nvmlDeviceGetHandleByIndex(gpu)))
    finally:
        pynvml.nvmlShutdown()


def test_a_limit_set_and_restored(nvml: CNvmlState, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    capper = PowerCapper(journal, is_root=lambda: True)
    assert capper.unavailable is None
    assert capper.apply(cap("0", 250)) == [("power_cap", "0", cap("0", 250)["rule"])]
    assert nvml.limits() == {0: 250000}, "written back into the driver's state"
    assert enforced_mw(0) == 250000
    hold = journal.holds()[hold_key("0")]
    assert (hold["original_mw"], hold["cap_mw"]) == (700000, 250000)
    assert hold["uuid"] == "GPU-00000000-0000-0000-0000-000000000000"
    hotter = {"gpus": [dict(GPUS["gpus"][0], temperature=90), GPUS["gpus"][1]]}
    nvml.write(hotter)
    assert enforced_mw(0) == 250000, "a new reading does not undo the limit"
    assert capper.apply(cap("0", 100)) != [], "clamped to the driver's lowest limit"
    assert nvml.limits() == {0: 200000}
    assert capper.apply({}) == [("restore", "0", None)]
    assert nvml.limits() == {0: 700000} and enforced_mw(0) == 700000
    assert hold_key("0") not in journal.holds()
    capper.close()


def test_undo_from_the_journal_alone_finds_the_gpu_by_uuid(nvml: CNvmlState) -> None:
    entry = {"kind": "power_cap", "gpu": "9", "uuid": "GPU-00000000-0000-0000-0000-000000000001",
             "original_mw": 650000, "cap_mw": 250000}
    assert undo_checked(entry) == (True, "gpu 9: power limit restored to 650 W")
    assert nvml.limits() == {1: 650000}
    assert "nvmlDeviceGetHandleByUUID" in nvml.calls()


def test_a_refused_limit_is_logged_not_raised(nvml: CNvmlState, tmp_path: Path) -> None:
    nvml.write({**GPUS, "set_power_error": "NO_PERMISSION"})
    capper = PowerCapper(Journal(tmp_path / "state"), is_root=lambda: True)
    assert capper.apply(cap("1", 250)) == []
    assert capper.capped == {} and nvml.limits() == {}
    ok, why = undo_checked({"gpu": "1", "uuid": "GPU-00000000-0000-0000-0000-000000000001",
                            "original_mw": 700000})
    assert not ok and "Insufficient Permissions" in why
    capper.close()
