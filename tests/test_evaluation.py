import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOTrainer
from trl_noise_ppo.evaluation import (
    CARD_SECTION_END,
    CARD_SECTION_START,
    evaluation_metrics,
    interval,
    paired_result,
    results_from_metrics,
    results_table,
    with_card_section,
)


def test_interval_leaves_out_unscored_images():
    stats = interval([1.0, float("nan"), 3.0])
    assert stats["n"] == 2 and stats["mean"] == 2.0
    np.testing.assert_allclose(stats["ci95"], [2.0 - 1.959964, 2.0 + 1.959964])  # s = sqrt(2), n = 2
    assert interval([float("nan"), 5.0]) == {"mean": 5.0, "std": None, "n": 1, "ci95": None}


def test_paired_gain_is_the_interval_of_the_differences():
    base, tuned = [1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 4.0, 4.5]
    result = paired_result(base, tuned)
    assert result["base"] == interval(base) and result["tuned"] == interval(tuned)
    assert result["difference"] == interval([0.5, 0.0, 1.0, 0.5])


def test_metrics_name_rewards_and_judges_and_give_back_the_table():
    results = [
        {"num_inference_steps": 2, "reward": "brightness", "role": "reward", **paired_result([1.0, 2.0, 3.0], [2.0, 2.5, 3.5])},
        {"num_inference_steps": 2, "reward": "shapes_judge", "role": "judge", **paired_result([0.0, 1.0], [math.nan, 1.0])},
    ]
    metrics = evaluation_metrics(results, "eval")
    assert metrics["eval_rewards/brightness/base"] == 2.0 and math.isclose(metrics["eval_rewards/brightness/mean"], 8 / 3)
    gain = results[0]["difference"]
    assert metrics["eval_rewards/brightness/gain"] == gain["mean"]
    assert math.isclose(metrics["eval_rewards/brightness/gain_ci95"], (gain["ci95"][1] - gain["ci95"][0]) / 2)
    assert metrics["eval_judges/shapes_judge/gain"] == 0.0 and math.isnan(metrics["eval_judges/shapes_judge/gain_ci95"])

    table = results_table(results_from_metrics({**metrics, "eval_runtime": 1.0, "epoch": 1.0}, "eval", 2))
    assert table == results_table(results)
    assert "| 2 | shapes_judge (judge) | 0.5 [" in table and "| n/a (fewer than 2 scored images) |" in table
    assert results_from_metrics(metrics, "eval_heldout", 2) == []


def test_card_section_is_replaced_or_placed_before_the_training_procedure():
    card = "# Title\n\nText.\n\n## Training procedure\n\nDetails.\n"
    once = with_card_section(card, "## Evaluation\n\nfirst")
    assert once.index(CARD_SECTION_START) < once.index("## Training procedure") and "Details." in once
    twice = with_card_section(once, "## Evaluation\n\nsecond")
    assert "second" in twice and "first" not in twice and twice.count(CARD_SECTION_START) == twice.count(CARD_SECTION_END) == 1
    assert with_card_section("", "## Evaluation").strip() == f"{CARD_SECTION_START}\n## Evaluation\n{CARD_SECTION_END}"


# ---- evaluation during training (NoisePPOTrainer.evaluate) ----


PROMPTS = Dataset.from_dict({"prompt": ["a red circle", "a blue square", "a green triangle", "a yellow star"]})
EVAL_PROMPTS = Dataset.from_dict({"prompt": ["a white circle", "a red square", "a blue star"]})


def brightness(images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def darkness(images, **kwargs):
    return (1 - images.mean(dim=(1, 2, 3))).tolist()


def make_config(tmp_path, **overrides):
    # without the rescaling to the shell an untrained generator's images are the base pipeline's: its gain is exactly 0
    defaults = dict(output_dir=str(tmp_path / "out"), num_inference_steps=2, num_generations=4, per_device_train_batch_size=8,
                    num_iterations=2, max_steps=4, learning_rate=1e-3, save_strategy="no", report_to="none",
                    disable_tqdm=True, seed=0, num_generations_eval=2, per_device_eval_batch_size=4, project_to_shell=False)
    return NoisePPOConfig(**{**defaults, **overrides})


def perturb_head(model, seed=0):
    """Gives the zero-initialised head random weights: the generator's noise is no longer eps itself."""
    with torch.no_grad():
        model.head.weight.copy_(0.3 * torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(seed)))


def test_evaluation_pairs_generator_and_base_on_fixed_noise_and_scores_the_base_once(tmp_path):
    scored = []

    def counting_darkness(images, **kwargs):
        scored.append(len(images))
        return darkness(images)

    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path), train_dataset=PROMPTS,
                              eval_dataset=EVAL_PROMPTS, judge_funcs=counting_darkness)
    untrained = trainer.evaluate()
    # An untrained generator is N(0, I): its noise is eps itself, so its images are the base pipeline's
    for name in ("rewards/brightness", "judges/counting_darkness"):
        assert untrained[f"eval_{name}/mean"] == untrained[f"eval_{name}/base"]
        assert untrained[f"eval_{name}/gain"] == 0 and untrained[f"eval_{name}/gain_ci95"] == 0
    assert untrained["eval_num_prompts"] == 3 and untrained["eval_images_per_prompt"] == 2
    assert sum(scored) == 2 * 3 * 2  # base and generator, 3 prompts x 2 images
    assert max(scored) == 4  # per_device_eval_batch_size images (2 prompts) per pipeline call

    perturb_head(trainer.model)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert sum(scored) == 4 * 3 * 2  # the base pipeline's images were scored once
    assert first == {**second, **{key: first[key] for key in first if "runtime" in key or "per_second" in key}}  # the same noise
    assert first["eval_rewards/brightness/base"] == untrained["eval_rewards/brightness/base"]
    assert first["eval_rewards/brightness/gain"] != 0
    assert math.isclose(first["eval_rewards/brightness/gain"], first["eval_rewards/brightness/mean"] - first["eval_rewards/brightness/base"], abs_tol=1e-7)
    # the judge is 1 - the reward: the same images score the opposite gain
    assert math.isclose(first["eval_judges/counting_darkness/gain"], -first["eval_rewards/brightness/gain"], abs_tol=1e-6)

    logged = trainer.state.log_history[-1]
    assert logged["eval_judges/counting_darkness/gain"] == second["eval_judges/counting_darkness/gain"]


def test_load_best_model_at_end_keeps_the_generator_of_the_best_judged_step(tmp_path):
    def step_judge(images, trainer_state, **kwargs):
        # the base is scored at the first evaluation (step 2), so the judge's gain peaks at step 4
        return [10.0 - abs(trainer_state.global_step - 4)] * len(images)

    args = make_config(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                       save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="judges/step_judge/gain")
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=args, train_dataset=PROMPTS,
                              eval_dataset=EVAL_PROMPTS, judge_funcs=[step_judge])
    trainer.add_callback(KeepLastWeights())
    trainer.train()
    last_weights = KeepLastWeights.head_weight

    gains = {entry["step"]: entry["eval_judges/step_judge/gain"] for entry in trainer.state.log_history
             if "eval_judges/step_judge/gain" in entry}
    assert gains == {2: 0.0, 4: 2.0, 6: 0.0, 8: -2.0}
    out = Path(args.output_dir)
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-4")
    # save_total_limit=1 with load_best_model_at_end: the best checkpoint is kept while training, and alone at its end
    assert [path.name for path in out.glob("checkpoint-*")] == ["checkpoint-4"]
    best = NoiseGenerator.from_pretrained(out / "checkpoint-4").state_dict()
    assert all(torch.equal(value, best[name]) for name, value in trainer.model.state_dict().items())
    assert not torch.equal(trainer.model.head.weight, last_weights)

    trainer.save_model()
    card = (out / "README.md").read_text()
    assert "At step 4 of training, on 3 evaluation prompts x 2 images" in card
    assert "| 2 | step_judge (judge) | 8 [8, 8] | 10 [10, 10] | 2 [2, 2] |" in card
    assert "| 2 | brightness |" in card
    assert "At step 4 of training" in (out / "checkpoint-4" / "README.md").read_text()


class KeepLastWeights(TrainerCallback):
    head_weight = None

    def on_step_end(self, args, state, control, model=None, **kwargs):  # the last one runs before the best is loaded
        KeepLastWeights.head_weight = model.head.weight.detach().clone()


def test_evaluation_settings_are_checked_before_any_sampling(tmp_path):
    pipe = build_pipeline("sd")
    with pytest.raises(ValueError, match=r"metric_for_best_model is 'loss'.*\['judges/darkness/gain', 'rewards/brightness/gain'\]|metric_for_best_model is 'loss'.*\['rewards/brightness/gain', 'judges/darkness/gain'\]"):
        NoisePPOTrainer(pipe, brightness, train_dataset=PROMPTS, eval_dataset=EVAL_PROMPTS, judge_funcs="tests.test_evaluation.darkness",
                        args=make_config(tmp_path, eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True))
    with pytest.raises(ValueError, match=r"metric_for_best_model is 'judges/darknes/gain'.*'heldout_judges/darkness/gain'"):
        NoisePPOTrainer(pipe, brightness, train_dataset=PROMPTS, eval_dataset={"heldout": EVAL_PROMPTS},
                        args=make_config(tmp_path, metric_for_best_model="judges/darknes/gain", judge_funcs=["tests.test_evaluation.darkness"]))
    with pytest.raises(ValueError, match="Judges are given twice"):
        NoisePPOTrainer(pipe, brightness, train_dataset=PROMPTS, judge_funcs=darkness, args=make_config(tmp_path, judge_funcs=["jpeg_compressibility"]))
    with pytest.raises(ValueError, match=r"The eval_dataset\['heldout'\] has no `prompt` column"):
        NoisePPOTrainer(pipe, brightness, train_dataset=PROMPTS, eval_dataset={"heldout": Dataset.from_dict({"text": ["a"]})},
                        args=make_config(tmp_path))
    with pytest.raises(ValueError, match="evaluate needs prompts: give the trainer an eval_dataset"):
        NoisePPOTrainer(pipe, brightness, train_dataset=PROMPTS, args=make_config(tmp_path)).evaluate()
    with pytest.raises(ValueError, match="num_generations_eval must be at least 1"):
        make_config(tmp_path, num_generations_eval=0)


def test_judges_by_name_and_several_evaluation_datasets(tmp_path):
    args = make_config(tmp_path, judge_funcs=["jpeg_compressibility", "tests.test_evaluation.darkness"])
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=args, train_dataset=PROMPTS,
                              eval_dataset={"heldout": EVAL_PROMPTS, "training": PROMPTS})
    metrics = trainer.evaluate()
    for prefix, count in (("eval_heldout", 3), ("eval_training", 4)):
        assert metrics[f"{prefix}_num_prompts"] == count
        for name in ("rewards/brightness", "judges/jpeg_compressibility", "judges/darkness"):
            assert metrics[f"{prefix}_{name}/gain"] == 0.0  # untrained
    assert metrics["eval_heldout_rewards/brightness/base"] != metrics["eval_training_rewards/brightness/base"]
    trainer.save_model()
    card = (Path(args.output_dir) / "README.md").read_text()
    assert "on 3 evaluation prompts (heldout) x 2 images" in card and "on 4 evaluation prompts (training) x 2 images" in card


def test_evaluation_blames_non_finite_images_and_noise_on_the_part_that_made_them(tmp_path):
    """As in training: checked before any reward or judge sees them, which would otherwise be blamed for the NaN."""
    pipe = build_pipeline("sd")
    trainer = NoisePPOTrainer(pipe, brightness, args=make_config(tmp_path), train_dataset=PROMPTS, eval_dataset=EVAL_PROMPTS)
    with torch.no_grad():
        trainer.model.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"The noise generator's noise is not finite \(NaN or inf\) for 4 of 4 samples"):
        trainer._evaluation_scores(EVAL_PROMPTS, with_generator=True)

    # what a float16 VAE that overflows returns
    pipe.vae.decoder.register_forward_hook(lambda module, inputs, output: torch.full_like(output, float("nan")))
    with pytest.raises(FloatingPointError, match=r"StableDiffusionPipeline made non-finite images \(NaN or inf\) for 4 of "
                                                 r"4 samples from finite noise.*float16"):
        trainer.evaluate()


def test_evaluation_prompts_with_columns_named_like_pipeline_arguments_are_refused(tmp_path):
    misnamed = EVAL_PROMPTS.add_column("negative_prompt", ["blurry"] * len(EVAL_PROMPTS))
    message = r"The eval_dataset{} has columns \['negative_prompt'\], named like arguments of StableDiffusionPipeline"
    with pytest.raises(ValueError, match=message.format(r"\['heldout'\]")):
        NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path), train_dataset=PROMPTS,
                        eval_dataset={"heldout": misnamed})
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path), train_dataset=PROMPTS)
    with pytest.raises(ValueError, match=message.format("")):
        trainer.evaluate(misnamed)


def test_evaluation_reads_the_images_whatever_the_output_calls_them(tmp_path):
    """Kandinsky 5's output names its images `image`."""
    pipe = build_pipeline("kandinsky5")
    args = make_config(tmp_path, num_inference_steps=1, height=64, width=64, per_device_train_batch_size=4)
    trainer = NoisePPOTrainer(pipe, brightness, args=args, train_dataset=PROMPTS, eval_dataset=EVAL_PROMPTS)
    metrics = trainer.evaluate()
    assert metrics["eval_num_prompts"] == 3 and metrics["eval_rewards/brightness/gain"] == 0.0  # untrained


def test_eval_steps_default_to_save_steps():
    config = NoisePPOConfig(output_dir="unused", eval_strategy="steps", save_steps=50, report_to="none")
    assert config.eval_steps == 50 and config.logging_steps == 1


def test_two_processes_evaluate_as_one(tmp_path):
    """Each process makes the images of every other prompt; the gathered scores, hence the metrics, are one
    process's."""
    script = tmp_path / "evaluate.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.test_evaluation import EVAL_PROMPTS, PROMPTS, brightness, make_config, perturb_head
        from tests.tiny_pipelines import build_pipeline
        from trl_noise_ppo import NoisePPOTrainer

        args = make_config(__import__("pathlib").Path({str(tmp_path)!r}), use_cpu=True, per_device_train_batch_size=4)
        trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=args, train_dataset=PROMPTS, eval_dataset=EVAL_PROMPTS)
        perturb_head(trainer.model)
        metrics = trainer.evaluate()
        if trainer.accelerator.is_main_process:
            json.dump(metrics, open({str(tmp_path / "metrics.json")!r}, "w"))
        trainer.accelerator.wait_for_everyone()
        trainer.end()
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        check=True, env=env, timeout=300,
    )
    two = json.loads((tmp_path / "metrics.json").read_text())
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=make_config(tmp_path, per_device_train_batch_size=4),
                              train_dataset=PROMPTS, eval_dataset=EVAL_PROMPTS)
    perturb_head(trainer.model)
    one = trainer.evaluate()
    assert one["eval_rewards/brightness/gain"] != 0
    for name in ("base", "mean", "gain", "gain_ci95"):
        assert math.isclose(two[f"eval_rewards/brightness/{name}"], one[f"eval_rewards/brightness/{name}"], rel_tol=1e-5, abs_tol=1e-7), name
