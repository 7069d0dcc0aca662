"""The noise generator: a prompt-conditioned Gaussian policy over a pipeline's initial noise."""

import math
import os
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


class NoiseGeneratorConfig(PreTrainedConfig):
    r"""
    Configuration of a [`NoiseGenerator`]. It records what the generator was trained for, so that it can refuse a
    pipeline it does not fit.

    Args:
        noise_shape (`list[int]`):
            Shape of one sample of the pipeline's initial noise, without the batch axis: `[channels, height, width]`
            in latent pixels (for example `[4, 64, 64]` for Stable Diffusion 1.5 at 512 px), `[patches, features]`
            for packed noise (Flux, Qwen-Image), or any layout of an image's channels, rows and columns with axes of
            size 1 besides (a frame axis: `[16, 1, 96, 96]` for Cosmos 2, `[1, 128, 128, 16]` for Kandinsky 5).
        token_grid (`list[int]`, *optional*):
            For packed noise only: the `[rows, columns]` of patches that its sequence flattens row by row.
        image_axes (`list[int]`, *optional*):
            For noise of more than three axes only: the axes of `noise_shape` that hold its channels, rows and columns.
        prompt_embeds_dim (`int` or `None`):
            Width of the pipeline's per-token prompt embeddings the generator reads, or `None` if it reads none.
        pooled_prompt_embeds_dim (`int` or `None`):
            Width of the pipeline's pooled prompt embedding the generator reads, or `None` if the pipeline has none
            (Stable Diffusion 1.x/2.x).
        base_pipeline (`str`, *optional*):
            Hub id or path of the pipeline the generator was trained on; `NoisePPOPipeline.from_pretrained` loads it
            when given the generator alone.
        pipeline_class (`str`, *optional*):
            Class name of that pipeline, for example `"StableDiffusionPipeline"`.
        architecture (`str`, *optional*, defaults to `"pooled_mlp"`):
            How the prompt becomes the coarse grid. `"pooled_mlp"`: an MLP reads the mean of the prompt's token
            embeddings (and the pooled embedding, where the pipeline has one) and writes the whole grid.
            `"token_attention"`: each grid cell is a learned query that attends over the prompt's token embeddings,
            so each region of the noise can read different words. `"prompt_clusters"`: the prompt's features (those
            `"pooled_mlp"` reads) pick the nearest of `num_clusters` k-means centroids of the training prompts', and
            each cluster has one learned grid, so that every prompt of a cluster shares one noise distribution (the
            trainer fits the centroids on its training prompts before the first step). See the docs' architecture
            table for measurements.
        num_clusters (`int`, *optional*, defaults to `12`):
            For `"prompt_clusters"` only: how many clusters of prompts share a grid.
        cluster_image_weight (`float`, *optional*, defaults to `0.0`):
            For `"prompt_clusters"` only: how much where each training prompt changes the frozen pipeline's images
            (from the images of `CLUSTER_PROBE_NOISES` fixed noises, against the empty prompt's) counts beside its
            features when k-means groups the prompts. `0` groups them by their features alone. Above 0, the two are
            standardised, each scaled to the same total variance and the images' multiplied by this weight, so that
            prompts that read alike and put things in the same places share a grid (single objects by where they
            stand, which their embeddings do not tell apart); a linear readout fitted on the training prompts'
            features then assigns any prompt its cluster from its features alone, so inference costs nothing more.
            Fitting costs `CLUSTER_PROBE_NOISES` images per training prompt. The docs measure `2`.
        cluster_means (`bool`, *optional*, defaults to `False`):
            For `"prompt_clusters"` only: whether each cluster also has a mean of the noise itself, `grid_size` x
            `grid_size` per channel and upsampled bilinearly to the noise resolution, added to the output convolution's
            (zero at start). The output convolution is shared by every cluster, so on its own it has to write each
            cluster's mean from that cluster's grid, and a few prompts with their own clusters kept less apart than
            each learns alone (docs/benchmarks.md).
        hidden_dim (`int`, *optional*, defaults to `256`):
            Width of the MLP, or of the attention, that reads the prompt.
        grid_size (`int`, *optional*, defaults to `8`):
            Side of the coarse grid the MLP writes, before convolutional upsampling to the noise resolution. The
            parameter count depends on it, not on the noise resolution.
        grid_channels (`int`, *optional*, defaults to `64`):
            Channels of the coarse grid and of the upsampling convolutions.
        learn_sigma (`bool`, *optional*, defaults to `False`):
            Whether the policy also learns a per-element standard deviation (it starts at 1). When `False` it is fixed
            at 1 and only the mean moves. The default is [`NoisePPOConfig`]'s `learn_sigma`.
        project_to_shell (`bool`, *optional*, defaults to `False`):
            Whether each noise sample is rescaled to norm `sqrt(D)` (its number of elements) before it reaches the
            pipeline: the shell where `N(0, I)` noise lies, so the frozen model sees noise of the norm it was trained
            on however far the mean drifts. The policy's action, and its density, stay those of the unscaled noise.
    """

    model_type = "noise_generator"

    def __init__(
        self,
        noise_shape: list[int] | None = None,
        token_grid: list[int] | None = None,
        image_axes: list[int] | None = None,
        prompt_embeds_dim: int | None = None,
        pooled_prompt_embeds_dim: int | None = None,
        base_pipeline: str | None = None,
        pipeline_class: str | None = None,
        architecture: str = "pooled_mlp",
        num_clusters: int = 12,
        cluster_image_weight: float = 0.0,
        cluster_means: bool = False,
        hidden_dim: int = 256,
        grid_size: int = 8,
        grid_channels: int = 64,
        learn_sigma: bool = False,
        project_to_shell: bool = False,
        **kwargs,
    ):
        self.noise_shape = list(noise_shape) if noise_shape is not None else None
        self.token_grid = list(token_grid) if token_grid is not None else None
        self.image_axes = list(image_axes) if image_axes is not None else None
        self.prompt_embeds_dim = prompt_embeds_dim
        self.pooled_prompt_embeds_dim = pooled_prompt_embeds_dim
        self.base_pipeline = base_pipeline
        self.pipeline_class = pipeline_class
        self.architecture = architecture
        self.num_clusters = num_clusters
        self.cluster_image_weight = cluster_image_weight
        self.cluster_means = cluster_means
        self.hidden_dim = hidden_dim
        self.grid_size = grid_size
        self.grid_channels = grid_channels
        self.learn_sigma = learn_sigma
        self.project_to_shell = project_to_shell
        super().__init__(**kwargs)


class NoiseDistribution(NamedTuple):
    r"""
    The policy over a pipeline's initial noise for a batch of prompts: independent Gaussians, one per noise element,

        x = mean + exp(log_std) * eps,    eps ~ N(0, I).

    This is the interface the trainer and [`NoisePPOPipeline`] use: they draw noise with `sample`, and the trainer
    scores and improves the policy with `log_prob`, `kl_to_prior` and `natural_step`, never with the Gaussian's
    formulas. `N(0, I)`, the base pipeline's own prior, is `mean = log_std = 0`. A new kind of policy is a generator
    whose `forward` returns another class with these methods. Per-sample quantities are averaged over the noise's
    elements, so that their scale does not depend on the resolution.
    """

    mean: torch.Tensor
    log_std: torch.Tensor

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """The noise for unit Gaussian noise `eps` of the same shape: `mean + exp(log_std) * eps`."""
        return self.mean + torch.exp(self.log_std) * eps

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """`log pi(x)` per sample, averaged over the noise's elements."""
        z = (x - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi)).flatten(1).mean(dim=1)

    def kl_to_prior(self) -> torch.Tensor:
        """`KL(pi || N(0, I))` per sample, in closed form, averaged over the noise's elements."""
        return (0.5 * (torch.exp(2 * self.log_std) + self.mean**2 - 1) - self.log_std).flatten(1).mean(dim=1)

    def natural_step(
        self, x: torch.Tensor, advantages: torch.Tensor, group_size: int, step_size: float, std_step_size: float,
        beta: float,
    ) -> "NoiseDistribution":
        r"""
        The distribution one natural-gradient step up `E[A] - beta KL(pi || N(0, I))` away, per prompt: each group of
        `group_size` consecutive samples `x` of one prompt, with advantages `A`, estimates the gradient from its own
        samples. With `z = (x - mean) / std`, the Fisher metric of the Gaussian turns the gradients into

            mean*    = mean    + step_size     * (std * mean_group(A z)           - beta * std^2 * mean)
            log_std* = log_std + std_step_size * (mean_group(A (z^2 - 1)) / 2      - beta * (std^2 - 1) / 2)

        (the updates of natural evolution strategies). `step_size` is in units of the noise's own scale, whatever the
        network that produces it; `std_step_size = 0` keeps the standard deviation. Returned per sample, like `x`.
        """
        std = torch.exp(self.log_std)
        z = (x - self.mean) / std
        weights = advantages.view(-1, *[1] * (x.ndim - 1))

        def group_mean(values: torch.Tensor) -> torch.Tensor:
            means = values.view(-1, group_size, *values.shape[1:]).mean(dim=1)
            return means.repeat_interleave(group_size, dim=0)

        mean_step = std * group_mean(weights * z) - beta * std**2 * self.mean
        log_std_step = group_mean(weights * (z**2 - 1)) / 2 - beta * (std**2 - 1) / 2
        return NoiseDistribution(self.mean + step_size * mean_step, self.log_std + std_step_size * log_std_step)

    def squared_distance(self, target: "NoiseDistribution") -> torch.Tensor:
        """`|mean - mean*|^2 + |log_std - log_std*|^2` per sample, averaged over the noise's elements: the loss that
        moves a generator's output onto `target`."""
        distance = (self.mean - target.mean) ** 2 + (self.log_std - target.log_std) ** 2
        return distance.flatten(1).mean(dim=1)

    def repeat_interleave(self, repeats: int) -> "NoiseDistribution":
        """Each prompt's distribution `repeats` times in a row, one per sample."""
        return NoiseDistribution(*(value.repeat_interleave(repeats, dim=0) for value in self))


def pooled_features(config: NoiseGeneratorConfig, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask) -> torch.Tensor:
    """The mean of the prompt's token embeddings over its real tokens, beside its pooled embedding where the pipeline
    has one: `(batch, prompt_embeds_dim + pooled_prompt_embeds_dim)`."""
    features = []
    if config.prompt_embeds_dim is not None:
        if prompt_attention_mask is None:
            features.append(prompt_embeds.float().mean(dim=1))
        else:
            weights = prompt_attention_mask.to(torch.float32).unsqueeze(-1)
            features.append((prompt_embeds.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1))
    if config.pooled_prompt_embeds_dim is not None:
        features.append(pooled_prompt_embeds.float())
    return torch.cat(features, dim=-1)


def conditioning_dim(config: NoiseGeneratorConfig) -> int:
    dim = (config.prompt_embeds_dim or 0) + (config.pooled_prompt_embeds_dim or 0)
    if dim == 0:
        raise ValueError("NoiseGeneratorConfig needs prompt_embeds_dim or pooled_prompt_embeds_dim to be set.")
    return dim


class PooledMLPGridEncoder(nn.Module):
    """Prompt -> grid through an MLP on the mean token embedding (and the pooled embedding)."""

    def __init__(self, config: NoiseGeneratorConfig):
        super().__init__()
        self.config = config
        dim = conditioning_dim(config)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, config.hidden_dim),
            nn.SiLU(),
            nn.Linear(config.hidden_dim, config.grid_channels * config.grid_size**2),
        )

    def forward(self, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask):
        grid = self.mlp(pooled_features(self.config, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask))
        return grid.view(-1, self.config.grid_channels, self.config.grid_size, self.config.grid_size)


def kmeans(points: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """`k` centroids of `points` by Lloyd's iterations from a k-means++ start (each next start drawn with probability
    proportional to its squared distance from the nearest start), seeded, so that the same points give the same
    centroids in every process."""
    generator = torch.Generator().manual_seed(0)
    points = points.float().cpu()
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        distances = torch.cdist(points, centroids).min(dim=1).values ** 2
        weights = distances if distances.sum() > 0 else torch.ones_like(distances)
        centroids = torch.cat([centroids, points[torch.multinomial(weights, 1, generator=generator)]])
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        for cluster in range(k):
            if (assignment == cluster).any():
                centroids[cluster] = points[assignment == cluster].mean(dim=0)
    return centroids


# With cluster_image_weight > 0: the fixed noises whose images, per training prompt, say where the prompt acts
CLUSTER_PROBE_NOISES = 4


class PromptClustersGridEncoder(nn.Module):
    """Prompt -> grid by the prompt's cluster, each cluster with one learned grid: the nearest of `num_clusters`
    centroids to the prompt's standardised features `z`. With `cluster_image_weight=0` the centroids are the k-means
    centroids of the training prompts' `z`. Above 0, k-means groups the training prompts by `z` and by where they
    change the pipeline's images together, a ridge regression of those clusters' one-hot on `z` gives the readout
    `s = W z + b`, and the centroids are the one-hot vectors themselves: the nearest is the argmax of `s`. A network
    that reads the embeddings fits each prompt's own noisy step; clusters make prompts alike share theirs
    (docs/benchmarks.md)."""

    def __init__(self, config: NoiseGeneratorConfig):
        super().__init__()
        if not 0 <= config.cluster_image_weight < math.inf:  # NaN fails too
            raise ValueError(f"cluster_image_weight must be a finite number >= 0, got {config.cluster_image_weight}.")
        self.config = config
        dim = conditioning_dim(config)
        # buffers, so that the clusters save, load and push with the weights
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("feature_shift", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(dim))
        by_images = config.cluster_image_weight > 0
        self.register_buffer("centroids", torch.zeros(config.num_clusters, config.num_clusters if by_images else dim))
        if by_images:
            self.register_buffer("readout_weight", torch.zeros(config.num_clusters, dim))
            self.register_buffer("readout_bias", torch.zeros(config.num_clusters))
        self.templates = nn.Linear(config.num_clusters, config.grid_channels * config.grid_size**2)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, image_changes: torch.Tensor | None = None) -> None:
        """Fits the clusters on the training prompts' features (`pooled_features`, one row per prompt) and, with
        `cluster_image_weight` above 0, on where each prompt changes the pipeline's images (one row per prompt; see
        `NoisePPOTrainer`)."""
        if len(features) < self.config.num_clusters:
            raise ValueError(
                f"The prompt_clusters generator has num_clusters={self.config.num_clusters} but was given "
                f"{len(features)} training prompts to fit them on: give more prompts or fewer clusters "
                "(generator_num_clusters)."
            )
        weight = self.config.cluster_image_weight
        if (image_changes is None) != (weight == 0):
            raise ValueError(
                f"A prompt_clusters generator with cluster_image_weight={weight} is fitted "
                + ("with image_changes, one row per prompt." if image_changes is None else "on the features alone.")
            )
        features = features.float().to(self.centroids.device)
        self.feature_shift.copy_(features.mean(dim=0))
        self.feature_scale.copy_(features.std(dim=0).nan_to_num(0.0) + 1e-6)
        standardised = (features - self.feature_shift) / self.feature_scale
        if image_changes is None:
            self.centroids.copy_(kmeans(standardised, self.config.num_clusters))
        else:
            # each block divided by the root of its width, so that both have the same total variance before the weight
            image_changes = image_changes.float().flatten(1).cpu()
            image_changes = (image_changes - image_changes.mean(dim=0)) / (image_changes.std(dim=0).nan_to_num(0.0) + 1e-6)
            both = torch.cat([standardised.cpu() / standardised.shape[1] ** 0.5,
                              weight * image_changes / image_changes.shape[1] ** 0.5], dim=1)
            clusters = torch.cdist(both, kmeans(both, self.config.num_clusters)).argmin(dim=1)
            # ridge regression, with a unit penalty, of the clusters' one-hot on [z, 1]
            inputs = torch.cat([standardised.cpu(), torch.ones(len(standardised), 1)], dim=1)
            one_hot = nn.functional.one_hot(clusters, self.config.num_clusters).float()
            solution = torch.linalg.solve(inputs.T @ inputs + torch.eye(inputs.shape[1]), inputs.T @ one_hot)
            self.readout_weight.copy_(solution[:-1].T)
            self.readout_bias.copy_(solution[-1])
            self.centroids.copy_(torch.eye(self.config.num_clusters))
        self.fitted.fill_(True)

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """The index of each prompt's nearest centroid, from its `pooled_features`."""
        features = (features.float() - self.feature_shift.float()) / self.feature_scale.float()
        if self.config.cluster_image_weight > 0:
            features = features @ self.readout_weight.float().T + self.readout_bias.float()
        return torch.cdist(features, self.centroids.float()).argmin(dim=1)

    def forward(self, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask):
        if not self.fitted:
            raise ValueError(
                "This prompt_clusters generator has no clusters yet: train it with NoisePPOTrainer, which fits them on "
                "its training prompts, or call generator.grid_encoder.fit(features) first."
            )
        grid = self.templates(self.one_hot_clusters(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask))
        return grid.view(-1, self.config.grid_channels, self.config.grid_size, self.config.grid_size)

    def one_hot_clusters(self, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask) -> torch.Tensor:
        """Each prompt's cluster, one-hot: `(batch, num_clusters)`."""
        clusters = self.assign(pooled_features(self.config, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask))
        return nn.functional.one_hot(clusters, self.config.num_clusters).to(self.templates.weight.dtype)


TOKEN_ATTENTION_HEADS = 4


class TokenAttentionGridEncoder(nn.Module):
    """Prompt -> grid by cross-attention: each grid cell is a learned query over the prompt's token embeddings (the
    pooled embedding, where the pipeline has one, is added to every query)."""

    def __init__(self, config: NoiseGeneratorConfig):
        super().__init__()
        if config.prompt_embeds_dim is None:
            raise ValueError(
                "The token_attention architecture reads per-token prompt embeddings, which this pipeline does not "
                "have (it is conditioned on one embedding): use architecture='pooled_mlp'."
            )
        if config.hidden_dim % TOKEN_ATTENTION_HEADS:
            raise ValueError(
                f"The token_attention architecture splits hidden_dim over {TOKEN_ATTENTION_HEADS} attention heads; "
                f"hidden_dim={config.hidden_dim} is not divisible by {TOKEN_ATTENTION_HEADS}. Use e.g. {TOKEN_ATTENTION_HEADS * 64}."
            )
        self.config = config
        self.queries = nn.Parameter(torch.randn(config.grid_size**2, config.hidden_dim) * 0.02)
        self.token_norm = nn.LayerNorm(config.prompt_embeds_dim)
        self.token_projection = nn.Linear(config.prompt_embeds_dim, config.hidden_dim)
        if config.pooled_prompt_embeds_dim is not None:
            self.pooled_projection = nn.Sequential(
                nn.LayerNorm(config.pooled_prompt_embeds_dim), nn.Linear(config.pooled_prompt_embeds_dim, config.hidden_dim)
            )
        self.attention = nn.MultiheadAttention(config.hidden_dim, num_heads=TOKEN_ATTENTION_HEADS, batch_first=True)
        self.to_grid = nn.Sequential(nn.LayerNorm(config.hidden_dim), nn.Linear(config.hidden_dim, config.grid_channels))

    def forward(self, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask):
        tokens = self.token_projection(self.token_norm(prompt_embeds.float()))
        queries = self.queries.expand(len(tokens), -1, -1)
        if self.config.pooled_prompt_embeds_dim is not None:
            queries = queries + self.pooled_projection(pooled_prompt_embeds.float()).unsqueeze(1)
        padding = None if prompt_attention_mask is None else prompt_attention_mask == 0
        attended, _ = self.attention(queries, tokens, tokens, key_padding_mask=padding, need_weights=False)
        cells = self.to_grid(queries + attended)  # (batch, grid_size**2, grid_channels)
        return cells.transpose(1, 2).reshape(-1, self.config.grid_channels, self.config.grid_size, self.config.grid_size)


GRID_ENCODERS = {
    "pooled_mlp": PooledMLPGridEncoder,
    "token_attention": TokenAttentionGridEncoder,
    "prompt_clusters": PromptClustersGridEncoder,
}


class NoiseGenerator(PreTrainedModel):
    r"""
    A prompt-conditioned diagonal Gaussian policy over the initial noise of a frozen diffusion pipeline:

        x_T = mu(c) + sigma(c) * eps,    eps ~ N(0, I)

    The prompt conditioning `c` is the pipeline's own prompt embeddings. A grid encoder (`config.architecture`) turns
    them into a coarse `grid_size` x `grid_size` map, which convolutions upsample to the noise resolution, so the
    parameter count does not grow with the noise. With `config.cluster_means`, each prompt cluster's own coarse mean,
    upsampled bilinearly, is added to the mean. The last convolution and the cluster means are zero-initialised: an
    untrained generator is exactly N(0, I), the base pipeline's own prior.

    Examples:

    ```python
    >>> from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig
    >>> config = NoiseGeneratorConfig(noise_shape=[4, 16, 16], prompt_embeds_dim=32)
    >>> generator = NoiseGenerator(config)
    >>> policy = generator(prompt_embeds=torch.randn(2, 77, 32))  # a NoiseDistribution: N(0, I) until trained
    >>> policy.mean.shape, float(policy.mean.abs().max()), float(policy.log_std.abs().max())
    (torch.Size([2, 4, 16, 16]), 0.0, 0.0)
    >>> noise = policy.sample(torch.randn(2, 4, 16, 16))
    ```
    """

    config_class = NoiseGeneratorConfig
    base_model_prefix = "noise_generator"
    main_input_name = "prompt_embeds"

    def __init__(self, config: NoiseGeneratorConfig):
        super().__init__(config)
        shape, axes = config.noise_shape, config.image_axes
        image_noise = shape is not None and len(shape) == 3 and axes is None
        packed_noise = shape is not None and len(shape) == 2 and config.token_grid is not None
        laid_out_noise = (
            shape is not None
            and axes is not None
            and sorted(axes) == sorted(set(axes)) and len(axes) == 3
            and all(0 <= axis < len(shape) for axis in axes)
            and all(size == 1 for axis, size in enumerate(shape) if axis not in axes)
        )
        if not (image_noise or packed_noise or laid_out_noise):
            raise ValueError(
                "NoiseGeneratorConfig.noise_shape must be [channels, height, width], [patches, features] with "
                "token_grid=[rows, columns], or any shape with image_axes=[channels axis, rows axis, columns axis] and "
                f"its other axes of size 1; got noise_shape={shape}, token_grid={config.token_grid}, image_axes={axes}."
            )
        if config.architecture not in GRID_ENCODERS:
            raise ValueError(f"Unknown architecture {config.architecture!r}; choose one of {sorted(GRID_ENCODERS)}.")
        self.grid_encoder = GRID_ENCODERS[config.architecture](config)
        channels, height, width = self._image_shape()
        num_upsamplings = max(0, math.ceil(math.log2(max(height, width) / config.grid_size)))
        self.upsampler = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(config.grid_channels, config.grid_channels, 3, padding=1),
                    nn.SiLU(),
                )
                for _ in range(num_upsamplings)
            ]
        )
        out_channels = 2 * channels if config.learn_sigma else channels
        self.head = nn.Conv2d(config.grid_channels, out_channels, 3, padding=1)
        if config.cluster_means not in (True, False):
            raise ValueError(f"NoiseGeneratorConfig.cluster_means must be True or False, got {config.cluster_means!r}.")
        self.cluster_means = None
        if config.architecture == "prompt_clusters" and config.cluster_means:
            # not drawn at random first (post_init zeroes it), so that the other modules start as without the means
            self.cluster_means = nn.utils.skip_init(nn.Linear, config.num_clusters, channels * config.grid_size**2, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing weights that do not fit the config (an edited config.json would
        otherwise load with modules left randomly initialised) or are not finite, and naming the folder whose weight
        file is damaged."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        path = str(pretrained_model_name_or_path)
        try:
            generator, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        except Exception as error:
            if not _is_safetensors_error(error):
                raise
            raise _read_error(path, error) from error
        if info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys"):
            raise ValueError(
                f"The weights in {path} do not fit its config.json (architecture {generator.config.architecture!r}): missing "
                f"{sorted(info['missing_keys'])[:3]}, unexpected {sorted(info['unexpected_keys'])[:3]}, mismatched "
                f"{list(info.get('mismatched_keys') or [])[:3]}. Was config.json edited? Restore the one saved with the weights."
            )
        not_finite = [name for name, value in generator.state_dict().items() if not value.isfinite().all()]
        if not_finite:
            raise ValueError(
                f"The weights in {path} are not finite (NaN or inf in {not_finite[:3]}): they were saved from a diverged "
                "run. Load an earlier checkpoint."
            )
        return (generator, info) if output_loading_info else generator

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self.head or module is self.cluster_means:
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _image_shape(self) -> tuple[int, int, int]:
        """The noise as an image: packed noise's features are its channels, its patch grid its pixels."""
        if self.config.image_axes is not None:
            return tuple(self.config.noise_shape[axis] for axis in self.config.image_axes)
        if len(self.config.noise_shape) == 3:
            return tuple(self.config.noise_shape)
        return (self.config.noise_shape[1], *self.config.token_grid)

    def forward(
        self,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
    ) -> NoiseDistribution:
        """
        Args:
            prompt_embeds (`torch.Tensor` of shape `(batch, tokens, prompt_embeds_dim)`, *optional*):
                The pipeline's per-token prompt embeddings.
            pooled_prompt_embeds (`torch.Tensor` of shape `(batch, pooled_prompt_embeds_dim)`, *optional*):
                The pipeline's pooled prompt embedding.
            prompt_attention_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*):
                1 for real tokens, 0 for padding, for pipelines whose encoders return one; padding is then left out
                of the mean over tokens.

        Returns:
            [`NoiseDistribution`]: the policy for each prompt, a `(mean, log_std)` pair of tensors of shape
            `(batch, *noise_shape)` (it unpacks as one).
        """
        channels, height, width = self._image_shape()
        grid = self.grid_encoder(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)
        grid = self.upsampler(grid)
        if grid.shape[-2:] != (height, width):
            grid = nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        out = self.head(grid)
        if self.config.learn_sigma:
            mu, log_sigma = out.split(channels, dim=1)
        else:
            mu, log_sigma = out, torch.zeros_like(out)
        if self.cluster_means is not None:
            one_hot = self.grid_encoder.one_hot_clusters(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)
            cluster_mean = self.cluster_means(one_hot).view(-1, channels, self.config.grid_size, self.config.grid_size)
            if cluster_mean.shape[-2:] != (height, width):
                cluster_mean = nn.functional.interpolate(cluster_mean, size=(height, width), mode="bilinear", align_corners=False)
            mu = mu + cluster_mean
        if self.config.image_axes is not None:
            # channels, rows and columns in the order of their axes, then the axes of size 1 in between
            order = sorted(range(3), key=lambda i: self.config.image_axes[i])
            mu, log_sigma = (
                x.permute(0, *[1 + i for i in order]).reshape(-1, *self.config.noise_shape) for x in (mu, log_sigma)
            )
        elif len(self.config.noise_shape) == 2:
            # patches in row-major order, as the pipelines pack them
            mu, log_sigma = (x.flatten(2).transpose(1, 2) for x in (mu, log_sigma))
        return NoiseDistribution(mu, log_sigma)


def pipeline_noise(noise: torch.Tensor, config: NoiseGeneratorConfig) -> torch.Tensor:
    """The noise the pipeline gets for the policy's sample `noise` (batch first): `noise` itself, or, with
    `config.project_to_shell`, `noise * sqrt(D) / ||noise||` per sample (`N(0, I)` noise in D dimensions has norm
    sqrt(D) +- 0.7)."""
    if not config.project_to_shell:
        return noise
    norms = noise.flatten(1).norm(dim=1).clamp(min=1e-12)  # zero noise (an untrained mean) stays zero
    return noise * (math.sqrt(noise[0].numel()) / norms).view(-1, *[1] * (noise.ndim - 1))


def _read_error(path: str, error: Exception) -> OSError:
    return OSError(f"Could not read the weights in {path} ({error}): the file is damaged or incomplete; save it again.")


def _is_safetensors_error(error: Exception) -> bool:
    return type(error).__module__.startswith("safetensors")  # its error types are not importable


def load_noise_generator(pretrained_model_name_or_path: str, **kwargs) -> nn.Module:
    """
    Loads a noise generator from the Hub or a folder: a [`NoiseGenerator`], or a LoRA adapter trained on one (saved by
    `NoisePPOTrainer(peft_config=...)`), which is then composed with the base generator its config names.
    """
    given = str(pretrained_model_name_or_path)
    path = os.path.expanduser(given)
    # a Hub id is `name` or `owner/name`; anything else is meant as a folder
    if not os.path.exists(path) and (os.path.isabs(path) or given.startswith((".", "~")) or given.count("/") > 1):
        raise FileNotFoundError(
            f"The noise generator {given} does not exist (looked for it relative to {os.getcwd()}). Pass the folder "
            "that `save_model` wrote, or a Hub id."
        )
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(
            f"{path} holds no config.json (nor a LoRA adapter_config.json): it is no noise generator folder. Pass the "
            "folder that `save_model` wrote."
        )
    try:
        from peft import PeftConfig, PeftModel

        adapter_config = PeftConfig.from_pretrained(path, **kwargs)
    except (ImportError, ValueError, OSError):
        return NoiseGenerator.from_pretrained(path, **kwargs)
    base_path = adapter_config.base_model_name_or_path
    if not base_path:
        raise ValueError(
            f"The LoRA adapter {path} does not record the generator it was trained on (base_model_name_or_path is "
            f"{base_path!r} in its adapter_config.json): set it to that generator's folder or Hub id."
        )
    if os.path.isabs(base_path) and not os.path.isdir(base_path):
        raise FileNotFoundError(
            f"The LoRA adapter {path} was trained on the generator {base_path}, which does not exist any more. Restore "
            "that folder, or set base_model_name_or_path in its adapter_config.json to where the generator is now."
        )
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"The LoRA adapter {path} has no weights (adapter_model.safetensors): save it again.")
    base = NoiseGenerator.from_pretrained(base_path, **kwargs)
    try:
        return PeftModel.from_pretrained(base, path, **kwargs)
    except Exception as error:
        if not _is_safetensors_error(error):
            raise
        raise _read_error(path, error) from error
