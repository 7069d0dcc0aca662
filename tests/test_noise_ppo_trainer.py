import functools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from datasets import Dataset
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer
from trl_noise_ppo.noise_ppo_trainer import gaussian_log_density, group_advantages, kl_to_standard_normal
from trl_noise_ppo.rewards import MissingWeightsError


PROMPTS = Dataset.from_dict({"prompt": ["a red circle", "a blue square", "a green triangle", "a yellow star"]})


def brightness(images, prompts, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def make_config(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        num_inference_steps=2,
        num_generations=4,
        per_device_train_batch_size=8,
        num_iterations=2,
        max_steps=4,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return NoisePPOConfig(**{**defaults, **overrides})


# ---- the equations ----


def test_gaussian_log_density_is_per_dimension_mean_of_normal_log_prob():
    x, mu, log_sigma = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), 0.3 * torch.randn(3, 4, 5, 5)
    expected = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_log_density(x, mu, log_sigma), expected)


def test_kl_to_standard_normal_matches_torch():
    mu, log_sigma = torch.randn(3, 4, 5, 5), 0.3 * torch.randn(3, 4, 5, 5)
    standard = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, log_sigma.exp()), standard)
    torch.testing.assert_close(kl_to_standard_normal(mu, log_sigma), expected.flatten(1).mean(1))
    assert kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0


def test_group_advantages_normalise_within_each_prompt_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 5.0, float("nan"), 7.0, 4.0, float("nan"), float("nan")])
    advantages = group_advantages(rewards, num_generations=3, clip=5.0).view(4, 3)
    # group 1: mean 2, std sqrt(2/3)
    torch.testing.assert_close(advantages[0], torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-4))
    # a group whose rewards are all equal carries no signal
    assert torch.equal(advantages[1], torch.zeros(3))
    # a sample without reward gets none, and does not enter its group's statistics
    torch.testing.assert_close(advantages[2], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))
    # a group with a single rewarded sample cannot be normalised
    assert torch.equal(advantages[3], torch.zeros(3))
    assert group_advantages(torch.tensor([0.0, 100.0, 0.0, 0.0]), 4, clip=1.5).max() == 1.5


# ---- training ----


def test_training_changes_only_the_generator(tmp_path):
    pipe = build_pipeline("sd")
    frozen = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    trainer = NoisePPOTrainer(pipe, brightness, args=make_config(tmp_path), train_dataset=PROMPTS)
    assert trainer.model.config.noise_shape == [4, 32, 32]
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()

    assert not torch.equal(trainer.model.head.weight, initial["head.weight"])
    assert all(torch.equal(value, frozen[name]) for name, value in pipe.unet.state_dict().items())
    assert not any(p.requires_grad for component in (pipe.unet, pipe.vae, pipe.text_encoder) for p in component.parameters())
    logged = trainer.state.log_history[0]
    for key in ("reward", "reward_std", "rewards/brightness/mean", "rewards/brightness/std", "clip_fraction",
                "approx_kl", "kl_prior", "policy/sigma", "policy/mu_rms"):
        assert key in logged and math.isfinite(logged[key]), key


def test_reward_rises(tmp_path):
    """Learning test: brightness moves little with the noise of a random tiny pipeline, so the rise is measured in
    units of the reward's spread over noise draws, against the same measurement on the untrained generator."""
    pipe = build_pipeline("sd")
    args = make_config(tmp_path, max_steps=30, num_iterations=2, learning_rate=3e-3, num_generations=8, per_device_train_batch_size=16)
    trainer = NoisePPOTrainer(pipe, brightness, args=args, train_dataset=PROMPTS)

    def mean_and_std(generator):
        tuned = NoisePPOPipeline(pipe, generator)
        images = tuned(list(PROMPTS["prompt"]), num_images_per_prompt=16, num_inference_steps=2, output_type="pt",
                       generator=torch.Generator().manual_seed(123)).images
        scores = torch.tensor(brightness(images, None))
        return scores.mean().item(), scores.std().item()

    before, spread = mean_and_std(trainer.model)
    trainer.train()
    after, _ = mean_and_std(trainer.model)
    assert (after - before) / spread > 1.0, (before, after, spread)


# ---- saving, loading, resuming ----


def test_save_model_writes_a_loadable_generator_and_model_card(tmp_path):
    pipe = build_pipeline("sd")
    pipe.save_pretrained(tmp_path / "base")
    pipe = type(pipe).from_pretrained(tmp_path / "base")
    trainer = NoisePPOTrainer(pipe, brightness, args=make_config(tmp_path, max_steps=2), train_dataset=PROMPTS)
    trainer.train()
    trainer.save_model()

    out = Path(trainer.args.output_dir)
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    card = (out / "README.md").read_text()
    assert "2506.12036" in card and "NoisePPOPipeline.from_pretrained" in card and "brightness" in card
    generator = NoiseGenerator.from_pretrained(out)
    assert generator.config.base_pipeline == str(tmp_path / "base")
    assert generator.config.pipeline_class == "StableDiffusionPipeline"
    tuned = NoisePPOPipeline.from_pretrained(out)  # base pipeline read from the generator's config
    tuned.set_progress_bar_config(disable=True)
    assert tuned("a red circle", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 64, 64)


def test_resume_continues_as_an_uninterrupted_run(tmp_path):
    # num_iterations=2: a checkpoint at step 3 falls between the two PPO epochs of a generation batch
    common = dict(max_steps=4, num_iterations=2, save_strategy="steps", save_steps=3)
    uninterrupted = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path / "a", **common), train_dataset=PROMPTS)
    uninterrupted.train()

    resumed = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path / "b", **common), train_dataset=PROMPTS)
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert (checkpoint / "noise_ppo_rollout_0.pt").is_file()
    resumed.train(resume_from_checkpoint=str(checkpoint))

    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6)


def test_continue_from_a_trained_generator(tmp_path):
    first = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path / "a", max_steps=2), train_dataset=PROMPTS)
    first.train()
    first.save_model()
    generator = NoiseGenerator.from_pretrained(first.args.output_dir)
    second = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path / "b", max_steps=2),
                             train_dataset=PROMPTS, noise_generator=generator)
    assert torch.equal(second.model.head.weight, first.model.head.weight)


# ---- bad input ----


def test_dataset_errors(tmp_path):
    pipe = build_pipeline("sd")
    with pytest.raises(ValueError, match="empty"):
        NoisePPOTrainer(pipe, brightness, args=make_config(tmp_path), train_dataset=Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match=r"no `prompt` column \(its columns: \['text'\]\).*rename_column"):
        NoisePPOTrainer(pipe, brightness, args=make_config(tmp_path), train_dataset=Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="needs a train_dataset"):
        NoisePPOTrainer(pipe, brightness, args=make_config(tmp_path))
    with pytest.raises(ValueError, match=r"columns \['images'\], names the reward functions' own arguments take"):
        NoisePPOTrainer(pipe, brightness, args=make_config(tmp_path),
                        train_dataset=Dataset.from_dict({"prompt": ["a"], "images": ["x.png"]}))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"per_device_train_batch_size \* steps_per_generation = 6 \* 1 = 6.*divisible by num_generations \(4\)"):
        make_config(tmp_path, per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="at least 2"):
        make_config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="sample_batch_size"):
        make_config(tmp_path, sample_batch_size=6)
    with pytest.raises(ValueError, match="one weight per function"):
        NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path, reward_weights=[1.0, 2.0]), train_dataset=PROMPTS)


def test_pipeline_without_latents_is_refused(tmp_path):
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="no `latents` argument"):
        NoisePPOTrainer(DDIMPipeline(unet=unet, scheduler=DDIMScheduler()), brightness, args=make_config(tmp_path), train_dataset=PROMPTS)


def test_missing_reward_weights_are_all_named_before_any_image_is_generated(tmp_path, monkeypatch):
    # A fresh offline machine: HF_HUB_OFFLINE=1 and an empty Hugging Face cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    pipe = build_pipeline("sd")
    calls, sample = [], type(pipe).__call__

    @functools.wraps(sample)
    def counting_sample(self, *args, **kwargs):
        calls.append(kwargs)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting_sample)
    with pytest.raises(MissingWeightsError) as error:
        NoisePPOTrainer(pipe, ["hpsv2", "imagereward", "aesthetic"], args=make_config(tmp_path), train_dataset=PROMPTS)
    repositories = ["xswu/HPSv2", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "THUDM/ImageReward", "bert-base-uncased",
                    "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor"]
    for repository in repositories:
        assert f"hf download {repository} " in str(error.value)
    assert calls == []


def test_generator_for_another_pipeline_is_refused(tmp_path):
    config = NoiseGeneratorConfig(noise_shape=[4, 64, 64], prompt_embeds_dim=32, pipeline_class="StableDiffusionPipeline")
    with pytest.raises(ValueError, match="does not fit this StableDiffusionPipeline"):
        NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path), train_dataset=PROMPTS,
                        noise_generator=NoiseGenerator(config))


@pytest.mark.parametrize(
    "reward, message",
    [
        (lambda images, **kwargs: [0.0], "returned 1 rewards for 8 images"),
        (lambda images, **kwargs: [float("nan")] * len(images), "returned nan for image 0"),
        (lambda images, **kwargs: [float("inf")] * len(images), "returned inf for image 0"),
    ],
)
def test_bad_rewards_are_explained(tmp_path, reward, message):
    trainer = NoisePPOTrainer(build_pipeline("sd"), reward, args=make_config(tmp_path, max_steps=1), train_dataset=PROMPTS)
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_none_rewards_are_left_out(tmp_path):
    def every_other(images, prompts, **kwargs):
        return [None if i % 2 else float(v) for i, v in enumerate(images.mean(dim=(1, 2, 3)))]

    trainer = NoisePPOTrainer(build_pipeline("sd"), every_other, args=make_config(tmp_path, max_steps=1), train_dataset=PROMPTS)
    batch = [{"prompt": p} for p in ["a red circle"] * 4 + ["a blue square"] * 4]
    rollout = trainer._sample_and_score(batch)
    assert rollout["rewarded"].tolist() == [1.0, 0.0] * 4
    assert torch.equal(rollout["advantages"][1::2], torch.zeros(4))
    assert rollout["advantages"][0::2].abs().sum() > 0


def test_dataset_columns_reach_the_reward(tmp_path):
    seen = {}

    def reward(images, prompts, category, trainer_state, **kwargs):
        seen.update(prompts=prompts, category=category, step=trainer_state.global_step)
        return [0.0] * len(images)

    dataset = PROMPTS.add_column("category", ["circle", "square", "triangle", "star"])
    trainer = NoisePPOTrainer(build_pipeline("sd"), reward, args=make_config(tmp_path, max_steps=1), train_dataset=dataset)
    trainer.train()
    assert len(seen["prompts"]) == 8 and len(seen["category"]) == 8
    assert {(p.split()[-1], c) for p, c in zip(seen["prompts"], seen["category"])} <= {
        ("circle", "circle"), ("square", "square"), ("triangle", "triangle"), ("star", "star")}


# ---- several processes ----


def test_two_processes_end_with_identical_generators(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from datasets import Dataset
        from tests.tiny_pipelines import build_pipeline
        from trl_noise_ppo import NoisePPOConfig, NoisePPOTrainer

        def brightness(images, **kwargs):
            return images.mean(dim=(1, 2, 3)).tolist()

        args = NoisePPOConfig(output_dir={str(tmp_path / "out")!r}, num_inference_steps=1, num_generations=4,
                              per_device_train_batch_size=4, num_iterations=2, max_steps=3, learning_rate=1e-3,
                              save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True)
        prompts = Dataset.from_dict({{"prompt": ["a", "b", "c", "d"]}})
        trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=args, train_dataset=prompts)
        trainer.train()
        assert trainer.accelerator.num_processes == 2
        rank = trainer.accelerator.process_index
        torch.save(trainer.model.state_dict(), {str(tmp_path)!r} + f"/rank{{rank}}.pt")
        trainer.save_model()
        trainer.accelerator.wait_for_everyone()
        trainer.end()
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        # accelerate's multi-process launcher; use_cpu=True in the config makes the processes join over gloo
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        check=True, env=env, timeout=300,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0["head.weight"], torch.zeros_like(rank0["head.weight"]))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_push_to_hub_uploads_generator_and_model_card(tmp_path, monkeypatch):
    uploaded = {}

    class FakeHub:
        def create_repo(self, repo_name, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_name}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["repo_id"] = repo_id
            uploaded["files"] = {path.name: path.read_bytes() for path in Path(folder_path).iterdir() if path.is_file()}

    monkeypatch.setattr("transformers.trainer.hf_api", lambda: FakeHub())
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path, max_steps=1, hub_model_id="shapes-noise"),
                              train_dataset=PROMPTS)
    trainer.train()
    trainer.push_to_hub(dataset_name="user/prompts")

    assert uploaded["repo_id"] == "user/shapes-noise"
    assert {"model.safetensors", "config.json", "README.md"} <= set(uploaded["files"])
    card = uploaded["files"]["README.md"].decode()
    assert "NoisePPOPipeline.from_pretrained(\"user/shapes-noise\")" in card
    assert "datasets: user/prompts" in card and "2506.12036" in card
