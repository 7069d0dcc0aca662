"""Every text-to-image family, through the one generic noise mechanism, on tiny offline pipelines."""

import pytest
import torch
from datasets import Dataset
from diffusers import (
    AmusedPipeline,
    AnimateDiffVideoToVideoPipeline,
    FluxFillPipeline,
    GlmImagePipeline,
    HunyuanImageRefinerPipeline,
    Kandinsky5I2IPipeline,
    LongCatImagePipeline,
    SanaVideoPipeline,
    StableAudioPipeline,
    StableDiffusionUpscalePipeline,
    StableUnCLIPPipeline,
    DDIMPipeline,
    DDPMPipeline,
    IFPipeline,
    KandinskyV22CombinedPipeline,
    LattePipeline,
    LDMTextToImagePipeline,
    OmniGenPipeline,
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    WanPipeline,
    WuerstchenPriorPipeline,
)

from benchmarks.families import untrained_like
from tests.tiny_pipelines import (
    DEFAULT_SIZE,
    EXPECTED_LATENT_SHAPE,
    PROMPT_CALL_KWARGS,
    STOCHASTIC_SAMPLER_FAMILIES,
    build_pipeline,
)
from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer
from trl_noise_ppo.noise_injection import (
    check_pipeline_takes_noise,
    discover_noise_spec,
    encode_prompts,
    generator_inputs,
    generator_config_for,
)


TEXT_FAMILIES = ["sd", "sd_vpred", "sdxl", "lcm", "sd3", "flux", "flux2", "flux2_klein", "pixart_sigma", "sana",
                 "qwenimage", "auraflow", "lumina2", "cogview4", "pixart_alpha", "sd_pag", "sdxl_pag", "pixart_sigma_pag",
                 "flux_kontext", "bria", "chroma", "hunyuandit", "hidream", "zimage", "sana_sprint", "cogview3plus",
                 "lumina", "kolors", "hunyuanimage", "kandinsky3", "cosmos2", "flux_control", "kandinsky5", "ernie_image",
                 "qwenimage21", "bria_fibo"]
# Also built by tests/tiny_pipelines.py (and checked by test_tiny_pipelines.py), trained only by benchmarks/families.py:
# variants whose mechanism the families above already test.
VARIANT_FAMILIES = ["sd3_pag", "sd3_controlnet", "flux_controlnet", "ovis_image"]
POOLED_FAMILIES = {"sdxl", "sd3", "flux", "sdxl_pag", "flux_kontext", "hidream", "kolors", "flux_control", "kandinsky5"}
PROMPTS = Dataset.from_dict({"prompt": ["a red circle", "a blue square on the left"]})


def size_kwargs(family):
    height, width = DEFAULT_SIZE[family]
    return {"height": height, "width": width}


def call_kwargs(family):
    """What a call of the family needs besides the prompt: its size and PROMPT_CALL_KWARGS (HunyuanDiT without
    resolution binning, Flux Kontext's max_area, the ControlNet's image)."""
    return {**size_kwargs(family), **PROMPT_CALL_KWARGS.get(family, {})}


def brightness(images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def tiny_config(tmp_path, family, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / family), num_inference_steps=2, num_generations=2, per_device_train_batch_size=4,
        num_iterations=1, max_steps=2, learning_rate=1e-2, save_strategy="no", report_to="none", disable_tqdm=True,
        **size_kwargs(family),
    )
    return NoisePPOConfig(**{**defaults, **overrides})


@pytest.mark.parametrize("family", TEXT_FAMILIES + VARIANT_FAMILIES)
def test_noise_shape_is_discovered(family):
    pipe = build_pipeline(family)
    spec = discover_noise_spec(pipe, {"prompt": "a cat", "num_inference_steps": 2, **call_kwargs(family)})
    assert spec.shape == EXPECTED_LATENT_SHAPE[family][1:]
    assert (spec.token_grid is not None) == (len(spec.shape) == 2)
    if spec.token_grid:
        assert spec.token_grid[0] * spec.token_grid[1] == spec.shape[0]


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_train_save_load_and_infer(family, tmp_path):
    pipe = build_pipeline(family)
    pipeline_kwargs = PROMPT_CALL_KWARGS.get(family, {})
    trainer = NoisePPOTrainer(pipe, brightness, args=tiny_config(tmp_path, family, pipeline_kwargs=pipeline_kwargs),
                              train_dataset=PROMPTS)
    embeds = generator_inputs(encode_prompts(pipe, ["a red circle"]))
    config = trainer.model.config
    assert config.prompt_embeds_dim == embeds["prompt_embeds"].shape[-1]
    assert (config.pooled_prompt_embeds_dim is not None) == (family in POOLED_FAMILIES)
    assert tuple(config.noise_shape) == EXPECTED_LATENT_SHAPE[family][1:]
    trainer.train()
    trainer.save_model()
    assert trainer.model.head.weight.abs().sum() > 0

    # the untrained policy reproduces the base pipeline exactly, for the same seed and for the same eps
    untrained = NoisePPOPipeline(pipe, untrained_like(config))
    call = {"num_inference_steps": 2, "output_type": "pt", **call_kwargs(family)}
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base = pipe(prompt="a red circle", generator=seeded(), **call)[0]
    assert torch.equal(untrained(prompt="a red circle", generator=seeded(), **call)[0], base)
    eps = torch.randn(1, *EXPECTED_LATENT_SHAPE[family][1:], generator=torch.Generator().manual_seed(0))
    base = pipe(prompt="a red circle", latents=eps, generator=seeded(), **call)[0]
    assert torch.equal(untrained(prompt="a red circle", latents=eps, generator=seeded(), **call)[0], base)

    # the saved generator, reloaded, is deterministic for a seed and differs from the base pipeline
    tuned = NoisePPOPipeline(pipe, NoiseGenerator.from_pretrained(trainer.args.output_dir))
    assert not torch.equal(tuned(prompt="a red circle", latents=eps, generator=seeded(), **call)[0], base)
    first, second = (tuned(prompt="a red circle", generator=seeded(), **call)[0] for _ in range(2))
    assert torch.equal(first, second)
    images = tuned(prompt=["a red circle", "a cat"], num_images_per_prompt=2, generator=seeded(), **call)[0]
    assert images.shape == (4, *base.shape[1:]) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_exact_for_the_same_seed_at_a_non_square_size(family):
    pipe = build_pipeline(family)
    call = {"prompt": "a red circle", "num_inference_steps": 2, "output_type": "pt", "height": 64, "width": 96}
    embeds = encode_prompts(pipe, ["a red circle"])
    spec = discover_noise_spec(pipe, call)
    untrained = NoisePPOPipeline(pipe, NoiseGenerator(generator_config_for(pipe, spec, embeds)))
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base = pipe(generator=seeded(), **call).images
    assert base.shape == (1, 3, 64, 96)
    assert torch.equal(untrained(generator=seeded(), **call).images, base)


def test_kandinsky_decoder_is_conditioned_on_image_embeddings(tmp_path):
    pipe = build_pipeline("kandinsky22")
    embeds = PROMPT_CALL_KWARGS["kandinsky22"]
    dataset = Dataset.from_dict({
        "prompt": ["a red circle", "a blue square"],
        "image_embeds": [embeds["image_embeds"][0].tolist()] * 2,
        "negative_image_embeds": [embeds["negative_image_embeds"][0].tolist()] * 2,
    })
    with pytest.raises(ValueError, match="conditioned on image embeddings, not on text.*negative_image_embeds"):
        NoisePPOTrainer(pipe, brightness, args=tiny_config(tmp_path, "kandinsky22"), train_dataset=PROMPTS)

    seen = []
    trainer = NoisePPOTrainer(pipe, lambda images, **kw: seen.append(images) or brightness(images),
                              args=tiny_config(tmp_path, "kandinsky22"), train_dataset=dataset)
    assert trainer.model.config.prompt_embeds_dim is None
    assert trainer.model.config.pooled_prompt_embeds_dim == embeds["image_embeds"].shape[-1]
    trainer.train()
    # the decoder's raw [-1, 1] output reaches the rewards in [0, 1]
    assert all(images.min() >= 0 and images.max() <= 1 for images in seen)

    call = {"num_inference_steps": 2, "output_type": "pt", **size_kwargs("kandinsky22"), **embeds}
    eps = torch.randn(1, *EXPECTED_LATENT_SHAPE["kandinsky22"][1:])
    untrained = NoisePPOPipeline(pipe, untrained_like(trainer.model.config))
    assert torch.equal(untrained(latents=eps, **call).images, pipe(latents=eps, **call).images)
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(untrained(generator=seeded(), **call).images, pipe(generator=seeded(), **call).images)
    assert not torch.equal(NoisePPOPipeline(pipe, trainer.model)(latents=eps, **call).images, pipe(latents=eps, **call).images)


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_half_precision_pipeline_with_float32_generator(family, tmp_path):
    pipe = build_pipeline(family).to(torch.bfloat16)
    trainer = NoisePPOTrainer(pipe, brightness, args=tiny_config(tmp_path, family, max_steps=1), train_dataset=PROMPTS)
    assert trainer.noise_dtype == torch.bfloat16
    assert trainer.model.head.weight.dtype == torch.float32
    trainer.train()
    tuned = NoisePPOPipeline(pipe, trainer.model)
    images = tuned(prompt="a cat", num_inference_steps=1, output_type="pt", **size_kwargs(family)).images
    assert images.shape[0] == 1 and torch.isfinite(images.float()).all()


@pytest.mark.parametrize("family", sorted(STOCHASTIC_SAMPLER_FAMILIES))
def test_stochastic_schedulers_are_seeded(family, tmp_path):
    images = []
    for run in range(2):
        args = tiny_config(tmp_path / str(run), family, pipeline_kwargs=PROMPT_CALL_KWARGS.get(family, {}))
        trainer = NoisePPOTrainer(build_pipeline(family), brightness, args=args, train_dataset=PROMPTS)
        rollout = trainer._sample_and_score([{"prompt": "a red circle"}] * 2 + [{"prompt": "a blue square"}] * 2)
        images.append(rollout["advantages"])
    assert torch.equal(*images)

    pipe = build_pipeline(family)
    tuned = NoisePPOPipeline(pipe, trainer.model)
    call = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "pt", **call_kwargs(family)}
    first, second = (tuned(**call, generator=torch.Generator().manual_seed(3)).images for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "pipeline_class, reason",
    [
        (DDPMPipeline, "no `latents` argument"),
        (DDIMPipeline, "no `latents` argument"),
        (IFPipeline, "pixel space through a cascade"),
        (StableDiffusionImg2ImgPipeline, "input image"),
        (StableDiffusionXLInpaintPipeline, "input image and mask"),
        (KandinskyV22CombinedPipeline, "route `latents` to the prior"),
        (WanPipeline, "generates video"),
        (LattePipeline, "generates video"),
        (WuerstchenPriorPipeline, "it is a prior: its output is image embeddings"),
        (StableCascadePriorPipeline, "it is a prior: its output is image embeddings"),
        (StableCascadeDecoderPipeline, "decoder stage of Stable Cascade"),
        (StableCascadeCombinedPipeline, "two denoising stages"),
        (AmusedPipeline, "discrete image tokens"),
        (LDMTextToImagePipeline, "takes its prompt only as text"),
        (OmniGenPipeline, "takes its prompt only as text"),
        (LongCatImagePipeline, "fails on `prompt_embeds` given without a `prompt`"),
        (GlmImagePipeline, "autoregressive model samples image tokens"),
        (StableUnCLIPPipeline, "two denoising stages"),
        (FluxFillPipeline, "fills the masked part of an input image"),
        (StableDiffusionUpscalePipeline, "upscales an input image"),
        (HunyuanImageRefinerPipeline, "refines an input image"),
        (Kandinsky5I2IPipeline, "starts from an input image"),
        (SanaVideoPipeline, "generates video"),
        (AnimateDiffVideoToVideoPipeline, "generates video"),
        (StableAudioPipeline, "generates audio"),
    ],
)
def test_pipelines_that_cannot_take_noise_are_refused(pipeline_class, reason):
    with pytest.raises(ValueError, match=reason):
        check_pipeline_takes_noise(object.__new__(pipeline_class))


def test_generator_of_one_family_is_refused_by_another(tmp_path):
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=tiny_config(tmp_path, "sd", max_steps=1), train_dataset=PROMPTS)
    with pytest.raises(ValueError, match="trained for StableDiffusionPipeline.*does not fit this FluxPipeline"):
        NoisePPOPipeline(build_pipeline("flux"), trainer.model)(prompt="a cat", num_inference_steps=1, **size_kwargs("flux"))
    with pytest.raises(ValueError, match="does not fit this StableDiffusionXLPipeline"):
        NoisePPOTrainer(build_pipeline("sdxl"), brightness, args=tiny_config(tmp_path, "sdxl"), train_dataset=PROMPTS,
                        noise_generator=trainer.model)


def test_noise_spec_follows_every_call_argument():
    # PixArt-Alpha bins 64 x 64 to 256 x 256 by default; without binning it draws 64 x 64 noise, which a generator made
    # for the binned shape does not fit: refused, instead of a stale shape giving a 256 x 256 image
    pipe = build_pipeline("pixart_alpha")
    embeds = encode_prompts(pipe, ["a cat"])
    call = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "pt", **size_kwargs("pixart_alpha")}
    binned = discover_noise_spec(pipe, call)
    assert binned.shape == (4, 32, 32)
    assert discover_noise_spec(pipe, {**call, "use_resolution_binning": False}).shape == (4, 8, 8)
    tuned = NoisePPOPipeline(pipe, NoiseGenerator(generator_config_for(pipe, binned, embeds)))
    assert tuned(**call).images.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"makes noise of shape \[4, 32, 32\].*takes \[4, 8, 8\]"):
        tuned(**call, use_resolution_binning=False)


def test_pipeline_kwargs_reach_every_training_call(tmp_path):
    batch = [{"prompt": "a red circle"}] * 2 + [{"prompt": "a blue square"}] * 2
    rollouts = []
    for pipeline_kwargs in ({}, {"negative_prompt": "blurry"}, {}):
        seen = []
        trainer = NoisePPOTrainer(build_pipeline("sd"), lambda images, **kw: seen.append(images) or brightness(images),
                                  args=tiny_config(tmp_path, "sd", guidance_scale=7.5, pipeline_kwargs=pipeline_kwargs),
                                  train_dataset=PROMPTS)
        trainer._sample_and_score(batch)
        rollouts.append(seen[0])
    assert torch.equal(rollouts[0], rollouts[2]) and not torch.equal(rollouts[0], rollouts[1])

    with pytest.raises(ValueError, match="pipeline_kwargs has \\['max_area'\\].*does not take"):
        NoisePPOTrainer(build_pipeline("sd"), brightness, args=tiny_config(tmp_path, "sd", pipeline_kwargs={"max_area": 1}),
                        train_dataset=PROMPTS)
    with pytest.raises(ValueError, match="pipeline_kwargs sets \\['latents'\\]"):
        tiny_config(tmp_path, "sd", pipeline_kwargs={"latents": None})
    assert tiny_config(tmp_path, "sd", pipeline_kwargs='{"negative_prompt": "blurry"}').pipeline_kwargs == {
        "negative_prompt": "blurry"
    }


def test_controlnet_image_comes_from_a_dataset_column(tmp_path):
    image = PROMPT_CALL_KWARGS["controlnet_sd"]["image"]
    with pytest.raises(ValueError, match="fails on the training call.*dataset columns of the argument's name"):
        NoisePPOTrainer(build_pipeline("controlnet_sd"), brightness, args=tiny_config(tmp_path, "controlnet_sd"),
                        train_dataset=PROMPTS)
    pipe = build_pipeline("controlnet_sd")
    dataset = Dataset.from_dict({"prompt": ["a red circle", "a blue square"], "image": [image, image.rotate(90)]})
    trainer = NoisePPOTrainer(pipe, brightness, args=tiny_config(tmp_path, "controlnet_sd"), train_dataset=dataset)
    trainer.train()
    assert trainer.model.head.weight.abs().sum() > 0
    call = {"num_inference_steps": 2, "output_type": "pt", "image": image, **size_kwargs("controlnet_sd")}
    untrained = NoisePPOPipeline(pipe, untrained_like(trainer.model.config))
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base = pipe(prompt="a red circle", generator=seeded(), **call).images
    assert torch.equal(untrained(prompt="a red circle", generator=seeded(), **call).images, base)


@pytest.mark.parametrize("family, guidance", [
    ("flux", {"true_cfg_scale": 2.0}),  # Flux's and Qwen-Image's true CFG encode it in an encode_prompt call of its own
    ("qwenimage", {"true_cfg_scale": 2.0}),
    ("cogview3plus", {}),  # it ignores negative embeddings given without their text
])
def test_a_negative_prompt_reaches_the_pipeline(family, guidance, tmp_path):
    pipe = build_pipeline(family)
    call = {"num_inference_steps": 2, "output_type": "pt", **guidance, **call_kwargs(family)}
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    prompts = ["a red circle", "a cat"]
    with_negative = pipe(prompt=prompts, negative_prompt=["blurry"] * 2, generator=seeded(), **call).images
    assert not torch.equal(with_negative, pipe(prompt=prompts, generator=seeded(), **call).images)
    spec = discover_noise_spec(pipe, {"prompt": prompts, **call})
    untrained = NoisePPOPipeline(pipe, NoiseGenerator(generator_config_for(pipe, spec, encode_prompts(pipe, prompts))))
    assert torch.equal(untrained(prompt=prompts, negative_prompt="blurry", generator=seeded(), **call).images, with_negative)

    batch = [{"prompt": "a red circle"}] * 2 + [{"prompt": "a blue square"}] * 2
    rollouts = []
    for negative in ({}, {"negative_prompt": "blurry"}):
        seen = []
        args = tiny_config(tmp_path, family, pipeline_kwargs={**guidance, **negative})
        trainer = NoisePPOTrainer(pipe, lambda images, **kw: seen.append(images) or brightness(images), args=args,
                                  train_dataset=PROMPTS)
        trainer._sample_and_score(batch)
        rollouts.append(seen[0])
    assert not torch.equal(*rollouts)
