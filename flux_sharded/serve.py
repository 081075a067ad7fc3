"""`flux-sharded serve`: one model under one budget, kept open, answering HTTP (the `serve` extra:
FastAPI and uvicorn).

    POST /v1/images/generations   OpenAI's images API: prompt, n, size "WIDTHxHEIGHT", response_format
                                  b64_json; our settings as extensions named as the CLI options with
                                  underscores (seed, steps, guidance, max_sequence_length)
    POST /v1/images/edits         OpenAI's edits, a multipart form: image (one file or several:
                                  Kontext's, FLUX.2's references, FLUX.1 image-to-image), mask
                                  (inpainting; transparent where edited, as OpenAI's), prompt,
                                  and the fields above; strength besides
    GET  /v1/models               the one model

and its own, for programs that want every setting and the progress, and for the web page at `/`:

    GET  /v1/flux/settings        the per-request settings (the schema's: name, type, range, help)
                                  with the model's defaults, and the budget
    POST /v1/flux/plan            the plan of a request (the dry-run, no weight read) as JSON
    POST /v1/flux/generations     prompt, n, seed and every per-request setting named as the CLI's
                                  options (height, width, steps, ...); answered as server-sent
                                  events: accepted, started, progress (each stage, each step),
                                  image (b64_json and its PNG text fields), done, or error
    GET  /                        the web page (web/index.html): a prompt, the settings, the plan
                                  as a per-stage, per-device memory chart, progress, a gallery

Every accepted request is written to OUT/requests/<id>.json (its prompt, settings and seeds: a
request without a seed gets a random one, recorded there and in its PNGs) before it is queued, and
runs with its run folder under OUT/runs/, so that a server stopped at any moment (SIGKILL
included) runs its unanswered requests again on restart, resuming their run folders, and keeps
their images in OUT (its client is gone); a request whose run failed keeps its error there (and in
the log), answered, not run again. A worker thread runs the queue in arrival order: the
requests waiting when a run starts that share its settings join it, up to --max-batch images, so
that each stage runs once for all of them (encode every prompt, then denoise, then decode), and
the weights the plan keeps stay loaded between runs (api.Model).

A bad request is answered 4xx with OpenAI's error object naming the field ({"error": {"message",
"type", "param", "code"}}), never a 500 with a traceback; no field names a path on the server.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import re
import secrets
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import python_multipart  # noqa: F401 (starlette parses the edits' forms with it, imported late: missing, said at start)
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from . import api
from .cli import BudgetType, OneLineErrors
from .checkpoint import DEFAULT_MODEL
from .errors import FluxShardedError, PlanError, SettingsError
from .files import atomic_write
from .input_images import decode
from .prompts import PromptLine
from .rundir import holds_our_run
from .settings import DTYPE_NAMES, MAX_INPUT_IMAGES, image_options, setting

DEFAULT_PORT = 8000  # what OpenAI-compatible local servers commonly listen on (vLLM, LocalAI)
MAX_BODY_BYTES = 1 * 2**20  # a request is a prompt and a few numbers; anything larger is refused (413)
DRAINED_BYTES = 64 * MAX_BODY_BYTES  # past this a body is cut off unread, the connection with it
MAX_PROMPT_CHARACTERS = 32_000  # OpenAI's images API limit for a prompt
# Fields of OpenAI's request that change nothing here, accepted so that clients work unchanged:
# `model` (one model per server), `user`, and the quality and style hints of OpenAI's own models.
IGNORED_FIELDS = ("model", "user", "quality", "style", "moderation", "background")
# Our settings a request may give (the CLI options, underscores): every per-call setting of the
# schema, less the batch size, which the server chooses (batch mates change the pixels' rounding),
# and the input images with their mask and strength: the command line reads images from paths, and no
# request names a path on the server.
INPUT_IMAGE_SETTINGS = ("images", "mask", "strength")
# Nor the prompt upsampler: --upsample-prompt names a folder or a hub id, so a request would have the
# server read, or fetch, a model of the client's choosing (18.8 GB for the published one).
UPSAMPLER_SETTINGS = ("upsample_prompt", "upsample_max_tokens")
NATIVE_SETTINGS = tuple(each for each in image_options()
                        if each.name not in ("batch_size", *INPUT_IMAGE_SETTINGS, *UPSAMPLER_SETTINGS))
# OpenAI's endpoint takes the size as its own `size` field, the rest as extensions.
EXTENSION_SETTINGS = tuple(each for each in NATIVE_SETTINGS if each.name not in ("height", "width"))
# OpenAI's edits endpoint takes the input images as uploaded files (kept in OUT/inputs, named by the
# server), and what they decide besides: image-to-image's strength.
EDIT_SETTINGS = (*EXTENSION_SETTINGS, *(each for each in image_options() if each.name == "strength"))
MAX_UPLOAD_BYTES = 64 * 2**20  # an edit's whole form: OpenAI takes images of up to 50 MB
# The form's file fields, by the field they fill: OpenAI's client sends a list of images as image[].
FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}
# The native endpoint's fields besides the settings; OpenAI's adds size and response_format.
REQUEST_FIELDS = ("prompt", "n", "seed")
WEB_PAGE = Path(__file__).with_name("web") / "index.html"
BACKLOG = 2048  # uvicorn's default backlog
SIZE = re.compile(r"^([1-9][0-9]{0,6})x([1-9][0-9]{0,6})$")


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error object naming `param`."""

    def __init__(self, message: str, param: str | None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status

    def response(self) -> JSONResponse:
        return error_response(str(self), self.param, self.status)


def error_response(message: str, param: str | None, status: int) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


@dataclass(frozen=True)
class Job:
    """An accepted request, as OUT/requests/<id>.json keeps it: each image's seed fixed."""

    id: str
    prompt: str
    seeds: tuple[int, ...]  # one per image
    settings: dict  # the extension settings given, and the size: image_options() names

    @property
    def key(self) -> str:
        """Jobs of one key can share a run (the same settings)."""
        return json.dumps(self.settings, sort_keys=True)

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "seeds": list(self.seeds), "settings": self.settings}

    @classmethod
    def from_json(cls, data: dict) -> "Job":
        return cls(data["id"], data["prompt"], tuple(data["seeds"]), data["settings"])


class Server:
    """The model, the queue and the output folder; the worker thread runs the queue."""

    def __init__(self, model: api.Model, out_dir: Path, max_images: int, max_batch: int):
        self.model, self.out_dir, self.max_images, self.max_batch = model, out_dir, max_images, max_batch
        self.requests = out_dir / "requests"
        self.requests.mkdir(parents=True, exist_ok=True)
        self.waiting: list[Job] = []
        self.answers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self.listeners: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[str, dict], None]]] = {}
        self.lock = threading.Condition()
        self.stopping = False
        for path in sorted(self.requests.glob("*.json"), key=lambda path: path.stat().st_mtime_ns):
            try:
                record = json.loads(path.read_text())
                job = Job.from_json(record)
                if (job.id != path.stem or not isinstance(job.prompt, str) or not isinstance(job.settings, dict)
                        or not all(isinstance(seed, int) for seed in job.seeds)):
                    raise ValueError("its id, prompt, seeds or settings are not this server's")
                api.checked_settings("its settings", job.settings, image_options())
            except (OSError, ValueError, KeyError, TypeError, FluxShardedError) as error:
                raise SettingsError(f"--out: {path} is not a request this server wrote ({error}); move it out of "
                                    f"{self.requests}") from None
            if "images" not in record and "error" not in record:  # accepted, not answered: run again (resumed)
                self.waiting.append(job)
        self.worker = threading.Thread(target=self._work, name="flux-sharded-queue", daemon=True)

    # ---- accepting

    def job(self, body: dict, native: bool = False, inputs: tuple[str, ...] = (), mask: str = "") -> Job:
        """The request's job, every field checked and its plan within the budget (RequestError
        naming the first bad field): OpenAI's request with our extensions, or (`native`) the native
        endpoint's, NATIVE_SETTINGS by name. `inputs`, `mask`: an edit's images and mask, files of
        the server's."""
        job = self._parsed(body, native, inputs, mask)
        try:  # the settings and the budget, before anything is accepted (no weight is read)
            self.model.check(self._request(job, [job]))
        except PlanError as error:
            raise RequestError(f"the server's --max-memory cannot hold this request: {error}",
                               "height" if native else "size") from None
        except FluxShardedError as error:
            raise RequestError(str(error), _param(str(error), native)) from None
        return job

    def _parsed(self, body: dict, native: bool, inputs: tuple[str, ...] = (), mask: str = "") -> Job:
        """The request's job, each field checked alone (RequestError naming the first bad one)."""
        accepted = NATIVE_SETTINGS if native else EDIT_SETTINGS if inputs else EXTENSION_SETTINGS
        known = {*REQUEST_FIELDS, *(each.name for each in accepted),
                 *(() if native else ("size", "response_format", *IGNORED_FIELDS))}
        unknown = sorted(set(body) - known)
        if unknown:
            raise RequestError(f"'{unknown[0]}' is not a field this server takes; it takes {', '.join(sorted(known))}",
                               unknown[0])
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("'prompt' must be a non-empty text", "prompt")
        if len(prompt) > MAX_PROMPT_CHARACTERS:
            raise RequestError(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARACTERS}", "prompt")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_images:
            raise RequestError(f"'n' is {json.dumps(n)}; give 1 to {self.max_images} images", "n")
        if body.get("response_format", "b64_json") not in ("b64_json", None):
            raise RequestError(f"'response_format' {json.dumps(body['response_format'])} is not served; use "
                               "b64_json (the server keeps no public image URLs)", "response_format")
        settings = {}
        for each in accepted:
            if body.get(each.name) is not None:
                try:
                    settings.update(api.checked_settings("request", {each.name: body[each.name]}, image_options()))
                except FluxShardedError as error:
                    raise RequestError(str(error), each.name) from None
        size = body.get("size")
        if size is not None and size != "auto":
            match = SIZE.match(size) if isinstance(size, str) else None
            if match is None:
                raise RequestError(f"'size' {json.dumps(size)} is not WIDTHxHEIGHT (e.g. 1024x768) or auto", "size")
            settings["width"], settings["height"] = int(match.group(1)), int(match.group(2))
        if inputs:
            settings["images"] = inputs
        if mask:
            settings["mask"] = mask
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(32)  # recorded in the request's file and in each PNG
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise RequestError(f"'seed' is {json.dumps(seed)}, not a whole number", "seed")
        return Job(uuid.uuid4().hex, prompt, tuple(seed + k for k in range(n)), settings)

    def edit_job(self, body: dict, uploads: dict[str, list[bytes]]) -> Job:
        """An edit's job (OpenAI's images.edit): the uploaded images (and mask), each decoded whole
        before it is kept in OUT/inputs/<folder>/ (the images in the request's order; the mask in the
        pipelines' convention: openai_mask), and the fields as job() checks them; a refused edit
        keeps no file."""
        images, masks = uploads.get("image", []), uploads.get("mask", [])
        if not images:
            raise RequestError("'image' is missing: give the image(s) to edit as files of the form", "image")
        if len(images) > MAX_INPUT_IMAGES:
            raise RequestError(f"'image' has {len(images)} files; no pipeline here takes more than {MAX_INPUT_IMAGES}",
                               "image")
        if len(masks) > 1:
            raise RequestError(f"'mask' has {len(masks)} files; give one", "mask")
        for field, files in (("image", images), ("mask", masks)):
            for position, data in enumerate(files, 1):
                try:
                    decode(data, f"'{field}' file {position}")
                except FluxShardedError as error:
                    raise RequestError(str(error), field) from None
        folder = self.out_dir / "inputs" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            files = [(folder / f"image-{position}", data) for position, data in enumerate(images)]
            files += [(folder / "mask.png", openai_mask(data)) for data in masks]
            for path, data in files:
                atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
            paths = [str(path) for path, _ in files]
            return self.job(body, inputs=tuple(paths[: len(images)]), mask=paths[-1] if masks else "")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def plan(self, body: dict) -> dict:
        """The plan of a native request (its prompt may be left out: a plan does not depend on the
        text), as JSON: `fits`, `refusal` (the budget's one line, or None), `summary`, `notes` and
        `report` (report.RunReport.to_json: the budget and, per stage, the planned weights and
        weights + activations per device, in bytes). A plan that does not fit is an answer, not a
        refusal: the page draws it."""
        job = self._parsed({**body, "prompt": body.get("prompt") or api.PLAN_PROMPT}, native=True)
        try:
            plan = self.model.plan(job.prompt, seed=job.seeds[0], num_images_per_prompt=len(job.seeds),
                                   **job.settings)
        except FluxShardedError as error:
            raise RequestError(str(error), _param(str(error), native=True)) from None
        return {"fits": plan.fits, "refusal": None if plan.fits else str(plan.refusal), "summary": plan.summary,
                "notes": list(plan.notes), "report": plan.report.to_json()}

    def described_settings(self) -> dict:
        """What the web page builds its form from: each native setting (name, type, help, range,
        choices) with the model's default, the model and the budget (bytes per device)."""
        defaults = self.model.defaults()
        fields = [{"name": each.name, "type": each.type.__name__, "help": each.help, "default": defaults[each.name],
                   "low": each.low, "high": each.high, "choices": list(each.choices)} for each in NATIVE_SETTINGS]
        return {"model": self.model.model, "max_images": self.max_images, "settings": fields,
                "max_memory": self.model.budget.to_json()}

    def accept(self, job: Job, loop: asyncio.AbstractEventLoop,
               listener: Callable[[str, dict], None] | None = None) -> asyncio.Future:
        """Keep the job on disk, then queue it; the future is set when its images are written.
        `listener(event, data)`, called in `loop`, hears its run start ("started": the requests and
        images run together) and progress ("progress": progress.Progress's fields)."""
        answer = loop.create_future()
        atomic_write(self.requests / f"{job.id}.json", lambda tmp: Path(tmp).write_text(json.dumps(job.to_json())))
        with self.lock:
            self.answers[job.id] = (loop, answer)
            if listener is not None:
                self.listeners[job.id] = (loop, listener)
            self.waiting.append(job)
            self.lock.notify()
        return answer

    # ---- running

    def _request(self, first: Job, jobs: list[Job]):
        lines = [PromptLine(job.prompt, seed) for job in jobs for seed in job.seeds]
        batch = hashlib.sha256(" ".join(job.id for job in jobs).encode()).hexdigest()[:16]
        request = self.model.request(lines, 0, 1, self.out_dir / "runs" / batch, **first.settings)
        if holds_our_run(request.run_folder):  # a run a stopped server began: continue it
            request = dataclasses.replace(request, resume=True)
        return request

    def _next(self) -> list[Job] | None:
        """The oldest waiting job and those right behind it with its settings, up to max_batch images."""
        with self.lock:
            while not self.waiting and not self.stopping:
                self.lock.wait()
            if self.stopping:
                return None
            jobs, images = [], 0
            for job in self.waiting:
                if job.key != self.waiting[0].key or (jobs and images + len(job.seeds) > self.max_batch):
                    break  # arrival order: a job of other settings waits for the next run, and so do those after it
                jobs.append(job)
                images += len(job.seeds)
            del self.waiting[: len(jobs)]
            return jobs

    def _tell(self, jobs: list[Job], event: str, data: dict) -> None:
        """Say `event` to the listeners of `jobs` (each in its own event loop)."""
        with self.lock:
            listening = [self.listeners[job.id] for job in jobs if job.id in self.listeners]
        for loop, listener in listening:
            loop.call_soon_threadsafe(listener, event, data)

    def _work(self) -> None:
        while (jobs := self._next()) is not None:
            self._tell(jobs, "started", {"requests": len(jobs), "images": sum(len(job.seeds) for job in jobs)})
            try:
                generation = self.model.run(self._request(jobs[0], jobs),
                                            lambda progress: self._tell(jobs, "progress", dataclasses.asdict(progress)))
                failure = None
            except FluxShardedError as error:
                generation, failure = None, str(error)
            except Exception as error:  # a bug or a library's failure: said to the clients, the server goes on
                generation, failure = None, f"{type(error).__name__}: {error}"
            if failure is not None:  # in the log too: a client that has gone hears nothing
                self.model.log(f"request(s) {', '.join(job.id for job in jobs)} failed: {failure}")
            position = 0
            for job in jobs:
                paths = generation.paths[position: position + len(job.seeds)] if generation else []
                position += len(job.seeds)
                # answered, with its images or its failure: a restart does not run it again (it would
                # fail again: an input gone, a setting the model refuses)
                record = {**job.to_json(), **({"images": [str(path) for path in paths]} if failure is None
                                              else {"error": failure})}
                atomic_write(self.requests / f"{job.id}.json",
                             lambda tmp, record=record: Path(tmp).write_text(json.dumps(record)))
                with self.lock:
                    loop, answer = self.answers.pop(job.id, (None, None))
                    self.listeners.pop(job.id, None)
                if answer is not None:
                    result = (paths, failure)
                    loop.call_soon_threadsafe(lambda answer=answer, result=result: answer.done() or
                                              answer.set_result(result))

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()


def _param(message: str, native: bool = False) -> str | None:
    """The request field a settings error is about (its message names the CLI option)."""
    size = () if native else (("--height", "size"), ("--width", "size"))
    for option, field in (*size, ("--seed", "seed"), ("--prompt", "prompt"), ("--mask", "mask"),
                          ("--image", "image")):  # a mask's message may name the --image too
        if option in message:
            return field
    return next((each.name for each in (*NATIVE_SETTINGS, *EDIT_SETTINGS)
                 if f"--{each.name.replace('_', '-')}" in message), None)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="flux-sharded", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def not_served(request: Request, error: HTTPException) -> JSONResponse:  # no such path, or method
        return error_response(f"{request.method} {request.url.path}: {error.detail}", None, error.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:  # a bug: no traceback to the client
        return error_response(f"the server failed ({type(error).__name__}); its log says more", None, 500)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model.model, "object": "model", "created": 0,
                                            "owned_by": "flux-sharded"}]}

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        return await _answer(server, server.job(await _json_body(request)))

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        body, uploads = await _form_body(request)
        return await _answer(server, await asyncio.to_thread(server.edit_job, body, uploads))

    @app.get("/v1/flux/settings")
    async def settings() -> dict:
        return server.described_settings()

    @app.post("/v1/flux/plan")
    async def plan(request: Request) -> dict:
        body = await _json_body(request)
        return await asyncio.to_thread(server.plan, body)  # reads configs only, yet not in the event loop

    @app.post("/v1/flux/generations")
    async def native_generations(request: Request) -> StreamingResponse:
        job = server.job(await _json_body(request), native=True)  # refused here: a 4xx JSON error, no stream
        events: asyncio.Queue = asyncio.Queue()
        answer = server.accept(job, asyncio.get_running_loop(), lambda event, data: events.put_nowait((event, data)))
        answer.add_done_callback(lambda _: events.put_nowait(None))
        return StreamingResponse(_event_stream(job, answer, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    return app


async def _answer(server: Server, job: Job) -> JSONResponse:
    """OpenAI's answer to an accepted job, once its images are written."""
    paths, failure = await server.accept(job, asyncio.get_running_loop())
    if failure is not None:
        return error_response(failure, None, 500)
    data = [{"b64_json": base64.b64encode(path.read_bytes()).decode(), "seed": seed, "revised_prompt": job.prompt}
            for path, seed in zip(paths, job.seeds, strict=True)]
    return JSONResponse({"created": int(time.time()), "data": data})


def _event(name: str, data: dict) -> str:
    """One server-sent event (the data on one line: JSON escapes newlines)."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _event_stream(job: Job, answer: asyncio.Future, events: asyncio.Queue):
    """The native endpoint's answer: accepted, then started and progress as the run goes, then each
    image (b64_json, seed, PNG text fields) and done, or one error (OpenAI's error object)."""
    yield _event("accepted", {"id": job.id, "seeds": list(job.seeds), "settings": job.settings})
    while (event := await events.get()) is not None:
        yield _event(*event)
    paths, failure = answer.result()
    if failure is not None:
        yield _event("error", {"error": {"message": failure, "type": "server_error", "param": None, "code": None}})
        return
    for index, (path, seed) in enumerate(zip(paths, job.seeds, strict=True)):
        png = path.read_bytes()
        with Image.open(io.BytesIO(png)) as image:
            metadata = dict(image.text)
        yield _event("image", {"index": index, "seed": seed, "b64_json": base64.b64encode(png).decode(),
                               "metadata": metadata})
    yield _event("done", {"id": job.id, "images": len(paths)})


async def _json_body(request: Request) -> dict:
    """The body as a JSON object; at most MAX_BODY_BYTES kept. A larger one is read on (discarded)
    up to DRAINED_BYTES before the 413, so that a client still sending can read the answer."""
    body, size = b"", 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            body += chunk
        elif size > DRAINED_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise RequestError(f"the body has more than {MAX_BODY_BYTES} bytes; at most {MAX_BODY_BYTES}", None, 413)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise RequestError(f"the body is not JSON ({error})", None) from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object", None)
    return data


async def _form_body(request: Request) -> tuple[dict, dict[str, list[bytes]]]:
    """An edit's multipart form (OpenAI's images.edit): its fields, numbers parsed from their text
    (a form's values are texts), and its files' bytes by field ("image", "mask"), in order. At most
    MAX_UPLOAD_BYTES, said by Content-Length before anything is read."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError("an edit is a multipart/form-data form (OpenAI's images.edit): the image files and "
                           "the fields", None, 415)
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise RequestError("the form's size is not given (Content-Length); send it with one", None, 411)
    if int(length) > MAX_UPLOAD_BYTES:
        raise RequestError(f"the form has {length} bytes; at most {MAX_UPLOAD_BYTES}", None, 413)
    try:
        form = await request.form(max_files=MAX_INPUT_IMAGES + 2, max_fields=64, max_part_size=MAX_BODY_BYTES)
    except (MultiPartException, HTTPException, ValueError) as error:
        raise RequestError(f"the form cannot be read ({getattr(error, 'detail', None) or error})", None) from None
    body, uploads = {}, {}
    try:
        numbers = {"n", "seed", *(each.name for each in EDIT_SETTINGS if each.type in (int, float))}
        for name, value in form.multi_items():
            field = FILE_FIELDS.get(name)
            if field is not None:
                if isinstance(value, str):
                    raise RequestError(f"'{field}' must be a file of the form, not a text", field)
                uploads.setdefault(field, []).append(await value.read())
            elif not isinstance(value, str):
                raise RequestError(f"'{name}' is a file; only 'image' and 'mask' are", name)
            elif name in body:
                raise RequestError(f"'{name}' is given twice", name)
            else:
                body[name] = _number(value) if name in numbers else value
    finally:
        await form.close()
    return body, uploads


def openai_mask(data: bytes) -> bytes:
    """An edit's mask in OpenAI's convention (a PNG whose fully transparent pixels, alpha 0, mark
    where the image is edited) as the inpainting pipelines read one: a grey PNG, white where it is
    redrawn, black where it is kept. A mask without transparency is taken as it is (already in the
    pipelines' convention, as `--mask` takes it), an alpha channel opaque everywhere included (as
    input_images.decode tells a transparent mask from an opaque one)."""
    with Image.open(io.BytesIO(data)) as image:
        alpha = image.convert("RGBA").getchannel("A")  # 255 everywhere for a mode without alpha
    if alpha.getextrema()[0] == 255:
        return data
    buffer = io.BytesIO()
    alpha.point(lambda value: 255 if value == 0 else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def _number(text: str):
    """A form's text as the JSON number it spells ("28", "3.5"), else the text (refused by its field's check)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


@click.command("flux-sharded serve", cls=OneLineErrors,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Hub id or local diffusers folder.")
@click.option("--max-memory", type=BudgetType(), default=None, help="Per-device budget, as flux-sharded's.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=setting("dtype").default, show_default=True)
@click.option("--quantize", default=setting("quantize").default, show_default=True, metavar="SPEC")
@click.option("--lora", multiple=True, metavar="SOURCE[:SCALE]", help="As flux-sharded's; repeat for several.")
@click.option("--offload-folder", type=click.Path(path_type=Path, file_okay=False), default=None)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("flux-sharded-server"),
              show_default=True, help="Folder for the requests, their run folders and images.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every network).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True, help="Port; 0 picks a free one.")
@click.option("--max-images", type=click.IntRange(1, 64), default=4, show_default=True, help="Images per request (n).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Images of queued requests that one run makes together.")
def main(**options) -> None:
    """Serve one model over HTTP: OpenAI's POST /v1/images/generations and GET /v1/models, the native
    /v1/flux/ endpoints (settings, plan, generations with progress as server-sent events) and a web page at /."""
    try:
        model = api.open_model(options["model"], max_memory=options["max_memory"], dtype=options["dtype"],
                               quantize=options["quantize"], lora=options["lora"],
                               offload_folder=options["offload_folder"],
                               log=lambda message: click.echo(message, err=True))
        server = Server(model, options["out_dir"], options["max_images"], options["max_batch"])
    except FluxShardedError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(error.exit_code)
    listening = socket.socket(socket.AF_INET6 if ":" in options["host"] else socket.AF_INET)
    # as uvicorn binds its own: a server restarted after a kill (its requests resumed) may take its
    # port again while the killed one's connections wait out TIME_WAIT (a minute on Linux); a port
    # another process listens on is still refused
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((options["host"], options["port"]))
        listening.listen(BACKLOG)  # now: a client that connects before uvicorn starts waits, not refused
    except OSError as error:
        click.echo(f"Error: --host {options['host']} --port {options['port']}: cannot listen there "
                   f"({error.strerror or error}); give another --port (0 picks a free one)", err=True)
        sys.exit(2)
    host, port = listening.getsockname()[:2]
    click.echo(f"serving {model.model} on http://{host}:{port} ({len(server.waiting)} request(s) resumed)", err=True)
    server.worker.start()
    try:
        uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning")).run(sockets=[listening])
    finally:
        server.stop()
        model.close()
