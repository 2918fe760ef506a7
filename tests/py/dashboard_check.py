"""Drives the weft dashboard in headless Chromium (Debian's chromium + chromium-driver) with
Selenium, as a user would look at it on a laptop screen:

    python dashboard_check.py URL SCREENSHOT_DIR

Fails (exit 1, with the reason) unless: the frontend → backend edge shows in the service graph
with mTLS, its numbers change without a reload, the tables fill, a live tap shows requests,
nothing overflows a 1366x768 window, and the browser logged no error.
"""
import json
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


def main():
    url, shots = sys.argv[1], sys.argv[2]
    os.makedirs(shots, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1366,768"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    report = {}
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)
        # The graph is redrawn every 2 s: the edge is read in one script call each time, never
        # held across a redraw.
        def edge(d):
            return d.execute_script(
                "const e = document.getElementById('edge-frontend-backend');"
                "return e ? [e.textContent, e.getAttribute('data-mtls')] : null")

        first, mtls = wait.until(edge)
        report["edge_first"] = first
        assert mtls == "true", f"the edge is not shown as mTLS: {first!r}"
        driver.save_screenshot(os.path.join(shots, "1-graph.png"))
        # Numbers change without a reload (the page never navigates again).
        start = time.time()
        wait.until(lambda d: (edge(d) or [first])[0] != first)
        report["edge_later"] = edge(driver)[0]
        report["changed_after_s"] = round(time.time() - start, 1)

        def rows(table):
            # Tables are rebuilt on each refresh: their rows' texts, read in one call.
            return driver.execute_script(
                f"return [...document.querySelectorAll('#{table} tbody tr')].map(r => r.innerText)")

        wait.until(lambda d: len(rows("instances")) >= 2 and len(rows("certs")) >= 2 and len(rows("proxies")) >= 3)
        services = rows("services")
        assert any(t.startswith("backend") for t in services), services
        health = driver.find_element(By.ID, "health").text
        assert health == "all checks pass", f"the healthy demo mesh shows {health!r}"
        report["services"] = services
        report["instances"] = rows("instances")
        # A live tap of backend.
        Select(driver.find_element(By.ID, "tap-service")).select_by_value("backend")
        driver.find_element(By.ID, "tap-start").click()
        wait.until(lambda d: len(rows("tap")) >= 3)
        report["tap"] = rows("tap")[:3]
        driver.save_screenshot(os.path.join(shots, "2-tap.png"))
        driver.find_element(By.ID, "tap-stop").click()
        # Readable on a laptop: nothing wider than the window.
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a 1366px window"
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        driver.save_screenshot(os.path.join(shots, "3-bottom.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, f"console errors: {errors}"
        problem = driver.find_element(By.ID, "problem")
        assert not problem.is_displayed(), f"the page shows a problem: {problem.text}"
    except Exception as e:
        driver.save_screenshot(os.path.join(shots, "failure.png"))
        print(json.dumps(report, indent=1))
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        driver.quit()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
