"""A real headless Chromium (Debian's chromium + chromium-driver) driven by selenium, offline:
no browser download, no selenium-manager lookup. Every page it loads is kept for the tests'
byte scans."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(DRIVER).exists()


class Browser:
    """One headless Chromium with its own profile."""

    def __init__(self, base_url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url = base_url.rstrip("/")
        self.profile = Path(tempfile.mkdtemp(prefix="synthnode-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
                    "--window-size=1280,900", f"--user-data-dir={self.profile}"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        self.driver.set_page_load_timeout(30)
        self.pages: dict[str, str] = {}
        """Every page seen: URL -> its HTML as the browser has it."""

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def get(self, path: str) -> str:
        self.driver.get(self.base_url + path)
        return self.keep()

    def keep(self) -> str:
        """The current page's HTML, kept for the byte scan."""
        html = str(self.driver.page_source)
        self.pages[f"{self.driver.current_url} #{len(self.pages)}"] = html
        return html

    def by_id(self, element_id: str):  # noqa: ANN201 - a selenium WebElement
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def submit(self, element_id: str, timeout_s: float = 30.0) -> str:
        """Click ``element_id`` (a form's button) and wait until the page it leads to has
        replaced this one (a click returns before the navigation); that page's HTML."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        button = self.by_id(element_id)
        html = self.driver.find_element("tag name", "html")
        button.click()
        WebDriverWait(self.driver, timeout_s).until(expected_conditions.staleness_of(html))
        WebDriverWait(self.driver, timeout_s).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        return self.keep()

    def has_id(self, element_id: str) -> bool:
        from selenium.webdriver.common.by import By

        return bool(self.driver.find_elements(By.ID, element_id))

    def css(self, selector: str) -> list:  # type: ignore[type-arg]
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def wait_for(self, path: str, ready: Callable[[str], bool], timeout_s: float,
                 what: str) -> str:
        """Reload ``path`` until ``ready(html)`` (bounded by ``timeout_s``); its HTML."""
        deadline = time.monotonic() + timeout_s
        while True:
            html = self.get(path)
            if ready(html):
                return html
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen on {path} within {timeout_s} s")
            time.sleep(0.5)

    def cookie(self, name: str) -> str | None:
        found = self.driver.get_cookie(name)
        return None if found is None else str(found["value"])

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
