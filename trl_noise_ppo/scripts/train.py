"""
Trains a noise generator for a frozen text-to-image pipeline with Noise PPO.

Run it as `trl-noise-ppo train --config examples/sd_turbo_pickscore.yaml`, which launches this script through
`accelerate launch` (arguments the script does not know, such as `--num_processes 4` or `--config_file
examples/accelerate_configs/multi_gpu.yaml`, go to accelerate), or directly as
`accelerate launch -m trl_noise_ppo.scripts.train --config ...`.
"""

import ctypes
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from datasets import Dataset

from ..noise_generator import load_noise_generator
from ..noise_ppo_config import NoisePPOConfig
from ..noise_ppo_trainer import NoisePPOTrainer, check_pipeline_kwargs
from .utils import (
    ConfigCheckingParser,
    ModelArguments,
    PromptArguments,
    check_local_path,
    load_pipeline,
    load_prompt_dataset,
    pipeline_class_of,
    reward_funcs_from_names,
)


# LoRA's default targets, by the generator's architecture: the layers that read the prompt into its grid, and the
# output convolution
DEFAULT_LORA_TARGETS = {
    "pooled_mlp": ["grid_encoder.mlp.1", "grid_encoder.mlp.3", "head"],
    "prompt_clusters": ["grid_encoder.templates", "head", "cluster_means"],  # cluster_means where it has them
    "token_attention": ["grid_encoder.token_projection", "grid_encoder.to_grid.1", "head"],
}

# `trl-noise-ppo train` puts its command line here for the model card (the training processes see only their part)
COMMAND_VARIABLE = "TRL_NOISE_PPO_COMMAND"


@dataclass
class TrainArguments:
    """
    What `train` needs besides the pipeline, the prompts and the [`NoisePPOConfig`].

    Args:
        reward_funcs (`list[str]` or `None`, *optional*, defaults to `None`):
            Rewards to maximise: built-in names (`trl_noise_ppo.rewards.REWARDS`: `pickscore`, `hpsv2.1`,
            `aesthetic`, ...) or import paths of functions (`my_rewards.brightness`). Weigh them with
            `reward_weights`.
        noise_generator_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            A trained noise generator (Hub id or folder, or a LoRA adapter of one) to continue training instead of
            starting from N(0, I).
        use_peft (`bool`, *optional*, defaults to `False`):
            Train LoRA adapters on the generator (usually a trained one, `noise_generator_name_or_path`) instead of all
            of it.
        lora_r (`int`, *optional*, defaults to `8`):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to `16`):
            LoRA scaling numerator.
        lora_target_modules (`list[str]` or `None`, *optional*, defaults to `None`):
            Names of the generator's modules that get adapters. `None`: the layers that read the prompt into the
            generator's grid, its output convolution and a prompt_clusters generator's cluster means where it has them
            (`DEFAULT_LORA_TARGETS`, by the generator's architecture).
        eval_dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Evaluation prompts, as `dataset_name` takes them (same `dataset_config`, `dataset_revision` and
            `prompt_column`). `None`: the training dataset's `eval_dataset_split`, if given.
        eval_dataset_split (`str` or `None`, *optional*, defaults to `None`):
            Split of the evaluation prompts, e.g. `test`; `None` uses `dataset_split`.
        max_eval_prompts (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first this many evaluation prompts (each evaluation samples `num_generations_eval` images
            of each).
    """

    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "Built-in reward names (pickscore, hpsv2.1, aesthetic, ...) or module.function paths."}
    )
    noise_generator_name_or_path: str | None = field(
        default=None, metadata={"help": "A trained noise generator to continue training."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters on the generator instead of all of it."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Generator modules that get adapters; default: its prompt reader's layers and head."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluation prompts, as --dataset_name takes them; default the training dataset's split."}
    )
    eval_dataset_split: str | None = field(default=None, metadata={"help": "Split of the evaluation prompts, e.g. test."})
    max_eval_prompts: int | None = field(default=None, metadata={"help": "Keep only the first this many evaluation prompts."})


def make_parser(prog: str | None = None) -> ConfigCheckingParser:
    return ConfigCheckingParser((TrainArguments, NoisePPOConfig, ModelArguments, PromptArguments), prog=prog)


def check_arguments(
    train_args: TrainArguments, training_args: NoisePPOConfig, model_args: ModelArguments, prompt_args: PromptArguments
) -> tuple[list, Dataset, Dataset | None]:
    """Checks everything that can be checked before the pipeline loads; returns the reward functions, the prompt
    dataset and the evaluation prompts (or None)."""
    if model_args.pipeline_name_or_path is None:
        raise ValueError("No pipeline given: pass --pipeline_name_or_path (a Hub id or a local folder).")
    check_local_path(model_args.pipeline_name_or_path, "The pipeline")
    pipeline_class = pipeline_class_of(model_args)
    if pipeline_class is not None:
        check_pipeline_kwargs(pipeline_class, training_args.pipeline_kwargs)
    if train_args.noise_generator_name_or_path is not None:
        check_local_path(train_args.noise_generator_name_or_path, "The noise generator")
    reward_funcs = reward_funcs_from_names(train_args.reward_funcs)
    if training_args.judge_funcs:
        reward_funcs_from_names(training_args.judge_funcs)  # names checked and paths imported before the pipeline loads
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"{len(training_args.reward_weights)} reward_weights for {len(reward_funcs)} reward_funcs "
            f"({train_args.reward_funcs}); give one weight per reward."
        )
    eval_dataset = None
    if train_args.eval_dataset_name is not None or train_args.eval_dataset_split is not None:
        eval_dataset = load_prompt_dataset(replace(
            prompt_args,
            dataset_name=train_args.eval_dataset_name or prompt_args.dataset_name,
            dataset_split=train_args.eval_dataset_split or prompt_args.dataset_split,
            max_prompts=train_args.max_eval_prompts,
        ))
    elif training_args.eval_strategy != "no":
        raise ValueError(
            f"eval_strategy is {training_args.eval_strategy.value!r} but no evaluation prompts are given: pass "
            "--eval_dataset_name (a file or Hub dataset) or --eval_dataset_split (a split of --dataset_name)."
        )
    return reward_funcs, load_prompt_dataset(prompt_args), eval_dataset


def lora_config(train_args: TrainArguments, training_args: NoisePPOConfig, noise_generator):
    """LoRA adapters for `noise_generator` (the given trained one, or `None` for the one the trainer builds)."""
    if not train_args.use_peft:
        return None
    from peft import LoraConfig

    targets = train_args.lora_target_modules
    if targets is None:
        architecture = training_args.generator_architecture if noise_generator is None else noise_generator.config.architecture
        targets = DEFAULT_LORA_TARGETS[architecture]
    return LoraConfig(r=train_args.lora_r, lora_alpha=train_args.lora_alpha, target_modules=targets)


def main(train_args: TrainArguments, training_args: NoisePPOConfig, model_args: ModelArguments, prompt_args: PromptArguments):
    reward_funcs, dataset, eval_dataset = check_arguments(train_args, training_args, model_args, prompt_args)
    noise_generator = train_args.noise_generator_name_or_path
    if noise_generator is not None:
        noise_generator = load_noise_generator(noise_generator)
    pipeline = load_pipeline(model_args, training_args.device)
    trainer = NoisePPOTrainer(
        pipeline=pipeline,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        noise_generator=noise_generator,
        peft_config=lora_config(train_args, training_args, noise_generator),
    )
    trainer.training_command, trainer.training_config = training_command(sys.argv[1:])
    resume = training_args.resume_from_checkpoint
    # `--resume_from_checkpoint True` (a string on the command line): the last checkpoint in output_dir
    trainer.train(resume_from_checkpoint=True if resume in ("True", "true") else resume)
    if training_args.push_to_hub:
        # push_to_hub saves the model and its card, then uploads once (save_model would push a first time, without
        # the dataset). The card names a Hub dataset; a local file means nothing to readers of the card.
        hub_dataset = None if os.path.exists(prompt_args.dataset_name) else prompt_args.dataset_name
        trainer.push_to_hub(dataset_name=hub_dataset)
    else:
        trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Trained on {trainer.accelerator.num_processes} process(es); noise generator saved to {training_args.output_dir}."
    )
    if training_args.push_to_hub:
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    # every process must be done with the group (the main one writes the model card) before any destroys it: a rank
    # tearing down gloo while its peer still saves was seen to hang the peer forever
    trainer.accelerator.wait_for_everyone()
    trainer.end()


def training_command(argv: list[str]) -> tuple[str, str | None]:
    """The command line that trains (the `trl-noise-ppo train` one when it launched this process), and the text of the
    `--config` file it names, if any, for the model card."""
    command = os.environ.get(COMMAND_VARIABLE) or shlex.join(["accelerate", "launch", "-m", "trl_noise_ppo.scripts.train", *argv])
    argv = shlex.split(command)
    config = next((arg.removeprefix("--config=") for arg in argv if arg.startswith("--config=")), None)
    if "--config" in argv[:-1]:
        config = argv[argv.index("--config") + 1]
    return command, Path(config).read_text().strip() if config and os.path.isfile(config) else None


def die_with_launcher() -> None:
    """Makes the kernel kill this process when the `trl-noise-ppo train` that launched it dies, even by `kill -9`,
    which no handler of its own can forward: an orphaned run would go on writing into the output folder."""
    launcher_pid = os.environ.get("TRL_NOISE_PPO_LAUNCHER_PID")
    if launcher_pid is None or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(launcher_pid):  # it died before the line above (a dead launcher not yet reaped still exists)
        os._exit(1)


if __name__ == "__main__":
    die_with_launcher()
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))
