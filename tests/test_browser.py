"""A real browser (Debian's chromium, headless, through Selenium and chromedriver) uploads an image, asks, and sees
the streamed answer; the screenshot is kept in the test's temporary folder."""

import shutil
import time

import pytest
from PIL import Image

from test_app import server  # noqa: F401  (the app on 127.0.0.1 with the tiny checkpoint)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_ask_and_see_the_streamed_answer(server, browser, tmp_path):  # noqa: F811
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "shapes.png"
    Image.new("RGB", (64, 48), (0, 160, 0)).save(picture)
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    box = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "textarea")))
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(picture))
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, ".thumbnail-item, .thumbnail-image, img"))
    box.send_keys("What is in the picture?")
    box.send_keys(Keys.ENTER)

    def bot_text(driver):
        messages = driver.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
        return messages[-1].text.strip() if messages else ""

    try:
        wait.until(lambda driver: bot_text(driver))
    except TimeoutException:  # keep what the page showed: a failure here was seen once, and passed on a rerun
        browser.save_screenshot(str(tmp_path / "timeout.png"))
        pytest.fail(f"no answer within 60 s; the page read: {browser.find_element(By.TAG_NAME, 'body').text[-600:]!r} "
                    f"(screenshot {tmp_path / 'timeout.png'})")
    time.sleep(1)  # let the stream finish
    answer = bot_text(browser)
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert answer and not answer.startswith(("Please", "Sorry", "**No model")), answer
    assert (tmp_path / "chat.png").stat().st_size > 10_000
