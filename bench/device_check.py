"""The device check: what a lent GPU must show, in one command that finishes within 8 minutes.

A GPU is lent to a session for about 15 minutes in all, its start included, on a machine with its own Python
3.12, torch, transformers, safetensors, peft and botorch, and nothing else: no network, no optuna, SQLAlchemy,
FastAPI or gguf, no built-in model or texts. So the check is prepared here and travels with the working tree:

    python bench/device_check.py --kit build/device-kit      # here, once: the wheels that machine lacks (cp312,
                                                             # pinned to this venv's versions), the built-in
                                                             # tokenizer and three built-in texts (about 20 MiB)
    bash bench/device_check.sh                               # there: carry build/device-kit; results in $OUT or
                                                             # runs/device-check
    bash bench/device_check.sh --device cpu --dry            # tiny shapes on the CPU (tests/test_device_check.py)

Steps, each with its own time limit, its output in ``NAME.log`` and one line of ``summary.json``:

1. ``env`` — torch, CUDA, the GPUs and ``nvidia-smi``;
2. ``tests`` — the suite's device-sensitive modules (device choice, dtypes, pruning, repair, perplexity, the
   search on the tiny model), which pick CUDA by themselves where it is present;
3. ``scale`` — ``bench/scale.py`` for the Llama-3.1-8B shape in bf16: statistics pass peak vs weights, trial vs
   one evaluation pass (``tiny`` in a dry run);
4. ``search`` — ``adapruner search``, 8 trials, on a random-weight shape (Llama-3.2-1B; ``tiny`` dry) saved as a
   checkpoint, on the device;
5. ``workers`` — a job submitted to the service's API (SQLite) and ``adapruner worker --devices all --once``:
   one worker per GPU, each running trials until the budget is met (``--device cpu`` in a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, whose service.py is not the service
# What the checks import that the GPU machine lacks; the kit holds these and everything they require but numpy (which
# its torch has); pip installs from the kit only what is missing there.
KIT_ROOTS = ("optuna", "sqlalchemy", "alembic", "gguf", "pytest", "pytest-timeout", "fastapi", "fastapi-offline",
             "pydantic-settings", "httpx", "uvicorn")
ON_THE_MACHINE = ("numpy",)
TEXTS = ("books", "wiki", "news")
TEST_MODULES = ("tests/test_models.py", "tests/test_structure_prune.py", "tests/test_repair.py",
                "tests/test_evaluate.py", "tests/test_plan.py", "tests/test_depth.py", "tests/test_search.py")
DRY_TESTS = ("tests/test_models.py",)


def closure(names) -> set[str]:
    """``names`` and every distribution they require (markers evaluated here, no extras), as installed here."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in needs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def download_wheels(wheels: Path) -> None:
    """The kit's wheels for CPython 3.12 on x86-64 Linux, pinned to the versions installed here."""
    from importlib.metadata import version

    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in sorted(closure(KIT_ROOTS) - set(ON_THE_MACHINE))]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "--dest", str(wheels), *pins], check=True)


def build_kit(kit: Path, wheels: bool = True) -> None:
    """Wheels for Python 3.12 (this venv's versions; ``wheels`` False: none, for a dry run where everything is
    installed), the built-in tokenizer's files and three built-in texts."""
    from adapruner.data import load_source
    from adapruner.models import builtin_checkpoint

    kit.mkdir(parents=True, exist_ok=True)
    if wheels:
        download_wheels(kit / "wheels")
    tokenizer = kit / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for path in builtin_checkpoint("smollm2-135m").iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(path, tokenizer / path.name)
    texts = kit / "texts"
    texts.mkdir(exist_ok=True)
    for name in TEXTS:  # a slice of each: enough windows for a short search, small enough to travel
        source = load_source(f"builtin:{name}")
        parts = ["\n\n".join(source.part(part))[:100_000] for part in ("pool", "validation", "test")]
        (texts / f"{name}.txt").write_text("\n\n".join(parts))
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    print(f"device kit: {kit} ({size / 2**20:.1f} MiB): {len(list(kit.glob('wheels/*.whl')))} wheels, tokenizer, texts")


def run_step(name: str, argv: list[str], out: Path, limit: float, env: dict | None = None) -> dict:
    """Run one step with its limit, its output to ``NAME.log``; its outcome as a row of the summary."""
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    row = {"step": name, "rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(row), flush=True)
    return row


def worker_check(args, model: Path, texts: Path, out: Path) -> int:
    """Submit a job through the API on SQLite, then run the worker per device until it ends; 0 if it succeeded."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.db import upgrade
    from service.settings import Settings

    token = "device-check-token"
    data = out / "service"
    env = {"ADAPRUNER_DATA_DIR": str(data), "ADAPRUNER_DATABASE_URL": f"sqlite:///{data / 'service.db'}",
           "ADAPRUNER_API_TOKENS": token, "ADAPRUNER_MODELS_ROOT": str(model.parent),
           "ADAPRUNER_TEXTS_ROOT": str(texts), "ADAPRUNER_WORKER_POLL_SECONDS": "0.5"}
    data.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    upgrade(env["ADAPRUNER_DATABASE_URL"])
    job = {"name": "device-check", "model": model.name, "calibration": ["books.txt", "wiki.txt"],
           "heldout": ["news.txt"], "target": 0.2, "trials": 4, "pool_size": 8, "seq_len": 64, "val_windows": 4,
           "test_windows": 4, "baselines": ["flap"], "repair_windows": 8, "measure_cost": False}
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(Settings())) as client:
        response = client.post("/v1/jobs", json=job, headers=auth)
        print("submitted:", response.status_code, response.text[:300], flush=True)
        if response.status_code != 202:
            return 1
        job_id = response.json()["id"]
        device = ["--device", "cpu"] if args.device == "cpu" else ["--devices", "all"]
        worker = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--once", *device], cwd=ROOT,
                                env={**os.environ, **env}, timeout=args.step_seconds)
        final = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    print("worker rc:", worker.returncode, "job:", final.get("status"), json.dumps(final.get("progress")), flush=True)
    return 0 if worker.returncode == 0 and final.get("status") == "succeeded" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kit", type=Path, default=ROOT / "build" / "device-kit",
                        help="the kit folder (with --build-kit: where to build it)")
    parser.add_argument("--build-kit", action="store_true", help="build the kit here, then stop")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="tiny shapes and a short test selection (on the CPU)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "device-check"))
    parser.add_argument("--work", type=Path, default=None,
                        help="models, databases and the search's output (default: a temporary folder, removed)")
    parser.add_argument("--step-seconds", type=float, default=150, help="each step's time limit")
    parser.add_argument("--worker-step", action="store_true", help=argparse.SUPPRESS)  # the workers step, in-process
    args = parser.parse_args()
    if args.build_kit:
        build_kit(args.kit)
        return 0
    out, kit = args.out.resolve(), args.kit.resolve()
    out.mkdir(parents=True, exist_ok=True)
    texts = kit / "texts"
    if args.worker_step:
        return worker_check(args, args.work / "models" / "random", texts, args.work)
    if args.work is None:
        with tempfile.TemporaryDirectory() as work:
            return check(args, out, kit, Path(work))
    return check(args, out, kit, args.work.resolve())


def check(args, out: Path, kit: Path, work: Path) -> int:
    """Every step; ``out`` gets what comes back from the GPU machine (at most 8 files: the logs, the scale table
    and the summary), ``work`` the rest."""
    texts = kit / "texts"
    python = sys.executable
    scale_shape, search_shape = ("tiny", "tiny") if args.dry else ("llama-3.1-8b", "llama-3.2-1b")
    tokenizer = kit / "tokenizer"
    sources = ",".join(str(texts / f"{n}.txt") for n in TEXTS[:2])
    rows = [run_step("env", [python, "-c", (
        "import torch, subprocess, shutil; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
        "'available', torch.cuda.is_available()); [print(i, torch.cuda.get_device_name(i)) for i in "
        "range(torch.cuda.device_count())]; shutil.which('nvidia-smi') and subprocess.run(['nvidia-smi'])")],
        out, 60)]
    tests = DRY_TESTS if args.dry else TEST_MODULES
    rows.append(run_step("tests", [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m",
                                   "not real and not postgres", *tests], out, args.step_seconds))
    rows.append(run_step("scale", [python, "bench/scale.py", "--shapes", scale_shape, "--device", args.device,
                                   "--dtype", "float32" if args.dry else "bfloat16", "--tokenizer", str(tokenizer),
                                   "--sources", sources, "--val-windows", "4" if args.dry else "32",
                                   "--json", str(out / "scale.json")], out, args.step_seconds))
    model = work / "models" / "random"
    rows.append(run_step("model", [python, "-c", (
        "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from transformers import AutoTokenizer; "
        f"from scale import save_random; save_random({search_shape!r}, Path({str(model)!r}), "
        f"AutoTokenizer.from_pretrained({str(tokenizer)!r}))")], out, args.step_seconds))
    small = ["--pool-size", "8", "--seq-len", "64", "--val-windows", "4", "--test-windows", "4",
             "--repair-windows", "8"] if args.dry else ["--pool-size", "32", "--repair-windows", "32"]
    rows.append(run_step("search", [python, "-m", "service.cli", "search", "--model", str(model), "--target", "0.2",
                                    "--trials", "2" if args.dry else "8", "--device", args.device,
                                    "--calib", str(texts / "books.txt"), "--calib", str(texts / "wiki.txt"),
                                    "--heldout", str(texts / "news.txt"), "--baselines", "flap,llm-pruner",
                                    "--baseline-draws", "1", "--no-measure", *small,
                                    "--storage", f"sqlite:///{work / 'search.db'}", "--out", str(work / "search")],
                             out, args.step_seconds))
    rows.append(run_step("workers", [python, str(Path(__file__).resolve()), "--worker-step", "--device", args.device,
                                     "--kit", str(kit), "--out", str(out), "--work", str(work),
                                     "--step-seconds", str(args.step_seconds)],
                         out, args.step_seconds + 30))
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    failed = [row["step"] for row in rows if row["rc"] != 0]
    print("device check:", "all steps passed" if not failed else f"failed: {', '.join(failed)}", f"({out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
