import os
import sys
import threading

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig, NoisePPOPipeline
from trl_noise_ppo.noise_injection import (
    discover_noise_spec,
    draw_noise,
    encode_prompts,
    generator_config_for,
    pipeline_arguments,
)
from trl_noise_ppo.shapes import load_shapes_pipeline, training_prompts


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


# ---- calls from several threads ----


def fitted_generator(pipe, **call):
    """A perturbed generator sized for `pipe`'s noise and prompt embeddings at `call`'s size."""
    embeds = encode_prompts(pipe, ["x"])
    spec = discover_noise_spec(pipe, {**pipeline_arguments(pipe, embeds), "num_inference_steps": 1, **call})
    return perturbed(NoiseGenerator(generator_config_for(pipe, spec, embeds)))


@pytest.mark.parametrize("family", ["shapes", "flux", "ernie_image"])  # ERNIE-Image: the noise drawn inline
def test_two_threads_get_exactly_the_images_of_the_same_calls_made_one_after_another(family):
    """Each call has its own prompt, seed, step count and guidance, so that a call disturbed by the other thread's
    (its scheduler's timesteps, its noise discovery, its guidance) gives another image."""
    pipe = load_shapes_pipeline() if family == "shapes" else build_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    size = {} if family == "shapes" else {"height": 64, "width": 64}
    tuned = NoisePPOPipeline(pipe, fitted_generator(pipe, **size))
    prompts = training_prompts()[:10]

    def call(thread, index):
        return tuned(prompts[index % len(prompts)], num_inference_steps=1 + (thread + index) % 3, guidance_scale=[1.0, 3.0][thread],
                     generator=torch.Generator().manual_seed(100 * thread + index), output_type="pt", **size).images

    calls = [(thread, index) for thread in range(2) for index in range(50)]
    expected = {key: call(*key) for key in calls}
    results, errors = {}, []
    intra_op_threads = torch.get_num_threads()

    def run(thread):
        # set per thread (OpenMP's setting is): another number of intra-op threads sums in another order
        torch.set_num_threads(intra_op_threads)
        try:
            for index in range(50):
                results[thread, index] = call(thread, index)
        except Exception as error:  # raised again below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(thread,)) for thread in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    differing = [key for key in calls if not torch.equal(results[key], expected[key])]
    assert not differing, f"{len(differing)} of {len(calls)} calls gave other images"


@pytest.mark.parametrize("family", ["sd", "ernie_image"])  # the noise drawn in prepare_latents, or inline in __call__
def test_the_noise_discovery_changes_neither_the_pipeline_nor_its_module_while_it_runs(family, monkeypatch):
    """What another thread would see in the middle of the dry run, when it draws the noise."""
    pipe = build_pipeline(family)
    pipe.scheduler.set_timesteps(7)
    module = sys.modules[type(pipe).__module__]
    attributes = {name: id(value) for name, value in vars(pipe).items()}
    seen, randn = [], torch.randn

    def probed_randn(*args, **kwargs):
        unchanged = {name: id(value) for name, value in vars(pipe).items()} == attributes
        seen.append((module.randn_tensor is randn_tensor, unchanged, pipe.scheduler.num_inference_steps))
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", probed_randn)
    embeds = encode_prompts(pipe, ["a cat"])
    draw_noise(pipe, {**pipeline_arguments(pipe, embeds), "num_inference_steps": 2, "height": 64, "width": 64,
                      "generator": torch.Generator().manual_seed(0)})
    assert seen and set(seen) == {(True, True, 7)}, seen  # SD draws twice: the second checks the generator's state


def test_call_mistakes_are_named():
    pipe = build_pipeline("sd")
    tuned = NoisePPOPipeline(pipe, generator_for(pipe))
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive whole number, got -1"):
        tuned("a cat", num_images_per_prompt=-1, **CALL)
    embeds = encode_prompts(pipe, ["a dog"])
    with pytest.raises(ValueError, match="Give either `prompt` or `prompt_embeds`, not both"):
        tuned("a cat", prompt_embeds=embeds["prompt_embeds"], **CALL)


@pytest.mark.parametrize("killed_while", ["writing", "moving into place"])
def test_a_save_killed_midway_leaves_the_earlier_save_or_no_pipeline_and_the_next_save_completes(
    killed_while, tmp_path, monkeypatch, modules_cache
):
    pipe = build_pipeline("sd")
    pipe.save_pretrained(tmp_path / "base")
    earlier = NoisePPOPipeline(pipe, perturbed(generator_for(pipe, base_pipeline=str(tmp_path / "base"))))
    later = NoisePPOPipeline(pipe, generator_for(pipe, base_pipeline=str(tmp_path / "base")))
    earlier.save_pretrained(tmp_path / "saved")
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    earlier_images = earlier("a cat", generator=seeded(), **CALL).images

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    if killed_while == "writing":
        monkeypatch.setattr(type(later.noise_generator), "save_pretrained", killed)
    else:  # pipeline/ and noise_generator/ replaced, model_index.json not yet moved in
        replace = os.replace

        def killed_at_the_index(source, target):
            return (killed if target.endswith("model_index.json") else replace)(source, target)

        monkeypatch.setattr(os, "replace", killed_at_the_index)
    for folder in (tmp_path / "saved", tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            later.save_pretrained(folder)
    monkeypatch.undo()
    if killed_while == "writing":  # the earlier save is whole, for diffusers alone too
        for loaded in (NoisePPOPipeline.from_pretrained(tmp_path / "saved"),
                       DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)):
            loaded.set_progress_bar_config(disable=True)
            torch.testing.assert_close(loaded("a cat", generator=seeded(), **CALL).images, earlier_images, rtol=0, atol=1e-5)
    # a half-replaced save, or a fresh folder, holds no pipeline, and says why
    interrupted = ["fresh"] if killed_while == "writing" else ["saved", "fresh"]
    for name in interrupted:
        with pytest.raises(OSError, match=f"A save into .*{name} was interrupted"):
            NoisePPOPipeline.from_pretrained(tmp_path / name)
        with pytest.raises(OSError, match="no file named model_index.json"):
            DiffusionPipeline.from_pretrained(tmp_path / name, trust_remote_code=True)

    for folder in (tmp_path / "saved", tmp_path / "fresh"):
        later.save_pretrained(folder)
        assert not (folder / "tmp-save").exists()
        for reloaded in (NoisePPOPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
            assert torch.equal(reloaded.noise_generator.head.weight, torch.zeros_like(reloaded.noise_generator.head.weight))
