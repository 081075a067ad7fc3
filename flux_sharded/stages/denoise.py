"""Denoise: text embeddings -> packed latents.

Loads: the transformer alone, with the plan's device map (diffusers' "auto" strategy computed in
plan.py: whole blocks spread over the GPUs, the rest offloaded to the CPU or disk if budgeted),
and the scheduler. Runs the family's pipeline's own denoising loop (__call__ with no text encoders
and no VAE; FLUX.3: its denoise block, code.denoise_batch) so that the numbers are exactly the
one-piece pipeline's; the latents are taken, packed, after the last step (what decode unpacks:
stages/flux1.py, flux2.py, flux3.py).
Reads from the handoff: the embeddings (prompt_embeds, ...), settings (seeds, steps, guidance,
size), and for a run with input images their encoded tensors (encode_image's), which the family's
image pipeline takes instead of the images (stages/flux1.py: FluxImg2ImgPipeline). Writes: latents; each batch's as it finishes, in the run folder (todo), so that an
interruption loses at most one batch. Memory: the transformer's weights (FLUX.1 in bf16: 23.8 GB) plus the
activations of one forward pass over (H/16)*(W/16) image tokens and max_sequence_length text tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from ..budget import device_key
from ..handoff import Handoff
from ..placement import check_placement, place
from ..quantize_load import load_quantized
from .adapters import load_adapters
from .code import family_code, pipeline_family
from .interface import Share, Work

NAME = "denoise"


def todo(handoff: Handoff, share: Share) -> Work:
    """The share's images, with run's options that keep each finished batch's latents in the run
    folder as it goes, and take those an interrupted run kept (a batch's own file, or its rows in
    `share.denoised`, {image index: latents row} from the shares of another number of processes)."""
    settings, checkpoint = share.settings, share.checkpoint
    config, factor = checkpoint.transformer_config, checkpoint.vae_scale_factor
    tokens = (settings.height // (2 * factor)) * (settings.width // (2 * factor))
    batches = settings.batches(checkpoint.family.prompt_batches)
    finished = {}
    for number, batch in enumerate(batches):
        indices = [settings.image_indices[position] for position in batch]
        if all(index in share.denoised for index in indices):
            finished[number] = torch.stack([share.denoised[index] for index in indices])
        elif (kept := share.saved_batch_latents(batch, (len(batch), tokens, config["in_channels"]))) is not None:
            finished[number] = kept
    if finished:
        done = sum(len(batches[number]) for number in finished)
        share.log(f"denoise: {done} of {len(settings.prompts)} image(s) finished earlier (their latents are in "
                  f"{share.run_folder})")
    return Work(handoff, {"finished_batches": finished,
                          "on_batch_done": lambda number, latents: share.save_batch_latents(batches[number], latents)})


def finish(output: Handoff, share: Share) -> Handoff:
    """Kept in the run folder; then the batches' own files go: the handoff holds them all now."""
    share.save_handoff(output, NAME)
    share.remove_batch_latents()
    return output


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None):
    """The transformer placed by the plan's device map (placement.py): blocks on "cpu" streamed to
    the GPU by diffusers' group offloading when the plan says `streamed`, a split over GPUs by
    accelerate's dispatch, blocks on "disk" by accelerate's offload hooks; checked against the map;
    in the family's pipeline (code.denoise_pipeline)."""
    import diffusers

    plan = stage_plan.component("transformer")
    device_map = dict(plan.device_map)
    family = checkpoint.family
    transformer_class = getattr(diffusers, family.component("transformer").class_name)
    if plan.quantization:
        def adapt(model, fuse: bool) -> None:
            load_adapters(family, "transformer", model, plan.adapters, fuse=fuse)

        return family_code(family).denoise_pipeline(checkpoint, load_quantized(
            transformer_class, checkpoint.path, "transformer", plan, dtype, adapt=adapt if plan.adapters else None))
    # Loaded on the CPU first where placement.place puts it: streamed blocks, and any LoRA (adapters
    # go into a component before it is placed, stages/adapters.py).
    on_cpu = plan.streamed or bool(plan.adapters)
    transformer = transformer_class.from_pretrained(
        checkpoint.path,
        subfolder="transformer",
        device_map={"": "cpu"} if on_cpu else device_map,
        offload_folder=offload_folder,
        dtype=dtype,
        use_safetensors=True,
    )
    if on_cpu:
        load_adapters(family, "transformer", transformer, plan.adapters)
        place(transformer, device_map, streamed=plan.streamed)
    else:
        check_placement(transformer, device_map, streamed=False)
    return family_code(family).denoise_pipeline(checkpoint, transformer)


def run(pipeline, handoff: Handoff, on_image_done=None, on_step=None, finished_batches=None,
        on_batch_done=None) -> Handoff:
    """Denoise batch_size images per pass, each with its own CPU generator seeded with its seed,
    as the pipelines do for a list of generators.

    finished_batches: {batch number: latents (len(batch), tokens, channels)} denoised earlier (a
    resumed run), taken as they are; on_batch_done(number, latents) is called as each batch
    finishes, so that the runner can keep it; on_step(step, steps) after each denoising step."""
    settings = handoff.settings
    finished_batches = finished_batches or {}
    latents = []
    code = family_code(pipeline_family(pipeline))
    caller = code.image_pipeline(pipeline, settings)  # FluxImg2ImgPipeline, ... for a run with input images

    with torch.inference_mode():
        for number, batch in enumerate(settings.batches(pipeline_family(pipeline).prompt_batches)):
            if number in finished_batches:
                latents.append(finished_batches[number])
            else:
                # One batch's rows on the GPU at a time: the rest of the run's wait in RAM.
                rows = handoff.select(list(batch)).to(pipeline._execution_device)
                arguments = {"generator": [torch.Generator("cpu").manual_seed(settings.seeds[p]) for p in batch]}
                # the encoded input images (and the generators as their encode left them), what the family adds
                arguments.update(code.call_arguments(caller, rows.inputs(), settings, batch))
                latents.append(code.denoise_batch(caller, rows, settings, arguments, on_step).to("cpu"))
                if on_batch_done:
                    on_batch_done(number, latents[-1])
            if on_image_done:
                on_image_done(len(batch))
    return dataclasses.replace(handoff, latents=torch.cat(latents),
                               finished_stages=handoff.finished_stages + (NAME,))


def device_map(pipeline) -> dict[str, dict[str, str]]:
    # placement.place's map (checked against the model), else the one from_pretrained dispatched by
    placed = (getattr(pipeline.transformer, "placed_device_map", None)
              or getattr(pipeline.transformer, "hf_device_map", None) or {"": pipeline.transformer.device})
    return {"transformer": {module: device_key(device) for module, device in placed.items()}}

