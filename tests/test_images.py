"""Input images (--image): FLUX.1 image-to-image staged (encode, encode_image, denoise, decode)
equals diffusers' one-piece FluxImg2ImgPipeline; the input is part of the run (run.json, the
run's hash, the PNG, --report, resume); every bad input is one Error line with nothing written."""

from __future__ import annotations

import hashlib
import inspect
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_sharded import runner
from flux_sharded.families import IMAGE_STAGE
from flux_sharded.input_images import read_image
from flux_sharded.settings import DEFAULT_STRENGTH
from flux_sharded.stages import STAGES

from .conftest import assert_same_pixels, error_line, invoke

STEPS, SEED, STRENGTH = 4, 5, 0.6


def photo(path: Path, size=(40, 56), mode="RGB", seed=0) -> Path:
    """A random image of `size` (width, height); smooth enough that resizing it matters."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).convert(mode).save(path)
    return path


def mask(path: Path, size=(40, 56)) -> Path:
    """A black mask of `size` (width, height) with a white rectangle (the part redrawn) and a grey edge."""
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[size[1] // 5: size[1] * 3 // 4, size[0] // 8: size[0] * 2 // 3] = 255
    pixels[size[1] // 5, :] = 128  # grey: binarised by FLUX.1's mask processor, kept by klein's bilinear one
    Image.fromarray(pixels).save(path)
    return path


def one_piece_img2img(checkpoint: Path, image_path: Path, prompts: list[str], seeds: list[int], size: int,
                      strength: float = STRENGTH, steps: int = STEPS) -> list[np.ndarray]:
    """diffusers' FluxImg2ImgPipeline, whole, on the CPU, with the image as diffusers' load_image reads it."""
    import diffusers
    from diffusers.utils import load_image

    pipeline = diffusers.FluxImg2ImgPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(prompt=prompts, image=load_image(str(image_path)), strength=strength, height=size, width=size,
                      num_inference_steps=steps, guidance_scale=3.5,
                      generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds]).images
    return [np.asarray(image) for image in images]


def img2img_args(checkpoint, image_path, out, size=32, *extra):
    return ["--model", str(checkpoint), "--prompt", "a photo of a dog", "--image", str(image_path),
            "--strength", str(STRENGTH), "--steps", str(STEPS), "--seed", str(SEED), "--height", str(size),
            "--width", str(size), "--dtype", "float32", "--max-memory", "cpu=4GB", "--out", str(out), *extra]


def written(out: Path) -> list[Path]:
    return sorted(out.glob("*.png"))


@pytest.mark.parametrize("fixture, size", [("tiny_checkpoint", 64), ("tiny_checkpoint_f2", 24)])
def test_staged_img2img_png_equals_the_one_piece_pipeline(request, tmp_path, fixture, size):
    checkpoint = request.getfixturevalue(fixture)
    image_path = photo(tmp_path / "in.png")
    result = invoke(img2img_args(checkpoint, image_path, tmp_path / "out", size, "--report", str(tmp_path / "r.json")))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["encode", "encode_image", "denoise", "decode"]
    (staged,) = [np.asarray(Image.open(path)) for path in report["images"]]
    (expected,) = one_piece_img2img(checkpoint, image_path, ["a photo of a dog"], [SEED], size)
    assert_same_pixels(staged, expected)
    assert staged.std() > 10
    # the input decides the pixels: the text-to-image of the same seed differs
    plain = invoke(["--model", str(checkpoint), "--prompt", "a photo of a dog", "--steps", str(STEPS), "--seed",
                    str(SEED), "--height", str(size), "--width", str(size), "--dtype", "float32", "--max-memory",
                    "cpu=4GB", "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert np.abs(np.asarray(Image.open(written(tmp_path / "plain")[0])).astype(int) - staged).max() > 0


def test_a_batch_of_two_equals_the_one_piece_pipeline_called_with_the_batch(tiny_checkpoint, tmp_path):
    """The pipeline encodes its one input image with the batch's first generator and draws each
    image's noise from its own: encode_image keeps each generator as the batch left it."""
    image_path = photo(tmp_path / "in.png", size=(48, 32))
    result = invoke(img2img_args(tiny_checkpoint, image_path, tmp_path / "out", 32, "--num-images-per-prompt", "2",
                                 "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    expected = one_piece_img2img(tiny_checkpoint, image_path, ["a photo of a dog"] * 2, [SEED, SEED + 1], 32)
    for path, reference in zip(written(tmp_path / "out"), expected, strict=True):
        assert_same_pixels(np.asarray(Image.open(path)), reference)


def test_strength_matters_and_its_default_and_steps_are_the_pipelines(tiny_checkpoint, tmp_path):
    import diffusers

    call = inspect.signature(diffusers.FluxImg2ImgPipeline.__call__).parameters
    assert call["strength"].default == DEFAULT_STRENGTH
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipeline = diffusers.FluxImg2ImgPipeline(scheduler, None, None, None, None, None, None)
    for steps, strength in [(4, 0.6), (28, 0.6), (10, 0.05), (10, 0.1), (3, 1.0), (7, 0.33)]:
        scheduler.set_timesteps(steps)
        assert pipeline.get_timesteps(steps, strength, "cpu")[1] == runner.img2img_steps(steps, strength)
    image_path = photo(tmp_path / "in.png")
    pixels = []
    for strength in ("0.6", "0.9"):
        args = img2img_args(tiny_checkpoint, image_path, tmp_path / strength)
        args[args.index("--strength") + 1] = strength
        assert invoke(args).exit_code == 0
        pixels.append(np.asarray(Image.open(written(tmp_path / strength)[0])).astype(int))
    assert np.abs(pixels[0] - pixels[1]).max() > 0


def test_the_input_is_part_of_the_run(tiny_checkpoint, tmp_path):
    """Its path, size and SHA-256 in run.json, the run folder's name, the PNG and --report."""
    image_path = photo(tmp_path / "in.png")
    digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
    recorded = f"{image_path.absolute()} 40x56 sha256:{digest}"
    folders = {}
    for name, seed in (("first", 0), ("second", 1)):
        photo(image_path, seed=seed)
        out = tmp_path / name
        assert invoke(img2img_args(tiny_checkpoint, image_path, out, 32, "--report", str(out / "r.json"))).exit_code == 0
        (run_json,) = (out / ".flux-sharded").glob("run-*/run.json")
        folders[name] = run_json.parent.name
        if name == "first":
            settings = json.loads(run_json.read_text())["settings"]
            assert settings["images"] == [recorded] and settings["strength"] == STRENGTH
            text = Image.open(written(out)[0]).text
            assert text["image"] == recorded and text["strength"] == str(STRENGTH)
            assert json.loads((out / "r.json").read_text())["inputs"] == [
                {"path": str(image_path.absolute()), "width": 40, "height": 56, "sha256": digest}]
    assert folders["first"] != folders["second"]  # the image's content decides the run's hash


@pytest.mark.parametrize("failing", ["encode_image", "denoise", "decode"])
def test_resume_from_each_stage_boundary_gives_the_same_png(tiny_checkpoint, tmp_path, monkeypatch, failing):
    image_path = photo(tmp_path / "in.png")
    assert invoke(img2img_args(tiny_checkpoint, image_path, tmp_path / "reference")).exit_code == 0
    out = tmp_path / "out"
    stage = next(stage for stage in STAGES if stage.NAME == failing)
    with monkeypatch.context() as patch:
        patch.setattr(stage, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped for the test")))
        failed = invoke(img2img_args(tiny_checkpoint, image_path, out))
    assert failed.exit_code == 1 and f"{failing} failed" in error_line(failed)
    (run_dir,) = (out / ".flux-sharded").glob("run-*")
    if failing != "encode_image":  # encoded and kept: the resume does not need the file
        image_path.rename(tmp_path / "moved.png")
    loads = []
    for each in STAGES:
        monkeypatch.setattr(each, "load", lambda *a, _real=each.load, _name=each.NAME, **k: loads.append(_name)
                            or _real(*a, **k))
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert loads == [name for name in ("encode_image", "denoise", "decode")
                     if ("encode_image", "denoise", "decode").index(name) >= ("encode_image", "denoise",
                                                                               "decode").index(failing)]
    assert_same_pixels(np.asarray(Image.open(written(out)[0])), np.asarray(Image.open(written(tmp_path / "reference")[0])))


def test_resume_refuses_an_input_changed_or_gone_while_it_is_still_needed(tiny_checkpoint, tmp_path, monkeypatch):
    image_path = photo(tmp_path / "in.png")
    out = tmp_path / "out"
    stage = next(stage for stage in STAGES if stage.NAME == IMAGE_STAGE)
    with monkeypatch.context() as patch:
        patch.setattr(stage, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped for the test")))
        assert invoke(img2img_args(tiny_checkpoint, image_path, out)).exit_code == 1
    (run_dir,) = (out / ".flux-sharded").glob("run-*")
    photo(image_path, seed=3)  # same name, other pixels
    changed = invoke(["--resume", str(run_dir)])
    assert changed.exit_code == 2
    assert error_line(changed).startswith(f"Error: --resume: the input image {image_path.absolute()} changed since "
                                          f"the run in {run_dir} began")
    image_path.unlink()
    gone = invoke(["--resume", str(run_dir)])
    assert gone.exit_code == 2
    assert error_line(gone).startswith(f"Error: --resume: the run in {run_dir} has not encoded its input images yet "
                                       f"and needs {image_path.absolute()} again")
    assert not written(out)


def test_resume_after_encode_image_refuses_an_input_that_changed(tiny_checkpoint, tmp_path, monkeypatch):
    image_path = photo(tmp_path / "in.png")
    out = tmp_path / "out"
    stage = next(stage for stage in STAGES if stage.NAME == "denoise")
    with monkeypatch.context() as patch:
        patch.setattr(stage, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped for the test")))
        assert invoke(img2img_args(tiny_checkpoint, image_path, out)).exit_code == 1
    (run_dir,) = (out / ".flux-sharded").glob("run-*")
    photo(image_path, seed=3)
    changed = invoke(["--resume", str(run_dir)])
    assert changed.exit_code == 2 and "changed since" in error_line(changed)
    again = invoke(["--resume", str(run_dir), "--image", str(image_path)])  # a conflicting --image is named
    assert again.exit_code == 2 and error_line(again).startswith(f"Error: --resume: --image {image_path.absolute()}")


@pytest.mark.parametrize("mode", ["P", "RGBA", "L", "CMYK", "LA"])
def test_other_modes_are_converted_as_diffusers_load_image_converts_them(tmp_path, mode):
    from diffusers.utils import load_image

    path = photo(tmp_path / ("in.jpg" if mode == "CMYK" else "in.png"), mode=mode)
    converted = read_image(str(path)).image
    assert converted.mode == "RGB"
    assert np.array_equal(np.asarray(converted), np.asarray(load_image(str(path))))


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels, with one row of data: what a decompression
    bomb's header looks like to PIL, without the gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    whole = photo(tmp_path / "whole.png", size=(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(deep)
    folder = tmp_path / "folder"
    folder.mkdir()
    transparent = mask(tmp_path / "transparent.png", (64, 64))
    Image.open(transparent).convert("LA").save(transparent)  # opaque...
    pixels = np.asarray(Image.open(transparent)).copy()
    pixels[:8, :8, 1] = 0  # ...but for one corner
    Image.fromarray(pixels, "LA").save(transparent)
    return {"text": text, "truncated": truncated, "bomb": _png_claiming(tmp_path / "bomb.png", 30000, 30000),
            "deep": deep, "folder": folder, "missing": tmp_path / "missing.png", "good": whole,
            "small": mask(tmp_path / "small.png", (40, 56)), "transparent": transparent}


@pytest.mark.parametrize(
    "case, message",
    [
        (["--image", "{text}"], "--image '{text}' is not an image PIL can read; give a PNG, JPEG or WebP file"),
        (["--image", "{truncated}"], "--image '{truncated}' is damaged or truncated ("),
        (["--image", "{bomb}"], "--image '{bomb}' has more pixels than PIL decodes safely ("),
        (["--image", "{deep}"], "--image '{deep}' has I;16 pixels (more than 8 bits per channel), which converting"),
        (["--image", "{folder}"], "--image '{folder}' is a folder; give an image file in it"),
        (["--image", "{missing}"], "--image '{missing}': no such file; check the path"),
        (["--image", "{good}", "--image", "{good}"], "--image given 2 times: "),
        (["--image", "{good}", "--strength", "0"], "--strength 0.0: give a number above 0 and at most 1"),
        (["--image", "{good}", "--strength", "1.5"], "--strength 1.5: give a number above 0 and at most 1"),
        (["--image", "{good}", "--strength", "nan"], "--strength nan: give a number above 0 and at most 1"),
        (["--strength", "0.8"], "--strength 0.8 needs an input image to redraw: give --image PATH"),
        (["--image", "{good}", "--strength", "1e-20", "--steps", "4"],  # 4 - 4e-20 rounds to 4: int() skips all 4
         "--strength 1e-20 with --steps 4 leaves no denoising step"),
        (["--image", "{good}", "--mask", "{text}"], "--mask '{text}' is not an image PIL can read"),
        (["--mask", "{good}"], "--mask needs the image it paints into: give --image PATH, or leave out --mask"),
        (["--image", "{good}", "--mask", ""], "--mask: empty; give an image file"),
        (["--image", "{good}", "--mask", "{small}"], "--mask {small}: 40x56 pixels, but the --image {good} is 64x64; "
         "give a mask of the image's size"),
        (["--image", "{good}", "--mask", "{transparent}"], "--mask '{transparent}' has transparent pixels, which the "
         "inpainting pipelines ignore"),
    ],
)
def test_each_bad_input_is_one_error_line_and_nothing_is_written(tiny_checkpoint, tmp_path, case, message):
    paths = bad_inputs(tmp_path)
    args = [part.format(**paths) for part in case]
    out = tmp_path / "out"
    base = ["--model", str(tiny_checkpoint), "--prompt", "a dog", "--steps", "4", "--height", "32", "--width", "32",
            "--max-memory", "cpu=2GB", "--out", str(out)]
    result = invoke(base + args)
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith("Error: " + message.format(**paths)), error_line(result)
    if "given 2 times" in message:  # FLUX.1's image pipeline takes one
        assert error_line(result).endswith("give at most 1")
    assert not out.exists()


@pytest.mark.parametrize("masked", [False, True])
def test_the_plan_counts_the_vae_encode_at_the_run_size(tiny_checkpoint, tmp_path, masked):
    """encode_image's estimate (activations.vae_encode_activation_bytes) bounds the measured peak of
    the stage's run and is within the margin's reach of it; inpainting's second encode (the masked
    image) follows the first, so one encode's activations are its peak too."""
    from flux_sharded.checkpoint import resolve_checkpoint
    from flux_sharded.handoff import GenerationSettings, Handoff
    from flux_sharded.memory import TensorBytesTracker
    from flux_sharded.plan import plan_run
    from flux_sharded.stages import encode_image

    image = read_image(str(photo(tmp_path / "in.png")))
    masks = (read_image(str(mask(tmp_path / "mask.png")), "--mask"),) if masked else ()
    settings = GenerationSettings(str(tiny_checkpoint), ("a dog",), (0,), 4, 3.5, 128, 96, 64, "float32",
                                  images=(image.saved_text,), mask="".join(each.saved_text for each in masks))
    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    request = runner.RunRequest(checkpoint, settings, {"cpu": 10**12}, tmp_path, input_images=(image, *masks))
    plan = plan_run(runner.plan_inputs(request), request.budget).stage(IMAGE_STAGE)
    pipeline = encode_image.load(checkpoint, plan, torch.float32)
    weights = [*pipeline.vae.parameters(), *pipeline.vae.buffers()]
    with TensorBytesTracker(existing=weights) as tracker:
        encode_image.run(pipeline, Handoff(settings), images=[image.image], mask=masks[0].image if masks else None)
    planned = plan.activation_bytes["cpu"]
    assert 1.0 <= planned / tracker.peak_bytes <= 1.6, (planned, tracker.peak_bytes)


def test_dry_run_of_flux_dev_image_to_image_plans_the_vae_encode_at_the_run_size(tmp_path):
    """Offline, from the shipped configs: encode_image holds FLUX.1-dev's VAE and one encode's
    activations at 1024x1024 (4 x 128 channels x 1024^2 pixels x 2 bytes + the image, with the margin)."""
    from flux_sharded.activations import vae_encode_activation_bytes
    from flux_sharded.checkpoint import shipped_config_dir

    image_path = photo(tmp_path / "in.png", size=(800, 600))
    result = invoke(["--prompt", "a dog", "--image", str(image_path), "--max-memory", "0=24GiB,cpu=64GB", "--dry-run",
                     "--report", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "plan.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["encode", "encode_image", "denoise", "decode"]
    stage = report["stages"][1]
    config = json.loads((shipped_config_dir("FLUX.1-dev") / "vae" / "config.json").read_text())
    activation = vae_encode_activation_bytes(config, 1024, 1024, 2)
    assert activation == int((4 * 128 + 3) * 1024 * 1024 * 2 * 1.15)
    assert stage["planned_bytes"] == {"0": stage["weight_bytes"]["0"] + activation}
    assert 160e6 < stage["weight_bytes"]["0"] < 170e6  # the VAE in bf16
    assert report["inputs"] == [{"path": str(image_path.absolute()), "width": 800, "height": 600,
                                 "sha256": hashlib.sha256(image_path.read_bytes()).hexdigest()}]
    assert {p.name for p in tmp_path.iterdir()} == {"in.png", "plan.json"}  # nothing else written


# ---------------------------------------------------------------- FLUX.2 reference images

def one_piece_references(checkpoint: Path, image_paths: list[Path], seed: int, size: int, guidance: float,
                         steps: int = 2) -> np.ndarray:
    """The checkpoint's Flux2Pipeline / Flux2KleinPipeline, whole, with image=[...] as load_image reads them."""
    import diffusers
    from diffusers.utils import load_image

    name = json.loads((checkpoint / "model_index.json").read_text())["_class_name"]
    pipeline = getattr(diffusers, name).from_pretrained(checkpoint, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(prompt="a photo of a dog", image=[load_image(str(path)) for path in image_paths], height=size,
                     width=size, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image)


@pytest.mark.parametrize("fixture, sizes, guidance", [
    ("tiny_dev", [(96, 80), (64, 72)], 4.0),  # FLUX.2-dev with two references
    ("tiny_klein", [(80, 64)], 1.0),  # klein with one
])
def test_staged_references_png_equals_the_one_piece_pipeline(request, tmp_path, fixture, sizes, guidance):
    checkpoint = request.getfixturevalue(fixture)
    paths = [photo(tmp_path / f"ref{index}.png", size=size, seed=index) for index, size in enumerate(sizes)]
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--prompt", "a photo of a dog", "--steps", "2", "--seed", str(SEED),
            "--height", "32", "--width", "32", "--dtype", "float32", "--max-memory", "cpu=4GB", "--out", str(out),
            "--report", str(tmp_path / "r.json")]
    for path in paths:
        args += ["--image", str(path)]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    staged = np.asarray(Image.open(written(out)[0]))
    assert_same_pixels(staged, one_piece_references(checkpoint, paths, SEED, 32, guidance))
    # the references decide the pixels
    plain = invoke(args[: args.index("--image")] + ["--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert np.abs(np.asarray(Image.open(written(tmp_path / "plain")[0])).astype(int) - staged).max() > 0


def test_resume_of_a_reference_run_after_encode_image_needs_no_reference(tiny_klein, tmp_path, monkeypatch):
    paths = [photo(tmp_path / "ref.png", size=(80, 64))]
    args = ["--model", str(tiny_klein), "--prompt", "a photo of a dog", "--steps", "2", "--seed", str(SEED),
            "--height", "32", "--width", "32", "--dtype", "float32", "--max-memory", "cpu=4GB", "--image", str(paths[0])]
    assert invoke(args + ["--out", str(tmp_path / "reference")]).exit_code == 0
    stage = next(stage for stage in STAGES if stage.NAME == "denoise")
    with monkeypatch.context() as patch:
        patch.setattr(stage, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped for the test")))
        assert invoke(args + ["--out", str(tmp_path / "out")]).exit_code == 1
    paths[0].unlink()
    (run_dir,) = (tmp_path / "out" / ".flux-sharded").glob("run-*")
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert_same_pixels(np.asarray(Image.open(written(tmp_path / "out")[0])),
                       np.asarray(Image.open(written(tmp_path / "reference")[0])))


def test_reference_sizes_are_the_pipelines(tmp_path):
    """families.reference_size (what the plan and a resume's checks count) against Flux2Pipeline's own
    step 4 on images above and below its 1024^2 area, and its image checks' limits."""
    import diffusers
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    from flux_sharded.families import FLUX_2_DEV, reference_size
    from flux_sharded.stages import flux2

    check = inspect.signature(Flux2ImageProcessor.check_image_input).parameters
    assert (check["min_side_length"].default, check["max_aspect_ratio"].default) == (
        FLUX_2_DEV.min_image_side, FLUX_2_DEV.max_image_aspect)
    pipeline = diffusers.Flux2Pipeline(diffusers.FlowMatchEulerDiscreteScheduler(), None, None, None, None)
    pipeline.vae_scale_factor = 8
    for size in [(1500, 900), (1030, 1030), (64, 200), (333, 77)]:
        (condition,) = flux2._condition_images(pipeline, [Image.new("RGB", size)])
        assert tuple(condition.shape[-2:]) == reference_size(size, 8), size


def test_more_references_than_the_pipeline_takes_and_small_ones_are_refused(tiny_klein, tmp_path):
    out = tmp_path / "out"
    base = ["--model", str(tiny_klein), "--prompt", "a dog", "--max-memory", "cpu=2GB", "--out", str(out)]
    many = [part for index in range(5) for part in ("--image", str(photo(tmp_path / f"{index}.png", (64, 64))))]
    result = invoke(base + many)
    assert result.exit_code == 2
    assert error_line(result) == ("Error: --image given 5 times: Flux2KleinPipeline takes at most 4 input image(s); "
                                  "give at most 4")
    small = photo(tmp_path / "small.png", size=(40, 56))
    result = invoke(base + ["--image", str(small)])
    assert result.exit_code == 2
    assert error_line(result) == (f"Error: --image {small.absolute()}: 40x56 pixels; Flux2KleinPipeline takes images "
                                  "of at least 64 pixels a side and at most 8:1; give a larger or less elongated image")
    result = invoke(base + ["--image", str(photo(tmp_path / "ok.png", (64, 64))), "--strength", "0.5"])
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: --strength 0.5: FLUX.2-klein's Flux2KleinPipeline takes no strength")
    assert not out.exists()


# ---------------------------------------------------------------- FLUX.1 Kontext

@pytest.fixture(scope="module")
def tiny_kontext(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny FLUX.1 checkpoint as FLUX.1-Kontext-dev is one: FLUX.1's components, FluxKontextPipeline."""
    import shutil

    copy = tmp_path_factory.mktemp("ckpt") / "kontext"
    shutil.copytree(tiny_checkpoint, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    return copy


def one_piece_kontext(checkpoint: Path, image_path: Path | None, seed: int, size: int, steps: int = 2,
                      **guidance) -> np.ndarray:
    """FluxKontextPipeline, whole, with the run's area as max_area (what the staged run passes)."""
    import diffusers
    from diffusers.utils import load_image

    pipeline = diffusers.FluxKontextPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    image = None if image_path is None else load_image(str(image_path))
    return np.asarray(pipeline(prompt="a photo of a dog", image=image, height=size, width=size, max_area=size * size,
                               num_inference_steps=steps, guidance_scale=3.5, **guidance,
                               generator=torch.Generator("cpu").manual_seed(seed)).images[0])


@pytest.mark.parametrize("with_image, true_cfg", [(True, False), (False, False), (True, True)])
def test_staged_kontext_png_equals_the_one_piece_pipeline(tiny_kontext, tmp_path, with_image, true_cfg):
    image_path = photo(tmp_path / "in.png", size=(72, 48))
    out = tmp_path / "out"
    args = ["--model", str(tiny_kontext), "--prompt", "a photo of a dog", "--steps", "2", "--seed", str(SEED),
            "--height", "32", "--width", "32", "--dtype", "float32", "--max-memory", "cpu=4GB", "--out", str(out),
            "--report", str(tmp_path / "r.json")] + (["--image", str(image_path)] if with_image else []) + (
        ["--true-cfg", "3", "--negative-prompt", "blurry"] if true_cfg else [])
    result = invoke(args)
    assert result.exit_code == 0, result.output
    staged = np.asarray(Image.open(written(out)[0]))
    assert staged.shape == (32, 32, 3)
    guidance = {"true_cfg_scale": 3.0, "negative_prompt": "blurry"} if true_cfg else {}
    assert_same_pixels(staged, one_piece_kontext(tiny_kontext, image_path if with_image else None, SEED, 32,
                                                 **guidance))
    stages = [stage["name"] for stage in json.loads((tmp_path / "r.json").read_text())["stages"]]
    assert ("encode_image" in stages) == with_image


def test_kontext_input_size_and_tokens_are_the_pipelines(tiny_kontext, tmp_path):
    """families.kontext_size (the plan's and a resume's) against the encoded latents' shape, and
    the transformer's plan counting the input image's tokens."""
    from flux_sharded.checkpoint import resolve_checkpoint
    from flux_sharded.families import kontext_size
    from flux_sharded.plan import plan_run
    from flux_sharded.stages import kontext
    from flux_sharded.stages.vae import vae_pipeline

    image = read_image(str(photo(tmp_path / "in.png", size=(120, 64))))
    checkpoint = resolve_checkpoint(str(tiny_kontext))
    settings_args = (str(tiny_kontext), ("a dog",), (0,), 2, 3.5, 32, 32, 64, "float32")
    from flux_sharded.handoff import GenerationSettings

    with_image = GenerationSettings(*settings_args, images=(image.saved_text,))
    request = runner.RunRequest(checkpoint, with_image, {"cpu": 10**12}, tmp_path, input_images=(image,))
    plan = plan_run(runner.plan_inputs(request), request.budget)
    pipeline = vae_pipeline(checkpoint, plan.stage(IMAGE_STAGE), torch.float32, "FluxKontextPipeline")
    latents = kontext.encode_images(pipeline, [image.image], with_image, range(1))["input_latents"]
    height, width = kontext_size(image.size, 8)
    assert tuple(latents.shape[-2:]) == (height // 8, width // 8)
    plain = plan_run(runner.plan_inputs(runner.RunRequest(checkpoint, GenerationSettings(*settings_args),
                                                          {"cpu": 10**12}, tmp_path)), request.budget)
    assert plan.stage("denoise").activation_bytes["cpu"] > plain.stage("denoise").activation_bytes["cpu"]


def test_dry_run_of_flux_kontext_dev_plans_offline_with_its_input(tmp_path):
    image_path = photo(tmp_path / "in.png", size=(1200, 800))
    result = invoke(["--model", "black-forest-labs/FLUX.1-Kontext-dev", "--prompt", "a dog", "--image",
                     str(image_path), "--max-memory", "0=24GiB,cpu=64GB", "--dry-run", "--report",
                     str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "plan.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["encode", "encode_image", "denoise", "decode"]
    result = invoke(["--model", "black-forest-labs/FLUX.1-Kontext-dev", "--prompt", "a dog", "--image",
                     str(image_path), "--strength", "0.5", "--max-memory", "0=24GiB,cpu=64GB", "--dry-run"])
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: --strength 0.5: FLUX.1-Kontext's FluxKontextPipeline takes no strength")


# ---------------------------------------------------------------- negative prompt, true classifier-free guidance

@pytest.mark.parametrize("negative", ["blurry, low quality", ""])
def test_true_cfg_with_a_negative_prompt_equals_the_one_piece_pipeline(tiny_checkpoint, tmp_path, negative):
    import diffusers

    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoint), "--prompt", "a photo of a dog", "--steps", "2", "--seed", str(SEED),
            "--height", "32", "--width", "32", "--dtype", "float32", "--max-memory", "cpu=4GB", "--out", str(out),
            "--true-cfg", "4", "--negative-prompt", negative, "--report", str(tmp_path / "r.json")]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    pipeline = diffusers.FluxPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    expected = np.asarray(pipeline(prompt="a photo of a dog", negative_prompt=negative, true_cfg_scale=4.0, height=32,
                                   width=32, num_inference_steps=2,
                                   generator=torch.Generator("cpu").manual_seed(SEED)).images[0])
    staged = np.asarray(Image.open(written(out)[0]))
    assert_same_pixels(staged, expected)
    text = Image.open(written(out)[0]).text
    assert text["true_cfg"] == "4.0" and text["negative_prompt"] == negative
    plain = invoke(args[: args.index("--true-cfg")] + ["--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0
    assert np.abs(np.asarray(Image.open(written(tmp_path / "plain")[0])).astype(int) - staged).max() > 0


@pytest.mark.parametrize("extra, message", [
    (["--negative-prompt", "blurry"], "--negative-prompt has no effect without true classifier-free guidance"),
    (["--true-cfg", "0.5"], "--true-cfg 0.5: give a finite scale of 1 or more"),
    (["--true-cfg", "inf"], "--true-cfg inf: give a finite scale of 1 or more"),
])
def test_bad_true_cfg_options_are_one_error_line(tiny_checkpoint, tmp_path, extra, message):
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_checkpoint), "--prompt", "a dog", "--max-memory", "cpu=2GB", "--out",
                     str(out), *extra])
    assert result.exit_code == 2
    assert error_line(result).startswith(f"Error: {message}")
    assert not out.exists()


def test_true_cfg_on_flux2_is_refused(tiny_klein, tmp_path):
    result = invoke(["--model", str(tiny_klein), "--prompt", "a dog", "--max-memory", "cpu=2GB", "--out",
                     str(tmp_path / "out"), "--true-cfg", "3"])
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: --true-cfg 3: FLUX.2-klein's Flux2KleinPipeline takes no negative "
                                         "prompt")


# ---------------------------------------------------------------- inpainting (--mask)

INPAINT_STRENGTH = 0.7


def inpaint_args(checkpoint: Path, image_path: Path, mask_path: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(checkpoint), "--prompt", "a photo of a dog", "--image", str(image_path), "--mask",
            str(mask_path), "--strength", str(INPAINT_STRENGTH), "--steps", "2", "--seed", str(SEED), "--dtype",
            "float32", "--max-memory", "cpu=4GB", "--out", str(out), *extra]


def one_piece_inpaint(checkpoint: Path, image_path: Path, mask_path: Path, seed: int = SEED,
                      reference: Path | None = None, **arguments) -> np.ndarray:
    """The family's inpainting pipeline (FluxInpaintPipeline, Flux2KleinInpaintPipeline), whole, on the
    CPU, with the image and mask as diffusers' load_image reads them."""
    import diffusers
    from diffusers.utils import load_image

    family = {"FluxPipeline": "FluxInpaintPipeline", "Flux2KleinPipeline": "Flux2KleinInpaintPipeline"}
    name = family[json.loads((checkpoint / "model_index.json").read_text())["_class_name"]]
    pipeline = getattr(diffusers, name).from_pretrained(checkpoint, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    guidance = 3.5 if name == "FluxInpaintPipeline" else 1.0  # the families' defaults
    if reference is not None:  # klein's image_reference
        arguments["image_reference"] = load_image(str(reference))
    return np.asarray(pipeline(prompt="a photo of a dog", image=load_image(str(image_path)),
                               mask_image=load_image(str(mask_path)), strength=INPAINT_STRENGTH,
                               num_inference_steps=2, guidance_scale=guidance,
                               generator=torch.Generator("cpu").manual_seed(seed), **arguments).images[0])


@pytest.mark.parametrize("fixture, image_size, size_args, reference", [
    # FLUX.1: painted at the run's size; with true classifier-free guidance on a negative prompt
    ("tiny_checkpoint", (40, 56), ["--height", "32", "--width", "32", "--true-cfg", "3", "--negative-prompt", "blurry"],
     False),
    ("tiny_klein", (64, 80), [], False),  # klein: at the image's own size (80x64, the default)
    ("tiny_klein", (64, 80), [], True),  # klein with an image_reference (a second --image)
])
def test_staged_inpainting_png_equals_the_one_piece_pipeline(request, tmp_path, fixture, image_size, size_args,
                                                             reference):
    """And the mask is part of the run: run.json, the run's hash, the PNG's text and --report."""
    checkpoint = request.getfixturevalue(fixture)
    image_path, mask_path = photo(tmp_path / "in.png", size=image_size), mask(tmp_path / "mask.png", image_size)
    reference_path = photo(tmp_path / "ref.png", size=(96, 72), seed=4) if reference else None
    out = tmp_path / "out"
    result = invoke(inpaint_args(checkpoint, image_path, mask_path, out, *size_args, "--report",
                                 str(tmp_path / "r.json"), *(["--image", str(reference_path)] if reference else [])))
    assert result.exit_code == 0, result.output
    staged = np.asarray(Image.open(written(out)[0]))
    sizes = {"height": 32, "width": 32, "true_cfg_scale": 3.0, "negative_prompt": "blurry"} if size_args else {}
    assert_same_pixels(staged, one_piece_inpaint(checkpoint, image_path, mask_path, reference=reference_path,
                                                 **sizes))
    assert staged.shape[:2] == ((32, 32) if size_args else image_size[::-1]) and staged.std() > 10
    report = json.loads((tmp_path / "r.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["encode", "encode_image", "denoise", "decode"]
    digest = hashlib.sha256(mask_path.read_bytes()).hexdigest()
    recorded = f"{mask_path.absolute()} {image_size[0]}x{image_size[1]} sha256:{digest}"
    assert report["mask"] == {"path": str(mask_path.absolute()), "width": image_size[0], "height": image_size[1],
                              "sha256": digest}
    assert Image.open(written(out)[0]).text["mask"] == recorded
    (run_json,) = (out / ".flux-sharded").glob("run-*/run.json")
    assert json.loads(run_json.read_text())["settings"]["mask"] == recorded
    if fixture == "tiny_klein":  # the rest is the families' common code: once is enough
        if reference:  # the reference decides the pixels
            plain = invoke(inpaint_args(checkpoint, image_path, mask_path, tmp_path / "plain"))
            assert plain.exit_code == 0, plain.output
            assert np.abs(np.asarray(Image.open(written(tmp_path / "plain")[0])).astype(int) - staged).max() > 0
        return
    # the mask decides the pixels and the run's hash: the whole image redrawn differs
    Image.new("L", image_size, 255).save(mask_path)
    other = invoke(inpaint_args(checkpoint, image_path, mask_path, tmp_path / "other", *size_args))
    assert other.exit_code == 0, other.output
    assert np.abs(np.asarray(Image.open(written(tmp_path / "other")[0])).astype(int) - staged).max() > 0
    (other_json,) = (tmp_path / "other" / ".flux-sharded").glob("run-*/run.json")
    assert other_json.parent.name != run_json.parent.name


def test_an_encode_without_seeds_runs_once_for_every_batch(tiny_klein, tmp_path, monkeypatch):
    """klein encodes its image with the VAE's mode: three images in batches of two are encoded once,
    and the last image (the short batch's) is still the one-piece pipeline's of its seed."""
    from diffusers import AutoencoderKLFlux2

    image_path, mask_path = photo(tmp_path / "in.png", size=(64, 80)), mask(tmp_path / "mask.png", (64, 80))
    encodes = []
    real = AutoencoderKLFlux2.encode
    monkeypatch.setattr(AutoencoderKLFlux2, "encode", lambda self, *a, **k: encodes.append(1) or real(self, *a, **k))
    result = invoke(inpaint_args(tiny_klein, image_path, mask_path, tmp_path / "out", "--num-images-per-prompt", "3",
                                 "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    assert len(encodes) == 1
    assert_same_pixels(np.asarray(Image.open(written(tmp_path / "out")[2])),
                       one_piece_inpaint(tiny_klein, image_path, mask_path, seed=SEED + 2))


@pytest.mark.parametrize("fixture, image_size, sizes", [("tiny_checkpoint", (40, 56), {"height": 32, "width": 32}),
                                                        ("tiny_klein", (64, 80), {})])
def test_resume_of_an_inpainting_run_after_encode_image(request, tmp_path, monkeypatch, fixture, image_size, sizes):
    """Stopped in denoise: a mask changed since is refused; once it is gone, the run continues from its
    kept encode (its tensors' shapes checked: families.Family.inputs_encoded; the files are needed no
    more) to the one-piece pipeline's PNG."""
    checkpoint = request.getfixturevalue(fixture)
    image_path, mask_path = photo(tmp_path / "in.png", size=image_size), mask(tmp_path / "mask.png", image_size)
    out = tmp_path / "out"
    stage = next(stage for stage in STAGES if stage.NAME == "denoise")
    size_args = [part for name, value in sizes.items() for part in (f"--{name}", str(value))]
    with monkeypatch.context() as patch:
        patch.setattr(stage, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped for the test")))
        failed = invoke(inpaint_args(checkpoint, image_path, mask_path, out, *size_args))
    assert failed.exit_code == 1 and "denoise failed" in error_line(failed)
    (run_dir,) = (out / ".flux-sharded").glob("run-*")
    original = mask_path.read_bytes()
    Image.new("L", image_size, 255).save(mask_path)
    changed = invoke(["--resume", str(run_dir)])
    assert changed.exit_code == 2
    assert error_line(changed).startswith(f"Error: --resume: the mask {mask_path.absolute()} changed since the run "
                                          f"in {run_dir} began")
    mask_path.write_bytes(original)
    expected = one_piece_inpaint(checkpoint, image_path, mask_path, **sizes)
    mask_path.unlink()
    image_path.unlink()
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert_same_pixels(np.asarray(Image.open(written(out)[0])), expected)


def test_an_inpainting_runs_defaults_are_its_pipelines(tiny_klein, tmp_path):
    """klein's inpainting paints at its image's size and strength 0.8 where none are given (FLUX.1's
    strength is its image-to-image one); each pipeline's own default, read from the installed diffusers."""
    import diffusers

    from flux_sharded.api import Model
    from flux_sharded.families import FLUX_1, FLUX_2_KLEIN
    from flux_sharded.prompts import PromptLine

    for family in (FLUX_1, FLUX_2_KLEIN):
        call = inspect.signature(getattr(diffusers, family.inpaint_pipeline).__call__).parameters
        assert call["strength"].default == family.inpaint_strength
    image_path, mask_path = photo(tmp_path / "in.png", (96, 72)), mask(tmp_path / "mask.png", (96, 72))
    model = Model(str(tiny_klein), max_memory="cpu=2GB")
    settings = model.request([PromptLine("a dog")], 0, 1, tmp_path, images=(str(image_path),),
                             mask=str(mask_path)).settings
    assert (settings.strength, settings.height, settings.width) == (0.8, 64, 96)
    given = model.request([PromptLine("a dog")], 0, 1, tmp_path, images=(str(image_path),), mask=str(mask_path),
                          strength=0.5).settings
    assert given.strength == 0.5


def test_a_mask_without_inpainting_or_at_another_size_than_klein_paints_is_refused(tiny_klein, tiny_kontext,
                                                                                   tmp_path):
    image_path, mask_path = photo(tmp_path / "in.png", (64, 80)), mask(tmp_path / "mask.png", (64, 80))
    out = tmp_path / "out"
    base = ["--prompt", "a dog", "--max-memory", "cpu=2GB", "--out", str(out), "--image", str(image_path), "--mask",
            str(mask_path)]
    result = invoke(["--model", str(tiny_kontext), *base])
    assert result.exit_code == 2
    assert error_line(result) == ("Error: --mask: FLUX.1-Kontext (FluxKontextPipeline) does no inpainting here; leave "
                                  "out --mask, or use a checkpoint that does (FLUX.1 (FluxInpaintPipeline), FLUX.1-Fill (FluxFillPipeline), "
                                  "FLUX.2-klein (Flux2KleinInpaintPipeline))")
    result = invoke(["--model", str(tiny_klein), *base, "--image", str(image_path), "--image", str(image_path)])
    assert result.exit_code == 2
    assert error_line(result) == ("Error: --image given 3 times: Flux2KleinInpaintPipeline paints into one image under "
                                  "--mask and takes 1 reference image (a second --image); give --image at most 2 "
                                  "time(s)")
    result = invoke(["--model", str(tiny_klein), *base, "--height", "64", "--width", "64"])
    assert result.exit_code == 2
    assert error_line(result) == ("Error: --height 64 --width 64: Flux2KleinInpaintPipeline paints at its input "
                                  "image's size, 64x80 for the 64x80 --image (at most 1024x1024 pixels, cut to "
                                  "multiples of 2 x the VAE's factor); leave out --height and --width, or give "
                                  "--height 80 --width 64")
    assert not out.exists()


def test_dry_run_of_an_inpainting_run_plans_its_vae_encodes(tmp_path):
    """Offline, from the shipped configs: FLUX.1-dev encodes the image and the masked image at the
    run's size one after the other (one encode's activations); klein-4B paints at the image's own
    size (800x592 for 800x600), encodes it at that size, and its transformer sees the image's tokens
    as a reference: the plan of the references run at that size."""
    from flux_sharded.activations import vae_encode_activation_bytes
    from flux_sharded.checkpoint import shipped_config_dir

    image_path, mask_path = photo(tmp_path / "in.png", size=(800, 600)), mask(tmp_path / "mask.png", (800, 600))

    def plan(model: str, *extra: str) -> tuple[dict, dict, str]:
        report_path = tmp_path / "plan.json"
        result = invoke(["--model", f"black-forest-labs/{model}", "--prompt", "a dog", "--image", str(image_path),
                         "--max-memory", "0=24GiB,cpu=64GB", "--dry-run", "--report", str(report_path), *extra])
        assert result.exit_code == 0, result.output
        report = json.loads(report_path.read_text())
        return {stage["name"]: stage for stage in report["stages"]}, report, result.output

    for model, (height, width) in (("FLUX.1-dev", (1024, 1024)), ("FLUX.2-klein-4B", (592, 800))):
        stages, report, output = plan(model, "--mask", str(mask_path))
        assert f"plan for {width}x{height}," in output
        vae = json.loads((shipped_config_dir(model) / "vae" / "config.json").read_text())
        stage = stages["encode_image"]
        assert stage["planned_bytes"] == {"0": stage["weight_bytes"]["0"] + vae_encode_activation_bytes(
            vae, height, width, 2)}
        assert report["mask"]["sha256"] == hashlib.sha256(mask_path.read_bytes()).hexdigest()
    references, _, _ = plan("FLUX.2-klein-4B", "--height", "592", "--width", "800")
    assert stages["denoise"]["planned_bytes"] == references["denoise"]["planned_bytes"]


# ---------------------------------------------------------------- FLUX.1 Fill (FluxFillPipeline)

@pytest.fixture(scope="module")
def tiny_fill(tmp_path_factory) -> Path:
    """A tiny FLUX.1 Fill checkpoint: FluxFillPipeline's model_index.json, a transformer of in_channels
    2 x 16 + 4 x 8^2 = 288 (the latents, the masked image, the mask) and out_channels 16."""
    from flux_sharded.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "fill", fill=True)


def one_piece_fill(checkpoint: Path, image_path: Path, mask_path: Path, seeds: list[int], **arguments) -> list:
    """diffusers' FluxFillPipeline, whole, on the CPU, at its own defaults but the steps and size."""
    import diffusers
    from diffusers.utils import load_image

    pipeline = diffusers.FluxFillPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(prompt="a photo of a dog", image=load_image(str(image_path)),
                      mask_image=load_image(str(mask_path)), height=32, width=48, num_inference_steps=3,
                      num_images_per_prompt=len(seeds),
                      generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds], **arguments).images
    return [np.asarray(image) for image in images]


def fill_args(checkpoint: Path, image_path: Path, mask_path: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(checkpoint), "--prompt", "a photo of a dog", "--image", str(image_path), "--mask",
            str(mask_path), "--steps", "3", "--seed", str(SEED), "--height", "32", "--width", "48", "--dtype",
            "float32", "--max-memory", "cpu=4GB", "--out", str(out), *extra]


@pytest.mark.parametrize("extra, arguments", [
    (["--num-images-per-prompt", "2", "--batch-size", "2"], {}),  # its defaults: guidance 30, strength 1
    (["--strength", "0.7", "--guidance", "12"], {"strength": 0.7, "guidance_scale": 12.0}),
])
def test_staged_fill_png_equals_the_one_piece_pipeline(tiny_fill, tmp_path, extra, arguments):
    """FluxFillPipeline samples the image, then draws the noise, then samples the masked image, all
    from the batch's first generator: a batch of two, and one image at another strength and guidance,
    equal the one-piece pipeline's, which differ from the image without the mask's help (a mask
    covering everything)."""
    image_path, mask_path = photo(tmp_path / "in.png", (40, 56)), mask(tmp_path / "mask.png", (40, 56))
    result = invoke(fill_args(tiny_fill, image_path, mask_path, tmp_path / "out", *extra, "--report",
                              str(tmp_path / "r.json")))
    assert result.exit_code == 0, result.output
    seeds = [SEED, SEED + 1] if "--batch-size" in extra else [SEED]
    expected = one_piece_fill(tiny_fill, image_path, mask_path, seeds, **arguments)
    staged = [np.asarray(Image.open(path)) for path in written(tmp_path / "out")]
    assert len(staged) == len(expected)
    for image, reference in zip(staged, expected):
        assert_same_pixels(image, reference)
    report = json.loads((tmp_path / "r.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["encode", "encode_image", "denoise", "decode"]
    Image.new("L", (40, 56), 255).save(mask_path)
    (everything,) = one_piece_fill(tiny_fill, image_path, mask_path, seeds[:1], **arguments)
    assert np.abs(everything.astype(int) - staged[0]).max() > 0


def test_fills_defaults_are_its_pipelines(tiny_fill, tmp_path):
    import diffusers

    from flux_sharded.api import Model
    from flux_sharded.families import FLUX_1_FILL
    from flux_sharded.prompts import PromptLine

    call = inspect.signature(diffusers.FluxFillPipeline.__call__).parameters
    assert (FLUX_1_FILL.steps, FLUX_1_FILL.guidance, FLUX_1_FILL.inpaint_strength) == (
        call["num_inference_steps"].default, call["guidance_scale"].default, call["strength"].default)
    image_path, mask_path = photo(tmp_path / "in.png", (40, 56)), mask(tmp_path / "mask.png", (40, 56))
    settings = Model(str(tiny_fill), max_memory="cpu=2GB").request(
        [PromptLine("a dog")], 0, 1, tmp_path, images=(str(image_path),), mask=str(mask_path)).settings
    assert (settings.steps, settings.guidance, settings.strength) == (50, 30.0, 1.0)


def test_resume_of_a_fill_run_after_encode_image_needs_neither_file(tiny_fill, tmp_path, monkeypatch):
    """Stopped in denoise: the kept encode (the image latents, the generators' states after the image's
    sample, the packed mask and masked image) gives the one-piece pipeline's PNG without the files."""
    image_path, mask_path = photo(tmp_path / "in.png", (40, 56)), mask(tmp_path / "mask.png", (40, 56))
    out = tmp_path / "out"
    stage = next(stage for stage in STAGES if stage.NAME == "denoise")
    with monkeypatch.context() as patch:
        patch.setattr(stage, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped for the test")))
        failed = invoke(fill_args(tiny_fill, image_path, mask_path, out))
    assert failed.exit_code == 1 and "denoise failed" in error_line(failed)
    (expected,) = one_piece_fill(tiny_fill, image_path, mask_path, [SEED])
    image_path.unlink()
    mask_path.unlink()
    (run_dir,) = (out / ".flux-sharded").glob("run-*")
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert_same_pixels(np.asarray(Image.open(written(out)[0])), expected)


def test_fill_without_a_mask_or_with_true_cfg_is_refused_in_one_line(tiny_fill, tmp_path):
    image_path, mask_path = photo(tmp_path / "in.png", (40, 56)), mask(tmp_path / "mask.png", (40, 56))
    out = tmp_path / "out"
    needs = ("Error: FLUX.1-Fill (FluxFillPipeline) only inpaints: it redraws the white part of a --mask over an "
             "--image; give --image PATH and --mask PATH (of the image's size)")
    for args in (["--prompt", "a dog"], ["--prompt", "a dog", "--image", str(image_path)]):
        result = invoke(["--model", str(tiny_fill), *args, "--max-memory", "cpu=2GB", "--out", str(out)])
        assert result.exit_code == 2 and error_line(result) == needs
    result = invoke(fill_args(tiny_fill, image_path, mask_path, out, "--true-cfg", "3", "--negative-prompt", "x"))
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: --true-cfg 3: FLUX.1-Fill's FluxFillPipeline takes no negative prompt")
    result = invoke(fill_args(tiny_fill, image_path, mask_path, out, "--strength", "0"))
    assert result.exit_code == 2  # the default it names is this run's pipeline's (FluxFillPipeline's 1), not img2img's
    assert error_line(result) == ("Error: --strength 0.0: give a number above 0 and at most 1 (the share of the "
                                  "schedule redrawn from the input image; default 1)")
    assert not out.exists()


def test_a_fill_transformer_that_does_not_take_the_mask_is_refused_before_any_weight(tiny_fill, tmp_path):
    import shutil

    folder = tmp_path / "fill"
    shutil.copytree(tiny_fill, folder)
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "in_channels": 32}))
    result = invoke(["--model", str(folder), "--prompt", "a dog", "--max-memory", "cpu=2GB", "--dry-run"])
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: --model: '{folder}': transformer/config.json field 'in_channels' is 32, but FluxFillPipeline hands it "
        "288 channels (the latents and the masked image, 16 each, and the mask, 4 x 8^2 for the VAE's scale factor "
        "8); the checkpoint is damaged or not FLUX.1-Fill: fetch that file again or give another --model")
