"""
Every example config trains as written, with only what this offline machine cannot download swapped for tiny stand-ins:
the pipeline (a tiny one of the same family, saved under the config's Hub id, with the config's weight variant, into a
temporary Hugging Face cache), the reward and judge models (tiny ones in their real layouts, under their real Hub ids)
and the Hub prompt datasets (a few prompts served for exactly the name, split, revision and column the config gives).
The config's dtype, resolution, steps, guidance, batch geometry, PPO settings, rewards, judges and evaluation settings
are kept; only `max_steps` is lowered to 1 (one generation batch and one optimiser step), and the run happens in a
temporary folder, so that the config's own `output_dir` is written there.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from datasets import Dataset
from torch import nn
from transformers import CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from tests.test_rewards import OpenCLIP, perturb_, save_clip_tokenizer, tiny_clip_config
from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator
from trl_noise_ppo.scripts import train


REPO = Path(__file__).parent.parent
EXAMPLES = REPO / "examples"
COMMIT = "0" * 40

# example config -> (tiny family standing in for its pipeline, pipeline class of the real one, the noise of one 512 x
# 512 image of the stand-in: 16 x 16 latents, packed into 8 x 8 patches of 4 x 2 x 2 values for Flux)
EXAMPLE_FAMILIES = {
    "sd_turbo_pickscore.yaml": ("sd", "StableDiffusionPipeline", [4, 16, 16]),
    "sdxl_turbo_hpsv2.yaml": ("sdxl", "StableDiffusionXLPipeline", [4, 16, 16]),
    "sd15_aesthetic.yaml": ("sd", "StableDiffusionPipeline", [4, 16, 16]),
    "flux_schnell_clipscore.yaml": ("flux", "FluxPipeline", [64, 16]),
}
PROMPTS = ["a cat", "a red car", "a lighthouse", "two dogs", "a bowl of fruit", "a snowy street", "an owl", "a boat",
           "a green apple", "a castle"]


def test_every_example_is_tested():
    assert sorted(path.name for path in EXAMPLES.glob("*.yaml")) == sorted(EXAMPLE_FAMILIES)
    assert sorted(path.name for path in (EXAMPLES / "accelerate_configs").glob("*.yaml")) == [
        "deepspeed_zero2.yaml", "fsdp.yaml", "multi_gpu.yaml", "single_gpu.yaml"]


def snapshot(cache: Path, repo_id: str) -> Path:
    """The folder of `repo_id`'s main revision in a Hugging Face cache, as a download would leave it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True, exist_ok=True)
    return repo / "snapshots" / COMMIT


def save_tiny_clip(folder: Path, projection_dim: int) -> None:
    """A tiny CLIPModel with its tokenizer and image processor, in the layout of openai/clip-vit-large-patch14."""
    save_clip_tokenizer(folder)
    torch.manual_seed(0)
    perturb_(CLIPModel(tiny_clip_config(projection_dim))).save_pretrained(folder)
    preprocessor = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
                    "size": 224, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))


@pytest.fixture(scope="module")
def reward_cache(tmp_path_factory):
    """Tiny stand-ins for the examples' reward and judge models, under their Hub ids, in a Hugging Face cache."""
    cache = tmp_path_factory.mktemp("hub")
    # CLIPScore and the aesthetic MLP's embedder (768-dimensional, as ViT-L/14's); PickScore
    save_tiny_clip(snapshot(cache, "openai/clip-vit-large-patch14"), projection_dim=768)
    save_tiny_clip(snapshot(cache, "yuvalkirstain/PickScore_v1"), projection_dim=16)
    # the LAION ViT-H-14 repository: PickScore's processor, HPSv2's architecture and tokenizer
    save_tiny_clip(snapshot(cache, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"), projection_dim=16)
    torch.manual_seed(1)
    torch.save({"state_dict": perturb_(OpenCLIP(embed_dim=16)).state_dict()}, snapshot(cache, "xswu/HPSv2") / "HPS_v2.1_compressed.pt")
    # DDPO's aesthetic MLP, plain tensors under its layer names
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
                        nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    weights = {f"layers.{name}": tensor for name, tensor in mlp.state_dict().items()}
    torch.save(weights, snapshot(cache, "trl-lib/ddpo-aesthetic-predictor") / "aesthetic-model.pth")
    return cache


def example_sized(family: str):
    """A tiny pipeline of `family` whose VAE (of the family's class and latent channels, one channel wide) halves the
    resolution five times: 512 x 512 images, the examples' size, then have 16 x 16 latents, which keeps the run fast."""
    pipe = build_pipeline(family)
    vae_config = {**{k: v for k, v in pipe.vae.config.items() if k != "_use_default_values"}, "block_out_channels": (1,) * 6, "down_block_types": ("DownEncoderBlock2D",) * 6,
                  "up_block_types": ("UpDecoderBlock2D",) * 6, "layers_per_block": 1, "norm_num_groups": 1}
    torch.manual_seed(0)
    pipe.register_modules(vae=type(pipe.vae).from_config(vae_config))
    return pipe


def hub_prompts(config: dict, requested: list):
    """A stand-in for `datasets.load_dataset` that serves a few prompts for the config's Hub dataset, its training split
    and its evaluation split, records the splits asked for, and refuses anything else (a name, revision or
    configuration the config does not give)."""
    splits = {config.get("dataset_split", "train"), config.get("eval_dataset_split")} - {None}

    def load_dataset(name, dataset_config=None, revision=None, split=None, **kwargs):
        asked = (name, dataset_config, revision, split)
        expected = (config["dataset_name"], config.get("dataset_config"), config.get("dataset_revision"))
        assert asked[:3] == expected and split in splits, f"load_dataset{asked}, but the config gives {expected} {splits}"
        requested.append(split)
        return Dataset.from_dict({config.get("prompt_column", "prompt"): PROMPTS})

    return load_dataset


@pytest.mark.parametrize("name", sorted(EXAMPLE_FAMILIES))
def test_example_trains_as_written_on_tiny_stand_ins(name, tmp_path, reward_cache, monkeypatch):
    family, pipeline_class, noise_shape = EXAMPLE_FAMILIES[name]
    text = (EXAMPLES / name).read_text()
    config = yaml.safe_load(text)
    assert "estimates until measured" in text

    import huggingface_hub.constants

    example_sized(family).save_pretrained(snapshot(reward_cache, config["pipeline_name_or_path"]), variant=config.get("variant"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(reward_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requested_splits = []
    monkeypatch.setattr("trl_noise_ppo.scripts.utils.load_dataset", hub_prompts(config, requested_splits))
    # the config's relative paths (its prompt file, its output_dir) from a folder of its own
    (tmp_path / "examples").symlink_to(EXAMPLES)
    monkeypatch.chdir(tmp_path)

    train_args, training_args, model_args, prompt_args = train.make_parser().parse_args_and_config(
        ["--config", str(EXAMPLES / name), "--max_steps", "1"]
    )
    for key, value in config.items():  # everything but max_steps reaches the run as written ("none" becomes [])
        parsed = next(getattr(args, key) for args in (train_args, training_args, model_args, prompt_args) if hasattr(args, key))
        if key not in ("max_steps", "report_to"):
            assert getattr(parsed, "value", parsed) == value, key
    train.main(train_args, training_args, model_args, prompt_args)

    output_dir = tmp_path / config["output_dir"]
    generator = NoiseGenerator.from_pretrained(output_dir)
    assert generator.config.pipeline_class == pipeline_class and generator.config.base_pipeline == config["pipeline_name_or_path"]
    assert generator.config.noise_shape == noise_shape  # trained at the config's resolution
    hub_dataset = not (EXAMPLES.parent / config["dataset_name"]).is_file()
    assert sorted(requested_splits) == (sorted({config.get("dataset_split", "train"), config.get("eval_dataset_split")} - {None})
                                        if hub_dataset else [])
    assert any(parameter.abs().sum() > 0 for parameter in generator.head.parameters())  # one optimiser step was taken


def test_simple_animals_are_ddpo_45():
    animals = (EXAMPLES / "prompts" / "simple_animals.txt").read_text().split("\n")
    assert len([a for a in animals if a]) == 45 and animals[:3] == ["cat", "dog", "horse"] and "kangaroo" in animals


@pytest.mark.parametrize("path", sorted((EXAMPLES / "accelerate_configs").glob("*.yaml")), ids=lambda path: path.name)
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "no"  # the generator trains in float32


def test_quickstart_runs_and_prints_its_judged_gain(tmp_path, capsys):
    """The README's quickstart, shortened to eight generation batches: it writes what its docstring lists, a generator
    with its clusters of the training captions, and prints the diagnostic and the held-out judge's and reward's gains."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    quickstart.main(quickstart.QuickstartArguments(output_dir=str(tmp_path), generation_batches=8, images_per_held_out_prompt=1))
    printed = capsys.readouterr().out
    assert "learning signal: gain_over_base" in printed
    assert "judge (share of images right):" in printed and "reward (optimised):" in printed
    assert {"before_after.png", "reward_curve.png"} <= {path.name for path in tmp_path.iterdir()}
    generator = NoiseGenerator.from_pretrained(tmp_path / "generator")
    assert generator.config.noise_shape == [4, 8, 8]
    assert generator.config.architecture == "prompt_clusters" and generator.grid_encoder.fitted
