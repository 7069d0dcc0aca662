import functools
import inspect
import json
import math
import os
import queue
import re
import shlex
import shutil
import sys
import textwrap
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from importlib.metadata import version
from pathlib import Path

import safetensors.torch
import torch
import transformers.trainer
from datasets import Dataset
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard, ModelCardData
from accelerate.utils import gather_object, is_peft_model
from torch import nn
from transformers import TrainerCallback, TrainerState, enable_full_determinism, set_seed
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, rotate_checkpoints, speed_metrics
from transformers.utils import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, CONFIG_NAME, SAFE_WEIGHTS_NAME, PushInProgress
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler, get_callable_name, get_comet_experiment_url, get_trackio_space_url

from . import __version__
from .evaluation import evaluation_metrics, paired_result, results_from_metrics, results_table, with_card_section
from .image_logging import log_images
from .noise_generator import (
    CLUSTER_PROBE_NOISES,
    NoiseGenerator,
    PromptClustersGridEncoder,
    load_noise_generator,
    pipeline_noise,
    pooled_features,
)
from .noise_injection import (
    call_parameters,
    check_generator_fits,
    check_pipeline_takes_noise,
    discover_noise_spec,
    generator_config_for,
    generator_inputs,
    images_in_unit_range,
    pipeline_arguments,
    prompt_conditioning,
    repeat_rows,
    take_rows,
    without_encoded_prompts,
)
from .noise_ppo_config import NoisePPOConfig
from .rewards import call_reward_funcs, check_reward_files, resolve_reward_funcs, runs_concurrently


ROLLOUT_FILE = "noise_ppo_rollout_{}.pt"
# Seeds the evaluation's noise and scheduler draws apart from the rollouts' (whose salts are small)
EVALUATION_SALT = 1_000_003
# A checkpoint, or the saved model, is written into this folder of the output folder, then moved into place when
# complete; a save killed midway leaves only this folder, which the next save removes
STAGING_DIR = "tmp-save"
# A prompt_clusters generator's k-means reads at most this many training prompts
CLUSTER_FIT_PROMPTS = 4096


def group_advantages(rewards: torch.Tensor, num_generations: int, clip: float) -> torch.Tensor:
    """
    Normalises `rewards` (one per sample, NaN where no reward was given) within consecutive groups of `num_generations`
    samples of the same prompt, then clips. Samples without reward, and groups with fewer than two rewarded samples,
    get advantage 0.
    """
    groups = rewards.view(-1, num_generations)
    valid = ~groups.isnan()
    count = valid.sum(dim=1, keepdim=True)
    mean = groups.nan_to_num().sum(dim=1, keepdim=True) / count.clamp(min=1)
    variance = ((groups - mean).nan_to_num() ** 2).sum(dim=1, keepdim=True) / count.clamp(min=1)
    advantages = (groups - mean) / (variance.sqrt() + 1e-4)
    advantages = torch.where(valid & (count >= 2), advantages, torch.zeros_like(advantages))
    return advantages.clamp(-clip, clip).flatten()


class _EpochSeededRepeatSampler(RepeatSampler):
    """A `RepeatSampler` whose order depends on the seed and the epoch only. RepeatSampler's own generator carries its
    state from epoch to epoch, which a run resumed in a later epoch does not replay: it would see other prompts."""

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(hash((self.seed, epoch)) % 2**62)


def _check_prompt_dataset(dataset, name: str = "train_dataset") -> None:
    if dataset is None:
        raise ValueError(f"NoisePPOTrainer needs a {name} with a `prompt` column, e.g. Dataset.from_dict({{'prompt': [...]}}).")
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            f"The {name} is a {type(dataset).__name__} without a length (a streaming dataset?); Noise PPO needs a "
            "map-style Dataset: load it with streaming=False, or take some rows: Dataset.from_list(list(dataset.take(n)))."
        )
    if len(dataset) == 0:
        raise ValueError(f"The {name} is empty: Noise PPO needs at least one prompt.")
    if not isinstance(dataset[0], Mapping):
        raise ValueError(
            f"Row 0 of the {name} is a {type(dataset[0]).__name__}; each row must be a dict with a `prompt` (and "
            "any columns for the reward functions), e.g. Dataset.from_dict({'prompt': [...]})."
        )
    # a datasets.Dataset has columns; a torch Dataset or a list has rows
    columns = getattr(dataset, "column_names", None) or list(dataset[0])
    if "prompt" not in columns:
        raise ValueError(
            f"The {name} has no `prompt` column (its columns: {columns}). Rename the column holding the "
            "prompts, e.g. `dataset.rename_column('text', 'prompt')`."
        )
    prompts = dataset["prompt"] if hasattr(dataset, "column_names") else [dataset[i]["prompt"] for i in range(len(dataset))]
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"Row {index} of the {name} has prompt {prompt!r}; every prompt must be a non-empty string.")
    reserved = sorted({"prompts", "images", "trainer_state"} & set(columns))
    if reserved:
        raise ValueError(
            f"The {name} has columns {reserved}, names the reward functions' own arguments take (`prompts`, "
            "`images`, `trainer_state`); rename them, e.g. `dataset.rename_column('prompts', 'prompt')`."
        )


def _numbered_names(funcs: list[Callable]) -> list[str]:
    """The functions' names, numbered where several share one (an ensemble of one reward class), which would otherwise
    log into one metric."""
    names = [get_callable_name(func) for func in funcs]
    return [f"{name}_{names[:i].count(name) + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _check_metric_for_best_model(args: NoisePPOConfig, eval_datasets: dict, reward_names: list[str], judge_names: list[str]) -> None:
    """Refuses, before any sampling, a `metric_for_best_model` that the evaluation will not log (such as the Trainer's
    default, the loss, which Noise PPO's evaluation does not compute)."""
    if args.metric_for_best_model is None:
        return
    metric = args.metric_for_best_model
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    prefixes = [f"eval_{name}" if name else "eval" for name in eval_datasets] or ["eval"]
    results = [{"reward": name, "role": role, **paired_result([], [])}
               for role, names in (("reward", reward_names), ("judge", judge_names)) for name in names]
    known = [name for prefix in prefixes for name in evaluation_metrics(results, prefix)]
    if metric not in known:
        gains = [name.removeprefix("eval_") for name in known if name.endswith("/gain")]
        default = " (what load_best_model_at_end sets when it is not given)" if args.metric_for_best_model == "loss" else ""
        raise ValueError(
            f"metric_for_best_model is {args.metric_for_best_model!r}{default}, which Noise PPO's evaluation does not "
            f"log (it computes no loss). Choose one of its gains, {gains}, or their base, mean and _ci95 statistics."
        )


# `__call__` arguments a dataset column may give per prompt: images (a ControlNet's `image`, Flux Kontext's reference
# `image`, Kandinsky 2.2's `image_embeds`). Any other argument is one value for every call, or the trainer's own.
PER_PROMPT_ARGUMENT = re.compile(r"(\w+_)?(image|images|image_embeds)")


def check_pipeline_kwargs(pipeline_class: type[DiffusionPipeline], pipeline_kwargs: dict) -> None:
    """Refuses `pipeline_kwargs` that `pipeline_class.__call__` does not take."""
    unknown = sorted(set(pipeline_kwargs) - set(inspect.signature(pipeline_class.__call__).parameters))
    if unknown:
        raise ValueError(f"pipeline_kwargs has {unknown}, which {pipeline_class.__name__}.__call__ does not take; remove them.")


def _check_columns_for_pipeline(dataset, pipeline: DiffusionPipeline, name: str = "train_dataset") -> None:
    columns = list(dataset[0])
    arguments = call_parameters(pipeline)
    misnamed = sorted(column for column in columns
                      if column in arguments and column != "prompt" and not PER_PROMPT_ARGUMENT.fullmatch(column))
    if misnamed:
        raise ValueError(
            f"The {name} has columns {misnamed}, named like arguments of {type(pipeline).__name__}.__call__ that "
            "are not per-prompt images, which alone come from dataset columns. Set such arguments in the config "
            "(num_inference_steps, guidance_scale, height, width) or in pipeline_kwargs (one value for every call), and "
            "rename the columns if they are meant for the reward functions."
        )


class NoisePPOTrainer(_BaseTrainer):
    r"""
    Trainer for Noise PPO: a frozen text-to-image pipeline, and a small prompt-conditioned noise generator trained with
    PPO to choose the initial noise whose images the reward functions prefer. The pipeline's weights never change and
    receive no gradient; rewards can be any black box.

    Each generation batch: sample noise from the generator, run the frozen pipeline, score the images, normalise the
    rewards within each prompt's group. Then `num_iterations` PPO epochs of the clipped surrogate, plus a KL to N(0, I),
    re-evaluate only the generator on the stored noise.

    Args:
        pipeline (`DiffusionPipeline`):
            The frozen text-to-image pipeline. It must accept `latents=`; it is moved to the trainer's device and its
            parameters are set to `requires_grad=False`.
        reward_funcs (`str`, `Callable` or a list of them):
            Reward functions, called as `func(images=..., prompts=..., trainer_state=..., **columns)` with `images` a
            float tensor `(N, 3, H, W)` in `[0, 1]`, `prompts` a list of `N` strings and every other dataset column as
            a list. Each returns `N` floats, or `None` for a sample it does not score. Strings name built-in rewards
            (see `trl_noise_ppo.rewards`). `async def` functions run concurrently; those, `HTTPReward` and rewards on
            another device score each chunk of images while the next is sampled (`args.score_while_sampling`).
        args ([`NoisePPOConfig`], *optional*):
            Configuration. Defaults to `NoisePPOConfig("<pipeline class>-NoisePPO")`.
        train_dataset ([`~datasets.Dataset`], or a map-style `torch.utils.data.Dataset` or list of dicts):
            Prompts, in a `prompt` column. Other columns are passed to the reward functions.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation prompts, in a `prompt` column (other columns go to the rewards and judges), on which the
            generator is compared with the base pipeline every `eval_steps` when `args.eval_strategy` is set; see
            [`~NoisePPOTrainer.evaluate`]. A dict is evaluated dataset by dataset, each name in its metrics' names.
        judge_funcs (`str`, `Callable` or a list of them, *optional*):
            Judges: rewards the generator is not trained on, called as the reward functions are, which score the
            evaluation images beside them. Defaults to the names in `args.judge_funcs`.
        noise_generator ([`NoiseGenerator`] or `str`, *optional*):
            A generator to continue training: a model, or its Hub id or folder (a LoRA adapter folder is composed with
            its base). It must fit the pipeline. Defaults to a new, zero-initialised one (exactly N(0, I)) sized for
            the pipeline's noise at the configured resolution.
        peft_config (`peft.PeftConfig`, *optional*):
            Train adapters on the generator instead of all of it, e.g. `LoraConfig(r=8, target_modules=[...])`;
            `save_model` then writes the adapter, with a model card naming the base generator.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks for the training loop.
        optimizers (`tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]`, *optional*):
            Optimiser and scheduler; default AdamW and the scheduler named by `args`.

    Examples:

    ```python
    from datasets import Dataset
    from diffusers import DiffusionPipeline
    from trl_noise_ppo import NoisePPOConfig, NoisePPOTrainer

    pipe = DiffusionPipeline.from_pretrained("stabilityai/sd-turbo")

    def brightness(images, prompts, **kwargs):
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = NoisePPOTrainer(
        pipeline=pipe,
        reward_funcs=brightness,
        args=NoisePPOConfig(output_dir="out", num_inference_steps=1, guidance_scale=0.0, num_generations=8),
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"]}),
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "noise-ppo", "diffusers", "text-to-image"]
    _name = "Noise PPO"
    _paper = {
        "title": "A Minimalist Method for Fine-tuning Text-to-Image Diffusion Models",
        "id": "2506.12036",
        "citation": textwrap.dedent(
            """\
            @article{miao2025minimalist,
                title        = {{A Minimalist Method for Fine-tuning Text-to-Image Diffusion Models}},
                author       = {Yanting Miao and William Loh and Pascal Poupart and Suraj Kothawade},
                year         = 2025,
                eprint       = {arXiv:2506.12036}
            }"""
        ),
    }
    # compute_loss returns a per-micro-batch mean; the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        reward_funcs: str | Callable | list[str | Callable],
        args: NoisePPOConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        judge_funcs: str | Callable | list[str | Callable] | None = None,
        noise_generator: NoiseGenerator | str | None = None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        if args is None:
            args = NoisePPOConfig(f"{type(pipeline).__name__}-NoisePPO")
        _check_prompt_dataset(train_dataset)
        check_pipeline_takes_noise(pipeline)
        _check_columns_for_pipeline(train_dataset, pipeline)
        eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {} if eval_dataset is None else {"": eval_dataset}
        for name, dataset in eval_datasets.items():
            label = f"eval_dataset[{name!r}]" if name else "eval_dataset"
            _check_prompt_dataset(dataset, label)
            _check_columns_for_pipeline(dataset, pipeline, label)
        min_prompts = args.per_device_train_batch_size * args.steps_per_generation * args.world_size // args.num_generations
        if len(train_dataset) < min_prompts:
            raise ValueError(
                f"The train_dataset holds {len(train_dataset)} prompts, fewer than one generation batch takes ({min_prompts}: "
                f"per_device_train_batch_size * steps_per_generation * processes / num_generations), so no step would "
                "run. Add prompts or lower per_device_train_batch_size."
            )
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        if judge_funcs is not None and args.judge_funcs:
            raise ValueError("Judges are given twice, as judge_funcs and as args.judge_funcs: give them once.")
        self.judge_funcs = resolve_reward_funcs(judge_funcs if judge_funcs is not None else args.judge_funcs or [])
        check_reward_files(self.reward_funcs + self.judge_funcs)  # every missing weight file named at once, before any sampling
        self.reward_func_names = _numbered_names(self.reward_funcs)
        self.judge_func_names = _numbered_names(self.judge_funcs)
        _check_metric_for_best_model(args, eval_datasets, self.reward_func_names, self.judge_func_names)
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries but there are {len(self.reward_funcs)} reward functions "
                f"({self.reward_func_names}); give one weight per function."
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        pipeline.to(args.device)
        for component in pipeline.components.values():
            if isinstance(component, nn.Module):
                component.requires_grad_(False).eval()
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline

        check_pipeline_kwargs(type(pipeline), args.pipeline_kwargs)
        example_embeds = prompt_conditioning(pipeline, [train_dataset[0]], **args.pipeline_kwargs)
        try:
            noise_spec = discover_noise_spec(pipeline, self._pipeline_kwargs(args, pipeline, example_embeds))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{type(pipeline).__name__} fails on the training call ({error}). Per-prompt arguments (a ControlNet's "
                "`image`, Flux Kontext's reference `image`) come from dataset columns of the argument's name; others "
                "from `pipeline_kwargs`."
            ) from error
        # The Trainer seeds only once the model exists; a new generator is initialised here, so seed first
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if isinstance(noise_generator, str | os.PathLike):
            noise_generator = load_noise_generator(noise_generator)
        # the prompts a prompt_clusters generator is fitted on: at most CLUSTER_FIT_PROMPTS, spread evenly over the dataset
        cluster_rows = list(range(0, len(train_dataset), math.ceil(len(train_dataset) / CLUSTER_FIT_PROMPTS)))
        if noise_generator is None:
            num_clusters, cluster_means = args.generator_num_clusters, args.generator_cluster_means
            if args.generator_architecture == "prompt_clusters":  # fewer distinct prompts: each a cluster of its own
                num_distinct_prompts = len({train_dataset[i]["prompt"] for i in cluster_rows})
                num_clusters = min(num_clusters, num_distinct_prompts)
                if cluster_means is None:  # a cluster per prompt shares nothing, so each writes its own mean
                    cluster_means = num_distinct_prompts <= args.generator_num_clusters
            noise_generator = NoiseGenerator(
                generator_config_for(
                    pipeline,
                    noise_spec,
                    example_embeds,
                    architecture=args.generator_architecture,
                    num_clusters=num_clusters,
                    cluster_image_weight=args.generator_cluster_image_weight,
                    cluster_means=bool(cluster_means),
                    hidden_dim=args.generator_hidden_dim,
                    grid_size=args.generator_grid_size,
                    grid_channels=args.generator_grid_channels,
                    learn_sigma=args.learn_sigma,
                    project_to_shell=args.project_to_shell,
                )
            )
        check_generator_fits(noise_generator.config, noise_spec, example_embeds, pipeline)
        grid_encoder = getattr(noise_generator, "grid_encoder", None)
        if isinstance(grid_encoder, PromptClustersGridEncoder) and not grid_encoder.fitted:
            features = self._prompt_features(pipeline, train_dataset, cluster_rows, noise_generator.config, args)
            if noise_generator.config.cluster_image_weight > 0:
                image_changes = self._prompt_image_changes(pipeline, train_dataset, cluster_rows, noise_generator.config, args,
                                                           noise_spec.dtype)
                grid_encoder.fit(features, image_changes)
            else:
                grid_encoder.fit(features)
        if peft_config is not None:
            from peft import get_peft_model

            noise_generator = get_peft_model(noise_generator, peft_config)
        self.noise_dtype = noise_spec.dtype

        super().__init__(
            model=noise_generator,
            args=args,
            data_collator=lambda features: features,  # prompts stay strings; sampling happens in _prepare_inputs
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.add_callback(_FiniteGeneratorGuard())
        for reward_func in self.reward_funcs + self.judge_funcs:
            if getattr(reward_func, "device", False) is None:
                reward_func.device = self.accelerator.device
        self.concurrent_rewards = [runs_concurrently(func, self.accelerator.device) for func in self.reward_funcs]
        self._metrics = defaultdict(list)
        self._buffered_inputs = None
        self._staging_dir = None  # while a checkpoint is being written: the folder it goes to first
        self._step = 0  # micro-steps; a generation batch is sampled every steps_per_generation * num_iterations
        self._base_scores = {}  # per evaluation dataset: the base pipeline's scores, computed once per run
        # shown in the model card; scripts/train.py sets the `trl-noise-ppo train` command line and its config file
        self.training_command, self.training_config = shlex.join(["python", *sys.argv]), None

    @staticmethod
    def _pipeline_kwargs(args: NoisePPOConfig, pipeline: DiffusionPipeline, embeds: dict) -> dict:
        # One row of embeddings per image: given embeddings are repeated for num_images_per_prompt by some families and
        # not by others, while the negative prompt's always are
        settings = {
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "height": args.height,
            "width": args.width,
        }
        return {
            **without_encoded_prompts(args.pipeline_kwargs),
            **pipeline_arguments(pipeline, embeds),  # with the prompts it replaces set to None
            "num_images_per_prompt": 1,
            "output_type": "pt",
            **{name: value for name, value in settings.items() if value is not None},  # None: the pipeline's default
        }

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def get_train_dataloader(self):
        # Each dataloader batch is a whole generation batch (see _prepare_inputs), hence the larger batch size.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        # Every prompt comes num_generations times in a row, and each generation batch is repeated for as many
        # micro-steps as it is used, so that dataloader length and progress bars count optimisation steps.
        generation_batch_size = self.args.per_device_train_batch_size * self.args.steps_per_generation
        return _EpochSeededRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=generation_batch_size * self.accelerator.num_processes // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            seed=self.args.seed,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    def _prepare_inputs(self, generation_batch: list[dict]) -> dict[str, torch.Tensor]:
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            rollout = self._sample_and_score(generation_batch)
            order = torch.randperm(len(rollout["noise"]), generator=self._rollout_generator(salt=1))
            shuffled = {name: value[order] for name, value in rollout.items()}
            self._buffered_inputs = [
                {name: value[i::self.args.steps_per_generation] for name, value in shuffled.items()}
                for i in range(self.args.steps_per_generation)
            ]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _rollout_generator(self, salt: int) -> torch.Generator:
        # Seeded by the optimiser step, not by the global RNG, so that a resumed run samples what an uninterrupted one
        # would; and by the micro-step within it, which tells apart generation batches that share an optimiser step
        # (gradient_accumulation_steps > steps_per_generation * num_iterations). Left out at 0, where a generation batch
        # starts in every other setting, so that those keep the draws they always had.
        within_step = self._step % self.args.gradient_accumulation_steps
        key = (self.args.seed, self.state.global_step, self.accelerator.process_index, salt) + ((within_step,) if within_step else ())
        return torch.Generator().manual_seed(hash(key) % 2**62)

    @torch.no_grad()
    def _sample_and_score(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        device, k = self.accelerator.device, self.args.num_generations
        prompts = [example["prompt"] for example in batch]
        generator = self.accelerator.unwrap_model(self.model)
        embeds = prompt_conditioning(self.pipeline, batch[::k], **self.args.pipeline_kwargs)
        sample_embeds = repeat_rows(embeds, k)

        # x_T ~ pi(. | c): each prompt's noise distribution, sampled num_generations times (x_T = mu(c) + sigma(c) eps)
        policy = generator(**generator_inputs(embeds)).repeat_interleave(k)
        eps = torch.randn(policy.mean.shape, generator=self._rollout_generator(salt=0)).to(device)
        noise = policy.sample(eps)
        _check_noise_is_finite(noise)

        # The frozen pipeline turns each noise into an image, sample_batch_size at a time; stochastic schedulers draw from
        # a seeded generator. Rewards that can run concurrently (async, served, on another device) score each chunk
        # while the next one samples (unless score_while_sampling is off); the others would compete with sampling, and
        # score the whole batch after it.
        columns = {name: [example[name] for example in batch] for name in batch[0] if name != "prompt"}
        concurrent = [i for i, is_concurrent in enumerate(self.concurrent_rewards) if is_concurrent]
        after_sampling = [i for i, is_concurrent in enumerate(self.concurrent_rewards) if not is_concurrent]
        score_seconds = []

        def score(func_indices: list[int], images: torch.Tensor, rows: slice) -> torch.Tensor:
            score_start = time.perf_counter()
            with torch.no_grad():  # grad mode is per thread
                funcs = [self.reward_funcs[i] for i in func_indices]
                rewards = call_reward_funcs(funcs, images=images, prompts=prompts[rows],
                                            trainer_state=self.state, **{name: values[rows] for name, values in columns.items()})
            score_seconds.append(time.perf_counter() - score_start)
            return rewards

        images, chunk_rewards, sample_seconds = [], [], 0.0
        images_per_call = self.args.sample_batch_size or len(prompts)
        rollout_start = time.perf_counter()
        with _ScoreWhileSampling() if self.args.score_while_sampling else _ScoreAfterSampling() as scorer:
            for start in range(0, len(prompts), images_per_call):
                call = slice(start, start + images_per_call)
                sample_start = time.perf_counter()
                noise_for_pipeline = pipeline_noise(noise[call], generator.config)
                images.append(self._sample_images(take_rows(sample_embeds, call), noise_for_pipeline,
                                                  self._rollout_generator(salt=2 + start)))
                sample_seconds += time.perf_counter() - sample_start
                chunk_rewards.append(scorer.submit(score, concurrent, images[-1], call))
            images = torch.cat(images)
            rewards_after_sampling = score(after_sampling, images, slice(None))
        rewards_per_func = torch.empty(len(prompts), len(self.reward_funcs), device=images.device)
        rewards_per_func[:, after_sampling] = rewards_after_sampling
        rewards_per_func[:, concurrent] = torch.cat([chunk.result() for chunk in chunk_rewards])
        # where the time went: wait is the part of scoring that sampling did not hide
        self._metrics["timing/sample"].append(sample_seconds)
        self._metrics["timing/score"].append(sum(score_seconds))
        self._metrics["timing/wait"].append(time.perf_counter() - rollout_start - sample_seconds)

        # r = sum_i w_i r_i(image, prompt); a sample no function scored gets NaN and no advantage
        rewards_per_func = rewards_per_func.to(device)
        weights = self.reward_weights.to(device)
        rewards = _weighted_reward(rewards_per_func, weights)
        _warn_if_no_group_is_scored(rewards, k)
        log_images(self, images, prompts, rewards)

        # A = clip((r - mean_group(r)) / std_group(r))
        advantages = group_advantages(rewards, k, self.args.advantage_clip)

        generation_batch_index = self._step // (self.args.steps_per_generation * self.args.num_iterations)
        if self.args.base_comparison_every and generation_batch_index % self.args.base_comparison_every == 0:
            # The learning-signal diagnostic: each prompt's first image against the base pipeline's from the same eps
            firsts, base_eps = slice(None, None, k), eps[::k]
            base_images = torch.cat([
                self._sample_images(take_rows(embeds, call), base_eps[call], self._rollout_generator(salt=-1 - call.start))
                for call in (slice(start, start + images_per_call) for start in range(0, len(base_eps), images_per_call))
            ])
            base_rewards = call_reward_funcs(self.reward_funcs, images=base_images, prompts=prompts[firsts],
                                             trainer_state=self.state, **{name: values[firsts] for name, values in columns.items()})
            base_rewards = _weighted_reward(base_rewards.to(device), weights)
            self._metrics["gain_over_base"].append(self.accelerator.gather(rewards[firsts] - base_rewards).nanmean().item())

        all_rewards_per_func = self.accelerator.gather(rewards_per_func)
        all_rewards = self.accelerator.gather(rewards)
        for i, name in enumerate(self.reward_func_names):
            self._metrics[f"rewards/{name}/mean"].append(all_rewards_per_func[:, i].nanmean().item())
            self._metrics[f"rewards/{name}/std"].append(_nanstd(all_rewards_per_func[:, i]))
        self._metrics["reward"].append(all_rewards.nanmean().item())
        self._metrics["reward_std"].append(_nanstd(all_rewards))

        rollout = {
            **{name: value for name, value in generator_inputs(sample_embeds).items() if value is not None},
            "noise": noise,
            "advantages": advantages,
            "rewarded": (~rewards.isnan()).float(),
        }
        if self.args.loss_type == "natural_step":
            # pi* = the policy one natural-gradient step up E[A] - beta KL(pi || N(0, I)), which the epochs regress onto
            target = policy.natural_step(noise, advantages, k, self.args.step_size,
                                         self.args.std_step_size if generator.config.learn_sigma else 0.0, self.args.beta)
            rollout.update({f"target_{name}": value for name, value in target._asdict().items()})
            self._metrics["step_rms"].append(self.accelerator.gather(target.squared_distance(policy).sqrt()).mean().item())
        else:
            rollout["old_log_prob"] = policy.log_prob(noise)
        return rollout

    def _sample_images(self, embeds: dict, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The frozen pipeline's images, in [0, 1], for one row of `embeds` per noise; stochastic schedulers draw from
        `generator`."""
        return self._pipeline_images(self.pipeline, self.args, embeds, noise.to(self.noise_dtype), generator)

    @classmethod
    def _pipeline_images(cls, pipeline, args, embeds: dict, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`pipeline`'s images, in [0, 1], called as `args` say, for one row of `embeds` per noise (in the pipeline's
        dtype); for the trainer's sampling and for the clusters' image probe before the trainer exists."""
        output = pipeline(**cls._pipeline_kwargs(args, pipeline, embeds), latents=noise, generator=generator)
        # output[0]: the images, whatever the output calls them (Kandinsky 5: `image`)
        images = images_in_unit_range(pipeline, output[0].float())
        _check_images_are_finite(images, pipeline)
        return images

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = model(**generator_inputs(inputs))
        kl = policy.kl_to_prior()
        metrics = {"kl": kl}
        if self.args.loss_type == "natural_step":
            # L = E[ |mu - mu*|^2 + |log sigma - log sigma*|^2 ]: regress onto the natural step's target, whose pull
            # towards N(0, I) (beta) is part of it; every sample of a prompt carries its prompt's target
            target = type(policy)(**{name: inputs[f"target_{name}"] for name in policy._fields})
            loss = policy.squared_distance(target).mean()
        else:
            # ratio = pi_theta(x|c) / pi_old(x|c), as a geometric mean over the noise's dimensions: the summed
            # log-ratio over tens of thousands of dimensions would leave any clip range after the smallest step
            log_ratio = policy.log_prob(inputs["noise"]) - inputs["old_log_prob"]
            ratio = torch.exp(log_ratio)
            # L = E[max(-A ratio, -A clip(ratio, 1 - epsilon, 1 + epsilon))] + beta KL(pi_theta || N(0, I))
            advantages, rewarded = inputs["advantages"], inputs["rewarded"]
            clipped_ratio = torch.clamp(ratio, 1 - self.args.epsilon, 1 + self.args.epsilon)
            policy_loss = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
            policy_loss = (policy_loss * rewarded).sum() / rewarded.sum().clamp(min=1)
            loss = policy_loss + self.args.beta * kl.mean()
            metrics["clip_ratio/region_mean"] = ((ratio - 1).abs() > self.args.epsilon).float()
            metrics["approx_kl"] = (ratio - 1) - log_ratio
        if not loss.isfinite():
            raise FloatingPointError(
                f"The loss is {loss.item()} at step {self.state.global_step} (KL to N(0, I) {kl.mean().item()}): the "
                "generator's output is no longer finite. Lower learning_rate; nothing of this step was saved, so the "
                "last checkpoint is intact."
            )

        with torch.no_grad():
            metrics["policy/sigma"] = torch.exp(policy.log_std).flatten(1).mean(dim=1)
            metrics["policy/mu_rms"] = policy.mean.flatten(1).pow(2).mean(dim=1).sqrt()
            for name, value in metrics.items():
                self._metrics[name].append(self.accelerator.gather(value.detach()).mean().item())
        return (loss, policy.mean) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = {}
        for name, values in self._metrics.items():
            values = [v for v in values if not math.isnan(v)]
            metrics[name] = sum(values) / len(values) if values else None
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics.clear()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        Compares the current generator with the base pipeline on the evaluation prompts (`eval_dataset`, default the
        trainer's), paired: the `num_generations_eval` images of each prompt start, for both, from the same noise eps,
        drawn once from `args.seed` (the base pipeline gets eps, the generator's `mu + sigma * eps`), and every reward
        and judge scores both. Logs, and returns, for each reward `<name>` (and judge, under `judges/`) the base mean
        `{metric_key_prefix}_rewards/<name>/base`, the tuned mean `.../mean` and the paired gain `.../gain`, each with
        its 95% interval's half-width `..._ci95` (see `trl_noise_ppo.evaluation`); in the trackers they read
        `eval/rewards/<name>/gain`, ... Use a gain as `metric_for_best_model`, e.g. `"judges/shapes_judge/gain"`.

        Cost: `len(eval_dataset) * num_generations_eval` images sampled and scored, and as many again the first time a
        dataset is evaluated (the base pipeline's scores, kept for the run).
        """
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, dict):  # as Trainer.evaluate: one evaluation per dataset, named in the metrics
            return {
                key: value
                for name, subset in dataset.items()
                for key, value in self.evaluate(subset, ignore_keys, f"{metric_key_prefix}_{name}").items()
            }
        if dataset is None:
            raise ValueError("evaluate needs prompts: give the trainer an eval_dataset (a Dataset with a `prompt` column), or evaluate one.")
        _check_prompt_dataset(dataset, "eval_dataset")
        _check_columns_for_pipeline(dataset, self.pipeline, "eval_dataset")
        start_time = time.time()
        cache_key = (metric_key_prefix, getattr(dataset, "_fingerprint", id(dataset)))
        if cache_key not in self._base_scores:
            self._base_scores[cache_key] = self._evaluation_scores(dataset, with_generator=False)
        base, tuned = self._base_scores[cache_key], self._evaluation_scores(dataset, with_generator=True)
        named = [("reward", name) for name in self.reward_func_names] + [("judge", name) for name in self.judge_func_names]
        results = [
            {"num_inference_steps": self.args.num_inference_steps, "reward": name, "role": role,
             **paired_result(base[:, column].tolist(), tuned[:, column].tolist())}
            for column, (role, name) in enumerate(named)
        ]
        metrics = evaluation_metrics(results, metric_key_prefix)
        metrics[f"{metric_key_prefix}_num_prompts"] = len(dataset)
        metrics[f"{metric_key_prefix}_images_per_prompt"] = self._images_per_eval_prompt
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=len(tuned)))
        # the Trainer's log, not this class's, which would flush the training metrics gathered so far into these
        super().log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @property
    def _images_per_eval_prompt(self) -> int:
        return self.args.num_generations_eval or self.args.num_generations

    @torch.no_grad()
    def _evaluation_scores(self, dataset: Dataset, with_generator: bool) -> torch.Tensor:
        """Every reward's and judge's score (NaN where none) of each evaluation image, prompt by prompt, made by the
        base pipeline from the evaluation noise eps, or from the current generator's noise for it. Each process makes
        the images of every num_processes-th prompt; all get all scores."""
        k, device = self._images_per_eval_prompt, self.accelerator.device
        funcs = self.reward_funcs + self.judge_funcs
        indices = list(range(self.accelerator.process_index, len(dataset), self.accelerator.num_processes))
        prompts_per_call = max(1, self.args.per_device_eval_batch_size // k)
        scored = []
        for start in range(0, len(indices), prompts_per_call):
            chunk = indices[start : start + prompts_per_call]
            examples = [dataset[index] for index in chunk]
            embeds = prompt_conditioning(self.pipeline, examples, **self.args.pipeline_kwargs)
            eps = torch.cat([self._evaluation_eps(index, k) for index in chunk]).to(device)
            noise = self._generator_noise(embeds, eps) if with_generator else eps
            _check_noise_is_finite(noise)
            # the same scheduler noise for the base pipeline and the generator's
            images = self._sample_images(repeat_rows(embeds, k), noise, self._evaluation_generator(chunk[0]))
            rows = [example for example in examples for _ in range(k)]
            columns = {name: [row[name] for row in rows] for name in rows[0] if name != "prompt"}
            scores = call_reward_funcs(funcs, images=images, prompts=[row["prompt"] for row in rows],
                                       trainer_state=self.state, **columns).cpu()
            scored += [(index, scores[i * k : (i + 1) * k]) for i, index in enumerate(chunk)]
        if self.accelerator.num_processes > 1:
            scored = gather_object(scored)
        return torch.cat([scores for _, scores in sorted(scored, key=lambda item: item[0])])

    @staticmethod
    @torch.no_grad()
    def _prompt_features(pipeline, train_dataset, rows: list[int], config, args) -> torch.Tensor:
        """What a prompt_clusters generator reads of the training prompts in `rows` (at most `CLUSTER_FIT_PROMPTS`,
        spread evenly over the dataset), one row per prompt."""
        features = []
        for start in range(0, len(rows), 64):
            examples = [train_dataset[i] for i in rows[start : start + 64]]
            inputs = generator_inputs(prompt_conditioning(pipeline, examples, **args.pipeline_kwargs))
            features.append(pooled_features(config, **inputs).cpu())
        return torch.cat(features)

    @classmethod
    @torch.no_grad()
    def _prompt_image_changes(cls, pipeline, train_dataset, rows: list[int], config, args, noise_dtype) -> torch.Tensor:
        """Where each training prompt in `rows` changes the frozen pipeline's images, for a prompt_clusters generator
        with `cluster_image_weight` above 0: over `CLUSTER_PROBE_NOISES` fixed noises, the per-pixel distance (over
        colour channels) between the prompt's image and the empty prompt's for the same noise, averaged over cells of
        the generator's grid; `(prompts, CLUSTER_PROBE_NOISES * grid_size**2)`."""
        eps = torch.randn((CLUSTER_PROBE_NOISES, *config.noise_shape), generator=torch.Generator().manual_seed(0))
        eps = eps.to(pipeline.device, noise_dtype)
        # as many images per pipeline call as training samples per call
        prompts_per_call = max(1, (args.sample_batch_size or args.per_device_train_batch_size) // CLUSTER_PROBE_NOISES)

        def images(examples: list[dict]) -> torch.Tensor:
            embeds = repeat_rows(prompt_conditioning(pipeline, examples, **args.pipeline_kwargs), CLUSTER_PROBE_NOISES)
            noise = eps.repeat(len(examples), *[1] * (eps.ndim - 1))
            result = cls._pipeline_images(pipeline, args, embeds, noise, torch.Generator().manual_seed(0))
            return result.view(len(examples), CLUSTER_PROBE_NOISES, *result.shape[1:])

        empty_prompt = images([{**train_dataset[rows[0]], "prompt": ""}])
        changes = []
        for start in range(0, len(rows), prompts_per_call):
            distance = (images([train_dataset[i] for i in rows[start : start + prompts_per_call]]) - empty_prompt).norm(dim=2)
            cells = nn.functional.adaptive_avg_pool2d(distance, config.grid_size)
            changes.append(cells.flatten(1).cpu())
        return torch.cat(changes)

    def _generator_noise(self, embeds: dict, eps: torch.Tensor) -> torch.Tensor:
        """The noise the pipeline gets from the current generator for the unit noise `eps` (`len(eps) // len(prompts)`
        rows per prompt of `embeds`): `mu + sigma * eps`."""
        generator = self.accelerator.unwrap_model(self.model)
        policy = generator(**generator_inputs(embeds))
        return pipeline_noise(policy.repeat_interleave(len(eps) // len(policy.mean)).sample(eps), generator.config)

    def _evaluation_eps(self, prompt_index: int, count: int) -> torch.Tensor:
        # Drawn from the seed and the prompt's index alone: the same noise at every evaluation, on any process count
        seed = hash((self.args.seed, EVALUATION_SALT, prompt_index)) % 2**62
        noise_shape = self.accelerator.unwrap_model(self.model).config.noise_shape
        return torch.randn((count, *noise_shape), generator=torch.Generator().manual_seed(seed))

    def _evaluation_generator(self, prompt_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.args.seed, EVALUATION_SALT + 1, prompt_index)) % 2**62)

    def _save_checkpoint(self, model, trial):
        # Written into a staging folder and renamed to checkpoint-N once complete, so that a run killed while saving
        # leaves no partial checkpoint for `resume_from_checkpoint=True` to pick
        run_dir = self._get_output_dir(trial=trial)
        self._staging_dir = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(self._staging_dir, ignore_errors=True)  # what a killed save left
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            staging_dir, self._staging_dir = self._staging_dir, None
        checkpoint_name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._point_best_checkpoint_out_of_staging(run_dir, staging_dir, checkpoint_name)
        if not self.args.save_only_model and self._buffered_inputs is not None:
            # A checkpoint can fall between two generation batches' PPO epochs; the stored rollout lets a resumed run
            # finish the epochs on the same samples instead of drawing new ones from a different policy.
            rollout = [{name: value.cpu() for name, value in inputs.items()} for inputs in self._buffered_inputs]
            torch.save(rollout, os.path.join(staging_dir, checkpoint_name, ROLLOUT_FILE.format(self.accelerator.process_index)))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoint_dir = os.path.join(run_dir, checkpoint_name)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # an earlier run's of the same step, as the Trainer overwrites it
            os.replace(os.path.join(staging_dir, checkpoint_name), checkpoint_dir)
            shutil.rmtree(staging_dir)
            if self.args.push_to_hub:
                self._push_from_checkpoint(checkpoint_dir)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _point_best_checkpoint_out_of_staging(self, run_dir: str, staging_dir: str, checkpoint_name: str) -> None:
        # The Trainer records the best checkpoint in the folder it wrote it into, the staging folder; it is about to be
        # moved into run_dir, where load_best_model_at_end and the rotation of checkpoints must find it
        best = self.state.best_model_checkpoint
        if best is None or os.path.dirname(best) != staging_dir:
            return
        self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging_dir, checkpoint_name, TRAINER_STATE_NAME))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer's own push would upload the staging copy of the checkpoint, which is moved away at once, and the
        # output folder with the staging folder in it, which the next checkpoint writes while the upload reads; and it
        # would copy the weights into the output folder in place, where a run killed midway would leave them truncated.
        if self._staging_dir is not None:  # the staging copy: `_save_checkpoint` pushes the checkpoint once in place
            return
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        staging_dir = os.path.join(output_dir, STAGING_DIR)
        os.makedirs(staging_dir, exist_ok=True)
        # the checkpoint's model, as the repository's current one
        for name in (CONFIG_NAME, SAFE_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, TRAINING_ARGS_NAME):
            if os.path.isfile(os.path.join(checkpoint_folder, name)):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(staging_dir, name))
                os.replace(os.path.join(staging_dir, name), os.path.join(output_dir, name))
        shutil.rmtree(staging_dir)
        message = f"Training in progress, step {self.state.global_step}"
        upload = functools.partial(
            transformers.trainer.hf_api().upload_folder,
            repo_id=self.hub_model_id,
            token=self.args.hub_token,
            run_as_future=True,
            revision=self.args.hub_revision,
        )
        jobs = [upload(folder_path=output_dir, commit_message=message,
                       ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*", f"{STAGING_DIR}/*"])]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else os.path.basename(checkpoint_folder)
            jobs.append(upload(folder_path=checkpoint_folder, path_in_repo=path_in_repo, commit_message=f"{message}, checkpoint"))
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _get_output_dir(self, trial):
        return self._staging_dir or super()._get_output_dir(trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        # Every file of the checkpoint is read before any of it is loaded: the Trainer would take the newest checkpoint
        # however damaged, fail on it with an error naming no file, or resume inexactly without its optimiser state
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._newest_complete_checkpoint()
        elif resume_from_checkpoint:
            problem = _checkpoint_problem(str(resume_from_checkpoint), self.args, self.accelerator.num_processes)
            if problem:
                raise ValueError(
                    f"Cannot resume exactly from {resume_from_checkpoint}: {problem}. Resume from another checkpoint "
                    "(resume_from_checkpoint=True takes the newest complete one)."
                )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _newest_complete_checkpoint(self) -> str:
        output_dir = self.args.output_dir
        names = [name for name in os.listdir(output_dir) if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", name)] if os.path.isdir(output_dir) else []
        skipped = []
        for name in sorted(names, key=lambda name: int(name.split("-")[1]), reverse=True):
            problem = _checkpoint_problem(os.path.join(output_dir, name), self.args, self.accelerator.num_processes)
            if problem is None:
                if skipped:
                    warnings.warn(f"resume_from_checkpoint=True skipped {', '.join(skipped)}; resuming from {name}.")
                return os.path.join(output_dir, name)
            skipped.append(f"{name} ({problem})")
        raise ValueError(
            f"No checkpoint in {output_dir} can resume the run exactly"
            + (f": {', '.join(skipped)}" if skipped else " (there is none)")
            + ". Start afresh without resume_from_checkpoint, or with a new output_dir."
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
        self._step = state.global_step * self.args.gradient_accumulation_steps
        rollout_file = os.path.join(resume_from_checkpoint, ROLLOUT_FILE.format(self.accelerator.process_index))
        if os.path.isfile(rollout_file):  # else the checkpoint is between two generation batches: `train` checked it
            rollout = torch.load(rollout_file, weights_only=True)
            self._buffered_inputs = [{name: value.to(self.accelerator.device) for name, value in inputs.items()} for inputs in rollout]

    def _save(self, output_dir: str | None = None, state_dict=None):
        _raise_if_not_finite(self.model, "weights", self.state.global_step)
        output_dir = output_dir or self.args.output_dir
        if self._staging_dir is not None:  # a checkpoint, which `_save_checkpoint` writes into the staging folder
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                self.create_model_card(output_dir=output_dir)
            return
        # safetensors writes model.safetensors as a hidden `.tmpXXXXXX` file beside it and renames it once complete,
        # so a save killed midway would leave that file, as large as the model, in the user's folder
        staging_dir = os.path.join(output_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(staging_dir, ignore_errors=True)  # what a killed save left
        super()._save(staging_dir, state_dict)
        if self.args.should_save:
            for name in os.listdir(staging_dir):
                os.replace(os.path.join(staging_dir, name), os.path.join(output_dir, name))
            os.rmdir(staging_dir)
            self.create_model_card(output_dir=output_dir)  # text written in place: no temporary file

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
    ):
        """Writes a model card for the noise generator (base pipeline, rewards, how to load it, the last evaluation's
        table, tracker links, the training command, citations) to `output_dir` (default `args.output_dir`)."""
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        config = model.config
        # an adapter's base is the generator it adapts; a generator's is the pipeline
        adapter_of = model.peft_config["default"].base_model_name_or_path if is_peft_model(model) else None
        base_model = adapter_of or config.base_pipeline
        base_model = base_model if base_model and not os.path.isdir(base_model) else None
        tags = {tags} if isinstance(tags, str) else set(tags or [])
        tags.update(self._tag_names)
        trackio_url = get_trackio_space_url()
        if trackio_url is not None:  # as TRL's cards: the tag links the run
            tags = {tag for tag in tags if not tag.startswith("trackio:")} | {f"trackio:{trackio_url}"}
        wandb = sys.modules.get("wandb")  # imported by the Trainer's callback when it reports to wandb
        evaluation = self._evaluation_for_card()
        card_data = ModelCardData(
            base_model=base_model,
            datasets=dataset_name,
            library_name="trl-noise-ppo",
            model_name=model_name or Path(output_dir).name,
            pipeline_tag="text-to-image",
            tags=sorted(tags),
        )
        card = ModelCard.from_template(
            card_data,
            template_path=str(Path(__file__).parent / "templates" / "noise_generator_card.md"),
            model_name=model_name or Path(output_dir).name,
            base_model=base_model,
            adapter_of=adapter_of,
            base_pipeline=config.base_pipeline,
            pipeline_class=config.pipeline_class,
            hub_model_id=self.hub_model_id or Path(output_dir).name,
            dataset_name=dataset_name,
            reward_names=", ".join(self.reward_func_names),
            noise_shape=config.noise_shape,
            num_inference_steps=self.args.num_inference_steps,
            guidance_scale=self.args.guidance_scale,
            evaluation=evaluation and with_card_section("", f"## Evaluation\n\n{evaluation}").strip(),
            wandb_url=wandb.run.url if wandb is not None and getattr(wandb, "run", None) is not None else None,
            trackio_url=trackio_url,
            comet_url=get_comet_experiment_url(),
            training_command=self.training_command,
            training_config=self.training_config,
            trainer_name=self._name,
            trainer_citation=self._paper["citation"],
            paper_title=self._paper["title"],
            paper_id=self._paper["id"],
            package_version=__version__,
            trl_version=version("trl"),
            diffusers_version=version("diffusers"),
            transformers_version=version("transformers"),
            pytorch_version=version("torch"),
        )
        card.save(os.path.join(output_dir, "README.md"))

    def _evaluation_for_card(self) -> str | None:
        """The model card's evaluation section: the table of the last evaluation of the generator being saved (at the
        best step once training loaded the best checkpoint), from the log history, which survives a resume."""
        step = self.state.global_step
        if self._staging_dir is None and self.args.load_best_model_at_end and self.state.best_model_checkpoint:
            step = self.state.best_global_step
        evaluations = [entry for entry in self.state.log_history if entry.get("step", 0) <= step
                       and any(key.endswith("_num_prompts") for key in entry)]
        if not evaluations:
            return None
        # several evaluation datasets log one entry each
        entry = {key: value for logged in evaluations if logged["step"] == evaluations[-1]["step"] for key, value in logged.items()}
        sections = []
        for key in sorted(key for key in entry if key.endswith("_num_prompts")):
            prefix = key.removesuffix("_num_prompts")
            name = prefix.removeprefix("eval").removeprefix("_")
            sections.append(
                f"At step {entry['step']} of training, on {entry[key]:g} evaluation prompts{f' ({name})' if name else ''} "
                f"x {entry[f'{prefix}_images_per_prompt']:g} images: mean reward and 95% confidence interval, the base "
                "pipeline and the tuned one from the same initial noise; difference = tuned - base, paired by noise. "
                "Judges are rewards the generator was not trained on.\n\n"
                + results_table(results_from_metrics(entry, prefix, self.args.num_inference_steps))
            )
        return "\n".join(sections)


def _checkpoint_problem(checkpoint: str, args: NoisePPOConfig, num_processes: int) -> str | None:
    """Why `checkpoint` cannot resume a run exactly (a file missing, damaged, or holding non-finite weights), or None.
    Every process checks every process's files, so that all choose the same checkpoint."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as file:
            global_step = json.load(file)["global_step"]
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE_NAME}"
    except (ValueError, KeyError, TypeError) as error:
        return f"its {TRAINER_STATE_NAME} is damaged or incomplete ({error})"
    weights = [name for name in (SAFE_WEIGHTS_NAME, ADAPTER_SAFE_WEIGHTS_NAME) if os.path.isfile(os.path.join(checkpoint, name))]
    if not weights:
        return f"it holds no weights ({SAFE_WEIGHTS_NAME} or {ADAPTER_SAFE_WEIGHTS_NAME})"
    for name in weights:
        try:
            tensors = safetensors.torch.load_file(os.path.join(checkpoint, name))
        except Exception as error:  # safetensors' own error types
            return f"its {name} is damaged or incomplete ({error})"
        if not all(tensor.isfinite().all() for tensor in tensors.values()):
            return f"its {name} holds non-finite (NaN or inf) weights"
    rng_files = [f"rng_state_{index}.pth" for index in range(num_processes)] if num_processes > 1 else ["rng_state.pth"]
    for name in [OPTIMIZER_NAME, SCHEDULER_NAME, *rng_files]:
        if not os.path.isfile(os.path.join(checkpoint, name)):
            return f"it has no {name}, without which the run cannot continue as it would have (saved with save_only_model?)"
    generate_every = args.steps_per_generation * args.num_iterations
    for index in range(num_processes):
        name = ROLLOUT_FILE.format(index)
        if not os.path.isfile(os.path.join(checkpoint, name)) and global_step * args.gradient_accumulation_steps % generate_every:
            return (
                f"it has no {name}: it was saved in the middle of a generation batch's PPO epochs and cannot resume "
                "exactly without those samples"
            )
    pickles = [OPTIMIZER_NAME, SCHEDULER_NAME, *rng_files, *(ROLLOUT_FILE.format(i) for i in range(num_processes))]
    for name in [name for name in pickles if os.path.isfile(os.path.join(checkpoint, name))]:
        try:
            with safe_globals():  # what rng_state.pth holds besides tensors, as the Trainer loads it
                torch.load(os.path.join(checkpoint, name), weights_only=True)
        except Exception as error:  # torch.load's errors on a cut file are of many types
            return f"its {name} is damaged or incomplete ({' '.join(str(error).split())[:200]})"
    return None


def _weighted_reward(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """r = sum_i w_i r_i over the functions that scored the image; NaN where none did."""
    rewards = (rewards_per_func * weights).nansum(dim=1)
    if not rewards.isfinite().all():  # each reward fits float32; weighted and summed they may not
        raise ValueError(
            f"The weighted sum of the rewards overflows float32 (reward_weights={weights.tolist()}, largest reward "
            f"{rewards_per_func.nan_to_num().abs().max().item():.3g}). Scale the rewards or reward_weights down."
        )
    rewards[rewards_per_func.isnan().all(dim=1)] = torch.nan
    return rewards


def _warn_if_no_group_is_scored(rewards: torch.Tensor, num_generations: int) -> None:
    """Advantages compare the images of one prompt: a prompt with fewer than two scored images teaches nothing."""
    scored_per_prompt = (~rewards.isnan()).view(-1, num_generations).sum(dim=1)
    if scored_per_prompt.max() == 0:
        warnings.warn("No reward function scored any image of this generation batch (all returned None): nothing is learned from it.")
    elif scored_per_prompt.max() < 2:
        warnings.warn(
            "No prompt of this generation batch has two or more scored images (the reward functions returned None for "
            f"the others), so nothing is learned from it: advantages compare the {num_generations} images of each prompt. "
            "Score more images, or raise num_generations."
        )


def _count_not_finite(samples: torch.Tensor) -> int:
    return (~samples.flatten(1).isfinite().all(dim=1)).sum().item()


def _check_noise_is_finite(noise: torch.Tensor) -> None:
    if not_finite := _count_not_finite(noise):
        raise FloatingPointError(
            f"The noise generator's noise is not finite (NaN or inf) for {not_finite} of {len(noise)} samples: its weights "
            "are not. Continue from a checkpoint whose weights are finite, or from a new generator."
        )


def _check_images_are_finite(images: torch.Tensor, pipeline: DiffusionPipeline) -> None:
    # checked before any reward sees them, which would otherwise be blamed for the NaN
    if not_finite := _count_not_finite(images):
        raise FloatingPointError(
            f"{type(pipeline).__name__} made non-finite images (NaN or inf) for {not_finite} of {len(images)} samples from "
            f"finite noise: the pipeline overflows in its dtype ({pipeline.dtype}), as float16 VAEs do. Load it in "
            "bfloat16 or float32 (torch_dtype=, or --dtype on the command line), or with a VAE made for float16."
        )


def _raise_if_not_finite(model: nn.Module, what: str, step: int) -> None:
    tensors = [param.grad if what == "gradient" else param for param in model.parameters() if param.requires_grad]
    tensors = [tensor.detach().flatten() for tensor in tensors if tensor is not None]
    if tensors and not torch.cat(tensors).isfinite().all():
        raise FloatingPointError(
            f"The generator's {what} is not finite at step {step}. Lower learning_rate; the generator was not saved "
            "and the last checkpoint is intact."
        )


class _FiniteGeneratorGuard(TrainerCallback):
    """Stops the run before an optimiser step takes a non-finite gradient and right after one makes the weights
    non-finite, so that a NaN generator never reaches a checkpoint."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        _raise_if_not_finite(model, "gradient", state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        _raise_if_not_finite(model, "weights", state.global_step)


class _ScoreWhileSampling(Executor):
    """Runs the scoring tasks submitted to it, in order, on a thread of its own, while the `with` block samples. A block
    that ends with an error raises it at once: the task still running (a reward server that hangs) is left to finish
    on its daemon thread, which does not hold up the interpreter's exit either, and the tasks not started are dropped."""

    def __init__(self):
        self._tasks = queue.SimpleQueue()
        self._futures = []
        threading.Thread(target=self._run_tasks, name="score-while-sampling", daemon=True).start()

    def _run_tasks(self):
        while (task := self._tasks.get()) is not None:
            future, fn, args, kwargs = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as error:  # raised again by future.result(), in the training thread
                    future.set_exception(error)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self._futures.append(Future())
        self._tasks.put((self._futures[-1], fn, args, kwargs))
        return self._futures[-1]

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None:
            for future in self._futures:
                future.cancel()
        self._tasks.put(None)  # the thread ends once the tasks before it are done
        return False


class _ScoreAfterSampling(Executor):
    """Keeps the scoring tasks submitted to it, and runs them in order, in the calling thread, when the `with` block
    that sampled ends without error: scoring after sampling, as without overlap."""

    def __init__(self):
        self._tasks = []

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self._tasks.append((Future(), fn, args, kwargs))
        return self._tasks[-1][0]

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:  # a failed sampling is not scored
            for future, fn, args, kwargs in self._tasks:
                future.set_result(fn(*args, **kwargs))
        return False


def _nanstd(values: torch.Tensor) -> float:
    values = values[~values.isnan()]
    return values.std().item() if len(values) > 1 else float("nan")
