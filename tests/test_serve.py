"""`dove-vlm serve`: the request handler called directly (against `dove-vlm chat`), bad input, the example
scenes, and the page itself driven in a headless Chromium.

The VLM is the tiny one of the lmms-eval tests, saved where `dove-vlm demo` saves its stage-2 model (beside
the shapes data), so the server finds the held-out scenes as it does after a demo run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_vlm import make_shapes_dir, save_tiny_vlm

from dove_vlm.cli import build_parser, main
from dove_vlm.serve.app import HELD_OUT_EXAMPLES, demo_examples, file_examples
from dove_vlm.serve.handler import RequestError, ServedModel, handle_request
from tokenizer.modeling.length import lengths_from_eos

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return make_shapes_dir(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def vlm_dir(shapes_dir):
    return save_tiny_vlm(shapes_dir, shapes_dir.parent / "vlm-stage2")


@pytest.fixture(scope="module")
def served(vlm_dir):
    return ServedModel.load(vlm_dir)


@pytest.fixture(scope="module")
def test_records(shapes_dir):
    return json.loads((shapes_dir / "test" / "annotations.json").read_text())


def image_of(shapes_dir: Path, record: dict) -> Path:
    return shapes_dir / "images" / f"{record['image_id']}.png"


def chat(vlm_dir: Path, image: Path, question: str, extra: list[str], capsys) -> tuple[str, int]:
    """(answer, visual tokens) as `dove-vlm chat` prints them."""
    capsys.readouterr()
    assert main(["chat", "--model", str(vlm_dir), "--image", str(image), "--question", question, *extra]) == 0
    *answer, count = capsys.readouterr().out.rstrip("\n").split("\n")
    assert count.startswith("visual tokens: ")
    return "\n".join(answer), int(count.removeprefix("visual tokens: "))


# ------------------------------------------------------------------------------------------ the handler


@pytest.mark.parametrize(
    "settings, chat_args",
    [
        ({}, []),
        ({"use_query": False}, ["--no-query"]),
        ({"budget": 5}, ["--budget", "5"]),
        ({"threshold": 0.3, "use_query": False}, ["--threshold", "0.3", "--no-query"]),
    ],
    ids=["query-auto", "no-query", "budget-5", "threshold-0.3"],
)
def test_the_handler_answers_as_chat_does(served, vlm_dir, shapes_dir, test_records, settings, chat_args, capsys):
    record = test_records[0]
    image = image_of(shapes_dir, record)
    reply = handle_request(served, image, record["question"], **settings)
    assert (reply.answer, reply.visual_tokens) == chat(vlm_dir, image, record["question"], chat_args, capsys)
    assert reply.max_tokens == served.max_tokens == 32
    assert len(reply.eos_probs) == reply.max_tokens
    if "budget" in settings:
        assert reply.visual_tokens == settings["budget"]
    else:  # the plotted probabilities are the ones the LLM's tokens were cut by
        probs = torch.tensor([reply.eos_probs])
        cut = lengths_from_eos(probs, reply.threshold, served.model.vision_tower.config.min_tokens)
        assert int(cut[0]) == reply.visual_tokens
    size = served.model.vision_tower.config.image_size
    assert reply.input_image.size == reply.reconstruction.size == reply.comparison.size == (size, size)
    assert reply.compare_budget == reply.max_tokens
    assert reply.eos_plot.width > 200 and reply.seconds > 0


def test_query_on_and_off_and_the_second_budget_change_what_the_handler_returns(served, shapes_dir, test_records):
    counts = set()
    for record in test_records[:6]:
        image = image_of(shapes_dir, record)
        on = handle_request(served, image, record["question"])
        off = handle_request(served, image, record["question"], use_query=False)
        counts.add((on.visual_tokens, off.visual_tokens))
    assert any(a != b for a, b in counts), counts
    image = image_of(shapes_dir, test_records[0])
    one = handle_request(served, image, test_records[0]["question"], budget=1, compare_budget=1)
    assert one.reconstruction.tobytes() == one.comparison.tobytes()
    two = handle_request(served, image, test_records[0]["question"], budget=1, compare_budget=32)
    assert two.reconstruction.tobytes() != two.comparison.tobytes()


def test_bad_input_is_refused_with_a_message_and_the_next_request_is_answered(
    served, shapes_dir, test_records, tmp_path
):
    image = image_of(shapes_dir, test_records[0])
    (tmp_path / "notes.txt").write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image.read_bytes()[:200])
    overlong = "What colour is the circle? " * 200
    cases = [
        ({"image": None, "question": "What colour is it?"}, "Upload an image"),
        ({"image": tmp_path / "missing.png", "question": "What colour is it?"}, "missing.png"),
        ({"image": tmp_path / "notes.txt", "question": "What colour is it?", "image_name": "notes.txt"}, "notes.txt"),
        ({"image": truncated, "question": "What colour is it?", "image_name": "my scene.png"}, "my scene.png"),
        ({"image": image, "question": "   "}, "Type a question"),
        ({"image": image, "question": None}, "Type a question"),
        ({"image": image, "question": "<image>"}, "asks nothing"),
        ({"image": image, "question": overlong}, "too long"),
        ({"image": image, "question": "What colour is it?", "budget": 0}, "from 1 to 32"),
        ({"image": image, "question": "What colour is it?", "budget": 33}, "from 1 to 32"),
        ({"image": image, "question": "What colour is it?", "compare_budget": 2.5}, "comparison budget"),
        ({"image": image, "question": "What colour is it?", "threshold": 1.0}, "threshold"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RequestError, match=re.escape(message)):
            handle_request(served, **kwargs)
    assert handle_request(served, image, "What colour is it?").visual_tokens >= 1


def test_the_longest_accepted_question_fits_the_context_with_the_image_and_the_answer(served):
    assert served.max_question_tokens == served.model.max_length - 32 - 64 > 0


def test_examples_are_the_demos_held_out_scenes_or_the_named_files(vlm_dir, shapes_dir, test_records, tmp_path):
    examples = demo_examples(vlm_dir)
    scenes = {s["image_id"]: s for s in json.loads((shapes_dir / "scenes.json").read_text())}
    questions = {(r["image_id"], r["question"]) for r in test_records}
    assert 1 <= len(examples) <= HELD_OUT_EXAMPLES
    for example in examples:
        image_id = example.image.stem
        assert scenes[image_id]["split"] == "test" and example.image.is_file()
        assert (image_id, example.question) in questions
    elsewhere = tmp_path / "model"
    shutil.copytree(vlm_dir, elsewhere)
    assert demo_examples(elsewhere) == []
    named = file_examples([example.image for example in examples[:2]])
    assert [e.label for e in named] == [e.image.name for e in examples[:2]] and named[0].question is None
    with pytest.raises(FileNotFoundError, match="nope.png"):
        file_examples([tmp_path / "nope.png"])


def test_serve_binds_this_machine_only_and_never_shares_by_default():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.share, args.examples) == ("127.0.0.1", 7860, False, None)


def test_serve_names_a_missing_example_file_or_a_missing_gradio_before_loading_anything(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope.png"
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--examples", str(missing)]) == 2
    assert "nope.png" in capsys.readouterr().err
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    assert main(["serve", "--model", str(tmp_path / "no-model")]) == 2
    assert "pip install 'dove-vlm[serve]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the browser


@pytest.fixture
def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver, found before the server starts so a skip costs nothing."""
    browser, driver = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    if browser and driver:
        return browser, driver
    reason = "the browser test needs Debian's chromium and chromium-driver (scripts/install_test_browser.sh)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; CI must run it")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _wait_for_server(process: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dove-vlm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with direct.open(url, timeout=5) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except OSError as err:
            last = f"{type(err).__name__}: {err}"
            time.sleep(0.5)
    pytest.fail(
        f"dove-vlm serve did not answer at {url} within {timeout:.0f} s (last try: {last}):\n{log.read_text()[-3000:]}"
    )


@pytest.fixture
def server(vlm_dir, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    # The server is a user's process: none of the distributed settings an earlier in-process run may have left
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("ACCELERATE_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dove_vlm.cli", "serve", "--model", str(vlm_dir), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(process, url, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_the_page_answers_counts_reconstructs_and_refuses_a_missing_image(
    browser_paths, server, served, shapes_dir, test_records, tmp_path
):
    browser_path, driver_path = browser_paths
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # A scene and question whose token count differs with the query on and off (what the page must show).
    for record in test_records:
        image = image_of(shapes_dir, record)
        on = handle_request(served, image, record["question"])
        off = handle_request(served, image, record["question"], use_query=False)
        if on.visual_tokens != off.visual_tokens and on.answer:
            break
    else:
        pytest.fail("no held-out scene of the tiny model costs a different number of tokens with and without its query")

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1250"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    wait = WebDriverWait(driver, 30)

    def value(elem_id: str) -> str:
        return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")

    def ask_and_wait_for(condition, expected: str) -> None:
        driver.find_element(By.CSS_SELECTOR, "#submit").click()
        try:
            wait.until(lambda d: condition())
        except TimeoutException:
            status = driver.find_element(By.CSS_SELECTOR, "#status").text
            pytest.fail(f"the page never showed {expected}: tokens {value('tokens')!r}, status {status!r}")

    try:
        driver.get(server)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(record["question"])

        ask_and_wait_for(
            lambda: "Upload an image" in driver.find_element(By.CSS_SELECTOR, "#status").text, "the missing-image error"
        )
        assert value("answer") == "" and value("tokens") == ""

        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        ask_and_wait_for(lambda: value("tokens") != "", "a token count")
        assert value("answer") == on.answer
        assert value("tokens").startswith(f"{on.visual_tokens} of 32 ")
        assert "Upload an image" not in driver.find_element(By.CSS_SELECTOR, "#status").text
        for elem_id in ("reconstruction", "comparison", "eos-plot", "input-view"):
            assert driver.find_element(By.CSS_SELECTOR, f"#{elem_id} img").get_attribute("src")
        assert f"from {on.visual_tokens} tokens" in driver.find_element(By.CSS_SELECTOR, "#reconstruction").text
        driver.save_screenshot(str(tmp_path / "serve.png"))

        driver.find_element(By.CSS_SELECTOR, "#use-query input[type=checkbox]").click()
        ask_and_wait_for(
            lambda: value("tokens").startswith(f"{off.visual_tokens} of 32 "), f"{off.visual_tokens} tokens, query off"
        )
        assert "query off" in value("tokens") and value("answer") == off.answer

        not_an_image = tmp_path / "notes.png"
        not_an_image.write_text("not an image")
        driver.find_element(By.CSS_SELECTOR, "#image button[aria-label='Remove Image']").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(not_an_image))
        ask_and_wait_for(
            lambda: "notes.png" in driver.find_element(By.CSS_SELECTOR, "#status").text, "the unreadable-file error"
        )
        assert "not an image" in driver.find_element(By.CSS_SELECTOR, "#status").text and value("tokens") == ""
    finally:
        driver.quit()
    assert Image.open(tmp_path / "serve.png").size[0] >= 1000
