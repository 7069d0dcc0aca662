import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from trl_noise_ppo.shapes import (
    SHAPES_PIPELINE_PATH,
    ShapesAlignmentReward,
    alignment_rate,
    held_out_prompts,
    load_shapes_pipeline,
    training_prompts,
)
from trl_noise_ppo.shapes.render import (
    COLOUR_NAMES,
    LAYOUTS,
    POSITION_NAMES,
    SHAPES,
    all_scenes,
    parse_caption,
    render_batch,
    render_example,
    single_object_scenes,
)


@pytest.fixture(scope="module")
def pipeline():
    pipeline = load_shapes_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def reward():
    return ShapesAlignmentReward()


def test_render_is_deterministic_in_the_seed():
    image, caption, labels = render_example(seed=3)
    again, same_caption, same_labels = render_example(seed=3)
    other, _, _ = render_example(seed=4)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, again) and caption == same_caption and labels == same_labels
    assert not torch.equal(image, other)


def test_captions_match_attribute_labels():
    scenes = all_scenes()
    assert len({scene.caption for scene in scenes}) == len(scenes) == 90 + 612
    for scene in scenes:
        assert parse_caption(scene.caption) == scene
        labels = scene.labels
        (colour, shape), *rest = scene.objects
        assert LAYOUTS[labels["layout"]] == scene.layout
        assert (COLOUR_NAMES[labels["colour_a"]], SHAPES[labels["shape_a"]]) == (colour, shape)
        assert colour in scene.caption.split() and shape in scene.caption.split()
        if rest:
            assert (COLOUR_NAMES[labels["colour_b"]], SHAPES[labels["shape_b"]]) == rest[0]
        else:
            assert labels["colour_b"] == labels["shape_b"] == -1
    with pytest.raises(ValueError):
        parse_caption("a pink hexagon on the moon")


def test_split_is_fixed_disjoint_and_covers_every_attribute():
    training, held_out = training_prompts(), held_out_prompts()
    assert not set(training) & set(held_out)
    assert sorted(training + held_out) == sorted(scene.caption for scene in all_scenes())
    assert len(held_out_prompts(include_two_objects=False)) == 18
    # Every colour, shape and position still appears in the training prompts of one object.
    training_scenes = [parse_caption(p) for p in training_prompts(include_two_objects=False)]
    assert {s.objects[0][0] for s in training_scenes} == set(COLOUR_NAMES)
    assert {s.objects[0][1] for s in training_scenes} == set(SHAPES)
    assert {s.layout for s in training_scenes} == set(POSITION_NAMES)
    assert "a red circle on the left" in held_out  # pinned: the split must not move silently


def test_bundled_pipeline_loads_offline_and_generates_from_given_latents(pipeline):
    assert type(DiffusionPipeline.from_pretrained(SHAPES_PIPELINE_PATH)) is StableDiffusionPipeline
    prompts = ["a red circle on the left", "a green triangle left of a yellow circle"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipeline(prompts, num_inference_steps=1, latents=latents, output_type="pt").images
    again = pipeline(prompts, num_inference_steps=1, latents=latents, output_type="pt").images
    other = pipeline(prompts, num_inference_steps=1, latents=torch.randn(2, 4, 8, 8), output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, again) and not torch.allclose(images, other)


def test_tokenizer_has_one_token_per_caption_word(pipeline):
    words = {word for scene in all_scenes() for word in scene.caption.split()}
    assert all(len(pipeline.tokenizer(word).input_ids) == 3 for word in words)  # <|startoftext|> word <|endoftext|>
    assert pipeline.tokenizer.model_max_length == pipeline.text_encoder.config.max_position_embeddings


def test_reward_prefers_an_image_of_the_prompt(reward):
    scenes = single_object_scenes()[::9] + all_scenes()[100::61]
    images, captions, _ = render_batch(range(len(scenes)), scenes)
    mismatched_images = images.roll(1, dims=0)  # each caption paired with another scene's image
    matching = torch.tensor(reward(images=images, prompts=captions, trainer_state=None))
    mismatching = torch.tensor(reward(images=mismatched_images, prompts=captions))
    assert reward.device == images.device and reward.__name__ == reward.name == "shapes_alignment"
    assert ((0 <= matching) & (matching <= 1)).all()
    assert (matching > mismatching).all()
    assert alignment_rate(images, captions, reward.classifier) > 0.9
    assert alignment_rate(mismatched_images, captions, reward.classifier) < 0.2


def test_noise_ppo_raises_alignment_on_the_bundled_model(tmp_path):
    """A short Noise PPO run at one step, the quickstart's setting, measured on the same prompts and eps before and
    after: the paired gain must clear three standard errors."""
    from datasets import Dataset

    from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer

    pipe = load_shapes_pipeline()
    reward = ShapesAlignmentReward()
    prompts = training_prompts()[::4]
    args = NoisePPOConfig(
        output_dir=str(tmp_path), num_inference_steps=1, num_generations=8, per_device_train_batch_size=64,
        num_iterations=4, max_steps=4 * 20, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )
    trainer = NoisePPOTrainer(pipe, reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}))
    eps = torch.randn(2 * len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    evaluated = prompts * 2

    def scores(generator):
        images = NoisePPOPipeline(pipe, generator)(evaluated, latents=eps, num_inference_steps=1, output_type="pt").images
        return torch.tensor(reward(images=images, prompts=evaluated))

    before = scores(NoiseGenerator(trainer.model.config))
    trainer.train()
    gain = scores(trainer.model) - before
    standard_error = gain.std() / len(gain) ** 0.5
    assert gain.mean() > 3 * standard_error, (gain.mean().item(), standard_error.item())
