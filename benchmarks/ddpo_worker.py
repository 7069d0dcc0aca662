"""DDPO with TRL 0.23's `DDPOTrainer`, for `benchmarks/peers.py`, which runs this file in a virtual environment of its
own: `DDPOTrainer` left TRL after 0.23 and cannot be installed beside TRL 1.x.

    <ddpo venv>/bin/python benchmarks/ddpo_worker.py <spec.json>

The spec (written by peers.py) says what to do:
- `"task": "shapes"`: fine-tune the shapes pipeline (LoRA or the full UNet) on the shapes reward for `reward_queries`
  images, and sample the evaluation sets (`eval_path`: prompts and initial noise) before training, at each checkpoint
  and at the end, with the deterministic sampler (eta 0, as the base is judged) and the stochastic one DDPO trains
  with (eta 1). Images go to `<output_dir>/images.pt`; seconds per reward query (sampling, scoring and training,
  evaluation excluded), seconds per image at inference and peak memory to `<output_dir>/result.json`.
- `"task": "cost"`: a few epochs on a large pipeline with a reward that costs nothing, for seconds per training sample
  and peak memory.
"""

import json
import os
import random
import sys
import time
import types
from pathlib import Path

import torch
from accelerate import PartialState
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
from benchmarks.process_memory import peak_memory_mb  # noqa: E402


def shapes_reward():
    """The shapes world's learned reward, imported without `trl_noise_ppo/__init__.py`, which needs TRL 1.x."""
    package = types.ModuleType("trl_noise_ppo")
    package.__path__ = [str(REPOSITORY / "trl_noise_ppo")]
    sys.modules["trl_noise_ppo"] = package
    from trl_noise_ppo.shapes import ShapesAlignmentReward

    return ShapesAlignmentReward()


def ddpo_config(spec: dict, epochs: int, samples_per_epoch: int, train_batch_size: int) -> DDPOConfig:
    sample_batch_size = min(samples_per_epoch, spec.get("sample_batch_size", 32))
    return DDPOConfig(
        num_epochs=epochs,
        sample_num_steps=spec["steps"],
        sample_guidance_scale=spec["guidance_scale"],
        sample_eta=1.0,
        sample_batch_size=sample_batch_size,
        sample_num_batches_per_epoch=samples_per_epoch // sample_batch_size,
        train_batch_size=train_batch_size,
        # two optimiser steps per epoch, as ddpo-pytorch's configurations take
        train_gradient_accumulation_steps=max(1, samples_per_epoch // (2 * train_batch_size)),
        train_learning_rate=spec["learning_rate"],
        mixed_precision="no",
        save_freq=10**9,  # no accelerate checkpoints
        seed=spec["seed"],
        logdir=os.path.join(spec["output_dir"], "logs"),
    )


@torch.no_grad()
def sample(pipeline, prompts: list[str], noise: torch.Tensor, spec: dict, eta: float, batch_size: int = 256):
    pipeline.unet.eval()
    images = []
    for start in range(0, len(prompts), batch_size):
        images.append(pipeline(
            prompts[start : start + batch_size], latents=noise[start : start + batch_size],
            num_inference_steps=spec["steps"], guidance_scale=spec["guidance_scale"], eta=eta, output_type="pt",
            generator=torch.Generator().manual_seed(spec["seed"] + start),
        ).images)
    return torch.cat(images)


def shapes(spec: dict) -> None:
    reward = shapes_reward()
    rng = random.Random(spec["seed"])
    training_prompts = spec["training_prompts"]
    evaluation = torch.load(spec["eval_path"])  # {set name: {"prompts": [...], "noise": tensor}}
    samples_per_epoch = spec["samples_per_epoch"]
    config = ddpo_config(spec, spec["reward_queries"] // samples_per_epoch, samples_per_epoch, spec["train_batch_size"])
    model = DefaultDDPOStableDiffusionPipeline(spec["pipeline_path"], use_lora=spec["use_lora"])
    trainer = DDPOTrainer(
        config,
        lambda images, prompts, metadata: (torch.tensor(reward(images=images, prompts=list(prompts))), {}),
        lambda: (rng.choice(training_prompts), {}),
        model,
    )
    model.set_progress_bar_config(disable=True)
    training_log = record_logs(trainer)
    images, train_seconds, global_step = {}, 0.0, 0
    checkpoints = set(spec["checkpoints"])

    def evaluate(queries: int, names: list[str]) -> None:
        for name in names:
            for eta in (0.0, 1.0):
                sets = evaluation[name]
                images[f"{name}/eta={eta:g}/{queries}"] = sample(model.sd_pipeline, sets["prompts"], sets["noise"], spec, eta)

    evaluate(0, list(evaluation))
    for epoch in range(config.num_epochs):
        start = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        train_seconds += time.perf_counter() - start
        queries = (epoch + 1) * samples_per_epoch
        if queries in checkpoints and queries != spec["reward_queries"]:
            evaluate(queries, ["curve"])
    start = time.perf_counter()
    evaluate(spec["reward_queries"], list(evaluation))
    seconds_per_image = (time.perf_counter() - start) / sum(2 * len(s["prompts"]) for s in evaluation.values())
    torch.save(images, os.path.join(spec["output_dir"], "images.pt"))
    result = {
        "reward_queries": config.num_epochs * samples_per_epoch,
        "train_seconds": train_seconds,
        "seconds_per_query": train_seconds / (config.num_epochs * samples_per_epoch),
        "inference_seconds_per_image": seconds_per_image,
        "peak_memory_mb": peak_memory_mb(),
        "trainable_parameters": sum(p.numel() for p in model.unet.parameters() if p.requires_grad),
        "training_log": training_log,
    }
    Path(spec["output_dir"], "result.json").write_text(json.dumps(result, indent=2))


def record_logs(trainer) -> list[dict]:
    """What DDPOTrainer logs (mean reward per epoch; loss, approx_kl and clip fraction per optimiser step), kept
    without a tracker."""
    logs = []

    def log(values: dict, step: int | None = None, **kwargs) -> None:
        entry = {}
        for name, value in values.items():
            try:
                entry[name] = float(value.detach() if torch.is_tensor(value) else value)
            except (TypeError, ValueError, RuntimeError):  # the per-image rewards
                pass
        logs.append(entry)

    trainer.accelerator.log = log
    return logs


def cost(spec: dict) -> None:
    config = ddpo_config(spec, spec["epochs"], spec["samples_per_epoch"], spec["train_batch_size"])
    model = DefaultDDPOStableDiffusionPipeline(spec["pipeline_path"], use_lora=spec["use_lora"])
    trainer = DDPOTrainer(
        config, lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {}), lambda: ("a photo of a cat", {}), model
    )
    model.set_progress_bar_config(disable=True)
    epoch_seconds, global_step = [], 0
    for epoch in range(config.num_epochs):
        start = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        epoch_seconds.append(time.perf_counter() - start)
    result = {
        "seconds_per_sample": sorted(epoch_seconds[1:])[len(epoch_seconds[1:]) // 2] / spec["samples_per_epoch"],
        "epoch_seconds": epoch_seconds,
        "peak_memory_mb": peak_memory_mb(),
        "trainable_parameters": sum(p.numel() for p in model.unet.parameters() if p.requires_grad),
    }
    Path(spec["output_dir"], "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    worker_spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(worker_spec["threads"])
    PartialState()  # DefaultDDPOStableDiffusionPipeline logs through accelerate, which needs its state first
    {"shapes": shapes, "cost": cost}[worker_spec["task"]](worker_spec)
