import json
import os
import shutil
import threading

import diffusers
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi

from .noise_generator import NoiseGenerator, load_noise_generator, pipeline_noise
from .noise_injection import (
    check_generator_fits,
    check_pipeline_takes_noise,
    copy_for_one_call,
    discover_noise_spec,
    draw_noise,
    encode_prompts,
    generator_inputs,
    pipeline_arguments,
    repeat_rows,
    without_encoded_prompts,
)
from .noise_ppo_trainer import STAGING_DIR


NOISE_GENERATOR_FOLDER = "noise_generator"
PIPELINE_FOLDER = "pipeline"
# The module of a saved folder that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs to load it
DIFFUSERS_LOADER = "noise_ppo_pipeline"
DIFFUSERS_LOADER_CODE = f"""\
# Written by trl-noise-ppo's NoisePPOPipeline.save_pretrained. It lets diffusers load this folder as the NoisePPOPipeline
# it was saved from: the pipeline in {PIPELINE_FOLDER}/, whose initial noise the generator in {NOISE_GENERATOR_FOLDER}/ draws.
#     DiffusionPipeline.from_pretrained(<this folder>, trust_remote_code=True)   # runs this file; needs trl-noise-ppo
#     trl_noise_ppo.NoisePPOPipeline.from_pretrained(<this folder>)              # runs no code from the folder
from trl_noise_ppo.noise_pipeline import NoisePPODiffusionPipeline  # noqa: F401
"""
PIPELINE_INDEX = DiffusionPipeline.config_name  # model_index.json
# A fast tokenizer sets its padding and truncation on the tokenizer it shares with every caller before it encodes, so
# that two threads encoding at once can get each other's (a T5 prompt padded to the longest instead of to 512 tokens):
# prompts are encoded one call at a time.
_PROMPT_ENCODING = threading.Lock()


class NoisePPOPipeline:
    r"""
    A text-to-image pipeline whose initial noise comes from a trained [`NoiseGenerator`]. It takes the same call
    arguments as the pipeline it wraps and returns the same outputs; every attribute of the wrapped pipeline
    (`scheduler`, `enable_model_cpu_offload`, ...) is reachable on it.

    Noise is `x_T = mu(c) + sigma(c) * eps`. `eps` is drawn by the wrapped pipeline's own `prepare_latents` from your
    `generator`, exactly as the pipeline would draw its own noise (packed-latent families included), or is the `latents`
    you pass: with an untrained generator the images are exactly those of the wrapped pipeline for the same seed or
    `latents` (unless its config has `project_to_shell`). Pass `noise="mean"` to use `x_T = mu(c)`; note that this noise
    is far smoother than what the frozen model was trained on, so sampling (the default) is usually better, and a
    seeded `generator` already makes it deterministic.

    Calls from several threads (a server) give each the images it would give alone: each runs on a copy of the wrapped
    pipeline with schedulers of its own, and prompts are encoded one call at a time.

    Args:
        pipeline (`DiffusionPipeline`): the frozen text-to-image pipeline; it must accept `latents=`.
        noise_generator ([`NoiseGenerator`], or a peft `PeftModel` of one): the trained generator; it must fit the
            pipeline.

    Examples:

    ```python
    >>> from trl_noise_ppo import NoisePPOPipeline
    >>> pipe = NoisePPOPipeline.from_pretrained("user/sd-turbo-noise-ppo")  # base pipeline id read from the generator
    >>> image = pipe("a cat", num_inference_steps=1, guidance_scale=0.0).images[0]
    ```
    """

    def __init__(self, pipeline: DiffusionPipeline, noise_generator: torch.nn.Module):
        check_pipeline_takes_noise(pipeline)
        self.pipeline = pipeline
        self.noise_generator = noise_generator

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, noise_generator: NoiseGenerator | str | None = None, **kwargs
    ) -> "NoisePPOPipeline":
        """
        Loads a base pipeline and a noise generator. `pretrained_model_name_or_path` is one of:

        - a folder written by [`NoisePPOPipeline.save_pretrained`] (the pipeline is in its `pipeline/`, the generator in
          its `noise_generator/`);
        - a noise generator (Hub id or folder, or a LoRA adapter of one) alone: the base pipeline is the one recorded in
          its config;
        - a base pipeline (Hub id or folder), with `noise_generator` given as a [`NoiseGenerator`] (or a peft model of
          one), Hub id or folder.

        Other keyword arguments (`torch_dtype`, `revision`, `variant`, ...) go to `DiffusionPipeline.from_pretrained`.
        """
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(os.path.join(path, STAGING_DIR)) and not os.path.isfile(os.path.join(path, PIPELINE_INDEX)):
            raise OSError(f"A save into {path} was interrupted before it was complete: save the pipeline there again.")
        if noise_generator is None and os.path.isdir(os.path.join(path, NOISE_GENERATOR_FOLDER)):
            noise_generator = load_noise_generator(os.path.join(path, NOISE_GENERATOR_FOLDER))
            # folders saved by earlier versions of trl-noise-ppo hold the pipeline at their root
            base = os.path.join(path, PIPELINE_FOLDER) if os.path.isdir(os.path.join(path, PIPELINE_FOLDER)) else path
        elif noise_generator is None:
            noise_generator = load_noise_generator(path)
            base = noise_generator.config.base_pipeline
            if not base:
                raise ValueError(
                    f"The noise generator at {path} does not record its base pipeline; pass it: "
                    f"NoisePPOPipeline.from_pretrained('<base pipeline id>', noise_generator='{path}')."
                )
        else:
            base = path
            if isinstance(noise_generator, str | os.PathLike):
                noise_generator = load_noise_generator(noise_generator)
        return cls(DiffusionPipeline.from_pretrained(base, **kwargs), noise_generator)

    def save_pretrained(self, save_directory: str, push_to_hub: bool = False, **kwargs) -> None:
        """
        Saves the wrapped pipeline into `pipeline/` and the generator into `noise_generator/`, with a
        `model_index.json` naming the two and a loader module, so that the folder loads back as this pipeline with
        [`NoisePPOPipeline.from_pretrained`] or with diffusers alone, `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` (see [`NoisePPODiffusionPipeline`]); without `trust_remote_code` diffusers refuses it
        rather than load the pipeline without its generator. With `push_to_hub=True` the folder is uploaded to
        `repo_id` (keyword).

        The save is written into `tmp-save/` and then moved into place, `model_index.json` last, so that one killed
        midway leaves an earlier save in the folder whole, or a folder that refuses to load (the next save removes
        `tmp-save/`).
        """
        if os.path.isfile(os.path.join(save_directory, "config.json")):
            raise ValueError(
                f"{save_directory} holds a model (config.json); saving a pipeline there would mix the two. Choose an "
                "empty folder."
            )
        repo_id = kwargs.pop("repo_id", None)
        # Written into a staging folder, then moved into place with model_index.json last, which an earlier save's loses
        # first: a save killed midway leaves the earlier save whole, or a folder that loads as no pipeline
        staging_dir = os.path.join(save_directory, STAGING_DIR)
        shutil.rmtree(staging_dir, ignore_errors=True)  # what a killed save left
        self.pipeline.save_pretrained(os.path.join(staging_dir, PIPELINE_FOLDER), **kwargs)
        self.noise_generator.save_pretrained(os.path.join(staging_dir, NOISE_GENERATOR_FOLDER))
        pipeline_class = type(self.pipeline)
        model_index = {
            "_class_name": [DIFFUSERS_LOADER, NoisePPODiffusionPipeline.__name__],
            "_diffusers_version": diffusers.__version__,
            PIPELINE_FOLDER: [pipeline_class.__module__.split(".")[0], pipeline_class.__name__],
            # the module, as diffusers records components of other libraries; the loader module imports it
            NOISE_GENERATOR_FOLDER: [NoiseGenerator.__module__, NoiseGenerator.__name__],
        }
        with open(os.path.join(staging_dir, PIPELINE_INDEX), "w") as file:
            json.dump(model_index, file, indent=2)
        with open(os.path.join(staging_dir, f"{DIFFUSERS_LOADER}.py"), "w") as file:
            file.write(DIFFUSERS_LOADER_CODE)
        if os.path.isfile(os.path.join(save_directory, PIPELINE_INDEX)):
            os.remove(os.path.join(save_directory, PIPELINE_INDEX))
        for name in sorted(os.listdir(staging_dir), key=lambda name: name == PIPELINE_INDEX):
            target = os.path.join(save_directory, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging_dir, name), target)
        os.rmdir(staging_dir)
        if push_to_hub:
            api = HfApi(token=kwargs.get("token"))
            repo_id = api.create_repo(repo_id or os.path.basename(os.path.abspath(save_directory)), exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=save_directory, ignore_patterns=[f"{STAGING_DIR}/*"])

    def to(self, *args, **kwargs) -> "NoisePPOPipeline":
        self.pipeline.to(*args, **kwargs)
        self.noise_generator.to(device=self.pipeline.device)
        return self

    def __getattr__(self, name):
        # Called only for attributes NoisePPOPipeline lacks: everything else behaves as the wrapped pipeline.
        if name in ("pipeline", "noise_generator"):
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def __repr__(self) -> str:
        return f"NoisePPOPipeline(pipeline={self.pipeline!r}, noise_generator={json.dumps(self.noise_generator.config.to_diff_dict())})"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: str = "sample",
        **kwargs,
    ):
        """
        Calls the wrapped pipeline with the generator's noise. All arguments are the wrapped pipeline's, except:

        Args:
            latents (`torch.Tensor`, *optional*):
                Unit Gaussian noise `eps` of the pipeline's own latent shape, turned into `mu + sigma * eps`. Drawn from
                `generator` if not given.
            noise (`str`, *optional*, defaults to `"sample"`):
                `"sample"` draws from the generator's policy; `"mean"` uses its mean `mu` and ignores `eps`.
        """
        if noise not in ("sample", "mean"):
            raise ValueError(f"noise must be 'sample' or 'mean', got {noise!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive whole number, got {num_images_per_prompt!r}.")
        given = [name for name in kwargs if "_embeds" in name or "_mask" in name]
        if any(name.startswith(("prompt_embeds", "image_embeds")) for name in given):
            if prompt is not None:
                raise ValueError("Give either `prompt` or `prompt_embeds`, not both: the noise generator reads one of them.")
            conditioning = {name: kwargs.pop(name) for name in given}
        elif prompt is None:
            raise ValueError(
                "NoisePPOPipeline needs a `prompt` (or `prompt_embeds`, or `image_embeds` for the Kandinsky decoder): "
                "the noise generator reads it."
            )
        else:
            with _PROMPT_ENCODING:
                conditioning = encode_prompts(self.pipeline, [prompt] if isinstance(prompt, str) else list(prompt), **kwargs)
            kwargs = without_encoded_prompts(kwargs)
        # one row of embeddings per image: families disagree on whether they repeat given embeddings themselves
        image_conditioning = pipeline_arguments(self.pipeline, repeat_rows(conditioning, num_images_per_prompt))
        call_kwargs = {**kwargs, **image_conditioning, "num_images_per_prompt": 1, "generator": generator}

        # Recomputed on every call: every argument that reaches prepare_latents (height, width, resolution binning,
        # Kontext's max_area, ...) can change the noise, and the dry run stops before any denoising step
        if latents is None:
            spec, latents = draw_noise(self.pipeline, call_kwargs)
        else:
            # the dry run draws noise it throws away: from its own generator, not from the caller's
            spec = discover_noise_spec(self.pipeline, {**call_kwargs, "generator": torch.Generator().manual_seed(0)})
            batch_size = len(next(iter(conditioning.values()))) * num_images_per_prompt
            if tuple(latents.shape) != (batch_size, *spec.shape):
                raise ValueError(
                    f"latents has shape {list(latents.shape)}, but {batch_size} image(s) of this pipeline need "
                    f"{[batch_size, *spec.shape]}."
                )
        check_generator_fits(self.noise_generator.config, spec, conditioning, self.pipeline)

        generator_device = next(self.noise_generator.parameters()).device
        conditioning = {
            name: None if value is None else value.to(generator_device)
            for name, value in generator_inputs(conditioning).items()
        }
        policy = self.noise_generator(**conditioning).repeat_interleave(num_images_per_prompt)
        policy = type(policy)(*(value.to(spec.device) for value in policy))
        noise_tensor = policy.mean if noise == "mean" else policy.sample(latents.to(spec.device, torch.float32))
        noise_tensor = pipeline_noise(noise_tensor, self.noise_generator.config)
        # a copy with schedulers of its own, as this call's denoising sets their timesteps and steps through them
        return copy_for_one_call(self.pipeline)(**call_kwargs, latents=noise_tensor.to(spec.dtype))


class NoisePPODiffusionPipeline(DiffusionPipeline):
    """
    What `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` builds from a folder that
    [`NoisePPOPipeline.save_pretrained`] wrote: diffusers loads the two components its `model_index.json` names, the
    wrapped pipeline (`pipeline/`) and the noise generator (`noise_generator/`), and this class gives back the
    [`NoisePPOPipeline`] of the two, whose images are those of `NoisePPOPipeline.from_pretrained(folder)`.

    Examples:

    ```python
    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained("saved-noise-ppo-pipeline", trust_remote_code=True)
    >>> type(pipe).__name__
    'NoisePPOPipeline'
    ```
    """

    def __new__(cls, pipeline: DiffusionPipeline, noise_generator: NoiseGenerator) -> NoisePPOPipeline:
        dtype = noise_generator.dtype
        if dtype != torch.float32:
            # diffusers gave the generator the dtype asked for, and not the nested pipeline; the generator runs
            # in float32, so it is read again from the folder (pipeline/'s neighbour), and the pipeline takes the dtype
            folder = os.path.dirname(os.path.normpath(pipeline.name_or_path))
            noise_generator = load_noise_generator(os.path.join(folder, NOISE_GENERATOR_FOLDER))
            pipeline.to(dtype)
        return NoisePPOPipeline(pipeline, noise_generator)

    def __init__(self, pipeline: DiffusionPipeline, noise_generator: NoiseGenerator):
        # Never runs (`__new__` returns a NoisePPOPipeline); diffusers reads from this signature which components to load
        raise NotImplementedError
