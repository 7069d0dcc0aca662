import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from trl.trainer.base_config import _BaseConfig

from .noise_generator import GRID_ENCODERS


# Pipeline call arguments the trainer decides: the noise, its seed, the prompt's conditioning, the batch and the output.
PIPELINE_ARGUMENTS_SET_BY_TRAINER = frozenset(
    {"prompt", "latents", "generator", "prompt_embeds", "num_images_per_prompt", "output_type", "return_dict",
     "num_inference_steps", "guidance_scale", "height", "width"}
)


@dataclass
class NoisePPOConfig(_BaseConfig):
    r"""
    Configuration class for the [`NoisePPOTrainer`].

    This class includes only the parameters that are specific to Noise PPO training. For a full list of training
    arguments, please refer to the [`~transformers.TrainingArguments`] documentation. Note that default values in this
    class may differ from those in [`~transformers.TrainingArguments`].

    Using [`~transformers.HfArgumentParser`] we can turn this class into
    [argparse](https://docs.python.org/3/library/argparse#module-argparse) arguments that can be specified on the
    command line.

    Parameters:
        > Parameters that control the images

        num_inference_steps (`int`, *optional*, defaults to `1`):
            Number of denoising steps of the frozen pipeline. Noise PPO helps most at few steps.
        guidance_scale (`float` or `None`, *optional*, defaults to `None`):
            Classifier-free guidance scale passed to the pipeline. `None` keeps the pipeline's own default. Distilled
            one-step models (SD-Turbo, SDXL-Turbo) want `0.0`.
        height (`int` or `None`, *optional*, defaults to `None`):
            Image height in pixels. `None` keeps the pipeline's default. The noise generator is trained for this
            resolution.
        width (`int` or `None`, *optional*, defaults to `None`):
            Image width in pixels. `None` keeps the pipeline's default.
        num_generations (`int`, *optional*, defaults to `8`):
            Number of images sampled per prompt. Advantages are normalised within each prompt's group, so it must be
            at least 2.
        pipeline_kwargs (`dict[str, Any]` or `None`, *optional*, defaults to `None`):
            Further keyword arguments of every pipeline call, in training and evaluation: a `negative_prompt`, Flux's
            `true_cfg_scale`, Flux Kontext's `max_area`, `use_resolution_binning`, ... (a JSON string on the command
            line). Per-prompt arguments (a ControlNet's `control_image`, Kontext's `image`) come from dataset columns of
            the argument's name instead.
        sample_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Most images passed to the pipeline in one call while sampling; a multiple of `num_generations`. `None`
            samples the whole generation batch in one call. Lower it if sampling runs out of memory.
        score_while_sampling (`bool`, *optional*, defaults to `True`):
            Whether the rewards that can run concurrently (`async def` functions, `HTTPReward`, rewards on another
            device; see `trl_noise_ppo.rewards.runs_concurrently`) score each chunk of `sample_batch_size` images
            while the pipeline samples the next. Rewards, advantages and weights are the same either way; `False`
            scores the chunks after the whole batch is sampled, in the training thread. Other rewards always score the
            whole batch after sampling.

        > Parameters that control the policy update

        loss_type (`str`, *optional*, defaults to `"natural_step"`):
            How each generation batch updates the generator (docs/method.md):

            - `"natural_step"`: each prompt's noise distribution takes one natural-gradient step up its advantages
              (the step of natural evolution strategies, of size `step_size` in units of the noise's own scale, with
              `beta` pulling it to `N(0, I)`), and the generator is regressed onto the stepped distributions for
              `num_iterations` epochs: a trust region in the space of noise distributions, whatever the network.
            - `"ppo_clip"`: the paper's PPO clipped surrogate on the ratio `pi_theta / pi_old` (geometric mean over the
              noise's dimensions, clip range `epsilon`) plus `beta` times the KL to `N(0, I)`; the step is set by the
              learning rate.
        num_iterations (`int`, *optional*, defaults to `8`):
            Epochs over each generation batch. Images are sampled once; only the cheap generator is re-evaluated.
        steps_per_generation (`int` or `None`, *optional*, defaults to `None`):
            Number of optimisation micro-steps each generation batch is split into. `None` uses
            `gradient_accumulation_steps`. The generation batch holds `per_device_train_batch_size *
            steps_per_generation` images per process.
        step_size (`float`, *optional*, defaults to `0.5`):
            With `loss_type="natural_step"`: the size of each generation batch's natural-gradient step on the mean of
            the noise, in units of its standard deviation per unit of advantage.
        std_step_size (`float`, *optional*, defaults to `0.1`):
            With `loss_type="natural_step"` and `learn_sigma`: the step size of the log standard deviation.
        epsilon (`float`, *optional*, defaults to `0.2`):
            With `loss_type="ppo_clip"`: clip range of the PPO ratio. The ratio is the geometric mean over the noise's
            dimensions of the per-dimension density ratio, so the usual PPO range applies whatever the noise size.
        beta (`float`, *optional*, defaults to `0.0`):
            Weight of the closed-form KL(N(mu, sigma^2) || N(0, I)) per noise dimension against the advantages: a
            pull towards the prior that keeps a prompt's images varied, at a cost in gain. With the default, none, and
            the noise kept at the prior's norm (`project_to_shell`), the generator gained most on the shapes-world
            benchmark, and a prompt's images came out about three times closer together than the base model's;
            `0.002` and `0.005` kept more of that variety for less gain (docs/benchmarks.md).
        base_comparison_every (`int`, *optional*, defaults to `4`):
            Every this many generation batches, the base pipeline also makes one image per prompt, from the noise eps
            of the prompt's first image, and the paired reward difference `gain_over_base` (the generator's image minus
            the base pipeline's, weighted reward) is logged: the learning-signal diagnostic, positive and rising while
            the generator learns, level with zero while it drifts (docs/method.md). Costs `1 / (num_generations *
            base_comparison_every)` more images and reward calls (3% at the defaults); the base images are not
            trained on. `0` never compares.
        advantage_clip (`float`, *optional*, defaults to `5.0`):
            Group-normalised advantages are clipped to `[-advantage_clip, advantage_clip]`.
        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of the reward functions. `None` weights each reward `1.0`.
        log_images_steps (`int` or `None`, *optional*, defaults to `None`):
            Log sampled images, with their prompts and rewards, to the trackers of `report_to` that take images
            (wandb, trackio) every this many optimiser steps. `None` never logs them.

        > Parameters that control the noise generator

        learn_sigma (`bool`, *optional*, defaults to `False`):
            Whether a new generator also learns the noise's standard deviation (it starts at 1). With `False` it is
            fixed at 1 and only the mean moves. Ignored when a trained generator is given (docs/benchmarks.md has the
            measurements behind the default).
        project_to_shell (`bool`, *optional*, defaults to `True`):
            Whether a new generator rescales each noise sample to the norm of `N(0, I)` noise (`sqrt(D)` for `D`
            elements) before the pipeline gets it, so that the frozen model sees noise of the norm it was trained on
            however far the mean moves. Ignored when a trained generator is given (its config decides). With
            `beta=0` it doubled the judged gain on the shapes-world benchmark; with a pull to `N(0, I)` of 0.02 it
            made no difference (docs/benchmarks.md). An untrained generator's images are then the base pipeline's
            from the same noise rescaled to that norm, not bit for bit the base pipeline's.
        generator_architecture (`str`, *optional*, defaults to `"prompt_clusters"`):
            How a new generator reads the prompt (`NoiseGeneratorConfig.architecture`): `"prompt_clusters"`, one
            learned grid per k-means cluster of the training prompts, fitted on `train_dataset` before the first step,
            so that prompts that read alike share one noise distribution; `"pooled_mlp"`, an MLP on the mean token
            embedding; `"token_attention"`, attention over the tokens. Ignored when a trained generator is given.
            Trained on a thousand prompts, the clusters learned where the MLP gained next to nothing
            (docs/benchmarks.md).
        generator_num_clusters (`int`, *optional*, defaults to `12`):
            For `generator_architecture="prompt_clusters"`: the number of clusters. A `train_dataset` of fewer
            distinct prompts gives each prompt a cluster of its own.
        generator_cluster_image_weight (`float`, *optional*, defaults to `2.0`):
            For `generator_architecture="prompt_clusters"`: how much where each training prompt changes the frozen
            pipeline's images counts beside its embeddings when the prompts are grouped
            (`NoiseGeneratorConfig.cluster_image_weight`). `0` groups them by their embeddings alone; `2` also groups
            single objects by where they stand (4 images per training prompt, once, before the first step; nothing
            more at inference). Measured in docs/benchmarks.md.
        generator_cluster_means (`bool` or `None`, *optional*, defaults to `None`):
            For `generator_architecture="prompt_clusters"`: whether each cluster also learns a coarse mean of the noise
            itself beside the output convolution that all clusters share (`NoiseGeneratorConfig.cluster_means`).
            `None`: only when `train_dataset` has no more distinct prompts than `generator_num_clusters`, so that each
            prompt has a cluster, and a mean, of its own. There the shared convolution held prompts back: 8 prompts
            trained together kept 0.52 and 0.59 of what the two relations among them gain alone, 0.81 and 0.81 with
            the means. Over a thousand prompts trained on a learned reward, the means gained as much on the training
            prompts and less on held-out ones (docs/benchmarks.md).
        generator_hidden_dim (`int`, *optional*, defaults to `256`):
            Width of the MLP of a new generator that reads the prompt embedding.
        generator_grid_size (`int`, *optional*, defaults to `8`):
            Side of a new generator's coarse grid, upsampled by convolutions to the noise resolution.
        generator_grid_channels (`int`, *optional*, defaults to `64`):
            Channels of a new generator's grid and upsampling convolutions.

        > Parameters that control evaluation

        judge_funcs (`list[str]` or `None`, *optional*, defaults to `None`):
            Judges: rewards the generator is not trained on, which score the evaluation images beside the training
            rewards (built-in names or `module.function` paths, as `trl-noise-ppo evaluate --judge_funcs` takes them;
            callables go to the trainer's `judge_funcs` argument). A gain the rewards see and the judges do not is
            reward hacking.
        num_generations_eval (`int` or `None`, *optional*, defaults to `None`):
            Images per evaluation prompt. `None` uses `num_generations`. Each evaluation samples and scores
            `len(eval_dataset) * num_generations_eval` images (the first, twice as many: the base pipeline's images
            are made once per run), `per_device_eval_batch_size` (or one prompt's images, if more) per pipeline call.

        > Parameters that differ from those of [`~transformers.TrainingArguments`]

        learning_rate (`float`, *optional*, defaults to `1e-3`):
            Learning rate of the [`~torch.optim.AdamW`] optimiser. With `loss_type="natural_step"` it only sets how
            closely the generator reaches each step's target; `step_size` sets the step.
        lr_scheduler_type (`str`, *optional*, defaults to `"constant"`):
            A decaying learning rate would shrink the natural steps late in training without saying so.
        per_device_train_batch_size (`int`, *optional*, defaults to `64`):
            Images per process per micro-step: with `num_generations=8`, eight prompts' groups.
        logging_steps (`float`, *optional*, defaults to `1`):
            Log every this many optimiser steps.
        activation_checkpointing (`bool`, *optional*, defaults to `False`):
            The generator is small; checkpointing it would only cost time. (Also the value of the deprecated
            `gradient_checkpointing`.)
        bf16 (`bool`, *optional*, defaults to `False`):
            The generator trains in float32, so `True` (and `fp16=True`) is refused; the frozen pipeline keeps the
            dtype it was loaded in.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Every dataset column is passed to the reward functions.
        eval_steps (`float` or `None`, *optional*, defaults to `None`):
            With `eval_strategy="steps"`, evaluate every this many optimiser steps. `None` uses `save_steps` (not
            `logging_steps`, which is 1 here: each evaluation samples the whole evaluation set).
    """

    # Parameters that control the images
    num_inference_steps: int = field(
        default=1, metadata={"help": "Number of denoising steps of the frozen pipeline."}
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={"help": "Classifier-free guidance scale; None keeps the pipeline's default (use 0.0 for Turbo models)."},
    )
    height: int | None = field(default=None, metadata={"help": "Image height; None keeps the pipeline's default."})
    width: int | None = field(default=None, metadata={"help": "Image width; None keeps the pipeline's default."})
    num_generations: int = field(
        default=8, metadata={"help": "Images sampled per prompt; advantages are normalised within each group."}
    )
    pipeline_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Further keyword arguments of every pipeline call (JSON), e.g. '{\"negative_prompt\": \"blurry\"}'."},
    )
    sample_batch_size: int | None = field(
        default=None,
        metadata={"help": "Most images per pipeline call while sampling (a multiple of num_generations); None: all."},
    )
    score_while_sampling: bool = field(
        default=True,
        metadata={
            "help": "Whether rewards that can run concurrently (async, HTTPReward, on another device) score each chunk "
            "of sample_batch_size images while the next is sampled. Same results either way."
        },
    )

    # Parameters that control the policy update
    loss_type: str = field(
        default="natural_step",
        metadata={"help": "How a generation batch updates the generator.", "choices": ["natural_step", "ppo_clip"]},
    )
    num_iterations: int = field(default=8, metadata={"help": "Epochs over each generation batch."})
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-steps each generation batch is split into; None uses gradient_accumulation_steps."},
    )
    step_size: float = field(
        default=0.5, metadata={"help": "natural_step: step of the noise's mean per generation batch, in units of its std."}
    )
    std_step_size: float = field(default=0.1, metadata={"help": "natural_step with learn_sigma: step of the log std."})
    epsilon: float = field(default=0.2, metadata={"help": "ppo_clip: clip range of the (dimension-averaged) PPO ratio."})
    beta: float = field(default=0.0, metadata={"help": "Weight of KL(N(mu, sigma^2) || N(0, I)) per dimension."})
    base_comparison_every: int = field(
        default=4,
        metadata={"help": "Every this many generation batches, log gain_over_base against the base pipeline on the "
                  "same noise (one image per prompt); 0 never."},
    )
    advantage_clip: float = field(default=5.0, metadata={"help": "Clip group-normalised advantages to +/- this."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions; None weights each 1.0."}
    )
    log_images_steps: int | None = field(
        default=None,
        metadata={"help": "Log sampled images with prompts and rewards to wandb/trackio every this many steps; None: never."},
    )

    # Parameters that control the noise generator
    learn_sigma: bool = field(
        default=False, metadata={"help": "Whether a new generator learns the noise's standard deviation too."}
    )
    project_to_shell: bool = field(
        default=True, metadata={"help": "Whether a new generator rescales its noise to the norm of N(0, I) noise."}
    )
    generator_architecture: str = field(
        default="prompt_clusters",
        metadata={"help": "How a new generator reads the prompt.", "choices": list(GRID_ENCODERS)},
    )
    generator_num_clusters: int = field(
        default=12, metadata={"help": "Clusters of training prompts of a new prompt_clusters generator."}
    )
    generator_cluster_image_weight: float = field(
        default=2.0,
        metadata={"help": "Weight of where each training prompt changes the pipeline's images when a new prompt_clusters "
                          "generator groups the prompts (0: by their embeddings alone)."},
    )
    generator_cluster_means: bool | None = field(
        default=None,
        metadata={"help": "Whether each cluster of a new prompt_clusters generator also learns a coarse mean of the noise; "
                          "None: only when each training prompt has a cluster of its own."},
    )
    generator_hidden_dim: int = field(default=256, metadata={"help": "Width of a new generator's prompt reader."})
    generator_grid_size: int = field(default=8, metadata={"help": "Side of a new generator's coarse grid."})
    generator_grid_channels: int = field(default=64, metadata={"help": "Channels of a new generator's grid."})

    # Parameters that control evaluation
    judge_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Judges (rewards not trained on) scoring the evaluation images: built-in names or module.function paths."},
    )
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Images per evaluation prompt; None uses num_generations."}
    )

    # Parameters that differ from those of TrainingArguments
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate for AdamW."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "The learning rate schedule."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per process per micro-step."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimiser steps."})
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "The generator is small; checkpointing it would only cost time."}
    )
    bf16: bool | None = field(default=False, metadata={"help": "The generator trains in float32."})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep every dataset column: they are passed to the reward functions."}
    )
    eval_steps: float | None = field(
        default=None, metadata={"help": "Evaluate every X optimiser steps (eval_strategy='steps'); None uses save_steps."}
    )

    _VALID_DICT_FIELDS = _BaseConfig._VALID_DICT_FIELDS + ["pipeline_kwargs"]

    def __post_init__(self):
        # before TrainingArguments' own checks, which would fail on these without naming them
        for name in ("bf16", "fp16"):
            if getattr(self, name):
                raise ValueError(
                    f"{name}=True would run the generator in mixed precision, but the generator trains in float32 (its "
                    "log-densities sum over the whole noise). Remove it; the frozen pipeline's dtype is the one it is "
                    "loaded in (torch_dtype=, or --dtype on the command line)."
                )
        if isinstance(self.pipeline_kwargs, str):
            try:
                self.pipeline_kwargs = json.loads(self.pipeline_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"pipeline_kwargs must be a JSON object such as '{{\"negative_prompt\": \"blurry\"}}', got "
                    f"{self.pipeline_kwargs!r} ({error})."
                ) from None
        if not isinstance(self.pipeline_kwargs, dict | None):
            raise ValueError(
                f"pipeline_kwargs must be a JSON object such as '{{\"negative_prompt\": \"blurry\"}}', got "
                f"{self.pipeline_kwargs!r}."
            )
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        super().__post_init__()
        self.pipeline_kwargs = dict(self.pipeline_kwargs or {})
        owned = sorted(set(self.pipeline_kwargs) & PIPELINE_ARGUMENTS_SET_BY_TRAINER)
        if owned:
            raise ValueError(
                f"pipeline_kwargs sets {owned}, which Noise PPO sets itself on every call; use the config fields "
                "(num_inference_steps, guidance_scale, height, width) or dataset columns instead."
            )
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be at least 2 (got {self.num_generations}): advantages are normalised within "
                "each prompt's group of images, which needs two or more."
            )
        generation_batch_size = self.per_device_train_batch_size * self.steps_per_generation
        if generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"The generation batch per process (per_device_train_batch_size * steps_per_generation = "
                f"{self.per_device_train_batch_size} * {self.steps_per_generation} = {generation_batch_size}) must be "
                f"divisible by num_generations ({self.num_generations}), so that each process holds whole prompt "
                "groups. Change one of them."
            )
        if self.sample_batch_size is not None and self.sample_batch_size % self.num_generations != 0:
            raise ValueError(
                f"sample_batch_size ({self.sample_batch_size}) must be a multiple of num_generations "
                f"({self.num_generations}): each pipeline call samples whole prompt groups."
            )
        for name in ("num_inference_steps", "num_iterations", "steps_per_generation", "generator_num_clusters",
                     "generator_hidden_dim", "generator_grid_size", "generator_grid_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("height", "width", "sample_batch_size", "num_generations_eval"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or None for the default), got {getattr(self, name)}.")
        if self.max_steps == 0:
            raise ValueError("max_steps=0 would train nothing: give a positive number of steps, or -1 to use num_train_epochs.")
        # `not x > 0` and not `x <= 0`, so that NaN fails too
        if self.base_comparison_every < 0:
            raise ValueError(f"base_comparison_every must be 0 (never) or positive, got {self.base_comparison_every}.")
        if self.generator_architecture not in GRID_ENCODERS:
            raise ValueError(
                f"generator_architecture must be one of {sorted(GRID_ENCODERS)}, got {self.generator_architecture!r}."
            )
        if not 0 <= self.generator_cluster_image_weight < math.inf:
            raise ValueError(
                f"generator_cluster_image_weight must be a finite number >= 0 (0 groups prompts by their embeddings "
                f"alone), got {self.generator_cluster_image_weight}."
            )
        if self.generator_cluster_means not in (None, True, False):
            raise ValueError(
                f"generator_cluster_means must be True, False or None (only where each training prompt has a cluster of "
                f"its own), got {self.generator_cluster_means!r}."
            )
        if self.loss_type not in ("natural_step", "ppo_clip"):
            raise ValueError(f"loss_type must be 'natural_step' or 'ppo_clip', got {self.loss_type!r}.")
        if not (0 < self.step_size < math.inf and 0 <= self.std_step_size < math.inf):
            raise ValueError(
                f"step_size must be positive and std_step_size non-negative, both finite; got step_size={self.step_size}, "
                f"std_step_size={self.std_step_size}."
            )
        if not (0 < self.epsilon < math.inf and 0 < self.advantage_clip < math.inf and 0 <= self.beta < math.inf):
            raise ValueError(
                f"epsilon and advantage_clip must be positive and beta non-negative, all finite; got epsilon={self.epsilon}, "
                f"advantage_clip={self.advantage_clip}, beta={self.beta}."
            )
        float32_max = torch.finfo(torch.float32).max
        for index, weight in enumerate(self.reward_weights or []):
            if not abs(weight) <= float32_max:
                raise ValueError(
                    f"reward_weights[{index}] is {weight}: reward weights must be finite numbers float32 can hold "
                    f"(magnitude at most {float32_max:.3g})."
                )
