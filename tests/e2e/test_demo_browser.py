"""`medmvl demo` in a real browser: a tiny trained model served by the real command, driven in
headless Chromium with Selenium — a refused file, a NIfTI upload, the slice slider and plane,
two questions and the answers read off the page, compared with what `Predictor` answers directly.
Leaves test-artifacts/demo-browser.png.

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver);
skipped, saying so, only where they are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.demo_support import (
    ARTIFACTS,
    TINY_ANSWER,
    DemoServer,
    chrome,
    chromium_paths,
    free_port,
    full_page_screenshot,
    tiny_model,
)

pytestmark = pytest.mark.slow

BROWSER, DRIVER = chromium_paths()
needs_chromium = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="headless Chromium is not installed: apt-get install -y chromium chromium-driver",
)
QUESTION_1 = "Is there a nodule in the right lung?"
QUESTION_2 = "How large is it?"
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    demo = DemoServer(tiny_run, free_port(), tmp_path_factory.mktemp("demo-server"))
    yield demo
    demo.stop()


@pytest.fixture
def browser(tmp_path):
    driver = chrome(BROWSER, DRIVER, tmp_path / "profile")
    yield driver
    driver.quit()


def expected_answer(run: Path, volume: Path, questions: list[str]) -> list[str]:
    """What `Predictor` answers directly (greedy), turn by turn, for the same conversation."""
    from medmvl_cli.inference.generate import GenerationSettings, Predictor, Request
    from medmvl_cli.runs.resolve import resolve_model_dir

    predictor = Predictor(resolve_model_dir(str(run)))
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    messages, answers = [], []
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": ("<image3d>\n" if i == 0 else "") + question})
        answer = predictor.generate([Request(messages=list(messages), volumes=[volume])], settings)[0]
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


@needs_chromium
def test_upload_page_ask_and_read_the_answer_in_chromium(server, tiny_run, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    css = lambda selector: browser.find_element(By.CSS_SELECTOR, selector)  # noqa: E731
    text_of = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731

    browser.get(server.url)
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    card = text_of("model-card")
    assert tiny_run.name in card and "2D images and 3D volumes" in card and "HU window -1000 to 1000" in card

    # A file the demo cannot read: the message says so under the upload box.
    junk = tiny_run.parent / "notes.txt"
    junk.write_text("not an image")
    css("#upload input[type=file]").send_keys(str(junk))
    wait.until(lambda _: "not a file type" in text_of("study-status"))
    css("#upload button[aria-label='Clear']").click()

    # A small NIfTI volume: the viewer shows its middle axial slice.
    volume = sorted((tiny_run.parents[1] / "data" / "volumes").glob("test-*.nii.gz"))[0]
    css("#upload input[type=file]").send_keys(str(volume))
    wait.until(lambda _: "3D volume" in text_of("study-status"))
    assert volume.name in text_of("study-status")
    slider = css("#slice input[type=range]")
    middle = int(slider.get_attribute("value"))
    first_src = css("#viewer img").get_attribute("src")

    # Move the slice slider: the slice number and the picture change.
    for _ in range(3):
        slider.send_keys(Keys.ARROW_RIGHT)
    wait.until(lambda _: css("#viewer img").get_attribute("src") != first_src)
    assert int(css("#slice input[type=range]").get_attribute("value")) == middle + 3
    # Another plane: the slider is relabelled for it.
    css("[data-testid='Coronal-radio-label']").click()
    wait.until(lambda _: "Coronal slice" in text_of("slice"))
    css("[data-testid='Axial-radio-label']").click()
    wait.until(lambda _: "Axial slice" in text_of("slice"))

    # Ask twice (button, then Enter); the answers stream into the chat.
    limit = css("#max-new-tokens input[type=number]")
    limit.clear()
    limit.send_keys(str(MAX_NEW_TOKENS), Keys.TAB)
    answers = []
    for n, question in enumerate((QUESTION_1, QUESTION_2), start=1):
        box = css("#question textarea")
        box.send_keys(question)
        if n == 1:
            css("#ask").click()
        else:
            box.send_keys(Keys.ENTER)
        wait.until(lambda _, n=n: len(browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")) == n
                   and css("#question textarea").get_attribute("value") == "" and _idle(browser))
        answers.append(browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")[-1].text)
    user_turns = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='user']")]
    assert user_turns == [QUESTION_1, QUESTION_2]  # the history stays, without the <image3d> placeholder
    assert not text_of("chat-status").strip()
    full_page_screenshot(browser, ARTIFACTS / "demo-browser.png")

    # The page's answers are the ones the shared inference code gives for the same conversation,
    # and they are the text the tiny model was trained to give.
    expected = expected_answer(tiny_run, volume, [QUESTION_1, QUESTION_2])
    assert answers == expected
    assert answers == [TINY_ANSWER, TINY_ANSWER]

    # Clear the conversation: the chat empties, the volume stays.
    css("#clear").click()
    wait.until(lambda _: not browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='user']"))
    assert "3D volume" in text_of("study-status")

    # Stopping the server (SIGTERM, as a service manager does) exits cleanly and removes the demo's files.
    assert list(server.tmpdir.glob("medmvl-demo-*"))
    assert server.stop() == 0, server.stderr()
    assert not list(server.tmpdir.glob("medmvl-demo-*"))


def _idle(browser) -> bool:
    """No event pending: Gradio hides every status tracker."""
    from selenium.webdriver.common.by import By

    trackers = browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='status-tracker']")
    return all("hide" in (t.get_attribute("class") or "") for t in trackers)

