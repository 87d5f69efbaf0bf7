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

    job_timeout_s: int = Field(3600, gt=0, description="a job running longer is stopped and failed")
    result_ttl_s: int = Field(24 * 3600, gt=0, description="how long results and artifacts are kept")
    predict_timeout_s: float = Field(30.0, gt=0, description="how long a predict request waits")
    predict_result_ttl_s: int = Field(60, gt=0)

    worker_heartbeat_s: float = Field(3.0, gt=0)
    worker_lost_after_s: float = Field(15.0, gt=0, description="a silent worker is presumed dead")
    onnx_engine: bool = Field(True, description="serve forward-only passes with ONNX Runtime")
    intra_op_threads: int = Field(0, ge=0, description="0 = number of CPU cores")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str = Field("", description="prefix for absolute links; empty = relative links")


@lru_cache
def get_settings() -> Settings:
    return Settings()
