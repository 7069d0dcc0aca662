import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig, NoisePPOPipeline
from trl_noise_ppo.cli import main
from trl_noise_ppo.scripts.utils import PromptArguments, load_prompt_dataset, load_prompts, reward_funcs_from_names


REPO = Path(__file__).parent.parent


def brightness(images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def darkness(images, **kwargs):
    return (1 - images.mean(dim=(1, 2, 3))).tolist()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion pipeline saved to a folder, as a Hub pipeline would be downloaded."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    build_pipeline("sd").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\n\na blue square\na green triangle\na yellow star\n")
    return path


def generator_for(pipeline_folder: Path, output_folder: Path, perturbed: bool) -> Path:
    """Saves a generator for the tiny SD pipeline: untrained (exactly N(0, I)) or with every weight moved."""
    text_encoder = build_pipeline("sd").text_encoder
    config = NoiseGeneratorConfig(
        noise_shape=[4, 32, 32],
        prompt_embeds_dim=text_encoder.config.hidden_size,
        base_pipeline=str(pipeline_folder),
        pipeline_class="StableDiffusionPipeline",
        learn_sigma=False,  # perturbed, a learned log-sigma head would make sigma overflow
    )
    generator = NoiseGenerator(config)
    if perturbed:
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in generator.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    generator.save_pretrained(output_folder)
    return output_folder


# ---- train ----


def test_train_on_two_processes(tmp_path, tiny_sd, prompt_file):
    config = tmp_path / "config.yaml"
    # num_processes is no training argument: like `trl grpo`, the command hands it to accelerate
    config.write_text(
        f"pipeline_name_or_path: {tiny_sd}\ndataset_name: {prompt_file}\nreward_funcs: [jpeg_compressibility]\n"
        "num_inference_steps: 1\nnum_generations: 2\nper_device_train_batch_size: 2\nnum_iterations: 1\n"
        "max_steps: 2\nlearning_rate: 1.0e-3\nsave_strategy: 'no'\nreport_to: none\nnum_processes: 2\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        # --multi_gpu with use_cpu makes the two processes join over gloo on a machine without GPUs
        [sys.executable, "-m", "trl_noise_ppo.cli", "train", "--config", str(config), "--multi_gpu", "--use_cpu", "True",
         "--dtype", "float32", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained on 2 process(es)" in result.stdout
    generator = NoiseGenerator.from_pretrained(tmp_path / "out")
    assert any(parameter.abs().sum() > 0 for name, parameter in generator.named_parameters() if "head" in name)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2506.12036" in card
    # the command that trained it, and its config file
    assert f"trl-noise-ppo train --config {config} --multi_gpu --use_cpu True --dtype float32" in card
    assert "reward_funcs: [jpeg_compressibility]" in card


def test_train_lora_adapters_on_a_trained_generator(tmp_path, tiny_sd, prompt_file):
    from trl_noise_ppo.scripts import train

    base = generator_for(tiny_sd, tmp_path / "base", perturbed=True)
    args = train.make_parser().parse_args_and_config([
        "--pipeline_name_or_path", str(tiny_sd), "--dataset_name", str(prompt_file), "--reward_funcs", "jpeg_compressibility",
        "--noise_generator_name_or_path", str(base), "--use_peft", "True", "--lora_r", "4",
        "--num_inference_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_steps", "2",
        "--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "out"),
    ])
    train.main(*args)
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(base)
    # the default targets are the given generator's (a pooled_mlp one), not those of the trainer's default architecture
    assert sorted(adapter["target_modules"]) == sorted(train.DEFAULT_LORA_TARGETS["pooled_mlp"])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_train_with_push_to_hub_uploads_once_with_the_model_card_naming_the_dataset(tmp_path, tiny_sd, monkeypatch):
    from trl_noise_ppo.scripts import train

    uploads = []

    class FakeHub:
        def create_repo(self, repo_name, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_name}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((Path(folder_path) / "README.md").read_text())

    monkeypatch.setattr("transformers.trainer.hf_api", lambda: FakeHub())
    monkeypatch.setattr(train, "load_prompt_dataset", lambda args: Dataset.from_dict({"prompt": ["a cat", "a dog"]}))
    args = train.make_parser().parse_args_and_config([
        "--pipeline_name_or_path", str(tiny_sd), "--dataset_name", "user/prompts", "--reward_funcs", "jpeg_compressibility",
        "--num_inference_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--push_to_hub", "True",
        "--eval_dataset_split", "test", "--eval_strategy", "steps", "--eval_steps", "1", "--num_generations_eval", "2",
        "--judge_funcs", "tests.test_cli.darkness",
    ])
    train.main(*args)
    (card,) = uploads
    assert "datasets: user/prompts" in card
    assert "At step 1 of training, on 2 evaluation prompts x 2 images" in card and "| 1 | darkness (judge) |" in card


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--reward_funcs": ["pickscor"]}, "Unknown reward 'pickscor'. Known rewards: aesthetic"),
        ({"--reward_funcs": ["no_such_module.reward"]}, "Could not import the reward 'no_such_module.reward'"),
        ({"--reward_weights": ["1.0", "2.0"]}, "2 reward_weights for 1 reward_funcs"),
        ({"--prompt_column": "caption"}, r"has no column 'caption'; its columns are \['text'\]"),
        ({"--dataset_name": "missing.txt"}, "The prompt dataset 'missing.txt' does not exist"),
        ({"--pipeline": "./missing_pipeline"}, "The pipeline './missing_pipeline' does not exist"),
        ({"--learnin_rate": "1e-3"}, r"Unknown argument\(s\) \['--learnin_rate'\]"),
        ({"--eval_strategy": "steps"}, "eval_strategy is 'steps' but no evaluation prompts are given: pass --eval_dataset_name"),
        ({"--judge_funcs": ["jugde"]}, "Unknown reward 'jugde'"),
        ({"--config": "missing.yaml"}, "No such file or directory: 'missing.yaml'"),
        ({"--config": "typo.yaml"}, "mapping values are not allowed here"),
        ({"--beta": "nan"}, "beta=nan"),
        ({"--pipeline_kwargs": '{"negativ_prompt": "blurry"}'},
         r"pipeline_kwargs has \['negativ_prompt'\], which StableDiffusionPipeline.__call__ does not take"),
        ({"--pipeline_kwargs": '{"negative_prompt": blurry}'}, r"pipeline_kwargs must be a JSON object.*Expecting value"),
        ({"--config": "list_for_int.yaml"}, r"The config file gives num_generations: \[4\], which is not an int"),
        ({"--config": "float_for_list.yaml"}, r"The config file gives reward_weights: 1.0, which is not a list of floats"),
    ],
    ids=["unknown reward", "unimportable reward", "reward weights", "missing column", "missing prompt file",
         "missing pipeline", "unknown argument", "no eval prompts", "unknown judge", "missing config", "yaml typo", "bad value",
         "pipeline_kwargs typo", "pipeline_kwargs not JSON", "list for an int", "number for a list"],
)
def test_train_errors_come_before_anything_loads_or_launches_as_one_line(tmp_path, tiny_sd, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text('{"text": "a cat"}\n')
    Path("typo.yaml").write_text("max_steps: 2\nlearning_rate: 1e-3: 2\n")
    Path("list_for_int.yaml").write_text("num_generations: [4]\nlearning_rate: 1.0e-3\nreport_to: [none]\n")
    Path("float_for_list.yaml").write_text("reward_weights: 1.0\npipeline_kwargs: {negative_prompt: blurry}\n")
    monkeypatch.setattr("trl_noise_ppo.cli.launch_command", lambda args: pytest.fail("launched"))
    monkeypatch.setattr("diffusers.DiffusionPipeline.from_pretrained", lambda *a, **k: pytest.fail("loaded a pipeline"))
    arguments = {"--pipeline": str(tiny_sd), "--dataset_name": "prompts.jsonl", "--prompt_column": "text",
                 "--reward_funcs": ["jpeg_compressibility"], "--output_dir": "out", **change}
    argv = ["train"]
    for name, value in arguments.items():
        argv += [name, *value] if isinstance(value, list) else [name, value]
    assert main(argv) == 2
    stderr = capsys.readouterr().err  # the error's line last, after any progress bar of loading the prompts
    assert stderr.splitlines()[-1].startswith("trl-noise-ppo: error: ") and "Traceback" not in stderr
    assert re.search(message, stderr.splitlines()[-1]), stderr


def test_training_process_dies_with_a_killed_command(tmp_path, tiny_sd, prompt_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = subprocess.Popen(
        [sys.executable, "-m", "trl_noise_ppo.cli", "train", "--pipeline", str(tiny_sd), "--dataset_name", str(prompt_file),
         "--reward_funcs", "jpeg_compressibility", "--num_inference_steps", "1", "--num_generations", "2",
         "--per_device_train_batch_size", "2", "--max_steps", "100000", "--save_strategy", "steps", "--save_steps", "1",
         "--report_to", "none", "--dtype", "float32", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "out" / "checkpoint-2").exists():  # training runs
        assert time.monotonic() < deadline and command.poll() is None
        time.sleep(0.2)
    children = Path(f"/proc/{command.pid}/task/{command.pid}/children").read_text().split()
    assert children
    command.kill()
    command.wait()
    time.sleep(2)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]


# ---- evaluate ----


def evaluate(tmp_path, generator, steps=("1", "2"), extra=()):
    main(["evaluate", "--noise_generator", str(generator), "--reward_funcs", "tests.test_cli.brightness",
          "jpeg_compressibility", "--judge_funcs", "tests.test_cli.darkness", "--prompts", "a red circle", "a blue square", "--num_inference_steps", *steps,
          "--num_images_per_prompt", "3", "--height", "64", "--width", "64", "--output_dir", str(tmp_path / "eval"),
          "--device", "cpu", *extra])
    return json.loads((tmp_path / "eval" / "results.json").read_text())


def test_evaluate_writes_table_json_and_grid(tmp_path, tiny_sd):
    report = evaluate(tmp_path, generator_for(tiny_sd, tmp_path / "generator", perturbed=True))
    results = report["results"]
    assert [(r["num_inference_steps"], r["reward"], r["role"]) for r in results] == [
        (steps, name, role) for steps in (1, 2)
        for name, role in (("brightness", "reward"), ("jpeg_compressibility", "reward"), ("darkness", "judge"))]
    for steps_results in (results[:3], results[3:]):  # the judge scored the very images the rewards scored
        np.testing.assert_allclose(steps_results[2]["tuned_rewards"], 1 - np.array(steps_results[0]["tuned_rewards"]), atol=1e-6)

    for result in results:
        # mean +/- 1.96 s / sqrt(n) over the 2 prompts x 3 images
        values = np.array(result["tuned_rewards"])
        assert len(values) == 6 and result["tuned"]["n"] == 6
        half_width = 1.959964 * values.std(ddof=1) / math.sqrt(6)
        np.testing.assert_allclose(result["tuned"]["ci95"], [values.mean() - half_width, values.mean() + half_width])
        differences = np.array(result["tuned_rewards"]) - np.array(result["base_rewards"])
        np.testing.assert_allclose(result["difference"]["mean"], differences.mean())
    assert any(abs(result["difference"]["mean"]) > 0 for result in results)  # the perturbed generator changes images

    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| steps | reward or judge | base | tuned | difference |" in table
    assert "| 1 | darkness (judge) |" in table
    assert "| 2 | jpeg_compressibility |" in table and "2 prompts x 3 images" in table
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.size == (110 + 2 * 256, 4 * 256)  # 2 prompts; base and tuned rows at 2 step counts


def test_evaluate_pairs_images_by_seed(tmp_path, tiny_sd):
    """With an untrained generator the tuned pipeline is the base one: the same seeds must give the same images."""
    report = evaluate(tmp_path, generator_for(tiny_sd, tmp_path / "generator", perturbed=False), steps=("2",))
    for result in report["results"]:
        assert result["tuned_rewards"] == result["base_rewards"]
        assert result["difference"]["ci95"] == [0.0, 0.0]
    assert len(set(report["results"][0]["base_rewards"])) == 6  # and every image has its own seed


def test_evaluate_passes_pipeline_kwargs_to_both_pipelines(tmp_path, tiny_sd):
    generator = generator_for(tiny_sd, tmp_path / "generator", perturbed=False)
    guided = ["--guidance_scale", "7.5"]
    plain = evaluate(tmp_path / "plain", generator, steps=("2",), extra=guided)["results"][0]
    negative = evaluate(tmp_path / "negative", generator, steps=("2",),
                        extra=[*guided, "--pipeline_kwargs", '{"negative_prompt": "blurry"}'])["results"][0]
    assert negative["base_rewards"] != plain["base_rewards"]  # the negative prompt reached the base pipeline
    assert negative["tuned_rewards"] == negative["base_rewards"]  # and the tuned one


def test_evaluate_names_missing_reward_weights_before_loading_anything(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from trl_noise_ppo.rewards import MissingWeightsError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    # The generator folder does not exist either: the reward check has to come first to be the error raised.
    with pytest.raises(MissingWeightsError, match=r"(?s)hf download xswu/HPSv2 .*hf download THUDM/ImageReward "):
        main(["evaluate", "--noise_generator", str(tmp_path / "absent-generator"), "--reward_funcs", "hpsv2",
              "imagereward", "--prompts", "a red circle", "--output_dir", str(tmp_path / "eval")])


def test_evaluate_push_to_hub_writes_the_table_into_the_card_and_uploads_the_folder(tmp_path, tiny_sd, monkeypatch):
    uploads = []

    class FakeHub:
        def create_repo(self, repo_name, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_name}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, (Path(folder_path) / "README.md").read_text()))

    monkeypatch.setattr("trl_noise_ppo.scripts.evaluate.HfApi", FakeHub)
    generator = generator_for(tiny_sd, tmp_path / "generator", perturbed=True)
    (generator / "README.md").write_text("# Noise generator\n\n## Training procedure\n\nTrained.\n")
    evaluate(tmp_path, generator, steps=("1",), extra=["--push_to_hub", "True"])
    evaluate(tmp_path, generator, steps=("2",), extra=["--update_model_card", "True"])  # replaces the section

    ((repo_id, pushed_card),) = uploads
    assert repo_id == "user/generator"
    assert "## Evaluation" in pushed_card and "| 1 | darkness (judge) |" in pushed_card and "2 prompts" in pushed_card
    card = (generator / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "| 2 | darkness (judge) |" in card and "| 1 | darkness" not in card
    assert card.index("## Evaluation") < card.index("## Training procedure") and "Trained." in card

    with pytest.raises(ValueError, match="--update_model_card writes into the generator's folder"):
        main(["evaluate", "--noise_generator", "user/generator", "--reward_funcs", "jpeg_compressibility",
              "--prompts", "a cat", "--update_model_card", "True"])


# ---- generate ----


def test_generate_writes_seeded_pngs_and_metadata(tmp_path, tiny_sd):
    generator = generator_for(tiny_sd, tmp_path / "generator", perturbed=True)
    main(["generate", "--noise_generator", str(generator), "--prompts", "a red circle", "a blue square",
          "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--height", "64", "--width", "64",
          "--seed", "10", "--output_dir", str(tmp_path / "images"), "--device", "cpu"])

    files = sorted(path.name for path in (tmp_path / "images").glob("*.png"))
    assert files == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]
    metadata = [json.loads(line) for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()]
    assert metadata[3] == {"file_name": "00001_01.png", "prompt": "a blue square", "seed": 13}

    tuned = NoisePPOPipeline.from_pretrained(str(generator))
    tuned.set_progress_bar_config(disable=True)
    expected = tuned("a blue square", num_inference_steps=2, height=64, width=64,
                     generator=[torch.Generator().manual_seed(13)], output_type="pil").images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / "00001_01.png")), np.asarray(expected))


# ---- prompts and rewards ----


def test_prompt_sources(tmp_path, prompt_file):
    assert load_prompt_dataset(PromptArguments(dataset_name=str(prompt_file)))["prompt"] == [
        "a red circle", "a blue square", "a green triangle", "a yellow star"]  # blank lines skipped

    (tmp_path / "prompts.csv").write_text("caption,category\na cat,animal\na car,vehicle\na dog,animal\n")
    dataset = load_prompt_dataset(PromptArguments(dataset_name=str(tmp_path / "prompts.csv"), prompt_column="caption", max_prompts=2))
    assert dataset["prompt"] == ["a cat", "a car"] and dataset["category"] == ["animal", "vehicle"]

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompts": "a cat"}\n{"prompts": "a dog"}\n')
    assert load_prompt_dataset(PromptArguments(dataset_name=str(folder), prompt_column="prompts"))["prompt"] == ["a cat", "a dog"]

    assert load_prompts(["a", "b", "c"], PromptArguments(max_prompts=2)) == ["a", "b"]
    with pytest.raises(ValueError, match="not both"):
        load_prompts(["a"], PromptArguments(dataset_name=str(prompt_file)))
    with pytest.raises(ValueError, match="Unsupported prompt file"):
        (tmp_path / "prompts.xml").write_text("<a/>")
        load_prompt_dataset(PromptArguments(dataset_name=str(tmp_path / "prompts.xml")))


def test_reward_names_resolve_without_loading_models():
    assert reward_funcs_from_names(["pickscore", "hpsv2.1", "tests.test_cli.brightness"]) == ["pickscore", "hpsv2.1", brightness]
    with pytest.raises(ValueError, match="No reward given"):
        reward_funcs_from_names([])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompts", "a", "--num_images_per_prompt", "0"], r"--num_images_per_prompt \(got 0\)"),
        (["evaluate", "--prompts", "a", "--reward_funcs", "jpeg_compressibility", "--num_inference_steps", "0"], r"--num_inference_steps \(got \[0\]\)"),
    ],
)
def test_evaluate_and_generate_refuse_zero_counts_as_one_line(argv, message, capsys):
    assert main([*argv, "--noise_generator", "missing"]) == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])
