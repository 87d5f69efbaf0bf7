"""The client's pure parts, without a server: SSE parsing, retry delays, progress reports,
image encoding, artifact file names."""

from __future__ import annotations

import io
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image
from tqdm import tqdm

from model_inspector import _core, errors
from model_inspector.inputs import array_image, as_image_list, file_parts
from schemas.jobs import Progress


def test_sse_parser_follows_the_event_stream_rules():
    stream = ": ping\r\n\nevent: progress\ndata: {\"a\":\ndata: 1}\n\ndata:plain\n\nevent: end\ndata: {}\n\n"
    parser = _core.SSEParser()
    events = [e for line in stream.splitlines(keepends=True) if (e := parser.feed(line))]
    assert events == [("progress", '{"a":\n1}'), ("message", "plain"), ("end", "{}")]


def test_retry_delay_honours_retry_after_and_backs_off_otherwise():
    policy = _core.RetryPolicy(retries=3, backoff=0.5, max_wait=30)
    limited = httpx.Response(429, headers={"Retry-After": "7"})
    assert policy.delay(0, limited) == 7
    assert policy.delay(3, limited) is None  # out of retries
    assert policy.delay(0, httpx.Response(503, headers={"Retry-After": "120"})) is None  # longer than max_wait
    dated = httpx.Response(
        503, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:09 GMT", "Date": "Wed, 21 Oct 2026 07:28:00 GMT"}
    )
    assert policy.delay(0, dated) == 9
    assert policy.delay(0, httpx.Response(422)) is None  # not retried
    backoffs = [policy.delay(a, httpx.Response(503)) for a in range(3)]
    assert all(0.25 * 2**a <= d <= 0.5 * 2**a for a, d in enumerate(backoffs))
    assert 0.25 <= policy.delay(0, None) <= 0.5  # a failed connection


def test_error_answers_map_by_type_then_by_status():
    def answer(status, type_, **headers):
        body = {"error": {"type": type_, "message": "m", "details": {"f": 1}}}
        return httpx.Response(status, json=body, headers=headers)

    e = errors.from_response(answer(429, "quota_exceeded", **{"Retry-After": "5"}))
    assert type(e) is errors.QuotaExceeded and isinstance(e, errors.RateLimited) and e.retry_after == 5
    assert type(errors.from_response(answer(404, "some_future_thing"))) is errors.NotFound
    assert type(errors.from_response(answer(409, "dataset_in_use"))) is errors.DatasetInUse
    proxy = errors.from_response(httpx.Response(502, text="<html>Bad Gateway</html>"))
    assert type(proxy) is errors.ServerError and proxy.status == 502 and "Bad Gateway" in proxy.message


def test_reporter_drives_a_tqdm_bar_and_calls_callbacks_on_changes_only():
    bar = tqdm(total=1, file=io.StringIO())
    report = _core.Reporter(bar)
    report("j", "started", Progress(done=3, total=12, stage="images"))
    assert (bar.n, bar.total) == (3, 12) and "started: images" in bar.desc
    seen = []
    report = _core.Reporter(seen.append)
    for done in (0, 0, 1, 1, 2):
        report("j", "started", Progress(done=done, total=2, stage="images"))
    assert [u.done for u in seen] == [0, 1, 2]

    class QuietBar(tqdm):  # a tqdm class (as tqdm.notebook.tqdm): the reporter makes and closes its bar
        def __init__(self, **kw):
            super().__init__(file=io.StringIO(), **kw)

    report = _core.Reporter(QuietBar)
    report("j", "finished", Progress(done=5, total=5, stage="done"))
    assert isinstance(report.target, QuietBar) and report.target.n == 5
    report.close()
    assert report.target.disable  # closed


@pytest.mark.parametrize(
    "arr",
    [
        np.full((4, 5), 200, np.uint8),
        np.full((4, 5), 200 / 255, np.float64),
        np.full((1, 4, 5), 200, np.uint8),
        np.full((4, 5, 1), 200, np.uint8),
    ],
)
def test_grey_arrays_of_every_layout_become_the_same_image(arr):
    img = array_image(arr)
    assert img.mode == "L" and img.size == (5, 4) and np.asarray(img).tolist() == [[200] * 5] * 4


def test_array_checks_and_batches():
    assert array_image(np.zeros((3, 4, 5), np.uint8)).mode == "RGB"  # (C, H, W)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        array_image(np.full((4, 4), 2.0))
    with pytest.raises(ValueError):
        array_image(np.zeros((2, 5, 5), np.uint8))  # neither (H, W, C) nor (C, H, W)
    assert len(as_image_list(np.zeros((3, 4, 4, 3), np.uint8))) == 3
    assert len(as_image_list(Image.new("RGB", (2, 2)))) == 1
    with pytest.raises(TypeError):
        _core.predict([1.5], "m", 1)


def test_extra_files_from_bytes_paths_folders_and_arrays(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_bytes(b"png bytes")
    (tmp_path / "map.npy").write_bytes(b"npy bytes")
    parts = dict(file_parts({"training_set": tmp_path / "train", "attribution": str(tmp_path / "map.npy")}))
    with zipfile.ZipFile(io.BytesIO(parts["training_set"][1])) as zf:
        assert zf.namelist() == ["cat/a.png"] and zf.read("cat/a.png") == b"png bytes"
    assert parts["attribution"][1] == b"npy bytes"
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    sent = dict(file_parts({"attribution": arr}))["attribution"][1]
    assert np.array_equal(np.load(io.BytesIO(sent), allow_pickle=False), arr)


def test_artifact_names_never_leave_the_download_folder():
    assert _core.local_name("0-heatmap.png") == "0-heatmap.png"
    for bad in ("../x", "a/b.png", "..", "", "a\\b"):
        with pytest.raises(errors.InspectorError):
            _core.local_name(bad)
