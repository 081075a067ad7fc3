"""`flux-sharded serve`: OpenAI's own client against it on the tiny checkpoint, the command line's
pixels, concurrent clients, refusals naming the field, and requests resumed after a SIGKILL."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import flux_sharded
from flux_sharded.serve import MAX_BODY_BYTES, MAX_PROMPT_CHARACTERS, Server, create_app

from .conftest import assert_same_pixels, invoke

STARTUP_SECONDS = 300  # a fresh process imports torch and diffusers: slow on a loaded 2-core machine
CLI_SETTINGS = ["--steps", "2", "--height", "32", "--width", "48", "--dtype", "float32", "--max-memory", "cpu=2GB"]
EXTENSIONS = {"steps": 2}
SIZE = "48x32"


def until(condition, seconds: float, what: str):
    """Wait for another thread or process to reach `condition` (polled), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return found


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """The server in this process, on a free port of 127.0.0.1 (uvicorn in a thread)."""
    model = flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32")
    queue = Server(model, tmp_path_factory.mktemp("served"), max_images=4, max_batch=8)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    web = uvicorn.Server(uvicorn.Config(create_app(queue), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [listening]}, daemon=True)
    queue.worker.start()
    thread.start()
    until(lambda: web.started, 60, "the server to start")
    yield f"http://127.0.0.1:{listening.getsockname()[1]}", queue
    web.should_exit = True
    thread.join(timeout=30)
    queue.stop()
    model.close()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def pixels(b64: str) -> tuple[np.ndarray, dict]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image), dict(image.text)


def cli_images(checkpoint: Path, out: Path, *args: str) -> list[Path]:
    result = invoke(["--model", str(checkpoint), *CLI_SETTINGS, "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return sorted(out.glob("*.png"))


def test_the_openai_client_gets_the_command_lines_pixels(server, tiny_checkpoint, tmp_path):
    url, _ = server
    answer = client(url).images.generate(prompt="a dog", n=2, size=SIZE, response_format="b64_json",
                                         extra_body={"seed": 5, **EXTENSIONS})
    expected = cli_images(tiny_checkpoint, tmp_path, "--prompt", "a dog", "--seed", "5", "--num-images-per-prompt", "2")
    assert len(answer.data) == 2
    for data, path in zip(answer.data, expected, strict=True):
        served, metadata = pixels(data.b64_json)
        with Image.open(path) as image:
            assert_same_pixels(served, np.asarray(image))
            assert metadata == dict(image.text)  # the same settings, seed and weights recorded


def test_the_models_endpoint_names_the_one_model(server, tiny_checkpoint):
    url, _ = server
    assert [model.id for model in client(url).models.list().data] == [str(tiny_checkpoint)]


def test_concurrent_clients_are_all_answered_with_their_seed(server):
    url, queue = server
    prompts = ["a dog", "a cat", "a red car", "a house"]

    def ask(prompt: str):
        return client(url).images.generate(prompt=prompt, size=SIZE, response_format="b64_json",
                                           extra_body={**EXTENSIONS})

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    metadata = [pixels(answer.data[0].b64_json)[1] for answer in answers]
    assert [each["prompt"] for each in metadata] == prompts
    # no seed given: a random one each, recorded in the PNG and the answer
    assert [each["seed"] for each in metadata] == [str(answer.data[0].seed) for answer in answers]
    assert len({each["seed"] for each in metadata}) == len(prompts)
    records = [json.loads(path.read_text()) for path in (queue.out_dir / "requests").glob("*.json")]
    assert all("images" in record for record in records)  # every accepted request answered and recorded


def send(url: str, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    """POST `body` to the server's `path`: (status, the JSON answer), a refusal's included."""
    request = urllib.request.Request(f"{url}{path}", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(url: str, body: bytes) -> tuple[int, dict]:
    return send(url, "/v1/images/generations", body)


def post_until_killed(url: str, body: bytes) -> None:
    """post(), from a client whose server is killed before it answers."""
    with pytest.raises(OSError):  # http.client.RemoteDisconnected, or a reset connection
        post(url, body)


def request_body(**fields) -> bytes:
    return json.dumps({"prompt": "a dog", "size": SIZE, **fields}).encode()


# (body, status, the field named, message fragment)
REFUSALS = [
    (b"{not json", 400, None, "the body is not JSON"),
    (b"[1, 2]", 400, None, "the body must be a JSON object"),
    (b" " * (MAX_BODY_BYTES + 1), 413, None, f"at most {MAX_BODY_BYTES}"),
    (request_body(size="50x50"), 400, "size", "--height 50 and --width 50 are not positive multiples of 16"),
    (request_body(size="big"), 400, "size", "is not WIDTHxHEIGHT"),
    (request_body(n=5), 400, "n", "give 1 to 4 images"),
    (request_body(n="2"), 400, "n", "give 1 to 4 images"),
    (request_body(prompt="x" * (MAX_PROMPT_CHARACTERS + 1)), 400, "prompt", f"at most {MAX_PROMPT_CHARACTERS}"),
    (request_body(prompt=""), 400, "prompt", "must be a non-empty text"),
    (request_body(steps="many"), 400, "steps", "field 'steps' is \"many\", not a whole number"),
    (request_body(guidance=-1), 400, "guidance", "field 'guidance' is -1"),
    (request_body(seed=1.5), 400, "seed", "not a whole number"),
    (request_body(response_format="url"), 400, "response_format", "use b64_json"),
    (request_body(out_dir="/etc"), 400, "out_dir", "'out_dir' is not a field this server takes"),
    # input images are read from paths: no request names a path on the server
    (request_body(images=["/etc/hostname"]), 400, "images", "'images' is not a field this server takes"),
    # nor does one name a model for it to read or fetch: the prompt upsampler
    (request_body(upsample_prompt="/etc"), 400, "upsample_prompt", "'upsample_prompt' is not a field this server takes"),
    (request_body(size="65536x65536"), 400, "size", "cannot hold this request"),
]


@pytest.mark.parametrize("body, status, param, message", REFUSALS, ids=[str(case[2]) + str(case[1])
                                                                       for case in REFUSALS])
def test_a_bad_request_is_refused_naming_the_field(server, body, status, param, message):
    url, queue = server
    before = set((queue.out_dir / "requests").iterdir())
    code, answer = post(url, body)
    assert code == status
    assert answer["error"]["param"] == param
    assert message in answer["error"]["message"]
    assert "Traceback" not in answer["error"]["message"]
    assert set((queue.out_dir / "requests").iterdir()) == before  # nothing accepted


def photo_bytes(size=(48, 32), seed=0) -> bytes:
    """A PNG of random pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def test_an_edit_through_the_openai_client_gets_the_command_lines_image_to_image_pixels(server, tiny_checkpoint,
                                                                                        tmp_path):
    url, queue = server
    data = photo_bytes()
    answer = client(url).images.edit(image=("dog.png", data, "image/png"), prompt="a dog", size=SIZE,
                                     response_format="b64_json", extra_body={"seed": 5, "strength": 0.8, **EXTENSIONS})
    (tmp_path / "dog.png").write_bytes(data)
    (expected,) = cli_images(tiny_checkpoint, tmp_path / "cli", "--prompt", "a dog", "--seed", "5", "--image",
                             str(tmp_path / "dog.png"), "--strength", "0.8")
    served, metadata = pixels(answer.data[0].b64_json)
    with Image.open(expected) as image:
        assert_same_pixels(served, np.asarray(image))
        assert metadata["strength"] == image.text["strength"] == "0.8"
    # the input kept by the server, as uploaded, and named in the image's metadata
    (kept,) = (queue.out_dir / "inputs").glob("*/image-0")
    assert kept.read_bytes() == data
    assert metadata["image"] == f"{kept} 48x32 sha256:{hashlib.sha256(data).hexdigest()}"


def test_an_edit_with_openais_transparent_mask_inpaints_as_the_command_line_with_its_grey_mask(server, tiny_checkpoint,
                                                                                                 tmp_path):
    """OpenAI's mask marks the pixels to edit as transparent; the inpainting pipelines read white as
    redrawn: the server's answer is the command line's with the grey mask that says the same."""
    url, _ = server
    image = photo_bytes()
    drawn = np.zeros((32, 48), dtype=bool)
    drawn[8:24, 12:36] = True  # the region to edit
    alpha = Image.fromarray(np.where(drawn, 0, 255).astype(np.uint8))
    openai_style = Image.merge("RGBA", (*Image.new("RGB", (48, 32), (90, 20, 200)).split(), alpha))
    buffer = io.BytesIO()
    openai_style.save(buffer, format="PNG")
    answer = client(url).images.edit(image=("in.png", image, "image/png"), mask=("mask.png", buffer.getvalue(),
                                     "image/png"), prompt="a dog", size=SIZE, response_format="b64_json",
                                     extra_body={"seed": 4, **EXTENSIONS})
    (tmp_path / "in.png").write_bytes(image)
    Image.fromarray(np.where(drawn, 255, 0).astype(np.uint8)).save(tmp_path / "grey.png")
    (expected,) = cli_images(tiny_checkpoint, tmp_path / "cli", "--prompt", "a dog", "--seed", "4", "--image",
                             str(tmp_path / "in.png"), "--mask", str(tmp_path / "grey.png"))
    served, metadata = pixels(answer.data[0].b64_json)
    with Image.open(expected) as cli_image:
        assert_same_pixels(served, np.asarray(cli_image))
    assert metadata["mask"].split()[-1] == cli_image.text["mask"].split()[-1]  # the same mask, by its content
    # the grey mask saved with an alpha channel that is opaque everywhere (as canvas exports save
    # one) has no transparency: read as the command line reads it, white redrawn, not as all kept
    opaque = io.BytesIO()
    Image.open(tmp_path / "grey.png").convert("RGBA").save(opaque, format="PNG")
    answer = client(url).images.edit(image=("in.png", image, "image/png"), mask=("mask.png", opaque.getvalue(),
                                     "image/png"), prompt="a dog", size=SIZE, response_format="b64_json",
                                     extra_body={"seed": 4, **EXTENSIONS})
    assert_same_pixels(pixels(answer.data[0].b64_json)[0], served)


def edit(url: str, files: list[tuple[str, bytes]], **fields) -> tuple[int, dict]:
    """POST /v1/images/edits as a multipart form, as OpenAI's client sends it."""
    boundary = "flux-sharded-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in {"prompt": "a dog", "size": SIZE, **fields}.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="in.png"\r\n'
              f'Content-Type: image/png\r\n\r\n'.encode() + data + b"\r\n" for name, data in files]
    return send(url, "/v1/images/edits", b"".join(parts) + f"--{boundary}--\r\n".encode(),
                f"multipart/form-data; boundary={boundary}")


@pytest.mark.parametrize("files, fields, param, message", [
    ([], {}, "image", "'image' is missing"),
    ([("image", b"not an image")], {}, "image", "'image' file 1"),
    ([("image[]", photo_bytes()), ("image[]", photo_bytes(seed=1))], {}, "image", "--image"),
    ([("image", photo_bytes())], {"strength": "2"}, "strength", "field 'strength' is 2"),
    ([("image", photo_bytes())], {"steps": "many"}, "steps", "field 'steps' is \"many\""),
    ([("image", photo_bytes()), ("mask", b"x")], {}, "mask", "'mask' file 1"),
    ([("image", photo_bytes()), ("mask", photo_bytes(size=(32, 32)))], {}, "mask", "--mask"),
    ([("image", photo_bytes()), ("other", b"x")], {}, "other", "'other' is a file; only 'image' and 'mask' are"),
], ids=["no-image", "not-an-image", "two-for-img2img", "strength", "steps", "bad-mask", "mask-size", "file-field"])
def test_a_bad_edit_is_refused_naming_the_field_and_keeps_no_file(server, files, fields, param, message):
    url, queue = server
    before = {*(queue.out_dir / "requests").iterdir(), *(queue.out_dir / "inputs").glob("*/*")}
    code, answer = edit(url, files, **fields)
    assert (code, answer["error"]["param"]) == (400, param), answer
    assert message in answer["error"]["message"]
    assert {*(queue.out_dir / "requests").iterdir(), *(queue.out_dir / "inputs").glob("*/*")} == before


def events(url: str, body: dict) -> list[tuple[str, dict]]:
    """The native endpoint's server-sent events, each (name, data), in order."""
    request = urllib.request.Request(f"{url}/v1/flux/generations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.read().decode()
    said = []
    for block in filter(None, text.split("\n\n")):
        name, data = block.split("\n")
        said.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return said


def test_the_native_endpoint_streams_each_stage_and_the_command_lines_pixels(server, tiny_checkpoint, tmp_path):
    url, _ = server
    said = events(url, {"prompt": "a dog", "n": 2, "seed": 5, "steps": 2, "height": 32, "width": 48})
    names = [name for name, _ in said]
    assert names[:2] == ["accepted", "started"] and names[-3:] == ["image", "image", "done"]
    progress = [data for name, data in said if name == "progress"]
    assert [stage for stage in dict.fromkeys(each["stage"] for each in progress)] == ["encode", "denoise", "decode"]
    assert [each["step"] for each in progress if each["step"]] == [1, 2] * 2  # two images, one per batch
    assert progress[-1] == {"stage": "decode", "images_done": 2, "images": 2, "step": None, "steps": None}
    expected = cli_images(tiny_checkpoint, tmp_path, "--prompt", "a dog", "--seed", "5", "--num-images-per-prompt", "2")
    images = [data for name, data in said if name == "image"]
    assert [each["seed"] for each in images] == [5, 6]
    for data, path in zip(images, expected, strict=True):
        served, metadata = pixels(data["b64_json"])
        with Image.open(path) as image:
            assert_same_pixels(served, np.asarray(image))
            assert metadata == data["metadata"] == dict(image.text)


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/v1/images/generations", 405, "GET /v1/images/generations: Method Not Allowed"),
    ("POST", "/v1/images/variations", 404, "POST /v1/images/variations: Not Found"),
])
def test_a_path_or_method_not_served_is_openais_error_object(server, method, path, status, message):
    url, _ = server
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=b"{}" if method == "POST" else None,
                                                      method=method), timeout=60)
    assert raised.value.code == status
    assert json.loads(raised.value.read()) == {"error": {"message": message, "type": "invalid_request_error",
                                                         "param": None, "code": None}}


@pytest.mark.parametrize("path", ["/v1/flux/generations", "/v1/flux/plan"])
@pytest.mark.parametrize("body, param, message", [
    ({"prompt": "a dog", "size": SIZE}, "size", "'size' is not a field this server takes"),
    ({"prompt": "a dog", "height": 50, "width": 48}, "height", "--height 50 is not a positive multiple of 16"),
    ({"prompt": "a dog", "steps": 0}, "steps", "field 'steps' is 0"),
    ({"prompt": "a dog", "strength": 0.5}, "strength", "'strength' is not a field this server takes"),
], ids=["size", "height", "steps", "strength"])
def test_the_native_endpoints_refuse_a_bad_field_naming_it(server, path, body, param, message):
    url, queue = server
    before = set((queue.out_dir / "requests").iterdir())
    code, answer = send(url, path, json.dumps(body).encode())
    assert (code, answer["error"]["param"]) == (400, param)
    assert message in answer["error"]["message"]
    assert set((queue.out_dir / "requests").iterdir()) == before


def test_the_plan_endpoint_answers_a_plan_over_the_budget_with_its_refusal(server):
    url, _ = server
    code, plan = send(url, "/v1/flux/plan", json.dumps({"height": 32, "width": 48, "steps": 2}).encode())
    assert code == 200 and plan["fits"] and plan["refusal"] is None
    assert [stage["name"] for stage in plan["report"]["stages"]] == ["encode", "denoise", "decode"]
    assert plan["report"]["budget"] == {"cpu": 2 * 10**9}
    for stage in plan["report"]["stages"]:
        assert 0 < stage["weight_bytes"]["cpu"] < stage["planned_bytes"]["cpu"] <= 2 * 10**9
    code, plan = send(url, "/v1/flux/plan", json.dumps({"height": 65536, "width": 65536}).encode())
    assert code == 200 and not plan["fits"]
    assert "--max-memory" in plan["refusal"]


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser():
    """Debian's headless chromium, driven by selenium through Debian's chromedriver (`.ci/run`
    installs both: apt-get install chromium chromium-driver). The flags keep it off the network."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1300,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_the_web_page_submits_a_prompt_and_shows_the_image_and_the_memory_chart(server, browser, tiny_checkpoint,
                                                                                 tmp_path):
    url, _ = server
    browser.get(f"{url}/")
    chart = "#memory-chart rect.{}[data-stage='{}'][data-device='cpu']"
    WebDriverWait(browser, 60).until(lambda page: page.find_elements(By.CSS_SELECTOR, chart.format("weights", "decode")))
    for name, value in (("steps", "2"), ("height", "32"), ("width", "48")):
        field = browser.find_element(By.ID, f"setting-{name}")
        field.clear()
        field.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys("a cat")
    browser.find_element(By.ID, "seed").send_keys("9")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 600).until(lambda page: page.find_elements(By.CSS_SELECTOR, "#gallery img"))
    assert browser.find_element(By.ID, "error").text == ""
    # the chart: each stage's weights and activations drawn against the budget, as the plan says
    for stage in ("encode", "denoise", "decode"):
        weights, activations, budget = (browser.find_element(By.CSS_SELECTOR, chart.format(kind, stage))
                                        for kind in ("weights", "activations", "budget"))
        assert 0 < float(weights.get_attribute("width")) and 0 < float(activations.get_attribute("width"))
        assert float(weights.get_attribute("width")) + float(activations.get_attribute("width")) <= \
            float(budget.get_attribute("width"))
    assert "plan for 48x32, 2 steps" in browser.find_element(By.ID, "plan-summary").text
    # progress: every stage done
    for stage in ("encode", "denoise", "decode"):
        bar = browser.find_element(By.CSS_SELECTOR, f"#progress .stage[data-stage='{stage}'] progress")
        assert bar.get_attribute("value") == bar.get_attribute("max") == "1"
    # the gallery: the command line's pixels, and their metadata
    source = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    served, metadata = pixels(source.removeprefix("data:image/png;base64,"))
    (expected,) = cli_images(tiny_checkpoint, tmp_path, "--prompt", "a cat", "--seed", "9")
    with Image.open(expected) as image:
        assert_same_pixels(served, np.asarray(image))
    assert browser.find_element(By.CSS_SELECTOR, "#gallery dd[data-field='seed']").text == metadata["seed"] == "9"


def start_server(checkpoint: Path, out: Path, log: Path, port: int = 0) -> tuple[subprocess.Popen, str, str]:
    """`flux-sharded serve` in a process of its own, once it has said its first line: (the process,
    its URL, the line). A start that fails or says something else is killed and fails the test."""
    with log.open("w") as stderr:  # a file, not a pipe nobody reads on: the bars would fill it
        process = subprocess.Popen(
            [sys.executable, "-m", "flux_sharded", "serve", "--model", str(checkpoint), "--max-memory",
             "cpu=2GB", "--dtype", "float32", "--port", str(port), "--out", str(out)],
            stderr=stderr, cwd=log.parent)

    def first_line():
        assert process.poll() is None, log.read_text()
        return log.read_text().partition("\n")[0] if "\n" in log.read_text() else None

    try:
        line = until(first_line, STARTUP_SECONDS, "the server's first line")
        assert line.startswith("serving "), line
    except BaseException:
        process.kill()  # no server left behind by a failed start
        process.wait(timeout=60)
        raise
    return process, line.split(" on ")[1].split()[0], line


def test_a_killed_server_runs_its_accepted_requests_again_on_restart(tiny_checkpoint, tmp_path):
    """SIGKILL once the request is accepted (its file written): the restarted server runs it, and
    its images are the command line's; the client is gone, so they stay in the output folder."""
    out = tmp_path / "served"

    def start(name: str) -> tuple[subprocess.Popen, str, str]:
        return start_server(tiny_checkpoint, out, tmp_path / f"{name}.log")

    process, url, _ = start("first")
    try:
        body = request_body(seed=3, n=2, steps=20)  # 20 steps: the kill lands inside the run
        threading.Thread(target=post_until_killed, args=(url, body), daemon=True).start()
        until(lambda: list((out / "requests").glob("*.json")), 120, "the request to be accepted")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    restarted, _, said = start("restarted")
    try:
        assert "(1 request(s) resumed)" in said  # killed before it was answered (the run takes seconds)
        record = until(lambda: (data := json.loads(next((out / "requests").glob("*.json")).read_text()))
                       .get("images") and data, 600, "the resumed request to be answered")
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=60)
    expected = cli_images(tiny_checkpoint, tmp_path / "cli", "--prompt", "a dog", "--seed", "3",
                          "--num-images-per-prompt", "2", "--steps", "20")
    for served, path in zip(record["images"], expected, strict=True):
        with Image.open(served) as image, Image.open(path) as cli_image:
            assert_same_pixels(np.asarray(image), np.asarray(cli_image))


WITHOUT_FASTAPI = """
import sys
sys.modules["fastapi"] = None  # as if the serve extra were not installed: importing it fails
sys.argv = ["flux-sharded", "serve", "--model", sys.argv[1]]
from flux_sharded.__main__ import run
run()
"""


def test_serve_without_its_extra_says_how_to_install_it(tiny_checkpoint):
    result = subprocess.run([sys.executable, "-c", WITHOUT_FASTAPI, str(tiny_checkpoint)], capture_output=True,
                            text=True, timeout=STARTUP_SECONDS)
    assert result.returncode == 2
    assert result.stderr == ("Error: flux-sharded serve needs fastapi, which is not installed; install the serve "
                             "extra: pip install 'flux-sharded[serve]'\n")


def test_a_port_in_use_is_one_error_line(tiny_checkpoint, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "flux_sharded", "serve", "--model", str(tiny_checkpoint),
                             "--max-memory", "cpu=2GB", "--port", str(port), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=STARTUP_SECONDS)
    taken.close()
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"Error: --host 127.0.0.1 --port {port}: cannot listen there (Address "
                                              "already in use); give another --port (0 picks a free one)")


def test_a_request_whose_run_fails_keeps_its_error_and_is_not_run_again_on_restart(tiny_checkpoint, tmp_path):
    """An accepted edit whose input is gone by the time it runs (its server was killed, the inputs
    removed) fails: its failure is logged and kept in its request file, and the next server does not
    queue it again."""
    out, gone = tmp_path / "out", tmp_path / "removed" / "image-0"
    (out / "requests").mkdir(parents=True)
    record = {"id": "0123", "prompt": "a dog", "seeds": [0], "settings": {"steps": 2, "height": 32, "width": 48,
                                                                         "images": [str(gone)]}}
    (out / "requests" / "0123.json").write_text(json.dumps(record))
    said = []
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32",
                                 log=said.append) as model:
        queue = Server(model, out, max_images=4, max_batch=8)
        assert [job.id for job in queue.waiting] == ["0123"]
        queue.worker.start()
        kept = until(lambda: json.loads((out / "requests" / "0123.json").read_text()).get("error"), 120,
                     "the failure to be kept")
        queue.stop()
        assert str(gone) in kept and "no such file" in kept
        assert f"request(s) 0123 failed: {kept}" in said
        assert Server(model, out, max_images=4, max_batch=8).waiting == []


def test_a_killed_server_restarts_on_its_port_while_its_connections_wait_out_time_wait(tiny_checkpoint, tmp_path):
    """A killed server's connections (closed by its end) hold its port in TIME_WAIT for a minute; a
    restart on that port, to resume its requests, listens at once, as uvicorn's own sockets do."""
    killed, url, _ = start_server(tiny_checkpoint, tmp_path / "out", tmp_path / "killed.log")
    port = int(url.rpartition(":")[2])
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/v1/models")  # kept alive, so that the killed end closes it
        assert connection.getresponse().read()
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    connection.sock.recv(1)  # the killed end's close arrives; this end closes after it
    connection.close()
    plain = socket.socket()
    with pytest.raises(OSError, match="Address already in use"):  # the state this test is about
        plain.bind(("127.0.0.1", port))
    plain.close()
    restarted, again, _ = start_server(tiny_checkpoint, tmp_path / "out", tmp_path / "restarted.log", port)
    restarted.kill()  # what is tested is that it listens; a graceful stop is the test above's
    restarted.wait(timeout=60)
    assert again == url


def test_a_port_outside_tcps_range_is_one_error_line(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "flux_sharded", "serve", "--model", str(tiny_checkpoint),
                             "--port", "70000", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=STARTUP_SECONDS)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "Error: --port: 70000 is not in the range 0<=x<=65535."


def test_a_damaged_request_file_stops_the_start_with_one_line(tiny_checkpoint, tmp_path):
    requests = tmp_path / "out" / "requests"
    requests.mkdir(parents=True)
    (requests / "0123.json").write_text(json.dumps({"id": "0123", "prompt": "a dog", "seeds": [0],
                                                    "settings": {"steps": -4}}))
    result = subprocess.run([sys.executable, "-m", "flux_sharded", "serve", "--model", str(tiny_checkpoint),
                             "--max-memory", "cpu=2GB", "--port", "0", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=STARTUP_SECONDS)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"Error: --out: {requests / '0123.json'} is not a request this server wrote (its settings: field 'steps' is "
        f"-4, outside 1..100000; leave it out (or None) for the model's default); move it out of {requests}")
