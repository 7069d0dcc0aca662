import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trl_noise_ppo.image_logging import log_images


class FakeImage:
    def __init__(self, image, caption=None):
        self.pixels = np.asarray(image)
        self.caption = caption


class FakeTable:
    def __init__(self, dataframe):
        self.dataframe = dataframe


def fake_tracker(name):
    """A stand-in for the wandb or trackio module that records what is logged to it."""
    tracker = types.ModuleType(name)
    tracker.Image, tracker.Table, tracker.logged = FakeImage, FakeTable, []
    tracker.log = tracker.logged.append
    tracker.run = object()  # an open wandb run
    return tracker


@pytest.fixture
def trackers(monkeypatch):
    fakes = {name: fake_tracker(name) for name in ("wandb", "trackio")}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    return fakes


def fake_trainer(report_to=("wandb", "trackio"), log_images_steps=10, main_process=True):
    return SimpleNamespace(
        args=SimpleNamespace(report_to=list(report_to), log_images_steps=log_images_steps),
        state=SimpleNamespace(global_step=0),
        is_world_process_zero=lambda: main_process,
    )


IMAGES = torch.rand(3, 3, 8, 8)
PROMPTS = ["a cat", "a dog", "a fox"]
REWARDS = torch.tensor([0.5, float("nan"), -1.25])


def test_images_prompts_and_rewards_reach_every_tracker(trackers):
    log_images(fake_trainer(), IMAGES, PROMPTS, REWARDS)
    expected_pixels = (IMAGES * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for tracker in trackers.values():
        (logged,) = tracker.logged
        table = logged["samples"].dataframe
        assert list(table.columns) == ["step", "prompt", "reward", "image"]
        assert table["prompt"].tolist() == PROMPTS and table["step"].tolist() == [0, 0, 0]
        assert table["reward"][0] == 0.5 and np.isnan(table["reward"][1])
        for image, pixels in zip(table["image"], expected_pixels, strict=True):
            np.testing.assert_array_equal(image.pixels, pixels)
        assert table["image"][2].caption == "-1.25 | a fox"


def test_logs_once_per_interval(trackers):
    trainer = fake_trainer(log_images_steps=10)
    for step in (0, 4, 8, 12, 16, 20):  # a generation batch every 4 optimiser steps
        trainer.state.global_step = step
        log_images(trainer, IMAGES, PROMPTS, REWARDS)
    assert [logged["samples"].dataframe["step"][0] for logged in trackers["wandb"].logged] == [0, 12, 20]
    # the step axis the Trainer's own tracker callbacks log the metrics against, so the tables line up with them
    for tracker in trackers.values():
        assert [logged["train/global_step"] for logged in tracker.logged] == [0, 12, 20]


def test_at_most_max_images(trackers):
    log_images(fake_trainer(), IMAGES, PROMPTS, REWARDS, max_images=2)
    assert trackers["trackio"].logged[0]["samples"].dataframe["prompt"].tolist() == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "trainer",
    [
        fake_trainer(report_to=[]),
        fake_trainer(log_images_steps=None),
        fake_trainer(main_process=False),
    ],
    ids=["not in report_to", "no interval", "not the main process"],
)
def test_nothing_is_logged(trackers, trainer):
    log_images(trainer, IMAGES, PROMPTS, REWARDS)
    assert not trackers["wandb"].logged and not trackers["trackio"].logged


def test_missing_tracker_or_closed_run_is_skipped(trackers, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # `import trackio` raises ImportError
    trackers["wandb"].run = None
    trainer = fake_trainer()
    log_images(trainer, IMAGES, PROMPTS, REWARDS)
    assert not trackers["wandb"].logged

    trackers["wandb"].run = object()
    log_images(trainer, IMAGES, PROMPTS, REWARDS)  # skipped trackers do not use up the interval
    assert len(trackers["wandb"].logged) == 1
