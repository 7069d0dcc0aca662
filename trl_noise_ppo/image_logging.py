"""Logging sampled images, with their prompts and rewards, to the experiment trackers TRL supports."""

import importlib

import pandas as pd
import torch
from PIL import Image


# Trackers that take a table of images, as GRPOTrainer logs its completions: `tracker.log({key: tracker.Table(
# dataframe=...)})` with `tracker.Image` cells. wandb only while a run is open (the Trainer's callback opens it).
IMAGE_TRACKERS = ("wandb", "trackio")


def log_images(trainer, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor, max_images: int = 16) -> None:
    """
    Logs up to `max_images` of a generation batch's images as a table (step, prompt, reward, image) to every tracker of
    `trainer.args.report_to` that takes images and is importable; does nothing if there is none. Call it at generation
    time, on every process: only the main process logs, its own images.

    It logs at the first generation batch of every `trainer.args.log_images_steps` optimiser steps (`None` or `0`
    never logs): generation batches fall every `num_iterations` steps or so, rarely exactly on a multiple.

    Args:
        trainer: the [`NoisePPOTrainer`] (anything with `args`, `state.global_step` and `is_world_process_zero()`).
        images (`torch.Tensor` of shape `(N, 3, H, W)`): float images in `[0, 1]`.
        prompts (`list[str]`): the `N` prompts.
        rewards (`torch.Tensor` of shape `(N,)`): the total reward of each image (NaN where none was given).
    """
    interval = trainer.args.log_images_steps
    if not interval or not trainer.is_world_process_zero():
        return
    step = trainer.state.global_step
    last_step = getattr(trainer, "_images_logged_at_step", None)
    if last_step is not None and step // interval == last_step // interval:
        return
    trackers = _image_trackers(trainer.args.report_to)
    if not trackers:
        return
    trainer._images_logged_at_step = step

    count = min(max_images, len(images))
    pixels = (images[:count].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    table = pd.DataFrame({"step": [step] * count, "prompt": list(prompts[:count]), "reward": rewards[:count].tolist()})
    for tracker in trackers:
        column = [
            tracker.Image(Image.fromarray(image), caption=f"{reward:.4g} | {prompt}")
            for image, prompt, reward in zip(pixels, table["prompt"], table["reward"], strict=True)
        ]
        # Not `step=`: wandb drops a log whose step is below its own counter, which counts log calls, not optimiser
        # steps. The Trainer's wandb and trackio callbacks log every metric with `train/global_step`, the axis wandb
        # plots against (`define_metric(step_metric=...)`); the table is logged on it too.
        tracker.log({"samples": tracker.Table(dataframe=table.assign(image=column)), "train/global_step": step})


def _image_trackers(report_to: str | list[str] | None) -> list:
    report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
    trackers = []
    for name in IMAGE_TRACKERS:
        if name not in report_to:
            continue
        try:
            tracker = importlib.import_module(name)
        except ImportError:
            continue
        if name == "wandb" and tracker.run is None:
            continue
        trackers.append(tracker)
    return trackers
