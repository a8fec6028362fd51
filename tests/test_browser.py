"""A real browser (Debian's chromium, headless, through Selenium and chromedriver) on the app as a visitor meets it:
the embedded model, its examples, a multi-turn chat, Clear, and the Data tab. Screenshots of each are kept in the
test's temporary folder (and were looked at when these tests were written)."""

import shutil
import time

import pytest
from app_process import running_app
from fake_openai import FakeOpenAI

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
VISITOR_KEY = "sk-typed-in-the-browser-5150"


@pytest.fixture(scope="module")
def drafting_server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def page_url(drafting_server, tmp_path_factory):
    """`python app.py` as the quickstart runs it (the embedded model), with remote drafting on for one server."""
    args = ["--remote-drafting", "--draft-base-url", drafting_server.base_url]
    with running_app(args, tmp_path_factory.mktemp("browser") / "app.log") as (url, _):
        yield url


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


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def texts(driver, role: str) -> list[str]:
    return [element.text.strip() for element in css(driver, f"[data-testid='{role}']")]


def wait_for(driver, condition, what: str, tmp_path, timeout: float = 60):
    """Waits for `condition(driver)`; on a timeout, fails with what the page read and a screenshot."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(tmp_path / "timeout.png"))
        body = css(driver, "body")[0].text[-800:]
        pytest.fail(f"{what}: not within {timeout} s; the page read {body!r} (screenshot {tmp_path / 'timeout.png'})")


def settled_answer(driver, count: int, tmp_path) -> str:
    """The text of the count-th bot message once it has stopped growing."""
    wait_for(driver, lambda d: len([text for text in texts(d, "bot") if text]) >= count, f"bot message {count}", tmp_path)
    last = None
    while last != texts(driver, "bot")[count - 1]:
        last = texts(driver, "bot")[count - 1]
        time.sleep(0.7)
    return last


def ask(driver, question: str, image=None):
    from selenium.webdriver.common.keys import Keys

    if image is not None:
        css(driver, "input[type=file]")[0].send_keys(str(image))
        time.sleep(1.0)  # the upload lands before the message goes
    box = css(driver, "textarea")[0]
    box.send_keys(question)
    box.send_keys(Keys.ENTER)


def test_the_page_says_what_the_model_knows_keeps_settings_folded_and_runs_an_example(page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    wait_for(browser, lambda d: css(d, "button[aria-label^='Select example 1']"), "the examples", tmp_path)
    page = css(browser, "body")[0].text
    assert "shapes world" in page and "circles, squares and triangles" in page
    assert not [slider for slider in css(browser, "input[type=range]") if slider.is_displayed()]  # folded away
    accordion = browser.find_element(By.XPATH, "//button[contains(., 'Generation settings')]")
    assert accordion.location["y"] < 1000  # the chat and its settings fit the first screen
    examples = " ".join(button.text for button in css(browser, "button[aria-label^='Select example']"))
    assert "0.7" not in examples and "512" not in examples
    browser.save_screenshot(str(tmp_path / "page.png"))

    css(browser, "button[aria-label^='Select example 1']")[0].click()  # "What color is the circle?": red
    answer = settled_answer(browser, 1, tmp_path)
    browser.save_screenshot(str(tmp_path / "example.png"))
    assert "red" in answer.lower(), answer

    accordion.click()
    wait_for(browser, lambda d: [slider for slider in css(d, "input[type=range]") if slider.is_displayed()], "the sliders", tmp_path)
    assert accordion.location["y"] < min(slider.location["y"] for slider in css(browser, "input[type=range]"))


def test_a_multi_turn_chat_then_clear_forgets_the_image(page_url, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    from app import EXAMPLES_FOLDER

    picture = tmp_path / "scene.png"  # a red circle at the top left, a blue square at the bottom right
    shutil.copyfile(f"{EXAMPLES_FOLDER}/red_circle_blue_square.png", picture)
    browser.get(page_url)
    wait_for(browser, lambda d: css(d, "textarea"), "the message box", tmp_path)
    assert "image" in css(browser, "input[type=file]")[0].get_attribute("accept")  # other files are not offered

    ask(browser, "What color is the circle?", picture)
    first = settled_answer(browser, 1, tmp_path)
    ask(browser, "How many shapes are in the image?")
    second = settled_answer(browser, 2, tmp_path)
    browser.save_screenshot(str(tmp_path / "multi_turn.png"))
    assert "red" in first.lower() and ("two" in second.lower() or "2" in second), (first, second)

    users = len(texts(browser, "user"))
    css(browser, "textarea")[0].send_keys(Keys.ENTER)  # an empty message
    time.sleep(1.5)
    assert len(texts(browser, "user")) == users  # no empty bubble

    clear = wait_for(browser, lambda d: [b for b in css(d, "button[aria-label='Clear']") if b.is_displayed()], "Clear", tmp_path)
    clear[0].click()
    wait_for(browser, lambda d: not texts(d, "bot"), "the cleared chat", tmp_path, timeout=10)
    ask(browser, "What color is the circle?")
    assert settled_answer(browser, 1, tmp_path) == "Please attach an image to your first message."


def test_the_data_tab_keeps_no_typed_key_in_the_browser(page_url, browser, drafting_server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    tab = wait_for(browser, lambda d: [b for b in d.find_elements(By.XPATH, "//button[normalize-space()='Data']") if b.is_displayed()],
                   "the Data tab", tmp_path)
    tab[0].click()
    wait_for(browser, lambda d: [b for b in d.find_elements(By.XPATH, "//button[normalize-space()='Draft']") if b.is_displayed()],
             "the Draft button", tmp_path)
    browser.find_element(By.XPATH, "//label[contains(., 'openai')]").click()
    css(browser, "input[type=password]")[0].send_keys(VISITOR_KEY)
    browser.find_element(By.XPATH, "//button[normalize-space()='Draft']").click()
    wait_for(browser, lambda d: drafting_server.requests, "the drafting request", tmp_path)
    wait_for(browser, lambda d: "pasted_" in css(d, "body")[0].text, "the drafted records", tmp_path)
    browser.save_screenshot(str(tmp_path / "data_tab.png"))
    assert drafting_server.requests[-1]["headers"]["authorization"] == f"Bearer {VISITOR_KEY}"
    stored = browser.execute_script(
        "return JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage), document.cookie])")
    assert VISITOR_KEY not in stored
