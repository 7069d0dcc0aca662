import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from trl_noise_ppo.shapes import (
    RECOMMENDED_GUIDANCE_SCALES,
    SHAPES_PIPELINE_PATH,
    ShapesAlignmentReward,
    alignment_rate,
    held_out_prompts,
    load_shapes_pipeline,
    training_prompts,
)
from trl_noise_ppo.shapes.render import (
    COLOUR_NAMES,
    KINDS,
    LAYOUTS,
    POSITION_NAMES,
    SHAPES,
    all_scenes,
    balanced_prompts,
    parse_caption,
    render_batch,
    render_example,
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
    assert len({scene.caption for scene in scenes}) == len(scenes) == 90 + 612 + 72 + 3240
    for scene in scenes:
        assert parse_caption(scene.caption) == scene
        labels = scene.labels
        assert LAYOUTS[labels["layout"]] == scene.layout
        assert labels["count"] + 1 == len(scene.objects)
        distinct = scene.objects[:1] if scene.kind == "count" else scene.objects
        for slot, name in enumerate("abc"):
            if slot < len(distinct):
                assert (COLOUR_NAMES[labels[f"colour_{name}"]], SHAPES[labels[f"shape_{name}"]]) == distinct[slot]
            else:
                assert labels[f"colour_{name}"] == labels[f"shape_{name}"] == -1
    assert parse_caption("three blue squares").objects == (("blue", "square"),) * 3
    assert parse_caption("a red circle left of a blue square left of a white triangle").kind == "row"
    with pytest.raises(ValueError):
        parse_caption("a pink hexagon on the moon")


def test_split_is_fixed_disjoint_and_covers_every_attribute():
    training, held_out = training_prompts(), held_out_prompts()
    assert not set(training) & set(held_out)
    assert sorted(training + held_out) == sorted(scene.caption for scene in all_scenes())
    assert [len(held_out_prompts((kind,))) for kind in KINDS] == [18, 122, 15, 648]
    # Every colour, shape and position still appears in the training prompts of one object.
    training_scenes = [parse_caption(p) for p in training_prompts(("single",))]
    assert {s.objects[0][0] for s in training_scenes} == set(COLOUR_NAMES)
    assert {s.objects[0][1] for s in training_scenes} == set(SHAPES)
    assert {s.layout for s in training_scenes} == set(POSITION_NAMES)
    assert "a red circle on the left" in held_out  # pinned: the split must not move silently


def test_balanced_prompts_weigh_every_kind_the_same_and_stay_in_their_split():
    prompts = balanced_prompts("held-out", 400)
    assert prompts == balanced_prompts("held-out", 400)
    assert [sum(parse_caption(p).kind == kind for p in prompts) for kind in KINDS] == [100] * 4
    assert set(prompts) <= set(held_out_prompts()) and len(set(prompts)) == 18 + 100 + 15 + 100
    assert set(balanced_prompts("training", 400)) <= set(training_prompts())
    with pytest.raises(ValueError, match="held-out"):
        balanced_prompts("test", 4)


def test_bundled_pipeline_loads_offline_and_generates_from_given_latents(pipeline):
    assert type(DiffusionPipeline.from_pretrained(SHAPES_PIPELINE_PATH)) is StableDiffusionPipeline
    prompts = ["a red circle on the left", "three blue squares"]
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
    scenes = all_scenes()[::97]
    images, captions, _ = render_batch(range(len(scenes)), scenes)
    mismatched_images = images.roll(1, dims=0)  # each caption paired with another scene's image
    matching = torch.tensor(reward(images=images, prompts=captions, trainer_state=None))
    mismatching = torch.tensor(reward(images=mismatched_images, prompts=captions))
    assert reward.device == images.device and reward.__name__ == reward.name == "shapes_alignment"
    assert ((0 <= matching) & (matching <= 1)).all()
    assert (matching > mismatching).all()
    assert alignment_rate(images, captions, reward.classifier) > 0.9
    assert alignment_rate(mismatched_images, captions, reward.classifier) < 0.2


def test_product_reward_is_the_probability_that_every_stated_attribute_holds(reward):
    from trl_noise_ppo.shapes.reward import _stated_attribute_probabilities, prompt_labels

    scenes = all_scenes()[::97]
    images, captions, _ = render_batch(range(len(scenes)), scenes)
    mismatched_images = images.roll(1, dims=0)
    product = ShapesAlignmentReward(aggregation="product")
    mean = reward(images=mismatched_images, prompts=captions)
    with torch.no_grad():
        probabilities, stated = _stated_attribute_probabilities(reward.classifier(mismatched_images), prompt_labels(captions))
    expected = [p[s].prod().item() for p, s in zip(probabilities, stated)]
    assert product(images=mismatched_images, prompts=captions) == pytest.approx(expected, rel=1e-5)
    assert all(p <= m + 1e-6 for p, m in zip(expected, mean))  # a product of probabilities is at most their mean
    with pytest.raises(ValueError, match="aggregation='sum' is not one of"):
        ShapesAlignmentReward(aggregation="sum")


def test_a_reward_folder_without_weights_is_refused_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json or model.safetensors: pass a folder written by"):
        ShapesAlignmentReward(tmp_path)


def test_noise_ppo_raises_alignment_on_the_bundled_model(tmp_path):
    """A short Noise PPO run at one step, the quickstart's setting, on 8 prompts (each seen 20 times, so that a short
    run can learn them; lr 3e-3), measured on the same prompts and eps before and after: the paired gain must clear
    three standard errors. Measured at the trainer's defaults (8 prompts, so 8 clusters: one each, with their coarse
    means): +0.054, 4.2 standard errors (one thread)."""
    from datasets import Dataset

    from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer

    pipe = load_shapes_pipeline()
    reward = ShapesAlignmentReward()
    prompts = balanced_prompts("training", 8)
    guidance_scale = RECOMMENDED_GUIDANCE_SCALES[1]
    args = NoisePPOConfig(
        output_dir=str(tmp_path), num_inference_steps=1, guidance_scale=guidance_scale, num_generations=8,
        per_device_train_batch_size=64, num_iterations=4, max_steps=4 * 20, learning_rate=3e-3, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0,
    )
    trainer = NoisePPOTrainer(pipe, reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}))
    evaluated = prompts * 16
    eps = torch.randn(len(evaluated), 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def scores(generator):
        images = NoisePPOPipeline(pipe, generator)(
            evaluated, latents=eps, num_inference_steps=1, guidance_scale=guidance_scale, output_type="pt"
        ).images
        return torch.tensor(reward(images=images, prompts=evaluated))

    before = scores(copy.deepcopy(trainer.model))  # the untrained generator: its clusters fitted, its means 0
    trainer.train()
    gain = scores(trainer.model) - before
    standard_error = gain.std() / len(gain) ** 0.5
    assert gain.mean() > 3 * standard_error, (gain.mean().item(), standard_error.item())


def test_evaluate_base_picks_the_guidance_by_training_prompts(tmp_path, capsys):
    from trl_noise_ppo.shapes.evaluate_base import EvaluateBaseArguments, main

    report = main(EvaluateBaseArguments(steps=[1], guidance_scales=[1.0, 7.5], num_images=8, output_dir=str(tmp_path)))
    cells = report["cells"]
    assert [(c["steps"], c["guidance_scale"]) for c in cells] == [(1, 1.0), (1, 7.5)]
    best = max(cells, key=lambda c: c["training"]["judge"])
    assert report["best_guidance_scale"] == {1: best["guidance_scale"]}
    for cell in cells:
        for split in ("training", "held-out"):
            by_kind = cell[split]["judge_by_kind"]
            assert sum(by_kind.values()) / 4 == pytest.approx(cell[split]["judge"])  # 2 images of each kind
    assert (tmp_path / "evaluate_base.json").exists() and "| steps | best guidance |" in capsys.readouterr().out


def test_distillation_brings_one_step_images_to_the_teachers(pipeline):
    """A short distillation on 16 (noise, prompt) pairs: the student's one-step latents must come at least twice as
    close to the teacher's 8-step samples as the teacher's own one-step latents are, and the student still samples."""
    import torch.nn.functional as F

    from trl_noise_ppo.shapes.distil_base import DistilBaseArguments, distil, one_step_prediction, teacher_samples
    from trl_noise_ppo.shapes.train_base import encode_latents

    args = DistilBaseArguments(teacher_path="", steps=40, batch_size=16, learning_rate=1e-3, warmup_steps=1, log_every=1000)
    prompts = balanced_prompts("training", 16)
    noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=pipeline.tokenizer.model_max_length, return_tensors="pt").input_ids
    images, captions, _ = render_batch(range(16))
    latents = encode_latents(pipeline.vae, images) * pipeline.vae.config.scaling_factor
    latent_ids = pipeline.tokenizer(captions, padding="max_length", max_length=pipeline.tokenizer.model_max_length, return_tensors="pt").input_ids
    targets = teacher_samples(pipeline, prompts, noise, args)

    def distance(model):
        with torch.no_grad():
            return F.mse_loss(one_step_prediction(model.unet, model.text_encoder, model.scheduler, noise, ids), targets).item()

    teacher_weights = {name: weight.clone() for name, weight in pipeline.unet.state_dict().items()}
    student = distil(pipeline, noise, ids, targets, latents, latent_ids, args, torch.Generator().manual_seed(0))
    assert distance(student) < 0.5 * distance(pipeline), (distance(student), distance(pipeline))
    assert all(torch.equal(weight, pipeline.unet.state_dict()[name]) for name, weight in teacher_weights.items())
    images = student(prompts[:2], latents=noise[:2], num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_distillation_refuses_to_overwrite_a_folder_before_any_work(tmp_path):
    from trl_noise_ppo.shapes.distil_base import DistilBaseArguments, main

    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        main(DistilBaseArguments(teacher_path="no-such-folder", output_dir=str(tmp_path)))
    assert (tmp_path / "model_index.json").read_text() == "{}"
