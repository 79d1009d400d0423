"""A screenshot of the page `halo-mpi serve` answers at `/`, after one chat message, in headless
chromium (Debian's chromium and chromium-driver, and selenium).

    python jobs/serve_screenshot.py http://127.0.0.1:8000 docs/serve-page.png ["message"] [--key-file F]
"""
import argparse
import shutil

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("png")
    p.add_argument("message", nargs="?", default="What is the capital of France?")
    p.add_argument("--key-file")
    p.add_argument("--max-tokens", default="48")
    p.add_argument("--temperature", default="0")
    a = p.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,640"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(a.url.rstrip("/") + "/")
        wait = WebDriverWait(driver, 300)
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('#ranks tr').length") > 0)
        if a.key_file:
            with open(a.key_file) as f:
                driver.find_element(By.ID, "key").send_keys(f.readline().strip(), Keys.TAB)
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys(a.max_tokens)
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys(a.temperature)
        driver.find_element(By.ID, "prompt").send_keys(a.message)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg[data-finish]"))
        wait.until(lambda d: "served 1" in d.find_element(By.ID, "summary").text)
        driver.save_screenshot(a.png)
        print(f"wrote {a.png}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
