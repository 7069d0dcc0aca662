import pytest
import torch
from diffusers import DiffusionPipeline

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig, NoisePPOPipeline
from trl_noise_ppo.noise_injection import discover_noise_spec, encode_prompts, generator_config_for


CALL = {"num_inference_steps": 2, "output_type": "pt"}


def generator_for(pipe, noise_shape=(4, 32, 32), base_pipeline=None, project_to_shell=False):
    embeds = encode_prompts(pipe, ["x"])
    pooled = embeds.get("pooled_prompt_embeds")
    return NoiseGenerator(
        NoiseGeneratorConfig(
            noise_shape=list(noise_shape),
            prompt_embeds_dim=embeds["prompt_embeds"].shape[-1],
            pooled_prompt_embeds_dim=None if pooled is None else pooled.shape[-1],
            base_pipeline=base_pipeline,
            pipeline_class=type(pipe).__name__,
            project_to_shell=project_to_shell,
        )
    )


def perturbed(generator):
    torch.manual_seed(1)
    torch.nn.init.normal_(generator.head.weight, std=0.5)
    return generator


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_untrained_generator_reproduces_base_pipeline(family):
    pipe = build_pipeline(family)
    tuned = NoisePPOPipeline(pipe, generator_for(pipe))

    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = pipe("a cat", generator=seeded(), **CALL).images
    assert torch.equal(tuned("a cat", generator=seeded(), **CALL).images, base)

    eps = torch.randn(3, 4, 32, 32)
    base = pipe("a cat", num_images_per_prompt=3, latents=eps, **CALL).images
    assert torch.equal(tuned("a cat", num_images_per_prompt=3, latents=eps, **CALL).images, base)


def test_a_shell_projecting_generator_gives_the_pipeline_its_noise_at_the_norm_of_n01_noise():
    pipe = build_pipeline("sd")
    tuned = NoisePPOPipeline(pipe, generator_for(pipe, project_to_shell=True))
    eps = torch.randn(2, 4, 32, 32)
    on_shell = eps * (eps[0].numel() ** 0.5 / eps.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    images = tuned("a cat", num_images_per_prompt=2, latents=eps, **CALL).images
    torch.testing.assert_close(images, pipe("a cat", num_images_per_prompt=2, latents=on_shell, **CALL).images)
    assert not torch.allclose(images, pipe("a cat", num_images_per_prompt=2, latents=eps, **CALL).images)


def test_trained_generator_changes_images_and_mean_mode_is_deterministic():
    pipe = build_pipeline("sd")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    tuned = NoisePPOPipeline(pipe, perturbed(generator_for(pipe)))
    sampled = tuned("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert not torch.allclose(sampled, base)
    first, second = (tuned("a cat", noise="mean", generator=torch.Generator().manual_seed(s), **CALL).images for s in (0, 1))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="'sample' or 'mean'"):
        tuned("a cat", noise="mode", **CALL)


def test_behaves_like_the_wrapped_pipeline():
    pipe = build_pipeline("sd")
    tuned = NoisePPOPipeline(pipe, generator_for(pipe))
    assert tuned.scheduler is pipe.scheduler
    assert tuned.vae_scale_factor == pipe.vae_scale_factor
    output = tuned(["a cat", "a dog"], num_images_per_prompt=2, **CALL)
    assert output.images.shape == (4, 3, 64, 64)
    with pytest.raises(ValueError, match=r"latents has shape \[1, 4, 32, 32\].*\[2, 4, 32, 32\]"):
        tuned(["a cat", "a dog"], latents=torch.randn(1, 4, 32, 32), **CALL)


def test_wrong_resolution_is_refused_before_sampling():
    pipe = build_pipeline("sd")
    tuned = NoisePPOPipeline(pipe, generator_for(pipe))
    with pytest.raises(ValueError, match="does not fit"):
        tuned("a cat", height=96, width=96, **CALL)


def test_save_and_load_round_trip(tmp_path):
    pipe = build_pipeline("sd")
    pipe.save_pretrained(tmp_path / "base")
    tuned = NoisePPOPipeline(pipe, perturbed(generator_for(pipe, base_pipeline=str(tmp_path / "base"))))
    expected = tuned("a cat", generator=torch.Generator().manual_seed(0), **CALL).images

    tuned.save_pretrained(tmp_path / "tuned")
    tuned.noise_generator.save_pretrained(tmp_path / "generator")
    pipe.save_pretrained(tmp_path / "earlier-layout")  # the layout earlier versions saved: the pipeline at the root
    tuned.noise_generator.save_pretrained(tmp_path / "earlier-layout" / "noise_generator")
    loaded = [
        NoisePPOPipeline.from_pretrained(tmp_path / "tuned"),
        NoisePPOPipeline.from_pretrained(tmp_path / "earlier-layout"),
        NoisePPOPipeline.from_pretrained(tmp_path / "generator"),
        NoisePPOPipeline.from_pretrained(tmp_path / "base", noise_generator=str(tmp_path / "generator")),
    ]
    for pipeline in loaded:
        pipeline.set_progress_bar_config(disable=True)
        # not bit-equal: a reloaded convolution may pick another CPU kernel (differences of about 1e-8)
        actual = pipeline("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_generator_without_base_pipeline_needs_one(tmp_path):
    pipe = build_pipeline("sd")
    generator_for(pipe).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not record its base pipeline"):
        NoisePPOPipeline.from_pretrained(tmp_path)


def test_save_refuses_a_model_folder(tmp_path):
    pipe = build_pipeline("sd")
    generator = generator_for(pipe)
    generator.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a model"):
        NoisePPOPipeline(pipe, generator).save_pretrained(tmp_path)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies a folder's pipeline code into its modules cache before importing it: a temporary one here."""
    import diffusers.utils.dynamic_modules_utils as dynamic_modules

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    return tmp_path / "modules"


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_diffusers_alone_loads_a_saved_folder_as_the_noise_ppo_pipeline_or_refuses(family, tmp_path, modules_cache):
    pipe = build_pipeline(family)
    call = {**CALL, "height": 64, "width": 64}  # a tiny pipeline's default size is not saved with it
    generator = NoiseGenerator(generator_config_for(pipe, discover_noise_spec(pipe, {"prompt": "x", **call}),
                                                    encode_prompts(pipe, ["x"])))
    NoisePPOPipeline(pipe, perturbed(generator)).save_pretrained(tmp_path / "tuned")

    # nothing loads the bare pipeline silently: diffusers asks to run the folder's loader, naming the flag
    for loader in (DiffusionPipeline, type(pipe)):
        with pytest.raises(ValueError, match="(?s)noise_ppo_pipeline.py.*trust_remote_code=True"):
            loader.from_pretrained(tmp_path / "tuned")

    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    reference = NoisePPOPipeline.from_pretrained(tmp_path / "tuned")
    for dtype in (None, torch.bfloat16):
        kwargs = {} if dtype is None else {"dtype": dtype}
        loaded = DiffusionPipeline.from_pretrained(tmp_path / "tuned", trust_remote_code=True, **kwargs)
        assert isinstance(loaded, NoisePPOPipeline) and type(loaded.pipeline) is type(pipe)
        assert loaded.noise_generator.dtype == torch.float32 and loaded.pipeline.dtype == (dtype or torch.float32)
        expected = NoisePPOPipeline.from_pretrained(tmp_path / "tuned", **kwargs)
        for pipeline in (loaded, expected):
            pipeline.set_progress_bar_config(disable=True)
        actual = loaded("a cat", generator=seeded(), **call).images
        torch.testing.assert_close(actual, expected("a cat", generator=seeded(), **call).images, rtol=0, atol=1e-5)
    base = reference.pipeline("a cat", generator=seeded(), **call).images
    assert not torch.allclose(reference("a cat", generator=seeded(), **call).images, base, atol=1e-3)  # the generator acts
