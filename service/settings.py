"""All service settings in one place, read from ``ADAPRUNER_*`` environment variables (or a .env file)."""

from __future__ import annotations

import hashlib
import hmac
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """The service's settings, in one place: from ``ADAPRUNER_*`` environment variables or ``.env``."""

    model_config = SettingsConfigDict(env_prefix="ADAPRUNER_", env_file=".env", extra="ignore")

    # Where everything lives. The database defaults to SQLite inside the data folder.
    data_dir: Path = Path("adapruner-data")
    database_url: str | None = None
    artifact_dir: str | None = None  # Optuna artifact store: a folder or s3://BUCKET; default data_dir/artifacts

    # Access. Writes always need one of the tokens, and a job is cancelled only by the token that
    # submitted it (or an admin token). Reads need a token unless public_reads is on; with a token, a
    # caller sees only its own jobs, an admin token sees all. public_reads shows everyone every job:
    # its spec (paths relative to the roots), trials, report and model.
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)  # comma-separated in the env
    admin_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)  # may read and cancel any job
    public_reads: bool = True

    # What a job may use. Built-in models and texts are always allowed; hub models only when listed
    # (exact ids, or a prefix ending in "/*"); local folders only below the roots.
    allowed_hub_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    models_root: Path | None = None
    texts_root: Path | None = None
    allow_hub_datasets: bool = False
    allow_trust_remote_code: bool = False

    # Limits.
    max_trials: int = 500
    max_pool_size: int = 256
    max_eval_windows: int = 512
    max_concurrent_jobs: int = 4
    max_finetune_steps: int = 5000  # LoRA steps a job's finetune may ask for

    # Links and workers.
    dashboard_url: str | None = "http://127.0.0.1:8081"  # empty: no dashboard, no dashboard links
    # The API's address as clients see it, for absolute links in answers; unset: links are relative
    # (never built from the request's Host header, which any client can set).
    public_url: str | None = None
    worker_poll_seconds: float = 5.0

    @field_validator("api_tokens", "admin_tokens", "allowed_hub_models", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str) and not value.startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("dashboard_url", "public_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return value or None

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'adapruner.db').resolve()}"

    @property
    def artifacts(self) -> str:
        if self.artifact_dir and self.artifact_dir.startswith("s3://"):
            return self.artifact_dir
        return str(Path(self.artifact_dir or self.data_dir / "artifacts").resolve())

    @property
    def jobs_dir(self) -> Path:
        return (self.data_dir / "jobs").resolve()

    @property
    def cache_dir(self) -> Path:
        """Models, corpora and pool statistics, shared by the workers through the data folder."""
        return (self.data_dir / "cache").resolve()

    def token_id(self, token: str) -> str | None:
        """A stable, non-secret id for a valid token (stored as a job's owner)."""
        if _known(token, [*self.api_tokens, *self.admin_tokens]):
            return hashlib.sha256(token.encode()).hexdigest()[:12]
        return None

    def is_admin(self, token: str) -> bool:
        return _known(token, self.admin_tokens)


def _known(token: str, tokens: list[str]) -> bool:
    # compare_digest: how long a comparison takes tells nothing about how much of a token matched
    return any(hmac.compare_digest(token.encode(), known.encode()) for known in tokens)
