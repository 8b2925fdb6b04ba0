"""The status page at ``/`` on both front ends: HTML for browsers, JSON for API clients,
and the page itself driven in headless Chromium (system browser, no download)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from monitoring_utils import save_digits, serve_in_thread
from serving_utils import SAMPLE

from torchship.serving.settings import ServeSettings

FRAMEWORKS = ["fastapi", "flask"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
DIGIT = [[[0.0] * 8] * 8]


@pytest.fixture(scope="module")
def page_store(tmp_path_factory: pytest.TempPathFactory, quick_mlp: torch.nn.Module) -> Path:
    return save_digits(tmp_path_factory.mktemp("page") / "models", quick_mlp, versions=2)


@contextlib.contextmanager
def _serve(framework: str, page_store: Path, **kw: Any) -> Iterator[str]:
    settings = ServeSettings(
        store=page_store,
        models=["digits:1", "digits:2"],
        runtime="eager",
        max_batch_size=8,
        access_log=False,
        **kw,
    )
    if framework == "fastapi":
        from torchship.serving.fastapi_app import create_app

        app: Any = create_app(settings, load_in_background=False)
    else:
        from torchship.serving.flask_app import create_app as create_flask

        app = create_flask(settings, load_in_background=False)
    with serve_in_thread(app, framework) as base:
        yield base


@pytest.fixture(scope="module", params=FRAMEWORKS)
def server(request: pytest.FixtureRequest, page_store: Path) -> Iterator[str]:
    with _serve(request.param, page_store) as base:
        policy = requests.put(
            f"{base}/manage/models/digits/policy",
            json={"kind": "split", "weights": {"1": 0.5, "2": 0.5}, "reason": "A/B"},
            timeout=30,
        )
        assert policy.ok, policy.text
        yield base


def test_browsers_get_the_page_and_api_clients_json(server: str) -> None:
    page = requests.get(
        server, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, timeout=10
    )
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="canvas"' in page.text and "/static/status.js" in page.text
    for accept in (None, "*/*", "application/json", "application/json, text/html"):
        headers = {"Accept": accept} if accept else {}
        r = requests.get(server, headers=headers, timeout=10)
        assert r.headers["content-type"].startswith("application/json"), accept
        assert r.json()["models"] == ["digits"] and r.json()["status"] == "/status"


def test_assets_are_served_and_nothing_else(server: str) -> None:
    js = requests.get(f"{server}/static/status.js", timeout=10)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    css = requests.get(f"{server}/static/status.css", timeout=10)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    for bad in ("/static/status.html", "/static/nope.js", "/static/..%2Fmetrics.py"):
        r = requests.get(f"{server}{bad}", timeout=10)
        assert r.status_code == 404 and r.json()["code"] == "not_found", bad


def test_status_json_lists_versions_policy_and_live_counters(server: str) -> None:
    before = requests.get(f"{server}/status", timeout=10).json()
    for _ in range(4):
        assert requests.post(f"{server}/predict", json={"inputs": DIGIT}, timeout=30).ok
    status = requests.get(f"{server}/status", timeout=10).json()
    assert status["ready"] is True
    (model,) = status["models"]
    assert model["name"] == "digits"
    assert [v["version"] for v in model["versions"]] == ["1", "2"]
    assert model["versions"][0]["input"] == {"kind": "image", "shape": [1, 8, 8]}
    policy = model["traffic"]["policy"]
    assert (policy["kind"], policy["weights"]) == ("split", {"1": 0.5, "2": 0.5})
    assert status["metrics"]["requests"] - before["metrics"]["requests"] == 4
    assert status["time"] > before["time"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "chromium and chromedriver are not installed (Debian: chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # the system browser: nothing is downloaded
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_shows_models_traffic_live_numbers_and_predicts(server: str, browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(selector: str) -> Any:
        """Read in one script: the page re-renders its tables at every poll."""
        return browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)",
            selector,
        )

    wait = WebDriverWait(browser, 15)
    browser.get("about:blank")  # stop the previous test's page from polling its server
    browser.get_log("browser")  # and forget what it logged
    browser.get(f"{server}/?refresh=0.5")
    refs = wait.until(
        lambda d: (
            d.execute_script(
                "return [...document.querySelectorAll('#models tbody tr')].map(r => r.dataset.ref)"
            )
            or None
        )
    )
    assert sorted(refs) == ["digits:1", "digits:2"]
    assert text("#ready") == ["ready"]
    (policy,) = text('#traffic [data-model="digits"]')
    assert "split" in policy and "v1 50%" in policy and "v2 50%" in policy

    # live numbers: traffic sent now shows up as a request rate at the next polls
    for _ in range(10):
        assert requests.post(f"{server}/predict", json={"inputs": DIGIT}, timeout=30).ok
    wait.until(lambda d: text("#rate")[0] not in ("-", "0.00"))
    assert "ms" in text("#p50")[0]
    assert int(text("#total")[0].replace(",", "")) >= 10

    # upload: the held-out sample is a "2"
    browser.find_element(By.ID, "upload").send_keys(str(SAMPLE))
    label = wait.until(lambda d: (text("#result-label") or [None])[0])
    assert label == "2"
    (served,) = text("#result-served")
    assert served.startswith("digits:") and "request" in served

    # draw: a stroke on the canvas is sent as a PNG and gets a prediction back
    browser.find_element(By.ID, "clear").click()
    assert text("#result-label") == []
    canvas = browser.find_element(By.ID, "canvas")
    stroke = ActionChains(browser).move_to_element_with_offset(canvas, 0, -90).click_and_hold()
    for _ in range(3):
        stroke = stroke.move_by_offset(0, 60)
    stroke.release().perform()
    wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "done")
    (drawn,) = text("#result-label")
    assert drawn in {str(i) for i in range(10)}

    # pinning a version in the playground sends it to that version
    browser.find_element(By.CSS_SELECTOR, '#model-select option[value="digits|2"]').click()
    browser.find_element(By.ID, "predict").click()
    wait.until(lambda d: (text("#result-served") or [""])[0].startswith("digits:2 "))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


# --- API docs ------------------------------------------------------------------------------

PAGE_KEY = "tsk_status_page_0123456789abcdef"


def test_docs_pages_load_nothing_from_other_hosts(server: str) -> None:
    """/docs and /redoc name only this server's assets (FastAPI's own pages load theirs
    from a CDN: blank on a machine without internet)."""
    for path, library in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        page = requests.get(f"{server}{path}", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f'src="/static/{library}"' in page.text
        assert "http://" not in page.text and "https://" not in page.text, path
        asset = requests.get(f"{server}/static/{library}", timeout=10)
        assert asset.status_code == 200 and "javascript" in asset.headers["content-type"]
        assert "max-age" in asset.headers["cache-control"]


def test_both_front_ends_describe_the_same_api(server: str) -> None:
    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.") and spec["info"]["title"] == "torchship"
    for path in ("/predict", "/v2/models/{name}/infer", "/predictions/{name}", "/status"):
        assert path in spec["paths"], path
    assert not any(p.startswith(("/docs", "/redoc", "/static")) for p in spec["paths"])


def _wait_docs(browser: Any, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get("about:blank")
    browser.get_log("browser")
    browser.get(url)
    WebDriverWait(browser, 20).until(
        lambda d: d.find_element("id", "docs").get_attribute("data-state") is not None
    )


def test_docs_render_offline_in_a_browser(server: str, browser: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    _wait_docs(browser, f"{server}/docs")
    assert browser.find_element("id", "docs").get_attribute("data-state") == "loaded"
    paths = WebDriverWait(browser, 10).until(
        lambda d: (
            d.execute_script(
                "return [...document.querySelectorAll('.opblock-summary-path')]"
                ".map(e => e.textContent.replace(/\\u200b/g, ''))"
            )
            or None
        )
    )
    assert "/predict" in paths and "/v2/models/{name}/infer" in paths
    _wait_docs(browser, f"{server}/redoc")
    assert browser.find_element("id", "docs").get_attribute("data-state") == "loaded"
    assert "/predict" in browser.find_element("id", "docs").text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


@pytest.fixture(scope="module", params=FRAMEWORKS)
def auth_server(request: pytest.FixtureRequest, page_store: Path) -> Iterator[str]:
    with _serve(request.param, page_store, api_keys=[f"page:inference:{PAGE_KEY}"]) as base:
        yield base


def _enter_key(browser: Any, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    form = WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "key-form"))
    assert "API key" in form.text
    form.find_element(By.ID, "key-input").send_keys(key)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def test_pages_ask_for_the_key_when_auth_is_on(auth_server: str, browser: Any) -> None:
    """With auth on, the status page and the docs ask for a key once (per tab), then
    show their data and send the key on every call, "Try it out" included."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get("about:blank")
    browser.get(f"{auth_server}/?refresh=0.5")
    wait.until(lambda d: d.find_element(By.ID, "ready").text == "API key needed")
    _enter_key(browser, "tsk_wrong_key_0123456789abcdef")  # refused: asked again
    wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
    assert "not valid" in browser.find_element(By.ID, "key-message").text
    _enter_key(browser, PAGE_KEY)
    wait.until(lambda d: d.find_element(By.ID, "ready").text == "ready")
    browser.find_element(By.ID, "upload").send_keys(str(SAMPLE))
    wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "done")
    assert browser.find_element(By.ID, "result-label").text == "2"

    # the docs in the same tab reuse the key: the spec loads, and Try it out sends it
    _wait_docs(browser, f"{auth_server}/docs")
    assert browser.find_element(By.ID, "docs").get_attribute("data-state") == "loaded"
    status_op = wait.until(lambda d: d.find_element(By.ID, "operations-status-status_status_get"))
    status_op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: status_op.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    wait.until(lambda d: status_op.find_element(By.CSS_SELECTOR, ".execute")).click()
    live = ".live-responses-table tr.response .response-col_status"
    code = wait.until(lambda d: status_op.find_element(By.CSS_SELECTOR, live))
    assert code.text.strip().startswith("200")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("401" in e["message"] for e in errors), errors  # only the refused key
