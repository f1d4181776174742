"""Drive the demo page as a person would: the demo's own command on a free localhost port, and headless
Chromium (Debian's `chromium` + `chromium-driver`) through selenium. Nothing here reaches the network."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots for people to look at; gitignored
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps trying to reach Google's services from a machine with no network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--window-size=1280,860",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def demo_server(*args: str, timeout: float = 180.0) -> Iterator[str]:
    """Run `python -m smollm_ref.demo --port <free> *args`; yield its URL once the page answers."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / "demo-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smollm_ref.demo", "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the demo exited with {proc.returncode} before serving:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the demo did not serve {url} within {timeout:.0f} s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Page:
    """The demo page in a browser, addressed by the elem_ids demo.py gives its components."""

    def __init__(self, driver):
        self.driver = driver

    def open(self, url: str) -> Page:
        self.driver.get(url)
        self.wait_for(lambda: self._find("#model-info").text.strip(), "the page to render")
        return self

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        return self._find(f"#{elem_id}").text

    def texts(self, css: str) -> list[str]:
        from selenium.webdriver.common.by import By

        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css)]

    def value(self, elem_id: str) -> str:
        return self._find(f"#{elem_id} textarea").get_attribute("value")

    def click(self, elem_id: str) -> None:
        self._find(f"#{elem_id}").click()

    def click_tab(self, label: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{label}']").click()

    def type(self, elem_id: str, text: str, enter: bool = False) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self._find(f"#{elem_id} textarea")
        box.clear()
        box.send_keys(text, *([Keys.ENTER] if enter else []))

    def set_number(self, elem_id: str, value: float) -> None:
        """Type into a slider's number box, as a person would for an exact value."""
        from selenium.webdriver.common.keys import Keys

        box = self._find(f"#{elem_id} input[type=number]")
        box.clear()
        box.send_keys(str(value), Keys.TAB)
        self.wait_for(
            lambda: float(self._find(f"#{elem_id} input[type=range]").get_attribute("value")) == value, f"{elem_id} = {value}"
        )

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 120.0):
        """Poll `condition` until it is truthy; an element not rendered yet (or re-rendered) counts as false."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        def check():
            try:
                return condition()
            except (NoSuchElementException, StaleElementReferenceException):
                return None

        deadline = time.monotonic() + timeout
        while not (result := check()):
            if time.monotonic() > deadline:
                self.screenshot("demo-failure.png")
                raise AssertionError(f"waited {timeout:.0f} s for {what}; screenshot in {ARTIFACTS}")
            time.sleep(0.05)
        return result

    def collect_while(self, read: Callable[[], str], until: Callable[[str], bool], timeout: float = 120.0) -> list[str]:
        """Every value `read` returns, polled quickly, until one satisfies `until`."""
        seen = [read()]
        self.wait_for(lambda: seen.append(read()) or until(seen[-1]), "the streamed text", timeout)
        return seen

    def settled(self, read: Callable[[], str], quiet: float = 2.0, timeout: float = 120.0) -> str:
        """`read()` once it has not changed for `quiet` seconds."""
        last, since = read(), time.monotonic()

        def still() -> bool:
            nonlocal last, since
            now = read()
            if now != last:
                last, since = now, time.monotonic()
            return time.monotonic() - since >= quiet

        self.wait_for(still, "the text to stop changing", timeout)
        return last

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.driver.save_screenshot(str(path))
        return path


@contextlib.contextmanager
def chromium(profile_dir: Path) -> Iterator[Page]:
    """A headless Chromium page with a new empty profile; skips the test where Chromium is not installed."""
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver_path):
        pytest.skip("Chromium is not installed (apt-get install -y chromium chromium-driver; .ci/run does this)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield Page(driver)
    finally:
        driver.quit()
