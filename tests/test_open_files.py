"""OpenFiles: a file kept open and read again gives what a fresh open would."""

from __future__ import annotations

import os
from pathlib import Path

from governor.sampling.paths import OpenFiles


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_rewritten_unlinked_and_replaced_files_read_as_a_fresh_open_would(
        tmp_path: Path) -> None:
    files = OpenFiles()
    sensor = tmp_path / "temp1_input"
    sensor.write_text("41000\n")
    assert files.read_text(sensor) == "41000"
    sensor.write_text("95000\n")  # the same inode, as a driver updates it
    assert files.read_text(sensor) == "95000"

    replacement = tmp_path / "new"
    replacement.write_text("50000\n")
    replacement.rename(sensor)  # a new inode under the old name
    assert files.read_text(sensor) == "50000"

    sensor.unlink()  # gone: the open file must not keep answering
    assert files.read_text(sensor) is None
    sensor.write_text("60000\n")
    assert files.read_text(sensor) == "60000"
    files.close()


def test_procfs_files_are_produced_anew_and_long_ones_read_whole(tmp_path: Path) -> None:
    files = OpenFiles()
    first = files.read_text(Path("/proc/self/stat"))
    assert first is not None and first.split()[0] == str(os.getpid())
    long = tmp_path / "stat"
    long.write_text("cpu " + "1 " * 50_000 + "\n")  # longer than one CHUNK
    text = files.read_text(long)
    assert text is not None and len(text.split()) == 50_001
    files.close()


def test_files_are_closed_when_no_longer_wanted(tmp_path: Path) -> None:
    files = OpenFiles()
    paths = [tmp_path / f"temp{i}_input" for i in range(5)]
    before = open_count()
    for path in paths:
        path.write_text("40000\n")
        assert files.read_text(path) == "40000"
    assert open_count() == before + 5
    files.keep_only(paths[:2])
    assert open_count() == before + 2
    assert files.read_text(tmp_path / "absent") is None
    assert open_count() == before + 2, "a file that cannot be opened leaves nothing open"
    files.close()
    assert open_count() == before
