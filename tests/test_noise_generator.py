import pytest
import torch

from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig


def make_generator(noise_shape=(4, 16, 16), learn_sigma=False, pooled=True):
    config = NoiseGeneratorConfig(
        noise_shape=list(noise_shape),
        prompt_embeds_dim=32,
        pooled_prompt_embeds_dim=16 if pooled else None,
        base_pipeline="some/pipeline",
        pipeline_class="StableDiffusionXLPipeline",
        learn_sigma=learn_sigma,
    )
    return NoiseGenerator(config)


def conditioning(batch=3):
    return {"prompt_embeds": torch.randn(batch, 7, 32), "pooled_prompt_embeds": torch.randn(batch, 16)}


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_untrained_generator_is_standard_normal(learn_sigma):
    mu, log_sigma = make_generator(learn_sigma=learn_sigma)(**conditioning())
    assert mu.shape == log_sigma.shape == (3, 4, 16, 16)
    assert torch.equal(mu, torch.zeros_like(mu))
    assert torch.equal(log_sigma, torch.zeros_like(log_sigma))


@pytest.mark.parametrize("noise_shape", [(4, 16, 16), (4, 20, 12), (16, 8, 8)])
def test_output_has_noise_shape_and_depends_on_prompt(noise_shape):
    generator = make_generator(noise_shape)
    torch.nn.init.normal_(generator.head.weight)
    mu, _ = generator(**conditioning())
    assert mu.shape == (3, *noise_shape)
    assert not torch.allclose(mu[0], mu[1])


def test_size_does_not_grow_with_noise_and_fits_sdxl_budget():
    def count(noise_shape):
        config = NoiseGeneratorConfig(noise_shape=list(noise_shape), prompt_embeds_dim=2048, pooled_prompt_embeds_dim=1280)
        return NoiseGenerator(config).num_parameters()

    sd15, sdxl = count((4, 64, 64)), count((4, 128, 128))
    assert sdxl < 10_000_000
    # one more upsampling convolution is all a 4x larger noise costs
    assert sdxl - sd15 == 64 * 64 * 9 + 64


def test_save_and_load_round_trip(tmp_path):
    generator = make_generator(learn_sigma=True)
    torch.nn.init.normal_(generator.head.weight, std=0.1)
    generator.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = NoiseGenerator.from_pretrained(tmp_path)
    assert loaded.config.noise_shape == [4, 16, 16]
    assert loaded.config.base_pipeline == "some/pipeline"
    inputs = conditioning()
    for expected, actual in zip(generator(**inputs), loaded(**inputs)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="noise_shape"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 16], prompt_embeds_dim=8))
    with pytest.raises(ValueError, match="prompt_embeds_dim or pooled_prompt_embeds_dim"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 16, 16]))
