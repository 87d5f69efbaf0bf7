"""One settings object for the API and the workers (pydantic-settings, `INSPECTOR_` prefix).

Read once per process through :func:`get_settings`; nothing else reads ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INSPECTOR_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(1.5, gt=0, description="connect/read timeout of API Redis calls")
    models_dir: Path = Path("var/models")
    cache_dir: Path = Path("var/cache")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    max_upload_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="width*height above this is a 413")
    max_images_per_request: int = Field(16, gt=0)
    max_training_set_images: int = Field(
        10_000, gt=0, description="images an uploaded training set zip (influence) may hold"
    )
    max_training_set_uncompressed_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="declared uncompressed size of an uploaded training set zip"
    )

    # Data sets (/v1/datasets): zips stored under data_dir, which api and workers share
    data_dir: Path = Field(Path("var/data"), description="uploaded data sets and data-set jobs' large artifacts")
    max_dataset_bytes: int = Field(
        4 * 1024**3,
        gt=0,
        description="stored bytes of data sets per tenant: one larger upload is a 413, one that would pass the "
        "tenant's total a 429",
    )
    max_datasets: int = Field(100, gt=0, description="data sets per tenant (429 above)")
    max_dataset_images: int = Field(100_000, gt=0, description="images one data set zip may hold (413 above)")
    max_dataset_uncompressed_bytes: int = Field(
        16 * 1024**3, gt=0, description="declared uncompressed size of one data set zip (413 above)"
    )

    job_timeout_s: int = Field(3600, gt=0, description="a job running longer is stopped and failed")
    job_memory_mb: int = Field(
        0, ge=0, description="a job growing its worker's resident memory by more is stopped and failed; 0 = no limit"
    )
    kind_timeout_s: dict[str, int] = Field(
        default_factory=dict, description='per-kind time budgets in s, JSON, e.g. {"u_sweep": 14400}'
    )
    kind_memory_mb: dict[str, int] = Field(
        default_factory=dict, description='per-kind memory budgets in MiB (0 = none), JSON, e.g. {"influence": 4096}'
    )
    result_ttl_s: int = Field(24 * 3600, gt=0, description="how long results and artifacts are kept")
    predict_timeout_s: float = Field(30.0, gt=0, description="how long a predict request waits")

    worker_heartbeat_s: float = Field(3.0, gt=0)
    worker_lost_after_s: float = Field(15.0, gt=0, description="a silent worker is presumed dead")
    redis_outage_s: float = Field(
        300.0, ge=0, description="how long a worker keeps a job's result while Redis is unreachable (workers.outage)"
    )
    onnx_engine: bool = Field(True, description="serve forward-only passes with ONNX Runtime")
    warm_models: str = Field(
        "all",
        description="models a worker warms before it takes work (load, engine, batch sizes, one forward and "
        "one forward+backward): 'all' registered ones, 'none', or ids separated by commas (workers.warmup)",
    )
    model_memory_mb: int = Field(
        0,
        ge=0,
        description="per worker, the memory its loaded models may take (weights and engine); beyond it the "
        "least recently used model is unloaded; 0 = no limit",
    )
    intra_op_threads: int = Field(0, ge=0, description="0 = number of CPU cores")

    # Security and tenancy (docs/security.md). No keys configured = auth off (local default).
    api_keys: str = Field(
        "",
        repr=False,
        description="inline keys, hashed: 'tenant:sha256hex' entries separated by commas or spaces "
        "(python -m service.auth new-key --tenant NAME prints a key and its entry)",
    )
    api_keys_file: str = Field("", description="JSON file of hashed keys with per-tenant limits; empty = none")
    rate_limit_per_s: float = Field(0.0, ge=0, description="work requests (POST) per tenant per second; 0 = off")
    rate_limit_burst: int = Field(20, gt=0, description="token-bucket size of the rate limit")
    max_unfinished_jobs: int = Field(0, ge=0, description="queued + running jobs per tenant; 0 = no quota")
    idempotency_ttl_s: int = Field(24 * 3600, gt=0, description="how long an Idempotency-Key is remembered")

    # Durability and scaling (docs/deployment.md)
    job_retries: int = Field(0, ge=0, description="reruns of a job whose worker died or that crashed")
    job_retry_backoff_s: list[int] = Field([10, 60, 300], description="wait before each rerun (last repeats)")
    worker_max_jobs: int = Field(0, ge=0, description="a worker exits after this many jobs (0 = never)")
    worker_max_rss_mb: int = Field(0, ge=0, description="a worker exits after a job that leaves it above this")
    predict_max_batch: int = Field(32, gt=0, description="images one batched predict forward takes at most")
    predict_max_delay_ms: float = Field(
        5.0, ge=0, description="how long a worker waits to fill a predict batch (only while requests come concurrently)"
    )
    predict_threads: int = Field(
        2,
        ge=1,
        description="batches a worker serves at once (each thread takes its own batch; two keep both cores of a "
        "small host busy while one batch is being decoded or answered)",
    )
    predict_intra_op_threads: int = Field(
        1,
        ge=0,
        description="ONNX Runtime threads of each predict batch on the CPU (0 = intra_op_threads: predicts share "
        "the jobs' session). Fewer than intra_op_threads gives predicts a session of their own, and "
        "predict_threads batches side by side use the cores with less overhead than one batch on all of them",
    )
    predict_spin_wait: bool = Field(
        False,
        description="ONNX Runtime threads of the predict batcher spin between batches (faster back-to-back "
        "batches on a dedicated host; off, they leave the cores to the API and the next request's decoding)",
    )
    deeplift_cache_mb: int = Field(
        256,
        ge=0,
        description="per model, the reference activations DeepLift keeps for baselines shared by every image "
        "(zero, black, uniform_noise): efficientnet-lite0 at 224x224 takes 50 MB per baseline; 0 = recompute per job",
    )
    job_spin_wait: bool = Field(
        False,
        description="ONNX Runtime threads of the jobs' forward engine spin between runs (faster on a quiet "
        "dedicated host, slower when other processes want the cores: benchmarks/thread_pools.py)",
    )

    # Completion webhooks (callback_url of a job), signed with HMAC-SHA256
    webhook_secret: str = Field("", repr=False, description="HMAC key; empty = callback_url refused")
    webhook_retries: int = Field(5, ge=0)
    webhook_backoff_s: list[int] = Field([1, 5, 30, 120, 600], description="wait before each redelivery")
    webhook_timeout_s: int = Field(10, gt=0)
    webhook_allow_private: bool = Field(False, description="allow callbacks to loopback/private addresses")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str = Field("", description="prefix for absolute links; empty = relative links")


@lru_cache
def get_settings() -> Settings:
    return Settings()
