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
import math
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from .noise_generator import NoiseGeneratorConfig


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


# Pipelines whose `output_type="pt"` images are the decoder's raw output in about [-1, 1] instead of [0, 1].
RAW_PT_OUTPUT_PIPELINES = {"KandinskyV22Pipeline"}


@dataclass(frozen=True)
class NoiseSpec:
    """
    The initial noise a pipeline takes as `latents`: the shape of one sample (no batch axis), its dtype and device.
    Packed noise (Flux, Qwen-Image: one row of features per image patch) also has `token_grid`, the (rows, columns)
    of patches its sequence flattens, so that a generator can still work on it as an image.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    token_grid: tuple[int, int] | None = None


class _LatentsPrepared(Exception):
    def __init__(self, latents: torch.Tensor, arguments: dict):
        self.latents = latents
        self.arguments = arguments


def _token_grid(sequence_length: int, height: int | None, width: int | None) -> tuple[int, int]:
    # the patch grid has the aspect of the latent image prepare_latents was asked for
    aspect = height / width if height and width else 1.0
    rows = round(math.sqrt(sequence_length * aspect))
    if rows == 0 or sequence_length % rows:
        raise ValueError(
            f"Packed noise of {sequence_length} patches does not form a grid of aspect {aspect:.3f}; please open an "
            "issue with the pipeline class and resolution."
        )
    return rows, sequence_length // rows


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
    Runs `pipeline(**call_kwargs)` up to `prepare_latents` and returns the noise it takes as `latents`, one sample's
    worth. The call is cut short there, so no denoising step runs. `call_kwargs` should hold the prompt (or prompt
    embeddings) and everything that decides the resolution (`height`, `width`).

    `prepare_latents` returns the noise in the layout the denoiser reads. Most pipelines take `latents` in that same
    layout; some take it unpacked and pack it themselves (Flux.2: `(channels, rows, columns)` in, `(patches, channels)`
    out). Each candidate layout is therefore tried on `prepare_latents` itself, and the first it accepts is the one.
    """

    def prepare_latents_and_stop(*args, **kwargs):
        arguments = inspect.signature(type(pipeline).prepare_latents).bind(pipeline, *args, **kwargs).arguments
        prepared = type(pipeline).prepare_latents(**arguments)
        raise _LatentsPrepared(prepared[0] if isinstance(prepared, tuple) else prepared, arguments)

    pipeline.prepare_latents = prepare_latents_and_stop
    try:
        pipeline(**call_kwargs)
    except _LatentsPrepared as stop:
        prepared, arguments = stop.latents, stop.arguments
    else:
        raise RuntimeError(
            f"{type(pipeline).__name__} finished without calling `prepare_latents`, so its noise shape cannot be "
            "discovered. Please open an issue with the pipeline class."
        )
    finally:
        del pipeline.prepare_latents

    candidates = [NoiseSpec(tuple(prepared.shape[1:]), prepared.dtype, prepared.device)]
    if prepared.ndim == 3:
        patches, features = prepared.shape[1:]
        grid = _token_grid(patches, arguments.get("height"), arguments.get("width"))
        candidates = [
            NoiseSpec((patches, features), prepared.dtype, prepared.device, token_grid=grid),
            NoiseSpec((features, *grid), prepared.dtype, prepared.device),
        ]
    for spec in candidates:
        if len(spec.shape) == 3 or spec.token_grid is not None:
            given = torch.zeros(prepared.shape[0], *spec.shape, dtype=spec.dtype, device=spec.device)
            try:
                accepted = type(pipeline).prepare_latents(**{**arguments, "latents": given})
            except (RuntimeError, ValueError, TypeError):
                continue
            accepted = accepted[0] if isinstance(accepted, tuple) else accepted
            if accepted.shape == prepared.shape:
                return spec
    raise ValueError(
        f"{type(pipeline).__name__} prepares noise of shape {list(prepared.shape)} and accepts none of the layouts "
        "Noise PPO knows as `latents` (image noise (batch, channels, height, width), packed noise (batch, patches, "
        "features)). Please open an issue with the pipeline class."
    )


@torch.no_grad()
def encode_prompts(pipeline: DiffusionPipeline, prompts: list[str], **call_kwargs) -> dict[str, torch.Tensor]:
    """
    Encodes `prompts` once with the pipeline's own `encode_prompt` (no classifier-free guidance: only the prompts'
    own embeddings) and returns them under the names the pipeline's `__call__` accepts: `prompt_embeds` (batch, tokens,
    dim), and where the family has them `pooled_prompt_embeds` (batch, dim) and the mask of real tokens
    (`prompt_attention_mask`, or `prompt_embeds_mask` for Qwen-Image).

    Arguments that `encode_prompt` shares with `__call__` (`max_sequence_length`, `clip_skip`, Sana's
    `complex_human_instruction`, ...) take their value from `call_kwargs`, else `__call__`'s default, so that the
    embeddings are those the pipeline would compute for itself.
    """
    encode_parameters = inspect.signature(pipeline.encode_prompt).parameters
    call_defaults = {
        name: param.default
        for name, param in inspect.signature(pipeline.__call__).parameters.items()
        if param.default is not param.empty
    }
    fixed = {
        "prompt": prompts,
        "device": pipeline._execution_device,
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": False,
    }
    kwargs = {}
    for name, param in encode_parameters.items():
        if name in fixed:
            kwargs[name] = fixed[name]
        elif name in call_kwargs:
            kwargs[name] = call_kwargs[name]
        elif name in call_defaults and "embeds" not in name and not name.startswith("negative"):
            kwargs[name] = call_defaults[name]
        elif param.default is param.empty:
            kwargs[name] = None
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
    mask_names = [name for name in ("prompt_attention_mask", "prompt_embeds_mask") if name in parameters]
    if masks and mask_names:
        embeds[mask_names[0]] = masks[0]
    return embeds


def check_generator_fits(config: NoiseGeneratorConfig, noise_spec: NoiseSpec, embeds: dict[str, torch.Tensor], pipeline: DiffusionPipeline) -> None:
    """Raises a `ValueError` if a generator with `config` cannot drive `pipeline`'s noise and read its prompt embeddings."""
    problems = []
    grid = tuple(config.token_grid) if config.token_grid else None
    if tuple(config.noise_shape) != noise_spec.shape or grid != noise_spec.token_grid:
        problems.append(
            f"it makes noise of shape {list(config.noise_shape)} per image, but the pipeline takes {list(noise_spec.shape)} "
            "at this resolution (use the height and width the generator was trained at)"
        )
    found = {name: None if value is None else value.shape[-1] for name, value in generator_inputs(embeds).items()}
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


def prompt_conditioning(pipeline: DiffusionPipeline, examples: list[dict], **call_kwargs) -> dict[str, torch.Tensor]:
    """
    The conditioning of each example, under the names the pipeline's `__call__` takes: the text embeddings of its
    `prompt` (see `encode_prompts`) or, for pipelines conditioned on image embeddings instead of text (the Kandinsky
    2.2 decoder), the example's own `image_embeds` and `negative_image_embeds` columns.
    """
    if hasattr(pipeline, "encode_prompt"):
        return encode_prompts(pipeline, [example["prompt"] for example in examples], **call_kwargs)
    names = sorted(name for name in call_parameters(pipeline) if name.endswith("image_embeds"))
    missing = [name for name in names if name not in examples[0]]
    if not names or missing:
        raise ValueError(
            f"{type(pipeline).__name__} is conditioned on image embeddings, not on text: give the dataset the columns "
            f"{names or ['image_embeds']} (for Kandinsky 2.2, computed from the prompts with KandinskyV22PriorPipeline), "
            "and keep `prompt` for the rewards."
        )
    return {
        name: torch.tensor([example[name] for example in examples], dtype=pipeline.dtype, device=pipeline._execution_device)
        for name in names
    }


def generator_inputs(embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The arguments of `NoiseGenerator.forward` from the output of `prompt_conditioning`: per-token embeddings, a
    pooled embedding (the image embedding, for pipelines conditioned on one) and the mask of real tokens."""
    prompt_embeds = embeds.get("prompt_embeds")
    mask = embeds.get("prompt_attention_mask", embeds.get("prompt_embeds_mask"))
    if mask is not None and mask.shape != prompt_embeds.shape[:2]:
        mask = None  # AuraFlow's is flattened over the embedding width too: it no longer marks tokens
    return {
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": embeds.get("pooled_prompt_embeds", embeds.get("image_embeds")),
        "prompt_attention_mask": mask,
    }


def images_in_unit_range(pipeline: DiffusionPipeline, images: torch.Tensor) -> torch.Tensor:
    """`output_type="pt"` images of `pipeline`, mapped to [0, 1] where the family returns them in [-1, 1]."""
    if type(pipeline).__name__ in RAW_PT_OUTPUT_PIPELINES:
        return (images * 0.5 + 0.5).clamp(0, 1)
    return images


def generator_config_for(
    pipeline: DiffusionPipeline, noise_spec: NoiseSpec, embeds: dict[str, torch.Tensor], **architecture
) -> NoiseGeneratorConfig:
    """The config of a new generator sized for `pipeline`'s noise and prompt embeddings; `architecture` holds the
    remaining `NoiseGeneratorConfig` fields."""
    inputs = generator_inputs(embeds)
    return NoiseGeneratorConfig(
        noise_shape=list(noise_spec.shape),
        token_grid=list(noise_spec.token_grid) if noise_spec.token_grid else None,
        prompt_embeds_dim=None if inputs["prompt_embeds"] is None else inputs["prompt_embeds"].shape[-1],
        pooled_prompt_embeds_dim=None if inputs["pooled_prompt_embeds"] is None else inputs["pooled_prompt_embeds"].shape[-1],
        base_pipeline=str(pipeline.name_or_path) if pipeline.name_or_path else None,
        pipeline_class=type(pipeline).__name__,
        **architecture,
    )
