"""The synthetic web: deterministic builds, honest truth labels, and every server route as specified."""

from __future__ import annotations

import http.client
import io
import math
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine.testbed.synthweb import (
    COLOURS,
    EXPECTED_REASON,
    KINDS,
    POSITIONS,
    SIZES,
    TRUTH_SCHEMA,
    NoiseMix,
    SynthWebServer,
    build_synthweb,
    write_url_list,
)
from dataengine.testbed.synthweb.server import OVERSIZED_BYTES, OVERSIZED_DIMS

N = 400
SMALL = {"sizes": (64, 96), "size_weights": (0.5, 0.5)}
STORED_IMAGE_KINDS = ("ok", "redirect", "flaky", "opt_out", "slow")


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthweb(tmp_path_factory.mktemp("sw") / "web", n=N, seed=0, **SMALL)


@pytest.fixture(scope="module")
def truth(web: Path) -> list[dict]:
    return pq.read_table(web / "truth.parquet").to_pylist()


@pytest.fixture(scope="module")
def server(web: Path):  # noqa: ANN201 - generator fixture
    with SynthWebServer(web) as srv:
        yield srv


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "files").rglob("*")) if p.is_file()}


def _first(truth: list[dict], kind: str) -> dict:
    return next(r for r in truth if r["url_kind"] == kind)


def _get(server: SynthWebServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# ---- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_identical_truth_and_bytes(tmp_path: Path) -> None:
    a = build_synthweb(tmp_path / "a", n=40, seed=0, **SMALL)
    b = build_synthweb(tmp_path / "b", n=40, seed=0, **SMALL, workers=2)  # a process pool changes nothing
    assert pq.read_table(a / "truth.parquet").equals(pq.read_table(b / "truth.parquet"))
    assert _files(a) == _files(b)

    c = build_synthweb(tmp_path / "c", n=40, seed=1, **SMALL)
    ta, tc = pq.read_table(a / "truth.parquet"), pq.read_table(c / "truth.parquet")
    assert ta.column("true_caption").to_pylist() != tc.column("true_caption").to_pylist()
    fa, fc = _files(a), _files(c)
    common = set(fa) & set(fc)
    assert common and all(fa[k] != fc[k] for k in common)


def test_item_does_not_depend_on_n(tmp_path: Path, web: Path, truth: list[dict]) -> None:
    small = build_synthweb(tmp_path / "small", n=30, seed=0, **SMALL)
    assert pq.read_table(small / "truth.parquet").to_pylist() == truth[:30]
    big_files = _files(web)
    for rel, data in _files(small).items():
        assert big_files[rel] == data, rel


# ---- truth table --------------------------------------------------------------------------------


def test_truth_schema_and_consistency(web: Path, truth: list[dict]) -> None:
    assert pq.read_schema(web / "truth.parquet").equals(TRUTH_SCHEMA)
    assert len(truth) == N and len({r["id"] for r in truth}) == N
    by_id = {r["id"]: r for r in truth}
    for r in truth:
        assert r["path"] == f"/{r['path'].split('/')[1]}/{r['id']}.jpg"
        assert r["broken"] == (r["url_kind"] in EXPECTED_REASON)
        assert r["expected_reason"] == EXPECTED_REASON.get(r["url_kind"])
        assert (r["caption"] == r["true_caption"]) == (r["caption_noise"] == "none")
        if r["image_noise"] == "near_duplicate":
            src = by_id[r["duplicate_of"]]
            assert src["id"] < r["id"] and src["image_noise"] == "none"
            assert src["url_kind"] in ("ok", "redirect", "flaky")
            assert r["dup_transform"] in ("resize", "reencode", "crop", "flip")
        else:
            assert r["duplicate_of"] is None and r["dup_transform"] is None
            assert 1 <= len(r["objects"]) <= 4
        for o in r["objects"]:
            assert o["kind"] in KINDS and o["colour"] in COLOURS and o["size"] in SIZES
            assert o["position"] in POSITIONS
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


def test_true_captions_name_every_object(truth: list[dict]) -> None:
    for r in truth:
        for o in r["objects"]:
            assert f"{o['colour']} {o['kind']}" in r["true_caption"], (r["true_caption"], o)
    single = [r for r in truth if len(r["objects"]) == 1]
    assert any(r["objects"][0]["size"] in r["true_caption"] for r in single)
    assert any("two " in r["true_caption"] for r in truth)


def test_stored_images_match_truth_sizes(web: Path, truth: list[dict]) -> None:
    for r in truth:
        if r["url_kind"] in STORED_IMAGE_KINDS:
            with Image.open(web / "files" / "img" / f"{r['id']}.jpg") as im:
                assert im.format == "JPEG" and im.size == (r["width"], r["height"])
                im.load()
        elif r["url_kind"] == "truncated":
            data = (web / "files" / "truncated" / f"{r['id']}.jpg").read_bytes()
            assert data[:2] == b"\xff\xd8"
            with pytest.raises(OSError), Image.open(io.BytesIO(data)) as im:
                im.load()
        elif r["url_kind"] == "not_image":
            assert (web / "files" / "notimage" / f"{r['id']}.jpg").read_bytes().startswith(b"<!DOCTYPE html")


def test_noise_fractions_as_configured(truth: list[dict]) -> None:
    mix = NoiseMix()

    def check(column: str, value: str, expected: float) -> None:
        got = sum(r[column] == value for r in truth) / N
        tol = 3 * math.sqrt(expected * (1 - expected) / N) + 0.01
        assert abs(got - expected) <= tol, (column, value, got, expected)

    for name in ("mismatched", "gibberish", "boilerplate"):
        check("caption_noise", name, getattr(mix, name))
    check("image_noise", "near_duplicate", mix.near_duplicate)
    for kind in ("http_404", "slow", "truncated", "not_image", "oversized", "opt_out", "redirect", "flaky"):
        check("url_kind", kind, getattr(mix, kind))


def test_clean_mix_has_no_noise(tmp_path: Path) -> None:
    rows = pq.read_table(build_synthweb(tmp_path, n=50, seed=3, noise=NoiseMix.clean(), **SMALL) / "truth.parquet")
    assert set(rows.column("url_kind").to_pylist()) == {"ok"}
    assert set(rows.column("caption_noise").to_pylist()) == {"none"}
    assert set(rows.column("image_noise").to_pylist()) == {"none"}
    with pytest.raises(ValueError):
        NoiseMix(http_404=0.7, slow=0.5)


def _thumb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)


def test_near_duplicates_look_like_their_source(web: Path, truth: list[dict]) -> None:
    img = web / "files" / "img"
    originals = {
        r["id"]: _thumb(img / f"{r['id']}.jpg")
        for r in truth
        if r["url_kind"] in STORED_IMAGE_KINDS and r["image_noise"] == "none"
    }
    dups = [r for r in truth if r["image_noise"] == "near_duplicate" and r["url_kind"] in STORED_IMAGE_KINDS]
    assert len(dups) >= 8
    for r in dups:
        d = _thumb(img / f"{r['id']}.jpg")

        def dist(v: np.ndarray) -> float:  # flip-invariant mean absolute difference
            return min(float(np.abs(d - v).mean()), float(np.abs(d[:, ::-1] - v).mean()))

        to_source = dist(originals[r["duplicate_of"]])
        others = sorted(dist(v) for k, v in originals.items() if k != r["duplicate_of"])
        assert to_source < others[0], (r["id"], r["dup_transform"], to_source, others[0])
        assert to_source < others[len(others) // 2] / 4


# ---- caching and the URL list -------------------------------------------------------------------


def test_build_is_cached_by_recipe(tmp_path: Path) -> None:
    out = build_synthweb(tmp_path, n=20, seed=5, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    build_synthweb(tmp_path, n=20, seed=5, **SMALL)
    assert time.perf_counter() - t0 < 0.5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    build_synthweb(tmp_path, n=25, seed=5, **SMALL)  # another recipe: rebuilt in place
    assert len(pq.read_table(out / "truth.parquet")) == 25
    assert (out / "truth.parquet").stat().st_mtime_ns != stamps[out / "truth.parquet"]


def test_write_url_list(web: Path, truth: list[dict]) -> None:
    urls = pq.read_table(write_url_list(web, "http://127.0.0.1:9/")).to_pylist()
    assert [u["id"] for u in urls] == [r["id"] for r in truth]
    assert urls[0]["url"] == "http://127.0.0.1:9" + truth[0]["path"]
    assert [u["caption"] for u in urls] == [r["caption"] for r in truth]


# ---- server routes ------------------------------------------------------------------------------


def test_image_route_keep_alive_and_head(server: SynthWebServer, web: Path, truth: list[dict]) -> None:
    row = _first(truth, "ok")
    data = (web / "files" / "img" / f"{row['id']}.jpg").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(2):  # the same connection serves both: keep-alive with correct lengths
        conn.request("GET", row["path"])
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "image/jpeg"
        assert int(resp.getheader("Content-Length")) == len(data) and resp.read() == data
    conn.request("HEAD", row["path"])
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data) and resp.read() == b""
    conn.close()


def test_missing_and_unknown_routes_404(server: SynthWebServer, truth: list[dict]) -> None:
    assert _get(server, _first(truth, "http_404")["path"])[0] == 404
    assert _get(server, "/img/nope.jpg")[0] == 404
    assert _get(server, "/nowhere/x.jpg")[0] == 404
    assert _get(server, "/img/..%2F..%2Ftruth.parquet")[0] == 404
    assert _get(server, "/img/../truth.parquet")[0] == 404


def test_redirect_route(server: SynthWebServer, web: Path, truth: list[dict]) -> None:
    row = _first(truth, "redirect")
    name = f"{row['id']}.jpg"
    status, headers, _ = _get(server, row["path"])
    assert status == 302 and headers["location"] == f"/img/{name}"
    with urllib.request.urlopen(server.base_url + row["path"], timeout=10) as resp:
        assert resp.status == 200 and resp.read() == (web / "files" / "img" / name).read_bytes()


def test_flaky_route_fails_once_then_serves(web: Path, truth: list[dict]) -> None:
    row = _first(truth, "flaky")
    with SynthWebServer(web) as server:  # its own server: "first request" is per server life
        status, headers, _ = _get(server, row["path"])
        assert status == 503 and headers["retry-after"] == "0"
        for _ in range(2):
            status, headers, body = _get(server, row["path"])
            assert status == 200 and body == (web / "files" / "img" / f"{row['id']}.jpg").read_bytes()


def test_slow_route_trickles(server: SynthWebServer, web: Path, truth: list[dict]) -> None:
    row = _first(truth, "slow")
    data = (web / "files" / "img" / f"{row['id']}.jpg").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", row["path"])
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(data)
    t0 = time.perf_counter()
    assert resp.read(2) == data[:2]
    assert time.perf_counter() - t0 >= 0.8  # the second byte comes a second after the first
    conn.close()


def test_truncated_not_image_and_opt_out(server: SynthWebServer, truth: list[dict]) -> None:
    status, headers, body = _get(server, _first(truth, "truncated")["path"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    with pytest.raises(OSError), Image.open(io.BytesIO(body)) as im:
        im.load()

    status, headers, body = _get(server, _first(truth, "not_image")["path"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and body.startswith(b"<!DOCTYPE html")

    row = _first(truth, "opt_out")
    status, headers, body = _get(server, row["path"])
    assert status == 200 and headers["x-robots-tag"] == "noai, noimageai"
    assert Image.open(io.BytesIO(body)).size == (row["width"], row["height"])


def test_oversized_route_streams_12_mib(server: SynthWebServer, truth: list[dict]) -> None:
    status, headers, body = _get(server, _first(truth, "oversized")["path"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert int(headers["content-length"]) == OVERSIZED_BYTES == len(body) == 12 * 1024 * 1024
    assert body[:2] == b"\xff\xd8"
    with pytest.warns(Image.DecompressionBombWarning):  # its header claims 12000 x 12000
        assert Image.open(io.BytesIO(body)).size == OVERSIZED_DIMS


def test_helper_routes(server: SynthWebServer) -> None:
    path = "/loop/0"
    for k in range(1, 6):  # a redirect loop never ends
        status, headers, _ = _get(server, path)
        assert status == 302 and headers["location"] == f"/loop/{k}"
        path = headers["location"]
    with pytest.raises(urllib.error.HTTPError, match="redirect"):
        urllib.request.urlopen(server.base_url + "/loop/0", timeout=10)

    target = "http://example.invalid/a b?x=1"
    status, headers, _ = _get(server, "/redirect-to?url=" + urllib.parse.quote(target, safe=""))
    assert status == 302 and headers["location"] == target

    status, _, body = _get(server, "/status/418")
    assert status == 418 and body
    assert _get(server, "/status/204")[0] == 204


def test_bomb_png(server: SynthWebServer) -> None:
    status, headers, body = _get(server, "/bomb.png")
    assert status == 200 and headers["content-type"] == "image/png"
    assert 50_000 < len(body) < 1_000_000
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and body[12:16] == b"IHDR"
    width, height, depth, colour_type = struct.unpack(">IIBB", body[16:26])
    assert (width, height, depth, colour_type) == (16000, 16000, 8, 0)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))


def test_request_count_and_content_types(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "img" / "b.webp").write_bytes(b"RIFF fake")
    with SynthWebServer(tmp_path) as srv:  # a plain directory of files, no build around it
        assert srv.request_count == 0
        assert _get(srv, "/img/a.png")[1]["content-type"] == "image/png"
        assert _get(srv, "/img/b.webp")[1]["content-type"] == "image/webp"
        threads = [threading.Thread(target=_get, args=(srv, "/status/200")) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.request_count == 22
        assert srv.base_url.startswith("http://127.0.0.1:")


def test_shutdown_does_not_wait_for_slow_clients(web: Path, truth: list[dict]) -> None:
    srv = SynthWebServer(web).start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", _first(truth, "slow")["path"])
    resp = conn.getresponse()
    assert resp.read(1)
    t0 = time.perf_counter()
    srv.close()
    assert time.perf_counter() - t0 < 2.0
    conn.close()


def test_every_url_behaves_as_its_truth_says(server: SynthWebServer, truth: list[dict]) -> None:
    """End to end: what a careful downloader sees for each row agrees with `broken` and the reason."""
    for r in truth:
        if r["url_kind"] in ("slow", "oversized"):
            continue  # covered above; too slow or too big to fetch for every row
        for _ in range(2):  # one retry, for flaky
            seen = None
            try:
                with urllib.request.urlopen(server.base_url + r["path"], timeout=10) as resp:
                    body, robots = resp.read(), resp.headers.get("X-Robots-Tag", "")
                if "noai" in robots:
                    seen = "opt_out"
                elif body.startswith(b"<!DOCTYPE html"):
                    seen = "not_image"
                else:
                    try:
                        with Image.open(io.BytesIO(body)) as im:
                            im.load()
                            assert im.size == (r["width"], r["height"])
                    except OSError:
                        seen = "decode_error"
                break
            except urllib.error.HTTPError as e:
                seen = "http_404" if e.code == 404 else f"http_{e.code}"
                if e.code != 503:
                    break
        assert seen == r["expected_reason"], (r["id"], r["url_kind"], seen)
