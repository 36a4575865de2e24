"""The device check (bench/device_check.sh) in its dry mode on the CPU, so that it cannot rot before a GPU arrives:
every step runs (environment, the device-sensitive tests, bench/scale.py, a search and the service's worker on a
random-weight shape) from a kit of the built-in tokenizer and texts, and what would come back from the GPU machine
fits its limit of 8 files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import device_check  # noqa: E402

pytestmark = pytest.mark.real  # the kit takes the built-in model's tokenizer and the built-in texts


def test_the_dry_device_check_runs_every_step(tmp_path):
    kit, out = tmp_path / "kit", tmp_path / "out"
    device_check.build_kit(kit, wheels=False)  # everything is installed here
    assert {p.name for p in (kit / "texts").iterdir()} == {"books.txt", "wiki.txt", "news.txt"}
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_SYSTEM_PYTHON": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--device", "cpu", "--dry", "--kit",
                             str(kit), "--out", str(out), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, env=env, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert [row["step"] for row in summary] == ["env", "tests", "scale", "model", "search", "workers"]
    failed = {row["step"]: (out / f"{row['step']}.log").read_text()[-2000:] for row in summary if row["rc"] != 0}
    assert not failed, failed
    assert result.returncode == 0 and "all steps passed" in result.stdout, result.stdout + result.stderr
    assert len(list(out.iterdir())) <= 8  # what the GPU machine sends back: at most 8 files
    assert json.loads((out / "scale.json").read_text())[0]["shape"] == "tiny"
    assert "succeeded" in (out / "workers.log").read_text()


def test_the_kit_holds_what_the_checks_import_and_not_numpy():
    wanted = device_check.closure(device_check.KIT_ROOTS)
    assert {"optuna", "sqlalchemy", "fastapi", "pydantic-settings", "httpx", "pytest"} <= wanted
    assert "numpy" in wanted and "numpy" in device_check.ON_THE_MACHINE  # the machine's torch has it
    assert "torch" not in wanted
