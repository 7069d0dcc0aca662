import dataclasses
import json
from pathlib import Path

import pytest
import torch

from trl_noise_ppo import NoiseDistribution, NoiseGenerator, NoiseGeneratorConfig, NoisePPOConfig
from trl_noise_ppo.noise_generator import load_noise_generator, pipeline_noise, pooled_features


ARCHITECTURES = ["pooled_mlp", "token_attention", "prompt_clusters"]


def make_generator(noise_shape=(4, 16, 16), learn_sigma=False, pooled=True, architecture="pooled_mlp", token_grid=None,
                   image_axes=None, cluster_means=False):
    config = NoiseGeneratorConfig(
        architecture=architecture,
        noise_shape=list(noise_shape),
        token_grid=token_grid,
        image_axes=image_axes,
        prompt_embeds_dim=32,
        pooled_prompt_embeds_dim=16 if pooled else None,
        base_pipeline="some/pipeline",
        pipeline_class="StableDiffusionXLPipeline",
        learn_sigma=learn_sigma,
        num_clusters=3,
        cluster_means=cluster_means,
    )
    generator = NoiseGenerator(config)
    if architecture == "prompt_clusters":  # one cluster for each of conditioning()'s three prompts
        inputs = conditioning()
        generator.grid_encoder.fit(pooled_features(config, inputs["prompt_embeds"], inputs["pooled_prompt_embeds"] if pooled else None, None))
    return generator


def conditioning(batch=3):
    generator = torch.Generator().manual_seed(0)
    return {"prompt_embeds": torch.randn(batch, 7, 32, generator=generator), "pooled_prompt_embeds": torch.randn(batch, 16, generator=generator)}


# ---- the policy: NoiseDistribution ----


def random_distribution(batch=4, shape=(4, 5, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return NoiseDistribution(torch.randn(batch, *shape, generator=generator), 0.3 * torch.randn(batch, *shape, generator=generator))


def test_sample_log_prob_and_kl_are_those_of_the_diagonal_gaussian():
    policy = random_distribution()
    normal = torch.distributions.Normal(policy.mean, policy.log_std.exp())
    eps = torch.randn(policy.mean.shape)
    x = policy.sample(eps)
    torch.testing.assert_close(x, policy.mean + policy.log_std.exp() * eps)
    torch.testing.assert_close(policy.log_prob(x), normal.log_prob(x).flatten(1).mean(1))
    standard = torch.distributions.Normal(torch.zeros_like(policy.mean), torch.ones_like(policy.mean))
    torch.testing.assert_close(policy.kl_to_prior(), torch.distributions.kl_divergence(normal, standard).flatten(1).mean(1))
    prior = NoiseDistribution(torch.zeros(2, 3), torch.zeros(2, 3))
    assert prior.kl_to_prior().abs().max() == 0 and torch.equal(prior.sample(eps[:2, 0, 0, :3]), eps[:2, 0, 0, :3])


def test_natural_step_is_the_nes_update_of_each_group():
    policy = random_distribution(batch=6).repeat_interleave(1)
    eps = torch.randn(policy.mean.shape)
    x = policy.sample(eps)
    advantages = torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, -2.0])
    target = policy.natural_step(x, advantages, group_size=3, step_size=0.4, std_step_size=0.1, beta=0.05)
    std = policy.log_std.exp()
    for group in (slice(0, 3), slice(3, 6)):
        weights = advantages[group].view(-1, 1, 1, 1)
        mean_gradient = std[group] * (weights * eps[group]).mean(0) - 0.05 * std[group] ** 2 * policy.mean[group]
        log_std_gradient = (weights * (eps[group] ** 2 - 1)).mean(0) / 2 - 0.05 * (std[group] ** 2 - 1) / 2
        torch.testing.assert_close(target.mean[group], policy.mean[group] + 0.4 * mean_gradient)
        torch.testing.assert_close(target.log_std[group], policy.log_std[group] + 0.1 * log_std_gradient)


def test_natural_step_moves_the_mean_towards_better_samples_and_keeps_a_fixed_std():
    prior = NoiseDistribution(torch.zeros(8, 16), torch.zeros(8, 16))
    x = torch.randn(8, 16)
    advantages = torch.tensor([1.0, -1.0] * 4)  # the even samples scored higher
    target = prior.natural_step(x, advantages, group_size=8, step_size=1.0, std_step_size=0.0, beta=0.0)
    torch.testing.assert_close(target.mean[0], (x[0::2].sum(0) - x[1::2].sum(0)) / 8)
    assert torch.equal(target.log_std, prior.log_std)
    # beta alone pulls a drifted mean back towards N(0, I)
    drifted = NoiseDistribution(torch.ones(8, 16), torch.zeros(8, 16))
    pulled = drifted.natural_step(drifted.sample(x), torch.zeros(8), 8, step_size=1.0, std_step_size=0.0, beta=0.1)
    torch.testing.assert_close(pulled.mean, torch.full((8, 16), 0.9))


def test_squared_distance_and_repeat_interleave():
    policy, target = random_distribution(seed=1), random_distribution(seed=2)
    expected = ((policy.mean - target.mean) ** 2 + (policy.log_std - target.log_std) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(policy.squared_distance(target), expected)
    assert policy.squared_distance(policy).abs().max() == 0
    repeated = policy.repeat_interleave(3)
    assert torch.equal(repeated.mean[3:6], policy.mean[1].expand(3, 4, 5, 5))


def test_generator_returns_a_noise_distribution():
    policy = make_generator()(**conditioning())
    assert isinstance(policy, NoiseDistribution)
    mean, log_std = policy
    assert mean is policy.mean and log_std is policy.log_std


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_untrained_generator_is_standard_normal(learn_sigma, architecture):
    mu, log_sigma = make_generator(learn_sigma=learn_sigma, architecture=architecture)(**conditioning())
    assert mu.shape == log_sigma.shape == (3, 4, 16, 16)
    assert torch.equal(mu, torch.zeros_like(mu))
    assert torch.equal(log_sigma, torch.zeros_like(log_sigma))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("noise_shape", [(4, 16, 16), (4, 20, 12), (16, 8, 8)])
def test_output_has_noise_shape_and_depends_on_prompt(noise_shape, architecture):
    generator = make_generator(noise_shape, architecture=architecture)
    torch.nn.init.normal_(generator.head.weight)
    mu, _ = generator(**conditioning())
    assert mu.shape == (3, *noise_shape)
    assert not torch.allclose(mu[0], mu[1])


def test_packed_noise_is_the_patch_grid_in_row_major_order():
    packed = make_generator((6, 16), token_grid=[2, 3])
    torch.nn.init.normal_(packed.head.weight)
    image = make_generator((16, 2, 3))
    image.load_state_dict(packed.state_dict())
    inputs = conditioning()
    mu_packed, _ = packed(**inputs)
    mu_image, _ = image(**inputs)
    assert mu_packed.shape == (3, 6, 16)
    torch.testing.assert_close(mu_packed, mu_image.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("noise_shape, image_axes, as_image", [
    ((16, 1, 2, 3), [0, 2, 3], lambda x: x.unsqueeze(2)),  # Cosmos 2: (channels, 1 frame, rows, columns)
    ((1, 2, 3, 16), [3, 1, 2], lambda x: x.permute(0, 2, 3, 1).unsqueeze(1)),  # Kandinsky 5: (1, rows, columns, channels)
])
def test_noise_with_a_frame_axis_is_the_image_laid_out_on_its_axes(noise_shape, image_axes, as_image):
    laid_out = make_generator(noise_shape, learn_sigma=True, image_axes=image_axes)
    torch.nn.init.normal_(laid_out.head.weight)
    image = make_generator((16, 2, 3), learn_sigma=True)
    image.load_state_dict(laid_out.state_dict())
    inputs = conditioning()
    for laid_out_output, image_output in zip(laid_out(**inputs), image(**inputs)):
        assert laid_out_output.shape == (3, *noise_shape)
        torch.testing.assert_close(laid_out_output, as_image(image_output))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_padding_tokens_are_ignored(architecture):
    generator = make_generator(architecture=architecture, pooled=False)
    torch.nn.init.normal_(generator.head.weight)
    embeds = torch.randn(1, 7, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]])
    padded = embeds.clone()
    padded[:, 3:] = torch.randn(1, 4, 32)
    first, _ = generator(prompt_embeds=embeds, prompt_attention_mask=mask)
    second, _ = generator(prompt_embeds=padded, prompt_attention_mask=mask)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_size_does_not_grow_with_noise_and_fits_sdxl_budget(architecture):
    def count(noise_shape):
        config = NoiseGeneratorConfig(
            architecture=architecture, noise_shape=list(noise_shape), prompt_embeds_dim=2048, pooled_prompt_embeds_dim=1280
        )
        return NoiseGenerator(config).num_parameters()

    sd15, sdxl = count((4, 64, 64)), count((4, 128, 128))
    assert sdxl < 10_000_000
    # one more upsampling convolution is all a 4x larger noise costs
    assert sdxl - sd15 == 64 * 64 * 9 + 64


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_and_load_round_trip(tmp_path, architecture):
    generator = make_generator(learn_sigma=True, architecture=architecture)
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


@pytest.mark.parametrize("noise_shape", [(4, 16, 16), (64, 8)])
def test_pipeline_noise_is_rescaled_onto_the_shell_only_when_the_config_asks(tmp_path, noise_shape):
    noise = 3 * torch.randn(5, *noise_shape) + 1
    config = NoiseGeneratorConfig(noise_shape=list(noise_shape), prompt_embeds_dim=32, project_to_shell=True)
    assert pipeline_noise(noise, NoiseGeneratorConfig(noise_shape=list(noise_shape))) is noise  # off by default
    projected = pipeline_noise(noise, config)
    dims = noise[0].numel()
    torch.testing.assert_close(projected.flatten(1).norm(dim=1), torch.full((5,), dims**0.5))
    cosine = torch.nn.functional.cosine_similarity(projected.flatten(1), noise.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(5))  # only the norm changes
    assert pipeline_noise(torch.zeros(2, *noise_shape), config).isfinite().all()
    config.save_pretrained(tmp_path)
    assert NoiseGeneratorConfig.from_pretrained(tmp_path).project_to_shell is True


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="noise_shape"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 16], prompt_embeds_dim=8))
    with pytest.raises(ValueError, match="prompt_embeds_dim or pooled_prompt_embeds_dim"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 16, 16]))
    with pytest.raises(ValueError, match="token_grid"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[256, 16], prompt_embeds_dim=8))
    with pytest.raises(ValueError, match="image_axes"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[16, 1, 8, 8], prompt_embeds_dim=8))
    with pytest.raises(ValueError, match="its other axes of size 1"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[16, 2, 8, 8], image_axes=[0, 2, 3], prompt_embeds_dim=8))
    with pytest.raises(ValueError, match="Unknown architecture 'unet'"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 16, 16], prompt_embeds_dim=8, architecture="unet"))
    with pytest.raises(ValueError, match="use architecture='pooled_mlp'"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 16, 16], pooled_prompt_embeds_dim=8, architecture="token_attention"))
    with pytest.raises(ValueError, match="cluster_means must be True or False, got 'no'"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 16, 16], prompt_embeds_dim=8, architecture="prompt_clusters",
                                            cluster_means="no"))


def save_generator_with_edited_architecture(folder) -> NoiseGeneratorConfig:
    """Saves a pooled_mlp generator whose config.json is then edited to name another architecture; returns its config."""
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=32, hidden_dim=64)
    NoiseGenerator(config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "architecture": "token_attention"}))
    return config


def test_damaged_generator_folders_are_explained(tmp_path):
    config = save_generator_with_edited_architecture(tmp_path / "edited")
    with pytest.raises(ValueError, match="do not fit its config.json \\(architecture 'token_attention'\\).*Was config.json edited"):
        load_noise_generator(tmp_path / "edited")

    NoiseGenerator(config).save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=f"Could not read the weights in {tmp_path / 'truncated'}.*damaged or incomplete"):
        load_noise_generator(tmp_path / "truncated")

    (tmp_path / "truncated" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no config.json.*no noise generator folder"):
        load_noise_generator(tmp_path / "truncated")

    with pytest.raises(ValueError, match="hidden_dim=66 is not divisible by 4"):
        NoiseGenerator(NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=32, hidden_dim=66, architecture="token_attention"))


def test_a_new_generator_config_defaults_to_the_trainers_sizes_and_to_the_base_pipelines_noise():
    """A generator built by hand has the sizes the trainer gives a new one; it reads the prompt with the MLP and passes
    its noise as it is, so that untrained it is the base pipeline exactly: the trainer's default clusters need fitting on
    training prompts, and its default rescaling to the shell changes the noise."""
    trainer_defaults = {field.name: field.default for field in dataclasses.fields(NoisePPOConfig)}
    config = NoiseGeneratorConfig()
    assert config.learn_sigma == trainer_defaults["learn_sigma"] is False
    for name in ("hidden_dim", "grid_size", "grid_channels", "num_clusters"):
        assert getattr(config, name) == trainer_defaults[f"generator_{name}"], name
    assert (config.architecture, config.project_to_shell, config.cluster_image_weight) == ("pooled_mlp", False, 0.0)


def test_load_noise_generator_is_exported():
    import trl_noise_ppo

    assert trl_noise_ppo.load_noise_generator is load_noise_generator and "load_noise_generator" in trl_noise_ppo.__all__


def test_the_method_page_states_the_generators_measured_size():
    """docs/method.md gives the pooled MLP's and the trainer's default generator's parameter counts for SD 1.5 and
    SDXL noise."""
    sizes = {}
    for name, tokens, pooled, side in (("SD 1.5", 768, None, 64), ("SDXL", 2048, 1280, 128)):
        config = NoiseGeneratorConfig(noise_shape=[4, side, side], prompt_embeds_dim=tokens, pooled_prompt_embeds_dim=pooled)
        sizes[name] = NoiseGenerator(config).num_parameters()
        config = NoiseGeneratorConfig(noise_shape=[4, side, side], prompt_embeds_dim=tokens, pooled_prompt_embeds_dim=pooled,
                                      architecture="prompt_clusters", cluster_image_weight=2.0)
        sizes[f"{name}, clusters"] = NoiseGenerator(config).num_parameters()
    assert sizes == {"SD 1.5": 1_364_164, "SDXL": 2_061_572, "SD 1.5, clusters": 166_340, "SDXL, clusters": 203_268}
    method = (Path(__file__).parent.parent / "docs" / "method.md").read_text()
    assert "1.36M parameters for SD 1.5 and 2.06M for SDXL" in method
    assert "0.17M and 0.20M with the default 12 prompt clusters" in method
    # a coarse mean per cluster: channels x grid_size^2
    with_means = NoiseGeneratorConfig(noise_shape=[4, 64, 64], prompt_embeds_dim=768, architecture="prompt_clusters",
                                      cluster_image_weight=2.0, cluster_means=True)
    assert NoiseGenerator(with_means).num_parameters() - sizes["SD 1.5, clusters"] == 12 * 256
    assert "adds 256 more per cluster" in method


def test_the_public_loader_refuses_what_load_noise_generator_refuses(tmp_path):
    config = save_generator_with_edited_architecture(tmp_path / "edited")
    with pytest.raises(ValueError, match="do not fit its config.json \\(architecture 'token_attention'\\)"):
        NoiseGenerator.from_pretrained(tmp_path / "edited")

    NoiseGenerator(config).save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=f"Could not read the weights in {tmp_path / 'truncated'}.*damaged or incomplete"):
        NoiseGenerator.from_pretrained(tmp_path / "truncated")
    # what the caller asks for is what it gets
    generator, info = NoiseGenerator.from_pretrained(tmp_path / "edited", architecture="pooled_mlp", output_loading_info=True)
    assert isinstance(generator, NoiseGenerator) and not info["missing_keys"]


@pytest.mark.parametrize("path", ["./no/such/generator", "/no/such/generator", "~/no/such/generator", "no/such/generator"])
def test_a_missing_generator_folder_is_named(path):
    with pytest.raises(FileNotFoundError, match=f"The noise generator {path} does not exist"):
        load_noise_generator(path)


def test_kmeans_finds_separated_clusters():
    from trl_noise_ppo.noise_generator import kmeans

    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat_interleave(20, dim=0) + 0.1 * torch.randn(60, 2, generator=generator)
    centroids = kmeans(points[torch.randperm(60, generator=generator)], 3)
    assert torch.cdist(centres, centroids).min(dim=1).values.max() < 0.2


def _clusters_generator(num_clusters=3, cluster_image_weight=0.0):
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=8, architecture="prompt_clusters",
                                  num_clusters=num_clusters, cluster_image_weight=cluster_image_weight, grid_size=4)
    return NoiseGenerator(config)


def test_prompt_clusters_refuse_to_run_before_they_are_fitted():
    generator = _clusters_generator()
    with pytest.raises(ValueError, match="no clusters yet: train it with NoisePPOTrainer"):
        generator(prompt_embeds=torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="num_clusters=3 but was given 2 training prompts"):
        generator.grid_encoder.fit(torch.randn(2, 8))


def test_one_prompt_cluster_gives_every_prompt_the_same_distribution():
    # generator_num_clusters=1 is the benchmarks' prompt-independent control
    generator = _clusters_generator(num_clusters=1)
    torch.nn.init.normal_(generator.head.weight)
    prompt_embeds = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(0)) * 3
    generator.grid_encoder.fit(prompt_embeds.mean(dim=1))
    with torch.no_grad():
        means = generator(prompt_embeds=prompt_embeds).mean.flatten(1)
    assert means.abs().sum() > 0
    assert torch.equal(means, means[:1].expand_as(means))


def test_prompt_clusters_give_each_cluster_one_distribution_and_save_it(tmp_path):
    generator = _clusters_generator()
    torch.nn.init.normal_(generator.head.weight)  # an untrained head writes zeros for every prompt
    # three groups of prompts whose mean token embeddings lie far apart
    offsets = torch.tensor([0.0, 5.0, -5.0]).repeat_interleave(6)
    prompt_embeds = torch.randn(18, 5, 8, generator=torch.Generator().manual_seed(0)) * 0.1 + offsets[:, None, None]
    generator.grid_encoder.fit(prompt_embeds.mean(dim=1))
    with torch.no_grad():
        means = generator(prompt_embeds=prompt_embeds).mean.flatten(1)
    groups = torch.unique(means, dim=0, return_inverse=True)[1]
    assert len(torch.unique(means, dim=0)) == 3
    assert all(len(set(groups[i : i + 6].tolist())) == 1 for i in (0, 6, 12))
    generator.save_pretrained(tmp_path)
    loaded = NoiseGenerator.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(prompt_embeds=prompt_embeds).mean.flatten(1), means)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cluster_means_add_each_clusters_coarse_mean_upsampled_to_the_noise(learn_sigma):
    generator = make_generator((4, 16, 12), learn_sigma=learn_sigma, architecture="prompt_clusters", cluster_means=True)
    inputs = conditioning()
    mu, log_sigma = generator(**inputs)
    assert torch.equal(mu, torch.zeros_like(mu))  # still N(0, I) untrained
    torch.nn.init.normal_(generator.cluster_means.weight)  # the head stays zero: the mean is the clusters' alone
    with torch.no_grad():
        mu, log_sigma = generator(**inputs)
    clusters = generator.grid_encoder.assign(pooled_features(generator.config, inputs["prompt_embeds"], inputs["pooled_prompt_embeds"], None))
    assert sorted(clusters.tolist()) == [0, 1, 2]
    coarse = generator.cluster_means.weight.detach().T[clusters].view(3, 4, 8, 8)
    torch.testing.assert_close(mu, torch.nn.functional.interpolate(coarse, size=(16, 12), mode="bilinear", align_corners=False))
    assert torch.equal(log_sigma, torch.zeros_like(log_sigma))
    # with the head's output beside it, the two add
    torch.nn.init.normal_(generator.head.weight)
    without = make_generator((4, 16, 12), learn_sigma=learn_sigma, architecture="prompt_clusters")
    without.load_state_dict({k: v for k, v in generator.state_dict().items() if not k.startswith("cluster_means")})
    with torch.no_grad():
        torch.testing.assert_close(generator(**inputs).mean - without(**inputs).mean, mu)


def test_cluster_means_follow_packed_noise_and_only_prompt_clusters_have_them():
    packed = make_generator((6, 16), token_grid=[2, 3], architecture="prompt_clusters", cluster_means=True)
    torch.nn.init.normal_(packed.cluster_means.weight)
    image = make_generator((16, 2, 3), architecture="prompt_clusters", cluster_means=True)
    image.load_state_dict(packed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(packed(**conditioning()).mean, image(**conditioning()).mean.flatten(2).transpose(1, 2))
    # for the other architectures the field is ignored, like num_clusters
    assert make_generator(architecture="pooled_mlp", cluster_means=True).cluster_means is None


def test_a_prompt_clusters_generator_saved_before_cluster_means_loads_without_them(tmp_path):
    generator = make_generator(architecture="prompt_clusters")
    torch.nn.init.normal_(generator.head.weight)
    generator.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["cluster_means"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = NoiseGenerator.from_pretrained(tmp_path)
    assert loaded.cluster_means is None
    with torch.no_grad():
        assert torch.equal(loaded(**conditioning()).mean, generator(**conditioning()).mean)
    # and one with them keeps them
    with_means = make_generator(architecture="prompt_clusters", cluster_means=True)
    torch.nn.init.normal_(with_means.cluster_means.weight)
    with_means.save_pretrained(tmp_path / "with_means")
    loaded = NoiseGenerator.from_pretrained(tmp_path / "with_means")
    assert torch.equal(loaded.cluster_means.weight, with_means.cluster_means.weight)


def test_prompt_clusters_with_an_image_weight_follow_the_images_where_the_features_spread_elsewhere():
    # Six feature axes say the prompt's colour, one its layout; the images change with the layout alone. By the
    # features alone k-means groups by colour; with the images weighted in, by layout, and the linear readout carries
    # that grouping to prompts it was not fitted on.
    generator = torch.Generator().manual_seed(0)

    def prompts(count):
        colour, layout = torch.randint(0, 2, (count,), generator=generator), torch.randint(0, 2, (count,), generator=generator)
        features = torch.randn(count, 8, generator=generator) * 0.05
        features[:, :6] += colour[:, None]
        features[:, 6] += layout
        return features, colour, layout

    def same_groups(clusters, labels):
        return all((clusters[i] == clusters[j]) == (labels[i] == labels[j]) for i in range(len(labels)) for j in range(len(labels)))

    features, colour, layout = prompts(40)
    image_changes = torch.randn(40, 16, generator=generator) * 0.05 + layout[:, None].float()
    by_both = _clusters_generator(num_clusters=2, cluster_image_weight=2.0).grid_encoder
    by_both.fit(features, image_changes)
    by_embeddings = _clusters_generator(num_clusters=2).grid_encoder
    by_embeddings.fit(features)
    fresh, _, fresh_layout = prompts(40)
    assert same_groups(by_both.assign(features), layout) and same_groups(by_both.assign(fresh), fresh_layout)
    assert same_groups(by_embeddings.assign(features), colour)
    # the readout saves and loads with the weights; a generator without images keeps the buffers it always had
    assert {"readout_weight", "readout_bias"} <= set(dict(by_both.named_buffers()))
    assert set(dict(by_embeddings.named_buffers())) == {"fitted", "feature_shift", "feature_scale", "centroids"}


def test_prompt_clusters_are_fitted_on_what_their_image_weight_names():
    with pytest.raises(ValueError, match="cluster_image_weight must be a finite number >= 0, got -1.0"):
        _clusters_generator(cluster_image_weight=-1.0)
    with pytest.raises(ValueError, match="cluster_image_weight must be a finite number >= 0, got nan"):
        _clusters_generator(cluster_image_weight=float("nan"))
    with pytest.raises(ValueError, match="cluster_image_weight=2.0 is fitted with image_changes"):
        _clusters_generator(cluster_image_weight=2.0).grid_encoder.fit(torch.randn(6, 8))
    with pytest.raises(ValueError, match="cluster_image_weight=0.0 is fitted on the features alone"):
        _clusters_generator().grid_encoder.fit(torch.randn(6, 8), torch.randn(6, 4))
