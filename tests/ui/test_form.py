"""The form built from each kind's params_schema: labelled, phone-sized, and what it sends is
what the kind's own params model accepts; images by drop and paste."""

from __future__ import annotations

import json

from playwright.sync_api import expect
from pydantic import ValidationError

from schemas.attribution import METHODS
from schemas.kinds import KINDS

UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button')]
  .filter(e => !e.closest('[hidden]') && e.type !== 'hidden')
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
  .filter(e => !(e.tagName === 'BUTTON' && e.textContent.trim()))
  .map(e => e.id || e.outerHTML.slice(0, 80))"""


def raw_params(page) -> dict:
    page.check("#raw-toggle")
    params = json.loads(page.input_value("#raw"))
    page.uncheck("#raw-toggle")
    return params


def accepted_or_asks(page, kind: str, params: dict) -> None:
    """The form's untouched params are valid for the kind, but for required fields with no
    default, which the page flags on Run (and sends nothing)."""
    model = KINDS[kind].params
    try:
        model.model_validate(params)
        return
    except ValidationError as e:
        errors = e.errors()
    missing = {err["loc"][0] for err in errors if err["type"] == "missing" and len(err["loc"]) == 1}
    assert len(missing) == len(errors) and missing <= set(model.model_json_schema().get("required", [])), errors
    posts = sum(r.method == "POST" for r in page.seen.requests)
    page.click("#submit")
    for name in missing:
        expect(page.locator(f'[data-field="{name}"] > .field-error')).to_have_text("required")
    assert sum(r.method == "POST" for r in page.seen.requests) == posts


def test_every_kinds_form_is_labelled_fits_a_phone_and_sends_valid_params(browser, stack):
    from tests.ui.conftest import open_page

    page, seen = open_page(browser, stack.url, width=390)
    page.seen = seen
    try:
        page.select_option("#kind", "saliency")
        reached = []
        for _ in range(40):  # the keyboard alone reaches every control, in reading order
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        order = ["api-key", "model", "image-file", "sample-cat", "sample-digit", "kind", "raw-toggle", "submit"]
        assert [r for r in reached if r in order][: len(order)] == order
        kinds = page.eval_on_selector_all("#kind option", "os => os.map(o => o.value)")
        assert set(kinds) == set(KINDS)
        for kind in kinds:
            page.select_option("#kind", kind)
            assert page.evaluate(UNLABELLED) == [], kind
            assert page.evaluate("document.documentElement.scrollWidth") <= 390, kind
            accepted_or_asks(page, kind, raw_params(page))
        page.select_option("#kind", "attribution")
        for method in METHODS:
            page.select_option('[data-field="method"] select', method)
            assert raw_params(page)["method"] == method
            KINDS["attribution"].params.model_validate(raw_params(page))
        # raw JSON -> fields -> raw JSON keeps every value, nested ones included
        sent = {
            "method": "integrated_gradients",
            "n_steps": 7,
            "sensitivity_max": {"n_perturb_samples": 3},
            "target": 4,
        }
        page.check("#raw-toggle")
        page.fill("#raw", json.dumps(sent))
        page.uncheck("#raw-toggle")
        assert page.input_value('[data-field="n_steps"] input') == "7"
        assert page.input_value('[data-field="sensitivity_max.n_perturb_samples"] input') == "3"
        assert raw_params(page) == sent
        assert not seen.errors
    finally:
        page.context.close()


def test_an_image_can_be_dropped_or_pasted(page):
    page.select_option("#model", "digits-cnn")
    for event, name in (("drop", "dropped.png"), ("paste", "pasted.png")):
        page.evaluate(
            """async ([event, name]) => {
              const blob = await (await fetch('/ui/samples/digit.png')).blob();
              const dt = new DataTransfer();
              dt.items.add(new File([blob], name, { type: 'image/png' }));
              const e = event === 'drop'
                ? new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true })
                : new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true });
              (event === 'drop' ? document.getElementById('drop') : document.body).dispatchEvent(e);
            }""",
            [event, name],
        )
        expect(page.locator("#preview-name")).to_contain_text(name)
        expect(page.locator(".top5 li .label").first).to_have_text("7")


def test_an_extra_upload_goes_with_the_job(page, stack):
    import io

    import httpx
    import numpy as np

    page.select_option("#model", "digits-cnn")
    page.select_option("#kind", "u_analysis")
    page.click("#sample-digit")
    page.wait_for_selector(".top5 li")
    buf = io.BytesIO()
    np.save(buf, np.arange(64, dtype=np.float32).reshape(8, 8))
    page.set_input_files(
        "#upload-attribution",
        files=[{"name": "map.npy", "mimeType": "application/octet-stream", "buffer": buf.getvalue()}],
    )
    page.click("#submit")
    page.wait_for_selector("#result[data-job]", timeout=120_000)
    view = httpx.get(f"{stack.url}/v1/jobs/{page.get_attribute('#result', 'data-job')}").json()
    assert view["result"]["attribution"] == "uploaded"
    assert view["result"]["images"][0]["region_importance"] == [float(v) for v in range(64)]
