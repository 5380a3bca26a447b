"""The deliberation viewer (/ui/) in a headless Chromium: the helpers the browser test uses, and the
screenshot in docs/.

    python -m scripts.viewer --out docs/viewer.png        # serves models/default on a free port

Chromium and its driver are Debian's (`apt-get install chromium chromium-driver`), driven through
Selenium; nothing is downloaded. The page is driven as a person would: type a prompt, set the fields,
press Run, wait for the runs to finish, click a marked token.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx


REPO = Path(__file__).resolve().parent.parent
# The screenshot: the bundled model answers this sum wrong greedily (9113); synchronous plans valued by
# the arithmetic checker correct it (10113). Its own value heads are not trusted to rank candidates
# (value_heads.json), so without a checker every plan keeps the model's token.
SCREENSHOT_PROMPT = "4817+5296="
SCREENSHOT_FIELDS = {"max_tokens": 16, "temperature": 0, "synchronous": True, "verifier": "arithmetic"}
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-extensions", "--hide-scrollbars")


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) when both are installed, else None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def headless_chromium(width: int = 1440, height: int = 900, scheme: str | None = None) -> Iterator:
    """A Selenium WebDriver on the system's Chromium (scheme: "light"/"dark" forces the colour scheme)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    # the page's console and its network requests (with their headers), for the test
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    if scheme is not None:
        options.add_argument(f"--blink-settings=preferredColorScheme={0 if scheme == 'dark' else 1}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def crsm_serve(model_dir: Path, *flags: str, timeout_s: float = 120) -> Iterator[str]:
    """`crsm serve` in a subprocess on a free port of 127.0.0.1 until the model is loaded; yields its URL.
    Its output goes to a file (a pipe nobody reads would fill up and block it) shown if it fails to start."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "CRSM_TORCH_THREADS": os.environ.get("CRSM_TORCH_THREADS", "1")}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "crsm", "--log-level", "WARNING", "serve",
                                 "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"crsm serve did not get ready (exit status {proc.poll()}):\n{log.read()}")
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def fill(driver, fields: dict[str, object], timeout_s: float = 20) -> None:
    """Sets the settings form's fields by name: numbers and text typed, checkboxes clicked, a choice (the
    deliberation knobs' on/off/server's) selected. Waits for each field: the knobs come from the server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    for name, value in fields.items():
        element = WebDriverWait(driver, timeout_s).until(
            lambda d: d.find_element(By.CSS_SELECTOR, f"#settings [name='{name}']"))
        if element.tag_name == "select":
            Select(element).select_by_value(json.dumps(value) if isinstance(value, bool) else str(value))
        elif isinstance(value, bool):
            if element.is_selected() != value:
                driver.execute_script("arguments[0].click()", element)
        elif element.get_attribute("type") == "range":
            driver.execute_script("arguments[0].value = arguments[1];"
                                  "arguments[0].dispatchEvent(new Event('input'))", element, str(value))
        else:
            element.clear()
            element.send_keys(str(value))


def run_prompt(driver, prompt: str, *, compare: bool = False, timeout_s: float = 60) -> None:
    """Types the prompt, sets compare mode, presses Run and waits until the page reports the run finished."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    toggle = driver.find_element(By.ID, "compare")
    if toggle.is_selected() != compare:
        toggle.click()
    runs = int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-runs") or 0)
    driver.find_element(By.ID, "run-button").click()
    WebDriverWait(driver, timeout_s).until(
        lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-runs") or 0) > runs)


def full_page(driver, width: int) -> None:
    """Grows the window until the whole page fits in it."""
    for _ in range(4):
        height = driver.execute_script("return document.documentElement.scrollHeight")
        if driver.execute_script("return window.innerHeight") >= height:
            return
        driver.set_window_size(width, height + 200)


def screenshot(model_dir: Path, out: Path, prompt: str, fields: dict[str, object], scheme: str) -> None:
    from selenium.webdriver.common.by import By

    with crsm_serve(model_dir) as url, headless_chromium(1440, 1000, scheme) as driver:
        driver.get(url + "/ui/")
        fill(driver, fields)
        run_prompt(driver, prompt, compare=True, timeout_s=300)
        for kind in ("[data-effect='suggested']", "[data-effect='blended']", ""):   # the most telling plan
            marked = driver.find_elements(By.CSS_SELECTOR, f"#run-main .tok.marked{kind}")
            if marked:
                marked[0].click()
                break
        time.sleep(2.5)  # one more status poll, so the sparklines show this run
        full_page(driver, 1440)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "viewer.png")
    parser.add_argument("--prompt", default=SCREENSHOT_PROMPT)
    parser.add_argument("--fields", default=json.dumps(SCREENSHOT_FIELDS), help="the settings form's fields, JSON")
    parser.add_argument("--scheme", choices=("light", "dark"), default="light")
    args = parser.parse_args()
    screenshot(args.model, args.out, args.prompt, json.loads(args.fields), args.scheme)


if __name__ == "__main__":
    main()
