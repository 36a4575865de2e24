"""Helpers the tests import: deterministic text, the tiny model, and the service's test setup.

Fixtures live in ``conftest.py``; this module holds plain functions and constants only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from adapruner.plan import PruningPlan, check_plan
from adapruner.structure import (
    ATTN_MODULES,
    COLUMN_MODULES,
    MLP_MODULES,
    decoder_layers,
    group_index,
    layer_linears,
    model_structure,
)

WORDS = (
    "the a of and to in was she he it that her his with for had not on be as at by but which you all "
    "Elizabeth Darcy Emma Anne house letter sister morning walk dinner ball family friend heart mind "
    "could would should must very much little great good young first last never always every day "
    "said thought felt knew saw came went gave took made found told asked replied answered"
).split()


def make_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-prose: sentences of random words, paragraphs separated by blank lines."""
    rng = random.Random(seed)
    out, sentence = [], []
    for i in range(n_words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(6, 14):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
        if i % 90 == 89:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


def make_documents(n_docs: int, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    return [make_text(words_per_doc, seed * 100_003 + i) for i in range(n_docs)]


def tiny_config(model_type: str = "llama", **overrides):
    base = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if model_type == "qwen2":
        base.update(use_sliding_window=False)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def make_tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    # Random init gives near-uniform predictions; a wider spread makes importance differences visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


# -- the service ---------------------------------------------------------------------------------

TOKEN = "test-token-1234"
PG_ADMIN_URL = os.environ.get("ADAPRUNER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_url_or_skip() -> str:
    """A fresh database on the machine's PostgreSQL; skipped only when it is down and CI is unset."""
    try:
        admin = create_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL} (and CI is unset): {str(exc).splitlines()[0]}")
    name = f"adapruner_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


def service_env(data_dir: Path, db_url: str, roots: Path, **extra: str) -> dict[str, str]:
    return {
        "ADAPRUNER_DATA_DIR": str(data_dir), "ADAPRUNER_DATABASE_URL": db_url, "ADAPRUNER_API_TOKENS": TOKEN,
        "ADAPRUNER_MODELS_ROOT": str(roots / "models"), "ADAPRUNER_TEXTS_ROOT": str(roots / "texts"),
        "ADAPRUNER_WORKER_POLL_SECONDS": "0.5", **extra,
    }


def small_job(**overrides) -> dict:
    job = {"name": "tiny-job", "model": "tiny", "calibration": ["toy"], "target": 0.2, "trials": 6, "pool_size": 12,
           "seq_len": 32, "val_windows": 12, "test_windows": 6, "baselines": ["wanda-sp", "magnitude"],
           "space": {"subset_size": [2, 6], "n_clusters": 3}, "measure_cost": False}
    return {**job, **overrides}


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@dataclass
class FinishedJob:
    """A job submitted over HTTP and run to its end by ``adapruner worker --once``, and where to read it."""

    client: object  # fastapi.testclient.TestClient, still open
    job: dict
    worker_code: int
    worker_output: str
    folder: Path


@contextmanager
def job_run_to_its_end(folder: Path, url: str, roots: Path, spec: dict, seconds: float = 300):
    """Submit ``spec`` to a service on the database ``url`` and run a worker subprocess until no job has
    work left; yields the :class:`FinishedJob` while the service's test client is open."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.db import upgrade
    from service.settings import Settings

    upgrade(url)
    env = service_env(folder / "data", url, roots)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with TestClient(create_app(Settings())) as client:
            created = client.post("/v1/jobs", json=spec, headers={"Authorization": f"Bearer {TOKEN}"}).json()
            worker = start_worker(env, "--once")
            try:
                out, _ = worker.communicate(timeout=seconds)
            except subprocess.TimeoutExpired:
                worker.kill()
                out = worker.communicate()[0]
                pytest.fail(f"the worker did not finish in {seconds:.0f} s: {out[-3000:]}")
            yield FinishedJob(client, client.get(f"/v1/jobs/{created['id']}").json(), worker.returncode, out, folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None, token: str | None = None, timeout: float = 30):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
        return r.status, r.read()


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            call(url)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


def wait_for_job(base: str, job_id: str, seconds: float = 300) -> dict:
    """The job, once it has left ``queued`` and ``running`` (or as it is when ``seconds`` ran out)."""
    deadline = time.time() + seconds
    while True:
        job = json.loads(call(f"{base}/v1/jobs/{job_id}")[1])
        if job["status"] not in ("queued", "running") or time.time() > deadline:
            return job
        time.sleep(0.5)


def mask_model(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A copy with the removed groups' weights set to zero instead of sliced out (for checking)."""
    structure = model_structure(model)
    check_plan(structure, plan)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, (layer, shape, lp) in enumerate(zip(decoder_layers(masked), structure.layers, plan.layers,
                                                   strict=True)):
            linears = layer_linears(layer)
            if i in plan.dropped:  # no output into the residual stream: the layer passes its input on
                for name in COLUMN_MODULES:
                    linears[name].weight.zero_()
                    if linears[name].bias is not None:
                        linears[name].bias.zero_()
                continue
            dropped_groups = torch.tensor(sorted(set(range(shape.n_groups)) - set(lp.keep_groups)), dtype=torch.long)
            dropped_channels = torch.tensor(sorted(set(range(shape.n_channels)) - set(lp.keep_channels)),
                                            dtype=torch.long)
            for names, dropped in ((ATTN_MODULES, dropped_groups), (MLP_MODULES, dropped_channels)):
                for name in names:
                    idx = group_index(shape, name, dropped)
                    linear = linears[name]
                    if name in COLUMN_MODULES:
                        linear.weight[:, idx] = 0
                    else:
                        linear.weight[idx] = 0
                        if linear.bias is not None:
                            linear.bias[idx] = 0
    return masked


class FlakyProxy:
    """A TCP forwarder between this test's processes and a server (PostgreSQL), which the test can cut: an
    outage closes every connection through it and refuses new ones for a while. The server is never touched."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self.lock:
                self.sockets -= {src, dst}

    def outage(self, seconds: float) -> None:
        """Cut every connection and refuse new ones for ``seconds``."""
        self.down.set()
        with self.lock:
            for s in list(self.sockets):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        time.sleep(seconds)
        self.down.clear()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
