"""The noise generator: a prompt-conditioned Gaussian policy over a pipeline's initial noise."""

import math

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
            in latent pixels (for example `[4, 64, 64]` for Stable Diffusion 1.5 at 512 px), or `[patches, features]`
            for packed noise (Flux, Qwen-Image).
        token_grid (`list[int]`, *optional*):
            For packed noise only: the `[rows, columns]` of patches that its sequence flattens row by row.
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
        hidden_dim (`int`, *optional*, defaults to `256`):
            Width of the MLP that reads the prompt.
        grid_size (`int`, *optional*, defaults to `8`):
            Side of the coarse grid the MLP writes, before convolutional upsampling to the noise resolution. The
            parameter count depends on it, not on the noise resolution.
        grid_channels (`int`, *optional*, defaults to `64`):
            Channels of the coarse grid and of the upsampling convolutions.
        learn_sigma (`bool`, *optional*, defaults to `False`):
            Whether the policy also learns a per-element standard deviation. When `False` the standard deviation is
            fixed at 1, which keeps the noise at the scale the frozen model was trained on.
    """

    model_type = "noise_generator"

    def __init__(
        self,
        noise_shape: list[int] | None = None,
        token_grid: list[int] | None = None,
        prompt_embeds_dim: int | None = None,
        pooled_prompt_embeds_dim: int | None = None,
        base_pipeline: str | None = None,
        pipeline_class: str | None = None,
        hidden_dim: int = 256,
        grid_size: int = 8,
        grid_channels: int = 64,
        learn_sigma: bool = False,
        **kwargs,
    ):
        self.noise_shape = list(noise_shape) if noise_shape is not None else None
        self.token_grid = list(token_grid) if token_grid is not None else None
        self.prompt_embeds_dim = prompt_embeds_dim
        self.pooled_prompt_embeds_dim = pooled_prompt_embeds_dim
        self.base_pipeline = base_pipeline
        self.pipeline_class = pipeline_class
        self.hidden_dim = hidden_dim
        self.grid_size = grid_size
        self.grid_channels = grid_channels
        self.learn_sigma = learn_sigma
        super().__init__(**kwargs)


class NoiseGenerator(PreTrainedModel):
    r"""
    A prompt-conditioned diagonal Gaussian policy over the initial noise of a frozen diffusion pipeline:

        x_T = mu(c) + sigma(c) * eps,    eps ~ N(0, I)

    The prompt conditioning `c` is the pipeline's own prompt embeddings (mean over its real tokens, concatenated with the
    pooled embedding where the pipeline has one). An MLP writes a coarse `grid_size` x `grid_size` map, which convolutions
    upsample to the noise resolution, so the parameter count does not grow with the noise. The last convolution is
    zero-initialised: an untrained generator is exactly N(0, I), the base pipeline's own prior.

    Examples:

    ```python
    >>> from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig
    >>> config = NoiseGeneratorConfig(noise_shape=[4, 16, 16], prompt_embeds_dim=32)
    >>> generator = NoiseGenerator(config)
    >>> mu, log_sigma = generator(prompt_embeds=torch.randn(2, 77, 32))
    >>> mu.shape, float(mu.abs().max()), float(log_sigma.abs().max())
    (torch.Size([2, 4, 16, 16]), 0.0, 0.0)
    ```
    """

    config_class = NoiseGeneratorConfig
    base_model_prefix = "noise_generator"
    main_input_name = "prompt_embeds"

    def __init__(self, config: NoiseGeneratorConfig):
        super().__init__(config)
        image_noise = config.noise_shape is not None and len(config.noise_shape) == 3
        packed_noise = config.noise_shape is not None and len(config.noise_shape) == 2 and config.token_grid is not None
        if not (image_noise or packed_noise):
            raise ValueError(
                "NoiseGeneratorConfig.noise_shape must be [channels, height, width], or [patches, features] with "
                f"token_grid=[rows, columns]; got noise_shape={config.noise_shape}, token_grid={config.token_grid}."
            )
        conditioning_dim = (config.prompt_embeds_dim or 0) + (config.pooled_prompt_embeds_dim or 0)
        if conditioning_dim == 0:
            raise ValueError("NoiseGeneratorConfig needs prompt_embeds_dim or pooled_prompt_embeds_dim to be set.")
        channels, height, width = self._image_shape()
        width_of_grid = config.grid_channels * config.grid_size**2
        self.prompt_mlp = nn.Sequential(
            nn.LayerNorm(conditioning_dim),
            nn.Linear(conditioning_dim, config.hidden_dim),
            nn.SiLU(),
            nn.Linear(config.hidden_dim, width_of_grid),
        )
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
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self.head:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def _image_shape(self) -> tuple[int, int, int]:
        """The noise as an image: packed noise's features are its channels, its patch grid its pixels."""
        if len(self.config.noise_shape) == 3:
            return tuple(self.config.noise_shape)
        return (self.config.noise_shape[1], *self.config.token_grid)

    def forward(
        self,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
            `tuple[torch.Tensor, torch.Tensor]`: the mean `mu` and the log standard deviation `log_sigma` of the noise,
            each of shape `(batch, *noise_shape)`.
        """
        features = []
        if self.config.prompt_embeds_dim is not None:
            if prompt_attention_mask is None:
                features.append(prompt_embeds.float().mean(dim=1))
            else:
                weights = prompt_attention_mask.to(torch.float32).unsqueeze(-1)
                features.append((prompt_embeds.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1))
        if self.config.pooled_prompt_embeds_dim is not None:
            features.append(pooled_prompt_embeds.float())
        conditioning = torch.cat(features, dim=-1)
        channels, height, width = self._image_shape()
        grid = self.prompt_mlp(conditioning).view(-1, self.config.grid_channels, self.config.grid_size, self.config.grid_size)
        grid = self.upsampler(grid)
        if grid.shape[-2:] != (height, width):
            grid = nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        out = self.head(grid)
        if self.config.learn_sigma:
            mu, log_sigma = out.split(channels, dim=1)
        else:
            mu, log_sigma = out, torch.zeros_like(out)
        if len(self.config.noise_shape) == 2:
            # patches in row-major order, as the pipelines pack them
            mu, log_sigma = (x.flatten(2).transpose(1, 2) for x in (mu, log_sigma))
        return mu, log_sigma
