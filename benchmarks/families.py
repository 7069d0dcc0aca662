"""The coverage table: every pipeline class of the installed diffusers whose `__call__` takes a `prompt` and `latents`
(and the Kandinsky 2.2 decoder, which takes image embeddings instead of a prompt), with its verdict:

- exact: a tiny offline build of the class (tests/tiny_pipelines.py) trains a generator 2 steps, saves and reloads it
  (the same weights, the same images for a seed twice, not the bare pipeline's); an untrained generator gives the bare
  pipeline's images bit for bit, for the same seed and for the same `latents`, with and without a negative prompt where
  the pipeline takes one;
- not exact: built, and one of those checks fails (which, and by how much);
- refused: the error Noise PPO raises when it is given the pipeline;
- not built: why no tiny build checks it.

Run from the repository root; docs/pipelines.md holds its output (`--write` puts it there):

    python -m benchmarks.families [--write]
"""

import argparse
import contextlib
import copy
import inspect
import io
import re
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from datasets import Dataset

from tests.tiny_pipelines import FAMILIES, MORE_CALL_KWARGS, MORE_FAMILIES, PROMPT_CALL_KWARGS, build_pipeline
from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer
from trl_noise_ppo.noise_injection import check_pipeline_takes_noise, discover_noise_spec


PROMPTS = ["a red circle", "a blue square on the left"]
NEGATIVE_PROMPT = "blurry"

# Why a class that Noise PPO does not refuse has no tiny build here.
NOT_BUILT = {
    "AltDiffusionPipeline": "Stable Diffusion with an XLM-RoBERTa text encoder (`RobertaSeriesModelWithTransformation`) and its sentencepiece tokenizer, which no offline tiny build makes yet",
    "BlipDiffusionPipeline": "subject-driven: a reference image and its subject category on every call, through a BLIP-2 Q-Former; no tiny build yet",
    "BlipDiffusionControlNetPipeline": "subject-driven with a ControlNet: a reference image, its category and a condition image on every call; no tiny build yet",
    "BriaFibo2Pipeline": "Bria FIBO 2 (a vision-language text encoder reading images beside the prompt); no tiny build yet",
    "HunyuanDiTControlNetPipeline": "a HunyuanDiT ControlNet (`HunyuanDiT2DControlNetModel`); HunyuanDiT and its PAG variant are exact, the ControlNet has no tiny build yet",
    "Ideogram4Pipeline": "Ideogram 4 (its encode_prompt takes the image's token grid, `grid_h`/`grid_w`, computed from the pipeline's own state); no tiny build yet",
    "KandinskyPipeline": "the Kandinsky 2.1 decoder: conditioned on text (M-CLIP) and on image embeddings from a separate prior; no tiny build yet",
    "Krea2Pipeline": "Krea 2; no tiny build yet",
    "NucleusMoEImagePipeline": "Nucleus MoE image; no tiny build yet",
    "PRXPipeline": "PRX; no tiny build yet",
    "PRXPixelPipeline": "PRX in pixel space; no tiny build yet",
    "QwenImageControlNetPipeline": "a Qwen-Image ControlNet (`QwenImageControlNetModel`); Qwen-Image is exact, the ControlNet has no tiny build yet",
    "SanaControlNetPipeline": "a Sana ControlNet (`SanaControlNetModel`); Sana and its PAG variant are exact, the ControlNet has no tiny build yet",
    "ZImageControlNetPipeline": "a Z-Image ControlNet (`ZImageControlNetModel`); Z-Image is exact, the ControlNet has no tiny build yet",
    "ZImageOmniPipeline": "Z-Image Omni (condition images encoded with a SigLIP vision model); no tiny build yet",
    "StableDiffusionAdapterPipeline": "SD with a T2I-Adapter (an `image` on every call, as a dataset column); no tiny build yet",
    "StableDiffusionXLAdapterPipeline": "SDXL with a T2I-Adapter (an `image` on every call, as a dataset column); no tiny build yet",
    "StableDiffusionControlNetXSPipeline": "SD with a ControlNet-XS (`ControlNetXSAdapter` fused into the UNet); no tiny build yet",
    "StableDiffusionXLControlNetXSPipeline": "SDXL with a ControlNet-XS; no tiny build yet",
    "StableDiffusionXLControlNetUnionPipeline": "SDXL with a ControlNet Union (several condition images and their types on every call); no tiny build yet",
    "StableDiffusionGLIGENPipeline": "SD with GLIGEN grounding (boxes and phrases on every call); no tiny build yet",
    "StableDiffusionGLIGENTextImagePipeline": "SD with GLIGEN grounding by text and image (boxes, phrases, images, a CLIP image encoder); no tiny build yet",
    "StableDiffusionLDM3DPipeline": "LDM3D makes an RGB image and a depth map from one 6-channel VAE; no tiny build yet",
    "StableDiffusionPix2PixZeroPipeline": "Pix2Pix-Zero edits by cross-attention guidance between source and target embeddings it is given, and inverts real images with a BLIP captioner; no tiny build yet",
    "StableDiffusionDiffEditPipeline": "DiffEdit edits an input image from its inverted latents and a mask (`image_latents`, `mask_image` on every call); no tiny build yet",
    "StableDiffusionInstructPix2PixPipeline": "an image-editing pipeline: an input image on every call (a dataset column, as for Flux Kontext); no tiny build yet",
    "StableDiffusionXLInstructPix2PixPipeline": "an image-editing pipeline: an input image on every call (a dataset column, as for Flux Kontext); no tiny build yet",
    "BriaFiboEditPipeline": "an image-editing pipeline: an input image on every call (a dataset column, as for Flux Kontext); no tiny build yet",
    "JoyImageEditPipeline": "an image-editing pipeline: an input image on every call (a dataset column, as for Flux Kontext); no tiny build yet",
    "LongCatImageEditPipeline": "an image-editing pipeline: an input image on every call (a dataset column, as for Flux Kontext); no tiny build yet",
    "QwenImageEditPipeline": "an image-editing pipeline: an input image on every call (a dataset column, as for Flux Kontext); no tiny build yet",
    "QwenImageEditPlusPipeline": "an image-editing pipeline: input images on every call (a dataset column, as for Flux Kontext); no tiny build yet",
    "QwenImageLayeredPipeline": "decomposes an input image into RGBA layers (an input image on every call); no tiny build yet",
    "UniDiffuserPipeline": "UniDiffuser's `latents` join the image's VAE latents, its CLIP image embedding and the text latents in one tensor, whatever the mode; no tiny build yet",
}


def pipeline_classes() -> list[str]:
    """Every pipeline class of diffusers whose `__call__` takes `prompt` and `latents`, by name."""
    names = []
    for name in dir(diffusers):
        if not name.endswith("Pipeline"):
            continue
        pipeline_class = getattr(diffusers, name)
        if inspect.isclass(pipeline_class) and {"prompt", "latents"} <= set(inspect.signature(pipeline_class.__call__).parameters):
            names.append(name)
    return names


def brightness(images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def differences(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first.float() - second.float()).abs().max()) if first.shape == second.shape else float("inf")


def untrained_like(config) -> NoiseGenerator:
    """A new generator for the noise `config` is for, whose policy is N(0, I) and whose noise reaches the pipeline as
    it is: the trainer's default generator groups prompts in clusters fitted before training and rescales its noise
    to the shell, neither of which a new generator has."""
    config = copy.deepcopy(config)
    config.architecture, config.project_to_shell = "pooled_mlp", False
    return NoiseGenerator(config)


def check_family(family: str, extra: dict) -> dict:
    """Trains, saves and reloads a generator on the tiny build of `family`, and compares images; see the module."""
    pipe = build_pipeline(family)
    try:
        check_pipeline_takes_noise(pipe)
    except ValueError:
        return {"class": type(pipe).__name__, "family": family, "refused": True}
    parameters = set(inspect.signature(pipe.__call__).parameters)
    embeddings = {name: value for name, value in extra.items() if name.endswith("image_embeds")}
    per_prompt = {name: value for name, value in extra.items() if isinstance(value, list)}  # Attend-and-Excite's tokens
    columns = {name: [value[0].tolist()] * len(PROMPTS) for name, value in embeddings.items()}
    columns.update({name: [value] * len(PROMPTS) for name, value in per_prompt.items()})
    # Flux's and Qwen-Image's true CFG: with it, the negative prompt is used
    pipeline_kwargs = {**{k: v for k, v in extra.items() if k not in embeddings and k not in per_prompt},
                       **({"true_cfg_scale": 2.0} if "true_cfg_scale" in parameters else {})}
    call = {"num_inference_steps": 2, "output_type": "pt", "height": 64, "width": 64, **pipeline_kwargs, **embeddings,
            **per_prompt}
    prompt = {} if embeddings else {"prompt": PROMPTS[0]}
    spec = discover_noise_spec(pipe, {**prompt, **call})

    with tempfile.TemporaryDirectory() as output_dir:
        args = NoisePPOConfig(
            output_dir=output_dir, num_inference_steps=2, num_generations=2, per_device_train_batch_size=4,
            num_iterations=1, max_steps=2, learning_rate=1e-2, save_strategy="no", report_to="none",
            disable_tqdm=True, height=64, width=64, pipeline_kwargs=pipeline_kwargs,
        )
        trainer = NoisePPOTrainer(pipe, brightness, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS, **columns}))
        trainer.train()
        trainer.save_model()
        reloaded = NoiseGenerator.from_pretrained(output_dir)
    config = trainer.model.config

    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    eps = torch.randn(1, *spec.shape, generator=torch.Generator().manual_seed(0)).to(spec.dtype)
    untrained = NoisePPOPipeline(pipe, untrained_like(config))
    failures = []
    negatives = [{}, {"negative_prompt": NEGATIVE_PROMPT}] if "negative_prompt" in parameters else [{}]
    negative_used = without_negative = None
    for negative in negatives:
        label = " with a negative prompt" if negative else ""
        base = pipe(**prompt, **call, **negative, generator=seeded())[0]
        again = pipe(**prompt, **call, **negative, generator=seeded())[0]
        if not torch.equal(base, again):
            failures.append(f"the bare pipeline itself differs between two calls with the same seed{label} "
                            f"(max {differences(base, again):.2g})")
            continue
        if negative and without_negative is not None:
            negative_used = not torch.equal(base, without_negative)
        without_negative = base
        same = untrained(**prompt, **call, **negative, generator=seeded())[0]
        if not torch.equal(base, same):
            failures.append(f"same seed{label}: max difference {differences(base, same):.2g}")
        base = pipe(**prompt, **call, **negative, latents=eps, generator=seeded())[0]
        same = untrained(**prompt, **call, **negative, latents=eps, generator=seeded())[0]
        if not torch.equal(base, same):
            failures.append(f"same latents{label}: max difference {differences(base, same):.2g}")
    saved, loaded = trainer.model.state_dict(), reloaded.state_dict()
    if saved.keys() != loaded.keys() or not all(torch.equal(saved[name], loaded[name]) for name in saved):
        failures.append("the reloaded generator's weights differ from the trained one's")
    tuned = NoisePPOPipeline(pipe, reloaded)
    trained = tuned(**prompt, **call, generator=seeded())[0]
    if not torch.equal(trained, tuned(**prompt, **call, generator=seeded())[0]):
        failures.append("the reloaded generator gives other images for the same seed")
    if torch.equal(trained, pipe(**prompt, **call, generator=seeded())[0]):
        failures.append("the reloaded generator changes nothing")

    reads = [f"tokens ({config.prompt_embeds_dim})"] if config.prompt_embeds_dim else []
    reads += [f"pooled ({config.pooled_prompt_embeds_dim})"] if config.pooled_prompt_embeds_dim else []
    if spec.token_grid:
        layout = f"packed, {spec.token_grid[0]}x{spec.token_grid[1]} patches"
    elif spec.image_axes:
        layout = "channels, rows, columns on axes " + ", ".join(str(axis + 1) for axis in spec.image_axes)
    else:
        layout = "image"
    shown = {name: value for name, value in pipeline_kwargs.items() if name != "true_cfg_scale"}
    shown.update({name: f"{value} (a dataset column)" for name, value in per_prompt.items()})
    return {
        "class": type(pipe).__name__,
        "family": family,
        "arguments": ", ".join(f"{name}={'<image>' if 'image' in name else value}" for name, value in shown.items()),
        "latents": str([1, *spec.shape]),
        "layout": layout,
        "reads": ", ".join(reads) or "image embeddings",
        "negative": "-" if negative_used is None else ("used" if negative_used else "no effect on the tiny build"),
        "failures": failures,
    }


def escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(quiet: bool) -> str:
    torch.set_num_threads(1)
    families = {**{name: PROMPT_CALL_KWARGS.get(name, {}) for name in FAMILIES},
                **{name: MORE_CALL_KWARGS.get(name, {}) for name in MORE_FAMILIES}}
    checked = {}
    for family, extra in families.items():
        start = time.perf_counter()
        with contextlib.ExitStack() as silence:
            if quiet:  # the trainer's and the pipelines' logs
                silence.enter_context(contextlib.redirect_stdout(io.StringIO()))
                silence.enter_context(contextlib.redirect_stderr(io.StringIO()))
            try:
                result = check_family(family, extra)
            except Exception as error:  # a build that fails is a verdict too
                result = {"class": type(build_pipeline(family)).__name__, "family": family, "arguments": "",
                          "latents": "", "layout": "", "reads": "", "negative": "",
                          "failures": [f"fails: {type(error).__name__}: {error}"]}
        if result.get("refused"):
            print(f"{family}: {result['class']} refused", flush=True)
            continue
        checked.setdefault(result["class"], []).append(result)
        print(f"{family}: {result['class']} {'exact' if not result['failures'] else result['failures']} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)

    exact, not_exact, refused, not_built = [], [], [], []
    for name in sorted(set(pipeline_classes()) | set(checked)):
        try:
            check_pipeline_takes_noise(object.__new__(getattr(diffusers, name)))
        except ValueError as error:
            refused.append(f"| {name} | {escape(str(error))} |")
            continue
        for result in checked.get(name, []):
            row = (f"| {name} | {result['family']} | {result['arguments']} | {result['latents']} | {result['layout']} "
                   f"| {result['reads']} | {result['negative']} |")
            if result["failures"]:
                not_exact.append(row + f" {escape('; '.join(result['failures']))} |")
            else:
                exact.append(row)
        if name not in checked:
            not_built.append(f"| {name} | {escape(NOT_BUILT.get(name, 'no tiny build yet'))} |")

    classes = lambda rows: len({row.split(" | ")[0] for row in rows})  # noqa: E731
    counts = (f"{classes(exact)} classes exact, {classes(not_exact)} not exact, {len(refused)} refused, "
              f"{len(not_built)} not built, of {classes(exact) + classes(not_exact) + len(refused) + len(not_built)} "
              f"(diffusers {diffusers.__version__}).")
    header = "| pipeline class | tiny build | call arguments | `latents`, batch 1 | layout | generator reads | negative prompt |"
    return "\n".join([
        counts, "", "### Exact", "", header, "|---|---|---|---|---|---|---|", *exact, "",
        "### Not exact", "", header + " what differs |", "|---|---|---|---|---|---|---|---|", *not_exact, "",
        "### Refused", "", "| pipeline class | refused at construction with |", "|---|---|", *refused, "",
        "### Not built", "", "| pipeline class | why |", "|---|---|", *not_built,
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/pipelines.md")
    args = parser.parse_args()
    text = table(quiet=True)
    print(text)
    if args.write:
        docs = Path("docs/pipelines.md")
        begin, end = "<!-- coverage table: python -m benchmarks.families --write -->", "<!-- end of coverage table -->"
        content = docs.read_text()
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{text}\n{end}", content,
                         flags=re.DOTALL)
        docs.write_text(content)


if __name__ == "__main__":
    main()
