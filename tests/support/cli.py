"""`governor ARGS` as a user runs it, from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import REPO


def governor(*args: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "governor", *args], capture_output=True, text=True, timeout=60,
        cwd=cwd or REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
