"""The page `halo-mpi serve` answers at `/`, in a real headless browser (Debian's chromium and
chromedriver, driven by Selenium): a message sent from its chat box comes back as streamed text,
and its cluster table has one row per rank. Skipped, saying why, where no browser is installed
(`apt-get install chromium chromium-driver`, `pip install selenium`)."""
import shutil

import pytest
from live_server import LiveServer, free_port, serve_cmd

KEY = "page-key"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser():
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium or chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def page_server(tiny_store_path):
    port = free_port()
    server = LiveServer(serve_cmd(tiny_store_path, port, 2, "--parallel", "tensor", "--sync", "strict",
                                  "--api-key", KEY), port)
    yield server
    code, err = server.stop()
    assert code == 0, err


def test_the_page_streams_a_chat_and_shows_each_rank(page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    driver = browser()
    wait = WebDriverWait(driver, 60)          # a hang guard: each wait ends as soon as its condition holds
    try:
        driver.get(page_server.url + "/")
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('#ranks tr').length") == 2)
        wait.until(lambda d: d.find_element(By.ID, "key-row").is_displayed())   # the server asks for a key
        driver.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("8")
        driver.find_element(By.ID, "prompt").send_keys("Hello there")
        driver.find_element(By.ID, "send").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg[data-finish]"))
        assert answer.get_attribute("data-finish") in ("stop", "length"), answer.text
        assert answer.text and "assistant" in answer.get_attribute("class")
        meta = driver.find_element(By.CSS_SELECTOR, ".msg[data-finish] + .meta").text
        assert "tokens" in meta and "finish:" in meta
        ranks = driver.execute_script(             # in one go: the table is redrawn every second
            "return [...document.querySelectorAll('#ranks tr')]"
            ".map(tr => [...tr.cells].map(td => td.textContent))")
        assert [cells[0] for cells in ranks] == ["0", "1"]
        shares = [float(cells[1]) for cells in ranks]
        assert sum(shares) == pytest.approx(1.0, abs=2e-3) and min(shares) > 0
        wait.until(lambda d: "served 1" in d.find_element(By.ID, "summary").text)
    finally:
        driver.quit()
