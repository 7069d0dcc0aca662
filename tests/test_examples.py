"""Every example config parses and trains for a step, pointed at a tiny pipeline of its family and a model-free reward."""

import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator
from trl_noise_ppo.scripts import train


REPO = Path(__file__).parent.parent
EXAMPLES = REPO / "examples"

# example config -> (tiny family standing in for its pipeline, pipeline class of the real one)
EXAMPLE_FAMILIES = {
    "sd_turbo_pickscore.yaml": ("sd", "StableDiffusionPipeline"),
    "sdxl_turbo_hpsv2.yaml": ("sdxl", "StableDiffusionXLPipeline"),
    "sd15_aesthetic.yaml": ("sd", "StableDiffusionPipeline"),
    "flux_schnell_clipscore.yaml": ("flux", "FluxPipeline"),
}


def test_every_example_is_tested():
    assert sorted(path.name for path in EXAMPLES.glob("*.yaml")) == sorted(EXAMPLE_FAMILIES)
    assert sorted(path.name for path in (EXAMPLES / "accelerate_configs").glob("*.yaml")) == [
        "deepspeed_zero2.yaml", "fsdp.yaml", "multi_gpu.yaml", "single_gpu.yaml"]


@pytest.mark.parametrize("name", sorted(EXAMPLE_FAMILIES))
def test_example_trains_on_a_tiny_pipeline(name, tmp_path, monkeypatch):
    family, pipeline_class = EXAMPLE_FAMILIES[name]
    config = yaml.safe_load((EXAMPLES / name).read_text())
    assert "estimates until measured" in (EXAMPLES / name).read_text()

    # the tiny pipeline saved as the real one is stored: with the fp16 variant files when the config asks for them
    pipeline_folder = tmp_path / "pipeline"
    build_pipeline(family).save_pretrained(pipeline_folder, variant=config.get("variant"))
    overrides = ["--pipeline_name_or_path", str(pipeline_folder), "--dtype", "float32", "--height", "64", "--width", "64",
                 "--reward_funcs", "jpeg_compressibility", "--num_generations", "2", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--sample_batch_size", "2", "--max_steps", "1",
                 "--output_dir", str(tmp_path / "out"), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"]
    if not Path(config["dataset_name"]).suffix:  # a Hub dataset: a local file with the same prompt column stands in
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({config["prompt_column"]: p}) + "\n" for p in ["a cat", "a red car"]))
        overrides += ["--dataset_name", str(prompts)]
    monkeypatch.chdir(REPO)  # local prompt files are given relative to the repository root

    train_args, training_args, model_args, prompt_args = train.make_parser().parse_args_and_config(
        ["--config", str(EXAMPLES / name), *overrides]
    )
    assert training_args.num_inference_steps == config["num_inference_steps"]
    assert model_args.variant == config.get("variant")
    train.main(train_args, training_args, model_args, prompt_args)

    generator = NoiseGenerator.from_pretrained(tmp_path / "out")
    assert generator.config.pipeline_class == pipeline_class


def test_simple_animals_are_ddpo_45():
    animals = (EXAMPLES / "prompts" / "simple_animals.txt").read_text().split("\n")
    assert len([a for a in animals if a]) == 45 and animals[:3] == ["cat", "dog", "horse"] and "kangaroo" in animals


@pytest.mark.parametrize("path", sorted((EXAMPLES / "accelerate_configs").glob("*.yaml")), ids=lambda path: path.name)
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "no"  # the generator trains in float32
