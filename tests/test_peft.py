"""LoRA adapters on a trained noise generator, through peft."""

import json
import shutil

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer
from trl_noise_ppo.noise_generator import GRID_ENCODERS, NoiseGeneratorConfig, load_noise_generator
from trl_noise_ppo.scripts.train import DEFAULT_LORA_TARGETS


PROMPTS = Dataset.from_dict({"prompt": ["a red circle", "a blue square"]})
LORA_TARGETS = DEFAULT_LORA_TARGETS[NoisePPOConfig.generator_architecture]  # the generator the trainer builds by default


def brightness(images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def config(path, **overrides):
    defaults = dict(output_dir=str(path), num_inference_steps=1, num_generations=2, per_device_train_batch_size=4,
                    num_iterations=2, max_steps=2, learning_rate=1e-2, save_strategy="no", report_to="none",
                    disable_tqdm=True)
    return NoisePPOConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def base_generator_dir(tmp_path_factory):
    """A trained generator saved to a folder, as one pulled from the Hub would be."""
    path = tmp_path_factory.mktemp("base_generator")
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=config(path), train_dataset=PROMPTS)
    trainer.train()
    trainer.save_model()
    return path


def test_continue_training_from_a_path(base_generator_dir, tmp_path):
    base = NoiseGenerator.from_pretrained(base_generator_dir)
    trainer = NoisePPOTrainer(build_pipeline("sd"), brightness, args=config(tmp_path), train_dataset=PROMPTS,
                              noise_generator=str(base_generator_dir))
    assert torch.equal(trainer.model.head.weight, base.head.weight)
    trainer.train()
    assert not torch.equal(trainer.model.head.weight, base.head.weight)


def test_lora_trains_only_adapters_and_reloads(base_generator_dir, tmp_path):
    base = NoiseGenerator.from_pretrained(base_generator_dir)
    trainer = NoisePPOTrainer(
        build_pipeline("sd"), brightness, args=config(tmp_path), train_dataset=PROMPTS,
        noise_generator=str(base_generator_dir), peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS),
    )
    assert isinstance(trainer.model, PeftModel)
    before = {name: value.clone() for name, value in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, value in trainer.model.named_parameters() if not torch.equal(value, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert not any(p.requires_grad for name, p in trainer.model.named_parameters() if "lora_" not in name)

    trainer.save_model()
    out = tmp_path
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert f"A LoRA adapter of the noise generator `{base_generator_dir}`" in (out / "README.md").read_text()

    conditioning = {"prompt_embeds": torch.randn(2, 77, 32)}
    expected, _ = trainer.model(**conditioning)
    reloaded = load_noise_generator(out)
    assert isinstance(reloaded, PeftModel)
    torch.testing.assert_close(reloaded(**conditioning)[0], expected)
    # transformers' own peft integration loads the adapter onto the base generator its config names
    torch.testing.assert_close(NoiseGenerator.from_pretrained(out)(**conditioning)[0], expected)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, NoiseGenerator)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(NoiseGenerator.from_pretrained(tmp_path / "merged")(**conditioning)[0], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(base(**conditioning)[0], expected)

    pipe = build_pipeline("sd")
    call = {"num_inference_steps": 1, "output_type": "pt", "generator": torch.Generator().manual_seed(0)}
    with_adapter = NoisePPOPipeline(pipe, reloaded)("a red circle", **call).images
    call["generator"] = torch.Generator().manual_seed(0)
    with_merged = NoisePPOPipeline(pipe, merged)("a red circle", **call).images
    torch.testing.assert_close(with_adapter, with_merged, atol=1e-4, rtol=0)


def test_adapter_whose_base_generator_is_gone_is_explained(base_generator_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(base_generator_dir, tmp_path / "base")
    get_peft_model(NoiseGenerator.from_pretrained(tmp_path / "base"), LoraConfig(r=4, target_modules=LORA_TARGETS)).save_pretrained(adapter)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match=f"was trained on the generator {tmp_path / 'base'}, which does not exist any more"):
        load_noise_generator(adapter)


def _adapter(base_generator_dir, folder):
    get_peft_model(NoiseGenerator.from_pretrained(base_generator_dir), LoraConfig(r=4, target_modules=LORA_TARGETS)).save_pretrained(folder)
    return folder


def test_an_adapter_folder_without_weights_is_named(base_generator_dir, tmp_path):
    adapter = _adapter(base_generator_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"The LoRA adapter {adapter} has no weights \\(adapter_model.safetensors\\)"):
        load_noise_generator(adapter)


def test_an_adapter_whose_base_is_not_recorded_is_explained(base_generator_dir, tmp_path):
    adapter = _adapter(base_generator_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="does not record the generator it was trained on.*base_model_name_or_path"):
        load_noise_generator(adapter)


def test_a_truncated_adapter_is_named(base_generator_dir, tmp_path):
    adapter = _adapter(base_generator_dir, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=f"Could not read the weights in {adapter}.*damaged or incomplete"):
        load_noise_generator(adapter)


@pytest.mark.parametrize("architecture", sorted(GRID_ENCODERS))
def test_the_default_lora_targets_of_each_architecture_are_its_prompt_reader_and_head(architecture):
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=16, architecture=architecture, hidden_dim=16,
                                  grid_size=2, grid_channels=8, num_clusters=2, cluster_means=True)
    generator = get_peft_model(NoiseGenerator(config), LoraConfig(r=2, target_modules=DEFAULT_LORA_TARGETS[architecture]))
    adapted = {name.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
               for name, _ in generator.named_parameters() if ".lora_A" in name}
    assert adapted == set(DEFAULT_LORA_TARGETS[architecture])
    assert any(name.startswith("grid_encoder.") for name in adapted) and "head" in adapted


@pytest.mark.parametrize("cluster_means", [True, False])
def test_lora_adapts_a_prompt_clusters_generators_cluster_means_where_it_has_them(cluster_means):
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=16, architecture="prompt_clusters",
                                  grid_size=2, grid_channels=8, num_clusters=2, cluster_means=cluster_means)
    lora = LoraConfig(r=2, target_modules=DEFAULT_LORA_TARGETS["prompt_clusters"])
    adapted = {name.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
               for name, _ in get_peft_model(NoiseGenerator(config), lora).named_parameters() if ".lora_A" in name}
    assert adapted == {"grid_encoder.templates", "head"} | ({"cluster_means"} if cluster_means else set())
