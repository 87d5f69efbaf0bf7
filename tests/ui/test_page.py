"""The web page in a real browser (chromium + Playwright) against a real stack (issue 18's list).

Each test drives the page as a person would (select, click, type) and checks what is drawn
against the API's own answer for the same job.
"""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from service.routes.ui import STATIC
from tests.ui.conftest import open_page
from tests.ui.stack import KEY, XSS_LABEL, XSS_MODEL

JOB_TIMEOUT_MS = 180_000


def choose(page, model: str, kind: str, sample: str | None = "#sample-digit") -> None:
    page.select_option("#model", model)
    page.select_option("#kind", kind)
    if sample:
        page.click(sample)
        page.wait_for_selector(".top5 li")


def run(page) -> str:
    """Clicks Run and waits for the result to be drawn; returns the job id."""
    page.click("#submit")
    page.wait_for_selector("#result[data-job]", timeout=JOB_TIMEOUT_MS)
    return page.get_attribute("#result", "data-job")


def loaded(img) -> int:
    """naturalWidth of a decoded image (0 while it is not)."""
    return img.evaluate("i => i.complete ? i.naturalWidth : 0")


def test_saliency_on_chelsea_shows_maps_and_the_slider_sets_the_opacity(page, stack):
    choose(page, "efficientnet-lite0", "saliency", "#sample-cat")
    assert "cat" in page.locator(".top5 li .label").first.inner_text()  # tabby / tiger cat / Egyptian cat
    job = run(page)
    view = httpx.get(f"{stack.url}/v1/jobs/{job}").json()
    assert view["status"] == "finished"
    for alt in ("input at model size", "heatmap", "heatmap over the input"):
        img = page.locator(f".side figure img[alt='{alt}']")
        assert img.get_attribute("src").startswith("blob:")
        assert loaded(img) == 224
    layer = page.locator(".stack img.layer")
    assert loaded(layer) == 224 and loaded(page.locator(".stack img.base")) == 224
    slider = page.locator("#opacity-0")
    slider.fill("20")
    assert float(layer.evaluate("e => getComputedStyle(e).opacity")) == pytest.approx(0.2)
    slider.fill("85")
    assert float(layer.evaluate("e => getComputedStyle(e).opacity")) == pytest.approx(0.85)


def test_u_analysis_shows_the_curve_and_every_triple(page, stack):
    choose(page, "digits-cnn", "u_analysis")
    page.select_option('[data-field="order"] select', "decreasing")
    page.select_option('[data-field="noise"] select', "gaussian")  # 6 U-triples on this digit
    job = run(page)
    images = httpx.get(f"{stack.url}/v1/jobs/{job}").json()["result"]["images"]
    assert loaded(page.locator('figure[data-artifact="0-curve.png"] img')) > 0
    triples = images[0]["triples"]
    assert triples, "the digit and params were chosen to have U-triples"
    rows = page.locator('[data-table="triples"] tbody tr')
    expect(rows).to_have_count(len(triples))
    shown = [[int(c) for c in rows.nth(i).locator("td").all_inner_texts()[:3]] for i in range(len(triples))]
    assert shown == [[t["left"], t["middle"], t["right"]] for t in triples]
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    page.click("details.json summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_compare_of_two_methods_has_a_two_row_table_even_without_the_event_stream(page, stack):
    # The events stream refused: the page must fall back to polling GET /v1/jobs/{id}.
    page.route("**/events", lambda route: route.abort())
    choose(page, "digits-cnn", "compare")
    rows = page.locator('[data-field="methods"] > ol.rows > li')
    assert rows.count() == 8  # the paper's eight, the default
    while rows.count() > 1:
        rows.last.locator(":scope > button.remove").click()
    page.select_option('[data-field="methods.0.method"] select', "saliency")
    page.click('[data-field="methods"] > button.add')
    page.select_option('[data-field="methods.1.method"] select', "occlusion")
    page.fill('[data-field="methods.1.window"] input', "3")
    for name in ("sensitivity_max", "infidelity"):
        page.uncheck(f'[data-field="{name}"] > .field input[type=checkbox]')
    job = run(page)
    table = page.locator('[data-table="compare.csv"]')
    expect(table.locator("tbody tr")).to_have_count(2)
    assert "saliency" in table.locator("tbody tr").nth(0).inner_text()
    assert "occlusion" in table.locator("tbody tr").nth(1).inner_text()
    sent = httpx.get(f"{stack.url}/v1/jobs/{job}").json()["params"]
    assert [m["method"] for m in sent["methods"]] == ["saliency", "occlusion"] and sent["sensitivity_max"] is None
    polls = [r for r in page.seen.requests if r.method == "GET" and r.url.endswith(f"/v1/jobs/{job}")]
    assert polls, "the job was followed by polling"


def test_raw_json_error_lands_on_its_field_and_creates_no_job(page, stack):
    choose(page, "digits-cnn", "attribution")
    page.check("#raw-toggle")
    page.fill("#raw", '{"method": "integrated_gradients", "n_steps": -1}')
    with page.expect_response(lambda r: r.url.endswith("/v1/jobs/attribution")) as answer:
        page.click("#submit")
    assert answer.value.status == 422
    message = answer.value.json()["error"]["details"][0]["msg"]
    error = page.locator('[data-field="n_steps"] .field-error')
    expect(error).to_be_visible()
    expect(error).to_have_text(message)
    assert page.locator('[data-field="n_steps"] input').input_value() == "-1"
    assert page.locator("#history li").count() == 0 and page.get_attribute("#result", "data-job") is None
    # Now in the form: the same value is flagged before anything is sent.
    posts = sum(r.method == "POST" for r in page.seen.requests)
    page.click("#submit")
    expect(error).to_have_text("must be ≥ 1")
    assert sum(r.method == "POST" for r in page.seen.requests) == posts


@pytest.mark.parametrize(
    ("name", "mime", "data", "status"),
    [
        ("notes.txt", "text/plain", b"a text file, not an image\n" * 4, 415),
        ("broken.png", "image/png", (STATIC / "samples" / "digit.png").read_bytes()[:60], 400),  # truncated
        ("huge.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20), 413),
    ],
    ids=["text-415", "corrupt-400", "too-big-413"],
)
def test_a_bad_image_shows_the_apis_message_at_the_image_field(page, stack, name, mime, data, status):
    choose(page, "digits-cnn", "saliency", sample=None)
    expected = httpx.post(
        f"{stack.url}/v1/models/digits-cnn/predict", files={"image": (name, data, mime)}, timeout=60
    )
    assert expected.status_code == status
    message = expected.json()["error"]["message"]
    page.set_input_files("#image-file", files=[{"name": name, "mimeType": mime, "buffer": data}])
    expect(page.locator("#image-error")).to_have_text(message)  # from the top-5 request
    with page.expect_response(lambda r: r.url.endswith("/v1/jobs/saliency")) as answer:
        page.click("#submit")
    assert answer.value.status == status
    expect(page.locator("#image-error")).to_have_text(answer.value.json()["error"]["message"])
    assert page.get_attribute("#result", "data-job") is None


def test_a_u_sweep_canceled_from_the_page_ends_canceled(page, stack):
    choose(page, "digits-cnn", "u_sweep", sample=None)
    page.click("#submit")
    page.wait_for_selector("#cancel:not([hidden])")
    job = page.get_attribute("#job-head a", "href").split("=", 1)[1]
    page.click("#cancel")
    page.wait_for_selector('#job-head .job[data-status="canceled"]', timeout=JOB_TIMEOUT_MS)
    assert httpx.get(f"{stack.url}/v1/jobs/{job}").json()["status"] == "canceled"
    expect(page.locator("#result")).to_contain_text("canceled")
    expect(page.locator("#cancel")).to_be_hidden()


def test_with_keys_the_page_asks_for_one_then_sends_it_on_every_call_never_in_a_url(browser, stack):
    page, seen = open_page(browser, stack.keyed_url, ready=False)
    try:
        expect(page.locator("#key-error")).to_contain_text("API key")
        seen.requests.clear()
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("body[data-ready]")
        choose(page, "digits-cnn", "saliency")
        job = run(page)
        assert loaded(page.locator(".side figure img[alt='heatmap']")) == 224
        page.click("details.downloads summary")
        with page.expect_download() as download:
            page.click("details.downloads a[download='0-heatmap.png']")
        assert download.value.suggested_filename == "0-heatmap.png"
        page.reload()  # the key stays in the browser: the deep link reopens the result
        page.wait_for_selector(f"#result[data-job='{job}']", timeout=JOB_TIMEOUT_MS)
        api = [r for r in seen.requests if "/v1/" in r.url]
        assert {r.url.split("/v1/")[1].split("/")[0] for r in api} >= {"models", "methods", "jobs"}
        for r in seen.requests:
            assert KEY not in r.url
        for r in api:
            assert r.all_headers().get("authorization") == f"Bearer {KEY}", r.url
        assert not seen.errors
    finally:
        page.context.close()


def test_a_deep_link_reopens_a_finished_job_after_reload(page, stack):
    choose(page, "digits-cnn", "saliency")
    job = run(page)
    assert page.url.endswith(f"#job={job}")
    page.reload()
    page.wait_for_selector(f"#result[data-job='{job}']", timeout=JOB_TIMEOUT_MS)
    assert loaded(page.locator(".side figure img[alt='heatmap over the input']")) == 224
    expect(page.locator(f"#history li[data-job='{job}']")).to_contain_text("finished")
    page.goto(f"{stack.url}/#job=no-such-job")
    expect(page.locator("#job-head")).to_have_text("Job no-such-job: not found or expired.")


def test_a_label_that_is_html_shows_as_text(page, stack):
    choose(page, XSS_MODEL, "saliency")  # the digit is a 7: the HTML label is the top class
    expect(page.locator(".top5 li .label").first).to_have_text(XSS_LABEL)
    page.fill('[data-field="target"] input', "7")
    expect(page.locator('[data-field="target"] output')).to_have_text(f"class index 7: {XSS_LABEL}")
    run(page)
    expect(page.locator(".image-result h4").first).to_contain_text(XSS_LABEL)
    assert page.locator("img[src='x']").count() == 0
    assert page.seen.dialogs == []
