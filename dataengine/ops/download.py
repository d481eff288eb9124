"""`download`: fetch each row's URL, verify, resize and re-encode the image.

Runs as Ray tasks; inside a task a thread pool fetches the batch concurrently (HTTP waits and the
OpenCV decode/resize/encode both release the GIL). Every row comes out with either an image or a
stable reject reason (`http_404`, `timeout`, `too_large`, `not_image`, `opt_out`, ...).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from dataengine.core import columns as C
from dataengine.io.fetch import DEFAULT_OPTOUT_TOKENS, Fetcher, FetchOptions
from dataengine.io.imaging import ImageOptions, ImageRejected, process_image
from dataengine.ops.base import Op, OpConfig, register_op


class DownloadConfig(OpConfig):
    """Download stage settings. Names follow img2dataset where it has the same knob."""

    op: Literal["download"] = "download"
    batch_size: int = Field(default=64, gt=0, description="URLs per batch (one task fetches a batch).")
    threads: int = Field(default=16, gt=0, le=512, description="Concurrent fetches per task.")
    timeout: float = Field(default=10.0, gt=0, description="Seconds to connect, and max silence while reading.")
    deadline: float = Field(default=30.0, gt=0, description="Total seconds per image: retries, redirects and body.")
    retries: int = Field(default=2, ge=0, le=10, description="Extra attempts on timeouts, 5xx and 429 only.")
    backoff_base: float = Field(default=0.5, ge=0, description="First backoff in seconds; doubles per retry, jittered.")
    backoff_max: float = Field(default=8.0, ge=0, description="Largest backoff in seconds.")
    max_redirects: int = Field(default=5, ge=0, le=30)
    max_bytes: int = Field(default=32 * 1024 * 1024, gt=0, description="Stop reading a body past this size.")
    max_pixels: int = Field(default=89_478_485, gt=0, description="Refuse images with more pixels (decompression bombs).")
    allow_private_networks: bool = Field(
        default=False, description="Allow loopback/private/link-local destinations (tests, intranets).")
    respect_optout: bool = Field(default=True, description="Skip responses whose X-Robots-Tag opts out.")
    optout_tokens: list[str] = Field(default=list(DEFAULT_OPTOUT_TOKENS))
    user_agent: str | None = Field(default=None, description="User-Agent header; default names dataengine.")
    image_size: int = Field(default=256, gt=0, le=16384, description="Target size in pixels (see resize_mode).")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = Field(default=False, description="Never upscale.")
    encode_format: Literal["jpeg", "webp", "png"] = "jpeg"
    encode_quality: int = Field(default=95, ge=1, le=100)

    @model_validator(mode="after")
    def _deadline_covers_timeout(self) -> "DownloadConfig":
        if self.deadline < self.timeout:
            raise ValueError(f"deadline ({self.deadline}) must be >= timeout ({self.timeout})")
        return self

    def fetch_options(self) -> FetchOptions:
        extra = {"user_agent": self.user_agent} if self.user_agent else {}
        return FetchOptions(
            timeout=self.timeout, deadline=self.deadline, retries=self.retries, backoff_base=self.backoff_base,
            backoff_max=self.backoff_max, max_redirects=self.max_redirects, max_bytes=self.max_bytes,
            allow_private_networks=self.allow_private_networks, respect_optout=self.respect_optout,
            optout_tokens=tuple(t.lower() for t in self.optout_tokens), pool_size=self.threads, **extra,
        )

    def image_options(self) -> ImageOptions:
        return ImageOptions(
            image_size=self.image_size, resize_mode=self.resize_mode, resize_only_if_bigger=self.resize_only_if_bigger,
            encode_format=self.encode_format, encode_quality=self.encode_quality, max_pixels=self.max_pixels,
        )


_OUTPUT_FIELDS = (
    C.IMAGE, C.IMAGE_FORMAT, C.WIDTH, C.HEIGHT, C.ORIGINAL_WIDTH, C.ORIGINAL_HEIGHT, C.ORIGINAL_BYTES,
    C.SHA256, C.FINAL_URL, C.HTTP_STATUS, C.DOWNLOAD_ATTEMPTS, C.DOWNLOAD_ERROR, C.REJECT_REASON,
)


@register_op
class DownloadOp(Op[DownloadConfig]):
    """Fetch, verify, resize and re-encode images; reject with a reason code on any failure."""

    Config = DownloadConfig

    def __init__(self, config: DownloadConfig) -> None:
        super().__init__(config)
        self.fetcher = Fetcher(config.fetch_options())
        self.image_options = config.image_options()
        self.executor = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="download")

    def process(self, batch: pa.Table) -> pa.Table:
        urls = batch.column(C.URL).to_pylist() if C.URL in batch.column_names else [None] * batch.num_rows
        rows = list(self.executor.map(self.download_one, urls))
        return pa.table({name: [row.get(name) for row in rows] for name in _OUTPUT_FIELDS})

    def download_one(self, url: str | None) -> dict:
        """Download and process one URL into the stage's output columns."""
        fetched = self.fetcher.fetch(url)
        out: dict = {
            C.FINAL_URL: fetched.final_url, C.HTTP_STATUS: fetched.status, C.DOWNLOAD_ATTEMPTS: fetched.attempts,
        }
        if fetched.reason:
            out[C.REJECT_REASON], out[C.DOWNLOAD_ERROR] = fetched.reason, fetched.detail
            return out
        body = fetched.body or b""
        out[C.ORIGINAL_BYTES] = len(body)
        out[C.SHA256] = hashlib.sha256(body).hexdigest()
        try:
            image = process_image(body, self.image_options)
        except ImageRejected as e:
            out[C.REJECT_REASON], out[C.DOWNLOAD_ERROR] = e.reason, e.detail
            return out
        out.update({
            C.IMAGE: image.data, C.IMAGE_FORMAT: image.format, C.WIDTH: image.width, C.HEIGHT: image.height,
            C.ORIGINAL_WIDTH: image.original_width, C.ORIGINAL_HEIGHT: image.original_height,
        })
        return out
