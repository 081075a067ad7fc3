"""`flux-sharded serve`: OpenAI's own client against it on the tiny checkpoint, the command line's
pixels, concurrent clients, refusals naming the field, and requests resumed after a SIGKILL."""

from __future__ import annotations

import base64
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


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


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


def test_a_killed_server_runs_its_accepted_requests_again_on_restart(tiny_checkpoint, tmp_path):
    """SIGKILL once the request is accepted (its file written): the restarted server runs it, and
    its images are the command line's; the client is gone, so they stay in the output folder."""
    out = tmp_path / "served"

    def start(name: str) -> tuple[subprocess.Popen, str, str]:
        log = tmp_path / f"{name}.log"  # a file, not a pipe nobody reads on: the bars would fill it
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "flux_sharded", "serve", "--model", str(tiny_checkpoint), "--max-memory",
                 "cpu=2GB", "--dtype", "float32", "--port", "0", "--out", str(out)],
                stderr=stderr, cwd=tmp_path)

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

    process, url, _ = start("first")
    try:
        body = request_body(seed=3, n=2, steps=20)  # 20 steps: the kill lands inside the run
        threading.Thread(target=post, args=(url, body), daemon=True).start()
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
