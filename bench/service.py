"""The service under load: submissions and polls against the API while a worker runs trials.

For each database (the embedded SQLite file, and PostgreSQL when reachable): starts ``adapruner api``
and one worker on a fresh database, submits one search job on the tiny built-in-free model folder
(a random LLaMA of the test suite's shape, saved here), waits for its first trial to run, then sends
``--requests`` requests, ``--concurrency`` at a time: one in four a job submission, the others polls of
the job list, the running job and its trials. Prints per database: requests, 5xx answers, p50 / p99
latency, the running job's final status, and failed trials across all studies.

    python bench/service.py                      # 400 requests, 16 at a time
    python bench/service.py --databases sqlite --requests 100
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import optuna
import torch
from optuna.trial import TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TOKEN = "bench-token"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WORDS = "the of and a to in is was that for it with as his on be at by had not are but from or have an they".split()


def tiny_model(folder: Path) -> None:
    """A random 4-layer LLaMA with a word-level tokenizer: trials of about a second on a CPU."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def texts(folder: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for d in range(40):
        ids = torch.randint(len(WORDS), (400,), generator=generator).tolist()
        (folder / f"doc{d:02d}.txt").write_text(" ".join(WORDS[i] for i in ids))


def job(name: str, trials: int, val_windows: int = 12) -> dict:
    return {"name": name, "model": "tiny", "calibration": ["toy"], "target": 0.2, "trials": trials, "pool_size": 12,
            "seq_len": 32, "val_windows": val_windows, "test_windows": 6, "baselines": ["wanda-sp", "magnitude"],
            "space": {"subset_size": [2, 6], "n_clusters": 3}}


def fresh_postgres() -> str | None:
    try:
        admin = create_engine(PG_ADMIN, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            name = f"adapruner_bench_{os.getpid()}"
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    except Exception as exc:  # noqa: BLE001
        print(f"PostgreSQL skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None


def run(url: str, work: Path, args) -> dict:
    env = {**os.environ, "ADAPRUNER_DATABASE_URL": url, "ADAPRUNER_DATA_DIR": str(work / "data"),
           "ADAPRUNER_API_TOKENS": TOKEN, "ADAPRUNER_MODELS_ROOT": str(work / "models"),
           "ADAPRUNER_TEXTS_ROOT": str(work / "texts"), "ADAPRUNER_WORKER_POLL_SECONDS": "0.5"}
    exe = [sys.executable, "-m", "service.cli"]
    subprocess.run([*exe, "db", "upgrade"], env=env, check=True, capture_output=True)
    api = subprocess.Popen([*exe, "api", "--port", str(args.port)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([*exe, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies, codes = [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=300) as client:
            for _ in range(600):
                try:
                    client.get("/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            first = client.post("/v1/jobs", json=job("running", args.trials, 48)).json()
            while not client.get(f"/v1/jobs/{first['id']}").json()["progress"]["running"]:
                time.sleep(0.2)

            def request(i: int) -> None:
                start = time.perf_counter()
                if i % 4 == 0:
                    code = client.post("/v1/jobs", json=job(f"burst-{i}", 2)).status_code
                else:
                    paths = ("/v1/jobs", f"/v1/jobs/{first['id']}", f"/v1/jobs/{first['id']}/trials")
                    code = client.get(paths[i % 4 - 1]).status_code
                latencies.append(time.perf_counter() - start)
                codes.append(code)

            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(request, range(args.requests)))
            while (status := client.get(f"/v1/jobs/{first['id']}").json()["status"]) in ("queued", "running"):
                time.sleep(0.5)
    finally:
        worker.send_signal(signal.SIGTERM)
        api.terminate()
        worker.wait(120)
        api.wait(60)
    storage = optuna.storages.RDBStorage(url)
    failed = sum(t.state == TrialState.FAIL for s in optuna.get_all_study_summaries(storage)
                 for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False))
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(codes), "5xx": sum(c >= 500 for c in codes), "p50": q[49], "p99": q[98],
            "job": status, "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--trials", type=int, default=8, help="trials of the job that runs during the burst")
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    rows = []
    for database in args.databases.split(","):
        with tempfile.TemporaryDirectory(prefix="adapruner-bench-service-") as tmp:
            work = Path(tmp)
            (work / "models" / "tiny").mkdir(parents=True)
            (work / "texts" / "toy").mkdir(parents=True)
            tiny_model(work / "models" / "tiny")
            texts(work / "texts" / "toy")
            url = f"sqlite:///{work / 'service.db'}" if database == "sqlite" else fresh_postgres()
            if url is None:
                continue
            rows.append((database, run(url, work, args)))
    print(f"Command: `python bench/service.py {' '.join(sys.argv[1:])}`\n")
    print("| database | requests | 5xx | p50 latency | p99 latency | job during the burst | failed trials |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for database, r in rows:
        print(f"| {database} | {r['requests']} | {r['5xx']} | {r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | "
              f"{r['job']} | {r['failed']} |")


if __name__ == "__main__":
    main()
