"""ORM models. Rows never leave this package: the repository turns them into domain dataclasses."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, MetaData, String, Text
from sqlalchemy import UniqueConstraint, false, true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC, the one timestamp convention of the database."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(Text)
    model_path: Mapped[str] = mapped_column(Text)
    dataset_source: Mapped[str] = mapped_column(Text)
    dataset_kind: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(32))
    n_items: Mapped[int] = mapped_column(Integer)
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON, deferred=True)  # items can be large
    threshold: Mapped[float] = mapped_column(Float)
    gpu_hour_usd: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float, server_default="0.95")
    policy: Mapped[str] = mapped_column(String(16), server_default="point")
    early_stop: Mapped[bool] = mapped_column(Boolean, server_default=false())
    target_gpu: Mapped[str] = mapped_column(String(32), server_default="H100-80GB")
    model_config: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # config.json, read when the job runs
    # {"source", "n", "texts"}: calibration samples for GPTQ/AWQ, split off the task data or from a file
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JSON, deferred=True)
    deploy: Mapped[bool] = mapped_column(Boolean)
    use_cache: Mapped[bool] = mapped_column(Boolean, server_default=true())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=false())
    cancel_reason: Mapped[str | None] = mapped_column(Text)  # why (None: by request), its error once it ends
    driver: Mapped[str | None] = mapped_column(String(200))  # host:pid of the process running the job
    # the Ray job submitted to drive it (`submit --address`): the cluster's dashboard and its submission id (0012)
    ray_address: Mapped[str | None] = mapped_column(Text)
    ray_submission: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)  # that driver's last sign of life
    error: Mapped[str | None] = mapped_column(Text)
    stage: Mapped[str | None] = mapped_column(Text)  # what its driver is doing now, while it runs
    deployed_candidate: Mapped[str | None] = mapped_column(String(64))
    base_url: Mapped[str | None] = mapped_column(Text)
    deploy_error: Mapped[str | None] = mapped_column(Text)  # why the deployment a job asked for did not happen
    candidate_timeout: Mapped[float | None] = mapped_column(Float)  # seconds a candidate may run (None: the driver's setting)
    notify: Mapped[str | None] = mapped_column(Text)  # a webhook URL the job's end is posted to
    recommended: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the answer as the job succeeded
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    candidates: Mapped[list[CandidateRow]] = relationship(
        back_populates="job", order_by="CandidateRow.position", cascade="all, delete-orphan", passive_deletes=True
    )


class CandidateRow(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    n_items: Mapped[int | None] = mapped_column(Integer)
    weight_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    quantize_seconds: Mapped[float | None] = mapped_column(Float)
    eval_seconds: Mapped[float | None] = mapped_column(Float)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    throughput_engine: Mapped[str | None] = mapped_column(String(200))
    prefill_tokens_per_second: Mapped[float | None] = mapped_column(Float)
    decode_tokens_per_second_b16: Mapped[float | None] = mapped_column(Float)
    disk_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the saved artifact
    artifact_path: Mapped[str | None] = mapped_column(Text)
    artifact_reused: Mapped[bool | None] = mapped_column(Boolean)
    device: Mapped[str | None] = mapped_column(String(128))
    node_id: Mapped[str | None] = mapped_column(String(128))
    gpu_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    n_truncated: Mapped[int | None] = mapped_column(Integer)
    early_stop: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the sequential test's state at the end
    attempts: Mapped[int | None] = mapped_column(Integer)  # worker processes it took
    reused_from: Mapped[str | None] = mapped_column(String(32))  # the job whose stored result this is
    items_carried: Mapped[int | None] = mapped_column(Integer)  # items an earlier attempt scored, kept
    phase: Mapped[str | None] = mapped_column(String(200))  # what it is doing while it runs (0011)
    # hash of model, dataset, candidate config, calibration and evaluation settings: equal keys, equal results
    cache_key: Mapped[str | None] = mapped_column(String(64), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    job: Mapped[JobRow] = relationship(back_populates="candidates")
    items: Mapped[list[ItemResultRow]] = relationship(
        order_by="ItemResultRow.item_index", cascade="all, delete-orphan", passive_deletes=True
    )


class ItemResultRow(Base):
    __tablename__ = "item_results"
    __table_args__ = (UniqueConstraint("candidate_id", "item_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    item_index: Mapped[int] = mapped_column(Integer)
    correct: Mapped[bool] = mapped_column(Boolean)
    score: Mapped[float | None] = mapped_column(Float)
    truncated: Mapped[bool] = mapped_column(Boolean, server_default=false())
    prediction: Mapped[Any] = mapped_column(JSON)
    choice_logprobs: Mapped[list[float] | None] = mapped_column(JSON)
    category: Mapped[str | None] = mapped_column(Text)
