"""How noise reaches a frozen pipeline: through its public `latents=` argument, the same way for every family.

Two things differ from family to family and are discovered from the pipeline itself rather than tabulated:

- the exact shape and dtype of the initial noise (latent channels, VAE scale factor, resolution binning, packing): a
  dry run of the pipeline's own `__call__` stops at `prepare_latents` and reads what it returns;
- the prompt embeddings: the pipeline's own `encode_prompt` is called once per prompt, and its outputs are sorted by
  what they are (per-token embeddings, pooled embedding, attention mask) and passed back to the pipeline under the
  names its `__call__` takes, so the text encoders run once.

Pipelines that cannot start from a given noise are refused up front, with the reason and what to use instead.
"""

import inspect
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


# Pipelines whose `__call__` takes `latents` but cannot be steered by the initial noise alone.
REFUSED_PIPELINE_NAME_PARTS = {
    "Img2Img": "it starts from an input image, not from pure noise; use the text-to-image pipeline of the family",
    "Inpaint": "it starts from an input image and mask, not from pure noise; use the text-to-image pipeline",
    "Combined": (
        "combined Kandinsky pipelines route `latents` to the prior, not to the image decoder; use the decoder "
        "pipeline (for example KandinskyV22Pipeline) with image embeddings"
    ),
    "IFPipeline": "DeepFloyd IF generates in pixel space through a cascade of stages; no single initial noise decides it",
}


@dataclass(frozen=True)
class NoiseSpec:
    """Shape (one sample, no batch axis), dtype and device of the initial noise a pipeline takes as `latents`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class _LatentsPrepared(Exception):
    def __init__(self, latents: torch.Tensor):
        self.latents = latents


def call_parameters(pipeline: DiffusionPipeline) -> set[str]:
    return set(inspect.signature(pipeline.__call__).parameters)


def check_pipeline_takes_noise(pipeline: DiffusionPipeline) -> None:
    """Raises a `ValueError` naming the reason and the alternative if `pipeline` cannot be driven by its initial noise."""
    name = type(pipeline).__name__
    for part, reason in REFUSED_PIPELINE_NAME_PARTS.items():
        if part in name:
            raise ValueError(f"{name} cannot be fine-tuned with Noise PPO: {reason}.")
    if "latents" not in call_parameters(pipeline):
        raise ValueError(
            f"{name}.__call__ has no `latents` argument, so its initial noise cannot be chosen. Noise PPO needs a "
            "text-to-image pipeline that accepts `latents=` (for example StableDiffusionPipeline, "
            "StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline)."
        )


def discover_noise_spec(pipeline: DiffusionPipeline, call_kwargs: dict) -> NoiseSpec:
    """
    Runs `pipeline(**call_kwargs)` up to `prepare_latents` and returns the shape of one sample of the noise it would
    draw. The call is cut short there, so no denoising step runs. `call_kwargs` should hold the prompt (or prompt
    embeddings) and everything that decides the resolution (`height`, `width`).
    """

    def prepare_latents_and_stop(*args, **kwargs):
        prepared = type(pipeline).prepare_latents(pipeline, *args, **kwargs)
        raise _LatentsPrepared(prepared[0] if isinstance(prepared, tuple) else prepared)

    pipeline.prepare_latents = prepare_latents_and_stop
    try:
        pipeline(**call_kwargs)
    except _LatentsPrepared as stop:
        latents = stop.latents
    else:
        raise RuntimeError(
            f"{type(pipeline).__name__} finished without calling `prepare_latents`, so its noise shape cannot be "
            "discovered. Please open an issue with the pipeline class."
        )
    finally:
        del pipeline.prepare_latents
    return NoiseSpec(shape=tuple(latents.shape[1:]), dtype=latents.dtype, device=latents.device)


@torch.no_grad()
def encode_prompts(pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
    """
    Encodes `prompts` once with the pipeline's own `encode_prompt` (no classifier-free guidance: only the prompts'
    own embeddings) and returns them under the names the pipeline's `__call__` accepts: `prompt_embeds` (batch, tokens,
    dim), and where the family has them `pooled_prompt_embeds` (batch, dim) and `prompt_attention_mask`.
    """
    signature = inspect.signature(pipeline.encode_prompt).parameters
    known = {
        "prompt": prompts,
        "device": pipeline._execution_device,
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": False,
    }
    kwargs = {name: known.get(name) for name, param in signature.items() if name in known or param.default is param.empty}
    outputs = pipeline.encode_prompt(**kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    batch_tensors = [t for t in outputs if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[0] == len(prompts)]
    sequences = [t for t in batch_tensors if t.is_floating_point() and t.ndim == 3]
    pooled = [t for t in batch_tensors if t.is_floating_point() and t.ndim == 2]
    masks = [t for t in batch_tensors if not t.is_floating_point() and t.ndim == 2]
    if not sequences:
        raise ValueError(
            f"{type(pipeline).__name__}.encode_prompt returned no per-token prompt embeddings; Noise PPO conditions "
            "its generator on them. Please open an issue with the pipeline class."
        )
    embeds = {"prompt_embeds": sequences[0]}
    parameters = call_parameters(pipeline)
    if pooled and "pooled_prompt_embeds" in parameters:
        embeds["pooled_prompt_embeds"] = pooled[0]
    if masks and "prompt_attention_mask" in parameters:
        embeds["prompt_attention_mask"] = masks[0]
    return embeds


def check_generator_fits(config, noise_spec: NoiseSpec, embeds: dict[str, torch.Tensor], pipeline: DiffusionPipeline) -> None:
    """Raises a `ValueError` if a generator with `config` cannot drive `pipeline`'s noise and read its prompt embeddings."""
    problems = []
    if tuple(config.noise_shape) != noise_spec.shape:
        problems.append(
            f"it makes noise of shape {list(config.noise_shape)} per image, but the pipeline takes {list(noise_spec.shape)} "
            "at this resolution (use the height and width the generator was trained at)"
        )
    found = {name: embeds[name].shape[-1] if name in embeds else None for name in ("prompt_embeds", "pooled_prompt_embeds")}
    expected = {"prompt_embeds": config.prompt_embeds_dim, "pooled_prompt_embeds": config.pooled_prompt_embeds_dim}
    for name, dim in expected.items():
        if dim is not None and found[name] != dim:
            problems.append(f"it reads `{name}` of width {dim}, but the pipeline's are {found[name] or 'absent'}")
    if problems:
        raise ValueError(
            f"This NoiseGenerator was trained for {config.pipeline_class} ({config.base_pipeline or 'a local pipeline'}) "
            f"and does not fit this {type(pipeline).__name__}: " + "; ".join(problems) + ". Load it into the pipeline "
            "it was trained for, or train a new generator for this one."
        )
