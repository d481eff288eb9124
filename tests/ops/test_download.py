"""The download op on a batch: image facts written, broken bodies rejected with the right code."""

import hashlib
import io
import time

import polars as pl
import pyarrow as pa
from PIL import Image

from dataengine.core import columns as C
from dataengine.ops import apply_stage, get_op
from dataengine.ops.download import DownloadConfig
from dataengine.testbed.synthweb import bomb_png
from tests.conftest import download_stage


def _run(urls, **overrides):
    config = DownloadConfig(**download_stage(**overrides))
    op = get_op("download")(config)
    batch = pa.table({C.UID: [str(i) for i in range(len(urls))], C.URL: urls})
    return apply_stage(op, batch, "download", 0).to_pylist()


def test_bad_bodies_get_their_reason_codes(synthweb_dir, synthweb_server):
    truth = pl.read_parquet(synthweb_dir / "truth.parquet")
    path = {k: truth.filter(pl.col("url_kind") == k)["path"][0] for k in ("truncated", "not_image", "ok")}
    base = synthweb_server.base_url
    bomb_png()  # built (and cached) on first use; build it before the clock starts
    started = time.monotonic()
    rows = _run([base + "/bomb.png", base + path["truncated"], base + path["not_image"], base + path["ok"]])
    assert time.monotonic() - started < 5
    assert [r[C.REJECT_REASON] for r in rows] == ["too_many_pixels", "decode_error", "not_image", None]
    assert [r[C.REJECT_STAGE] for r in rows] == ["download", "download", "download", None]
    assert all(r[C.DOWNLOAD_ERROR] for r in rows[:3])
    # the hash is of the bytes as served, even when the body is then rejected
    served = (synthweb_dir / "files" / path["truncated"].lstrip("/")).read_bytes()
    assert rows[1][C.SHA256] == hashlib.sha256(served).hexdigest()


def test_kept_image_is_resized_and_reencoded(synthweb_dir, synthweb_server):
    truth = pl.read_parquet(synthweb_dir / "truth.parquet").filter(pl.col("url_kind") == "ok").row(0, named=True)
    (row,) = _run([synthweb_server.base_url + truth["path"]], image_size=64, resize_mode="center_crop",
                  encode_format="webp", encode_quality=80)
    assert row[C.REJECT_REASON] is None
    image = Image.open(io.BytesIO(row[C.IMAGE]))
    assert image.format == "WEBP" and image.size == (64, 64) == (row[C.WIDTH], row[C.HEIGHT])
    assert (row[C.ORIGINAL_WIDTH], row[C.ORIGINAL_HEIGHT]) == (truth["width"], truth["height"])
    assert row[C.IMAGE_FORMAT] == "webp" and row[C.HTTP_STATUS] == 200 and row[C.DOWNLOAD_ATTEMPTS] == 1


def test_rows_rejected_earlier_are_not_fetched(synthweb_server):
    config = DownloadConfig(**download_stage())
    op = get_op("download")(config)
    before = synthweb_server.request_count
    batch = pa.table({C.UID: ["a", "b"], C.URL: [synthweb_server.base_url + "/status/200"] * 2,
                      C.REJECT_STAGE: ["input", None], C.REJECT_REASON: ["duplicate_id", None]})
    rows = apply_stage(op, batch, "download", 0).to_pylist()
    assert synthweb_server.request_count - before == 1
    assert (rows[0][C.REJECT_STAGE], rows[0][C.REJECT_REASON], rows[0][C.IMAGE]) == ("input", "duplicate_id", None)
    assert rows[1][C.REJECT_REASON] == "not_image"
    assert rows[0]["_seconds_0"] == 0 and rows[1]["_seconds_0"] > 0
