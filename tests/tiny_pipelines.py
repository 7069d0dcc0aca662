"""Tiny, offline, seeded diffusers text-to-image pipelines for tests.

Every builder returns a fresh pipeline on CPU, in float32, in eval mode, with its progress bar
disabled, built from configs only: no Hub access (``HF_HUB_OFFLINE=1`` is set on import). The
component configs follow diffusers' own ``get_dummy_components()`` test helpers (0.42), with the
Hub tokenizers replaced by offline ones; every model is created right after
``torch.manual_seed(0)``, so two builds of one family have identical weights. A build takes
0.05-0.5 s and a 2-step 64 x 64 call 0.05-1 s on one CPU thread.

API::

    from tests.tiny_pipelines import FAMILIES, build_pipeline
    pipe = build_pipeline("sd")

Families (name: pipeline class, latents= shape at 64 x 64, batch 1):

==============  ==============================  ===================  ============================
name            class                           latents= shape       notes
==============  ==============================  ===================  ============================
sd              StableDiffusionPipeline         (1, 4, 32, 32)       DDIM, epsilon, VAE x2
sd_vpred        StableDiffusionPipeline         (1, 4, 32, 32)       DDIM, v_prediction
sdxl            StableDiffusionXLPipeline       (1, 4, 32, 32)       Euler: init_noise_sigma != 1
lcm             LatentConsistencyModelPipeline  (1, 4, 32, 32)       stochastic steps (see below)
sd3             StableDiffusion3Pipeline        (1, 4, 32, 32)       CLIP x2 + T5, flow matching
flux            FluxPipeline                    (1, 256, 16)         PACKED latents
flux2           Flux2Pipeline                   (1, 16, 16, 16)      Mistral-3, patchified 4-D
flux2_klein     Flux2KleinPipeline              (1, 16, 16, 16)      Qwen-3, patchified 4-D
pixart_sigma    PixArtSigmaPipeline             (1, 4, 32, 32)       binned to 256 px, VAE x8
sana            SanaPipeline                    (1, 4, 16, 16)       binned to 512 px, DC-AE x32
kandinsky22     KandinskyV22Pipeline            (1, 4, 32, 32)       NO TEXT: image embeddings
qwenimage       QwenImagePipeline               (1, 64, 16)          PACKED latents, VAE x4
auraflow        AuraFlowPipeline                (1, 4, 32, 32)       UMT5
lumina2         Lumina2Pipeline                 (1, 4, 8, 8)         Gemma; VAE x8 hard-coded
cogview4        CogView4Pipeline                (1, 4, 32, 32)       GLM
pixart_alpha    PixArtAlphaPipeline             (1, 4, 32, 32)       PixArt-Sigma's parts, binned
sd_pag          StableDiffusionPAGPipeline      (1, 4, 32, 32)       sd's parts, PAG on "mid"
sdxl_pag        StableDiffusionXLPAGPipeline    (1, 4, 32, 32)       sdxl's parts, PAG on "mid"
pixart_sigma_pag PixArtSigmaPAGPipeline         (1, 4, 32, 32)       pixart_sigma's parts
flux_kontext    FluxKontextPipeline             (1, 256, 16)         flux's parts; PACKED; max_area
controlnet_sd   StableDiffusionControlNetPipeline (1, 4, 32, 32)     needs ``image=``
bria            BriaPipeline                    (1, 256, 16)         T5; PACKED
chroma          ChromaPipeline                  (1, 256, 16)         T5, FLOAT mask; PACKED
hunyuandit      HunyuanDiTPipeline              (1, 4, 8, 8)         BERT + T5; binning off
hidream         HiDreamImagePipeline            (1, 4, 8, 8)         CLIP x2 + T5 + Llama
zimage          ZImagePipeline                  (1, 16, 32, 32)      Qwen-3; LIST of embeddings
kolors          KolorsPipeline                  (1, 4, 32, 32)       ChatGLM-3 (sentencepiece)
hunyuanimage    HunyuanImagePipeline            (1, 4, 8, 8)         Qwen2.5-VL + ByT5; batch_size
kandinsky3      Kandinsky3Pipeline              (1, 4, 8, 8)         T5; MoVQ; cut_context
cosmos2         Cosmos2TextToImagePipeline      (1, 16, 1, 8, 8)     T5; FRAME axis; sigma_max
sd3_pag         StableDiffusion3PAGPipeline     (1, 4, 32, 32)       sd3's parts, 2 blocks
sd3_controlnet  StableDiffusion3ControlNetPipeline (1, 4, 32, 32)    needs ``control_image=``
flux_controlnet FluxControlNetPipeline          (1, 256, 16)         needs ``control_image=``
flux_control    FluxControlPipeline             (1, 256, 16)         needs ``control_image=``
kandinsky5      Kandinsky5T2IPipeline           (1, 1, 8, 8, 16)     channels LAST, frame axis
ovis_image      OvisImagePipeline               (1, 256, 16)         Qwen-3; PACKED
longcat_image   LongCatImagePipeline            (1, 256, 64)         Qwen2.5-VL; PACKED (refused)
ernie_image     ErnieImagePipeline              (1, 16, 16, 16)      Mistral-3; draws INLINE
qwenimage21     QwenImage21Pipeline             (1, 16, 16)          Qwen3-VL; RGBA images
bria_fibo       BriaFiboPipeline                (1, 16, 16)          SmolLM3; prompt as TEXT only
==============  ==============================  ===================  ============================

``MORE_FAMILIES`` (with ``MORE_CALL_KWARGS``) holds other pipeline classes on these components (PAG and ControlNet
variants, SAG, Panorama, ...), built only for the coverage table of ``benchmarks/families.py``.

Tables for tests:

- ``DEFAULT_SIZE[name]``: (height, width) to call the family at: (64, 64) for every family.
  ALWAYS pass height and width: the pipelines' own defaults differ (Kandinsky 512 px, which
  takes ~100 s on CPU; AuraFlow 1024 px, which fails with this tiny transformer; PixArt 256 px;
  Sana 512 px). sd/sdxl/lcm/sd3/flux*/qwenimage/lumina2/cogview4 default to 64 px.
- ``EXPECTED_LATENT_SHAPE[name]``: the ``latents=`` shape for batch 1 at ``DEFAULT_SIZE``.
  ``randn`` of it, given as ``latents=``, reproduces the pipeline's own default call with the same
  generator seed, except for the packed families (see ``UNPACKED_NOISE_SHAPE``) and LCM.
- ``PROMPT_CALL_KWARGS[name]``: extra call arguments: Kandinsky 2.2's image embeddings, the
  ControlNet's conditioning ``image``, Flux Kontext's ``max_area`` (else it generates at 1
  megapixel) and HunyuanDiT's ``use_resolution_binning=False`` (else 64 px is binned to 1024 px).
- ``TEXT_PROMPT_FAMILIES``: the families that take ``prompt=`` and ``encode_prompt(text)``.
- ``RAW_PT_OUTPUT_FAMILIES``, ``STOCHASTIC_SAMPLER_FAMILIES``, ``INIT_NOISE_SIGMA_FAMILIES``,
  ``PRE_NOISE_DRAW_FAMILIES``, ``RGBA_OUTPUT_FAMILIES``, ``UNPACKED_NOISE_SHAPE``, ``BINNED_GENERATION_SIZE``: the
  quirks below.

Families that cannot take text prompts:

- ``kandinsky22``: ``KandinskyV22Pipeline`` is the Kandinsky 2.2 *decoder*; its conditioning is
  CLIP *image* embeddings (``image_embeds`` / ``negative_image_embeds``, shape (B, 32) here) that
  the separate prior pipeline makes from text. It has no tokenizer, no ``prompt`` argument and no
  ``encode_prompt``. The decoder is the pipeline that takes the initial image noise (the combined
  Kandinsky pipelines route ``latents=`` to the prior). Call it with
  ``PROMPT_CALL_KWARGS["kandinsky22"]``; a prompt-conditioned noise policy must condition on the
  image embeddings instead.

Every other family takes text prompts through an offline tokenizer:

- CLIP (sd, sdxl, lcm, sd3, flux): a byte-level CLIP BPE vocab (512 byte tokens + bos/eos, no
  merges) written once per process to a temp dir and loaded with
  ``CLIPTokenizer.from_pretrained(dir, model_max_length=77)``.
- T5 / UMT5 / Gemma / Qwen / Mistral / GLM: a ``tokenizers`` byte-level BPE with no merges (one
  token per UTF-8 byte) plus the family's special tokens, wrapped in ``PreTrainedTokenizerFast``
  or the family's class (``GemmaTokenizerFast``, ``Qwen2TokenizerFast``), with the family's
  special-token ids, padding side, bos/eos insertion and, where the pipeline uses it, a chat
  template (ChatML for Qwen, incl. ``enable_thinking=False``; Mistral's [INST] format for
  Flux.2, whose real tokenizer is a Pixtral processor: only the text path is supported here).
  Byte tokens make sequences long: Lumina2 prefixes its system prompt (165 tokens here) and
  truncates at 256 tokens, so prompts beyond ~90 bytes are cut there (pass a larger
  ``max_sequence_length``, at most 512); Sana prepends its "complex human instruction" (1,058
  tokens here; still fast).
- ChatGLM-3 (kolors): diffusers' own sentencepiece ``ChatGLMTokenizer`` on a character model with
  byte fallback, trained offline once per process (needs ``sentencepiece``, in the ``test`` extra).

Quirks met (all checked by tests/test_tiny_pipelines.py):

- Packed latents: ``flux`` and ``qwenimage`` take ``latents=`` already packed to
  (B, tokens, C * 4); their default noise is ``randn(UNPACKED_NOISE_SHAPE)`` (Qwen-Image's has a
  frame axis: (B, 1, C, h, w)) packed by ``pipe._pack_latents(x, B, C, h, w)``. Flux.2 takes a
  4-D *patchified* tensor (B, C * 4, h / 2, w / 2) and draws it directly.
- init_noise_sigma: sd, sd_vpred, sdxl, lcm, pixart_sigma, kandinsky22 multiply given latents by
  ``scheduler.init_noise_sigma`` (1.0 except SDXL's Euler: ~1.91 after ``set_timesteps(2)``,
  ~14.6 before). Pass unit-variance noise. Flow-matching families use latents as given.
- Stochastic sampler: LCM with > 1 step draws fresh noise in ``scheduler.step`` from the
  ``generator``: fixed latents give a fixed image only with a fixed generator; and giving
  latents changes how much the generator has been consumed, so ``latents=randn(seed)`` does NOT
  reproduce the default call with that seed.
- Resolution binning (default on): pixart_sigma snaps 64 x 64 to 256 x 256 (``sample_size=32``
  selects the 256-px bin table) and sana to 512 x 512 (``sample_size=16``, 512-px table); noise
  is drawn at the binned size and the image resized back to 64 x 64. A latents shape
  contradicting the (binned) size is used silently, or fails deep in the model.
- Hard-coded scale factor: ``Lumina2Pipeline`` sets ``vae_scale_factor = 8`` whatever the VAE,
  so its tiny VAE has 4 blocks (a 1-block VAE as in diffusers' test gives 16 px images for a
  64 px request).
- Raw "pt" output: ``KandinskyV22Pipeline`` with ``output_type="pt"`` returns the raw decoder
  output (about [-1, 1], unclamped); only "np"/"pil" are rescaled with x / 2 + 0.5 and clamped.
- Positional arguments: ``Flux2Pipeline`` / ``Flux2KleinPipeline``'s first positional argument
  is ``image`` (``pipe("a cat")`` fails: "Provide either prompt or prompt_embeds"), and
  ``Lumina2Pipeline`` takes ``width`` before ``height``. Always call with keywords.
- dtype: builders keep float32; SD/SDXL do not cast given latents to the pipeline dtype.
- Defaults: Flux, Flux.2 and Qwen-Image hard-code ``default_sample_size = 128`` on the instance;
  the builders set it so that a call without height/width gives 64 px.
- PixArt's default ``clean_caption=True`` logs a warning (no bs4/ftfy) and falls back to False;
  Qwen-Image warns that ``true_cfg_scale`` needs a ``negative_prompt``. Both are harmless.
- Flux.2 stacks text-encoder hidden states (10, 20, 30) and Flux.2-klein (9, 18, 27) by default:
  the tiny text encoders have 30 and 27 layers (hidden size 16) so that default calls and
  ``encode_prompt(text)`` work without ``text_encoder_out_layers``.
- Tokenizers and processors stood in for: Cosmos' guardrail (``PassingSafetyChecker``), Qwen-Image 2.1's
  ``Qwen3VLProcessor`` (``QwenTextProcessor``: its video processor needs torchvision); ByT5 needs no vocabulary file.
- Zero-initialised gates (Kandinsky 5, Ovis, ERNIE, Qwen-Image 2.1, Bria FIBO, LongCat) are drawn small and seeded
  (``_unzeroed``), else the prompt would not reach the image of an untrained tiny model.
- Instance attributes not kept by ``save_pretrained``: ``default_sample_size`` (see above) and Kandinsky 5's
  ``resolutions`` (set to 64 px: it snaps every request to one of them).
- Speed: on a busy 2-core machine these tiny models run several times faster with
  ``torch.set_num_threads(1)`` (two intra-op threads spin against each other).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

__all__ = [
    "FAMILIES",
    "build_pipeline",
    "DEFAULT_SIZE",
    "EXPECTED_LATENT_SHAPE",
    "PROMPT_CALL_KWARGS",
    "TEXT_PROMPT_FAMILIES",
    "RAW_PT_OUTPUT_FAMILIES",
    "STOCHASTIC_SAMPLER_FAMILIES",
    "INIT_NOISE_SIGMA_FAMILIES",
    "PRE_NOISE_DRAW_FAMILIES",
    "RGBA_OUTPUT_FAMILIES",
    "UNPACKED_NOISE_SHAPE",
    "BINNED_GENERATION_SIZE",
]


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable-unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_CLIP_DIR: str | None = None


def _clip_tokenizer_dir() -> str:
    """Write a byte-level CLIP vocab (514 tokens, no merges) once per process (again if removed);
    the directory is deleted at exit."""
    global _CLIP_DIR
    if _CLIP_DIR is not None and os.path.isfile(os.path.join(_CLIP_DIR, "merges.txt")):
        return _CLIP_DIR
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)  # 512
    vocab["<|endoftext|>"] = len(vocab)  # 513 (also the pad token, as in CLIP)
    d = tempfile.mkdtemp(prefix="tiny_clip_tok_")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    _CLIP_DIR = d
    return d


CLIP_BOS_ID, CLIP_EOS_ID, CLIP_PAD_ID = 512, 513, 513


def _clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_clip_tokenizer_dir(), model_max_length=model_max_length)


def _clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    kw = dict(
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_PAD_ID,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )
    kw.update(overrides)
    return CLIPTextConfig(**kw)


def _byte_bpe_tokenizer(
    specials: list[str],
    *,
    tokenizer_cls=None,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
    prepend: tuple[str, ...] = (),
    append: tuple[str, ...] = (),
    model_max_length: int = 512,
    padding_side: str = "right",
    **init_kwargs,
):
    """A byte-level BPE tokenizer with no merges (one token per UTF-8 byte) plus ``specials``.

    Specials get ids 0..len(specials)-1 and are matched whole in the text (chat templates spell
    them out); the 256 byte tokens follow, so any text encodes offline. ``prepend`` / ``append``
    special tokens are added around every sequence when ``add_special_tokens=True`` (bos, eos,
    GLM's "[gMASK]<sop>"). The ``tokenizers`` object is wrapped in ``tokenizer_cls`` (default the
    generic ``PreTrainedTokenizerFast``, which reloads from disk unchanged).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(specials)}
    for c in _bytes_to_unicode().values():
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if prepend or append:
        single = " ".join([*prepend, "$A", *append])
        pair = " ".join([*prepend, "$A", *append, "$B", *append])
        used = dict.fromkeys([*prepend, *append])
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in used]
        )
    kw = dict(model_max_length=model_max_length, padding_side=padding_side)
    for key, val in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
        if val is not None:
            kw[key] = val
    kw.update(init_kwargs)
    cls = tokenizer_cls or PreTrainedTokenizerFast
    return cls(tokenizer_object=tok, **kw)


def _t5_tokenizer(model_max_length: int = 512):
    """T5-like: <pad>=0, </s>=1, <unk>=2, eos appended."""
    return _byte_bpe_tokenizer(
        ["<pad>", "</s>", "<unk>"],
        eos="</s>",
        append=("</s>",),
        pad="<pad>",
        unk="<unk>",
        model_max_length=model_max_length,
    )


def _t5_encoder(d_model: int = 32, num_layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=1000,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _finish(pipe: DiffusionPipeline, default_size: int | None = None) -> DiffusionPipeline:
    """CPU, float32, eval mode, no progress bar.

    ``default_size``: for pipelines whose default resolution is the hard-coded instance
    attribute ``default_sample_size`` (Flux, Flux.2, Qwen-Image: 128 latent px), set it so that a
    call without height/width generates ``default_size`` px (not kept by save_pretrained).
    """
    if default_size is not None:
        pipe.default_sample_size = default_size // pipe.vae_scale_factor
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.to("cpu")
            if any(p.dtype != torch.float32 for p in comp.parameters() if p.is_floating_point()):
                comp.to(torch.float32)
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.x / 2.x
# --------------------------------------------------------------------------------------------


def _sd_components(prediction_type: str = "epsilon", time_cond_proj_dim=None, scheduler=None):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        time_cond_proj_dim=time_cond_proj_dim,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    if scheduler is None:
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        _clip_text_config(intermediate_size=64, num_attention_heads=8, num_hidden_layers=3, hidden_act="quick_gelu")
    )
    return dict(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_sd() -> DiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    return _finish(StableDiffusionPipeline(**_sd_components()))


def build_sd_vpred() -> DiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    return _finish(StableDiffusionPipeline(**_sd_components(prediction_type="v_prediction")))


# --------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------


def build_sdxl() -> DiffusionPipeline:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config())
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Latent Consistency Model
# --------------------------------------------------------------------------------------------


def build_lcm() -> DiffusionPipeline:
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    comps = _sd_components(time_cond_proj_dim=32, scheduler=scheduler)
    return _finish(LatentConsistencyModelPipeline(**comps))


# --------------------------------------------------------------------------------------------
# Stable Diffusion 3
# --------------------------------------------------------------------------------------------


def _flow_vae(latent_channels: int, n_blocks: int = 2, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,) * n_blocks,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        **kw,
    )


def build_sd3() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config())
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config())
    text_encoder_3 = _t5_encoder(d_model=32)
    vae = _flow_vae(latent_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Flux
# --------------------------------------------------------------------------------------------


def build_flux() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config())
    text_encoder_2 = _t5_encoder(d_model=32)
    vae = _flow_vae(latent_channels=4)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe, default_size=64)


# --------------------------------------------------------------------------------------------
# Flux.2 (dev: Mistral-3 text encoder; klein: Qwen-3 text encoder)
# --------------------------------------------------------------------------------------------

# A Mistral-style chat template; content may be a string or a list of {"type": "text"} parts.
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)

# A ChatML template (Qwen); enable_thinking=False adds the empty think block as Qwen3 does.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
]


def _qwen_tokenizer(model_max_length: int = 32768):
    """Qwen2-like: <|endoftext|> is pad (and eos for base models), no bos, ChatML template."""
    from transformers import Qwen2TokenizerFast

    return _byte_bpe_tokenizer(
        _QWEN_SPECIALS,
        tokenizer_cls=Qwen2TokenizerFast,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        model_max_length=model_max_length,
        chat_template=_CHATML_TEMPLATE,
    )


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    return AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _flux2_transformer(joint_attention_dim: int, guidance_embeds: bool = True):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2 patchify
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,
    )


def _mistral3_config(num_hidden_layers: int = 30):
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": 1000,
            "hidden_size": 16,
            "intermediate_size": 37,
            "max_position_embeddings": 1024,
            "num_attention_heads": 4,
            "num_hidden_layers": num_hidden_layers,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 4,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=4,
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=1,
    )


def _mistral_tokenizer():
    return _byte_bpe_tokenizer(
        ["<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        model_max_length=1024,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def build_flux2() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3ForConditionalGeneration

    # The pipeline stacks text-encoder hidden states (10, 20, 30) by default: 30 tiny layers make
    # the default call work without a text_encoder_out_layers argument.
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(_mistral3_config())
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        # stands in for the Pixtral processor: the pipeline only calls apply_chat_template on text
        tokenizer=_mistral_tokenizer(),
        transformer=_flux2_transformer(joint_attention_dim=48),
    )
    return _finish(pipe, default_size=64)


def build_flux2_klein() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # default hidden_states_layers are (9, 18, 27): 27 tiny layers.
    config = Qwen3Config(
        intermediate_size=16,
        hidden_size=16,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=1000,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(config)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=_qwen_tokenizer(),
        transformer=_flux2_transformer(joint_attention_dim=48, guidance_embeds=False),
    )
    return _finish(pipe, default_size=64)


# --------------------------------------------------------------------------------------------
# PixArt-Sigma (resolution binning)
# --------------------------------------------------------------------------------------------


def build_pixart_sigma() -> DiffusionPipeline:
    """PixArt-Sigma with resolution binning left ON (the pipeline's default).

    transformer.sample_size=32 selects the 256-px bin table: a 64 x 64 request is generated at
    256 x 256 (latents 32 x 32 through a 4-block VAE, scale factor 8) and resized back to 64 x 64.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(d_model=32),
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Sana (resolution binning, DC-AE, Gemma-2)
# --------------------------------------------------------------------------------------------


def _gemma_tokenizer(model_max_length: int = 8192):
    """Gemma-like: <pad>=0, <eos>=1, <bos>=2, <unk>=3, bos prepended.

    Wrapped in the generic ``PreTrainedTokenizerFast``: transformers 5's ``GemmaTokenizer``
    rebuilds its own SentencePiece-style normalizer when reloaded from disk, which breaks this
    byte-level vocab after ``save_pretrained`` / ``from_pretrained``.
    """
    return _byte_bpe_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        prepend=("<bos>",),
        pad="<pad>",
        unk="<unk>",
        model_max_length=model_max_length,
    )


def _gemma2_model(hidden_size: int = 8, num_layers: int = 1):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    cfg = Gemma2Config(
        head_dim=16,
        hidden_size=hidden_size,
        initializer_range=0.02,
        intermediate_size=64,
        max_position_embeddings=8192,
        num_attention_heads=2,
        num_hidden_layers=num_layers,
        num_key_value_heads=2,
        vocab_size=300,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    return Gemma2Model(cfg)


def build_sana() -> DiffusionPipeline:
    """Sana with resolution binning left ON (the pipeline's default).

    transformer.sample_size=16 selects the 512-px bin table: a 64 x 64 request is generated at
    512 x 512 through a 6-stage DC-AE (scale factor 32, latents 16 x 16) and resized back.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=16,
    )
    n = 6
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * (n - 1) + ("EfficientViTBlock",),
        decoder_block_types=("ResBlock",) * (n - 1) + ("EfficientViTBlock",),
        encoder_block_out_channels=(4,) * (n - 1) + (8,),
        decoder_block_out_channels=(4,) * (n - 1) + (8,),
        encoder_qkv_multiscales=((),) * (n - 1) + ((5,),),
        decoder_qkv_multiscales=((),) * (n - 1) + ((5,),),
        encoder_layers_per_block=(1,) * n,
        decoder_layers_per_block=(1,) * n,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    pipe = SanaPipeline(
        tokenizer=_gemma_tokenizer(),
        text_encoder=_gemma2_model(hidden_size=8),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Kandinsky 2.2 decoder (image embeddings, no text)
# --------------------------------------------------------------------------------------------

KANDINSKY_EMBED_DIM = 32


def build_kandinsky22() -> DiffusionPipeline:
    """The Kandinsky 2.2 *decoder*: conditioned on CLIP image embeddings, not on text.

    Call it with ``image_embeds`` / ``negative_image_embeds`` of shape (B, 32); see
    ``PROMPT_CALL_KWARGS["kandinsky22"]``. (The prior that maps text to image embeddings needs
    CLIP text+vision models and an image processor; the combined pipeline routes ``latents=`` to
    the prior, so the decoder is the one that takes the initial noise.)
    """
    from diffusers import DDIMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # predicts mean and variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=KANDINSKY_EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    torch.manual_seed(0)
    movq = VQModel(  # SpatialNorm hard-codes 32 groups: channels must be multiples of 32
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    return _finish(KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq))


def _kandinsky_embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, KANDINSKY_EMBED_DIM, generator=torch.Generator("cpu").manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Qwen-Image (Qwen2.5-VL text encoder, packed latents)
# --------------------------------------------------------------------------------------------


def build_qwenimage() -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    z_dim = 4
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 6,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": 1000,
            "bos_token_id": 0,  # ids of the tiny Qwen tokenizer's <|endoftext|>, <|im_end|>
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=1000,
        vision_start_token_id=997,
        vision_end_token_id=998,
        vision_token_id=999,
        image_token_id=996,
        video_token_id=995,
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_qwen_tokenizer(),
        transformer=transformer,
    )
    return _finish(pipe, default_size=64)


# --------------------------------------------------------------------------------------------
# AuraFlow (UMT5)
# --------------------------------------------------------------------------------------------


def build_auraflow() -> DiffusionPipeline:
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=256,
    )
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=1000,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=32,
    )
    pipe = AuraFlowPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Lumina-Image 2.0 (Gemma)
# --------------------------------------------------------------------------------------------


def build_lumina2() -> DiffusionPipeline:
    """Lumina2Pipeline. Its prompt is prefixed with a system prompt (165 byte tokens) and
    truncated at max_sequence_length=256 tokens; with this byte-level tokenizer, prompts longer
    than about 90 bytes are cut (pass a larger max_sequence_length, <= 512, for long prompts)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=8,  # only sets the default size: 8 * 8 = 64 px
        patch_size=2,
        in_channels=4,
        hidden_size=8,
        num_layers=2,
        num_attention_heads=1,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=8,
    )
    # Lumina2Pipeline hard-codes vae_scale_factor = 8: the VAE must downsample 8x (4 blocks).
    vae = _flow_vae(latent_channels=4, n_blocks=4)
    torch.manual_seed(0)
    text_encoder = GemmaForCausalLM(
        GemmaConfig(
            head_dim=2,
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            num_key_value_heads=4,
            vocab_size=300,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    )
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_gemma_tokenizer(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# CogView4 (GLM)
# --------------------------------------------------------------------------------------------


def build_cogview4() -> DiffusionPipeline:
    from diffusers import AutoencoderKL, CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        sample_size=32,  # only sets the default size: 32 * 2 = 64 px
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    torch.manual_seed(0)
    text_encoder = GlmForCausalLM(
        GlmConfig(
            hidden_size=32,
            intermediate_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            head_dim=8,
            vocab_size=1000,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    )
    # GLM-4 tokenizer: "[gMASK]<sop>" prefix, left padding (the pipeline also left-pads to 16).
    tokenizer = _byte_bpe_tokenizer(
        ["<|endoftext|>", "<|user|>", "[gMASK]", "<sop>"],
        pad="<|endoftext|>",
        eos="<|user|>",
        prepend=("[gMASK]", "<sop>"),
        model_max_length=1024,
        padding_side="left",
    )
    pipe = CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Families added for issue 13: variants built from the components above, and families with
# several text encoders, float masks or variable-length embeddings
# --------------------------------------------------------------------------------------------


def _four_block_vae(latent_channels: int = 4, **kw):
    """AutoencoderKL with VAE scale factor 8 (4 blocks of 4 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        **kw,
    )


def build_pixart_alpha() -> DiffusionPipeline:
    """PixArt-Alpha on PixArt-Sigma's components and DDIM: binning ON, 64 x 64 generated at 256 x 256."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    # DDIM: with one step PixArt-Alpha reads the scheduler's predicted original sample, which DPM-Solver lacks
    components = {**build_pixart_sigma().components, "scheduler": DDIMScheduler()}
    return _finish(PixArtAlphaPipeline(**components))


def build_sd_pag() -> DiffusionPipeline:
    from diffusers import StableDiffusionPAGPipeline

    return _finish(StableDiffusionPAGPipeline(**_sd_components(), pag_applied_layers=["mid"]))


def build_sdxl_pag() -> DiffusionPipeline:
    from diffusers import StableDiffusionXLPAGPipeline

    return _finish(StableDiffusionXLPAGPipeline(**build_sdxl().components, pag_applied_layers=["mid"]))


def build_pixart_sigma_pag() -> DiffusionPipeline:
    from diffusers import PixArtSigmaPAGPipeline

    return _finish(PixArtSigmaPAGPipeline(**build_pixart_sigma().components))  # PAG on its default "blocks.1"


def build_flux_kontext() -> DiffusionPipeline:
    """Flux Kontext on Flux's components; text-to-image without a reference image, or with one (``image=``)."""
    from diffusers import FluxKontextPipeline

    return _finish(FluxKontextPipeline(**build_flux().components), default_size=64)


def _sd_controlnet_model():
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    return ControlNetModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=2,
    )


def build_controlnet_sd() -> DiffusionPipeline:
    """SD 1.x with a ControlNet: needs its conditioning ``image=`` (64 x 64) on every call."""
    from diffusers import StableDiffusionControlNetPipeline

    return _finish(StableDiffusionControlNetPipeline(**_sd_components(), controlnet=_sd_controlnet_model()))


def build_bria() -> DiffusionPipeline:
    """Bria 3.2: T5 only, packed latents like Flux."""
    from diffusers import BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.bria import BriaPipeline

    torch.manual_seed(0)
    transformer = BriaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=None,
        axes_dims_rope=[0, 4, 4],
    )
    pipe = BriaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=4),
        text_encoder=_t5_encoder(d_model=32),
        tokenizer=_t5_tokenizer(),
    )
    return _finish(pipe, default_size=64)


def build_chroma() -> DiffusionPipeline:
    """Chroma: T5 only, packed latents, a FLOAT attention mask."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    pipe = ChromaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=4),
        text_encoder=_t5_encoder(d_model=32),
        tokenizer=_t5_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe, default_size=64)


def _bert_tokenizer_and_model(hidden_size: int = 32):
    """A BERT WordPiece tokenizer over single characters (offline vocab file) and a tiny BertModel."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tempfile.mkdtemp(prefix="tiny_bert_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    characters = [chr(c) for c in range(33, 127)]
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters]) + "\n")
    tokenizer = BertTokenizer.from_pretrained(directory, model_max_length=512)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(vocab_size=128, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=37, max_position_embeddings=512),
        add_pooling_layer=False,
    )
    return tokenizer, model


def build_hunyuandit() -> DiffusionPipeline:
    """HunyuanDiT: BERT + T5, each with its own embeddings and mask (``prompt_embeds_2``). Its
    resolution binning maps 64 x 64 to 1024 x 1024: call it with ``use_resolution_binning=False``
    (``PROMPT_CALL_KWARGS``)."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        cross_attention_dim=32,
        cross_attention_dim_t5=32,
        pooled_projection_dim=16,
        hidden_size=24,
        activation_fn="gelu-approximate",
    )
    tokenizer, text_encoder = _bert_tokenizer_and_model(hidden_size=32)
    pipe = HunyuanDiTPipeline(
        transformer=transformer,
        vae=_four_block_vae(),
        scheduler=DDPMScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(d_model=32),
        tokenizer_2=_t5_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def build_hidream() -> DiffusionPipeline:
    """HiDream-I1: CLIP x 2 (pooled), T5 and Llama-3 (per-layer states: (layers, batch, tokens, dim)).
    It rescales every request to the area of ``default_sample_size`` (set here to 64 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 16],
        text_emb_dim=64,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=(0, 1),
    )
    clip_config = _clip_text_config(max_position_embeddings=128)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(0)
    text_encoder_4 = LlamaForCausalLM(
        LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    )
    llama_tokenizer = _byte_bpe_tokenizer(["<pad>", "<s>", "</s>"], bos="<s>", eos="</s>", pad="<pad>",
                                          prepend=("<s>",), model_max_length=128)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_four_block_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(d_model=32),
        tokenizer_3=_t5_tokenizer(),
        text_encoder_4=text_encoder_4,
        tokenizer_4=llama_tokenizer,
        transformer=transformer,
    )
    return _finish(pipe, default_size=64)  # it rescales every request to the area of its default size


def build_zimage() -> DiffusionPipeline:
    """Z-Image: Qwen-3; ``encode_prompt`` returns a LIST of variable-length embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: fixed so that outputs are deterministic
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(0)
    text_encoder = Qwen3Model(
        Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)
    )
    pipe = ZImagePipeline(
        transformer=transformer,
        vae=_zimage_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=_qwen_tokenizer(),
    )
    return _finish(pipe)


def _zimage_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[16, 16],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def build_sana_sprint() -> DiffusionPipeline:
    """SANA-Sprint (timestep-distilled, guidance embedded) on Sana's text encoder and DC-AE. It bins only
    at 1024 px (``sample_size=32``): call it with ``use_resolution_binning=False`` and, for other than 2
    steps, ``intermediate_timesteps=None`` (``PROMPT_CALL_KWARGS``)."""
    from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

    sana = build_sana()
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
        qk_norm="rms_norm_across_heads",
        guidance_embeds=True,
    )
    pipe = SanaSprintPipeline(
        tokenizer=sana.tokenizer,
        text_encoder=sana.text_encoder,
        vae=sana.vae,
        transformer=transformer,
        scheduler=SCMScheduler(),
    )
    return _finish(pipe)


def build_cogview3plus() -> DiffusionPipeline:
    """CogView3-Plus: T5; a 4-block VAE (scale factor 8) keeps 64 px within the tiny positional table."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(0)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=2,
        pos_embed_max_size=8,
        sample_size=8,
    )
    pipe = CogView3PlusPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(d_model=32),
        vae=_four_block_vae(),
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    return _finish(pipe)


def build_lumina() -> DiffusionPipeline:
    """Lumina-Next (Lumina 1): Gemma, a 4-block VAE (scale factor 8)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline

    lumina2 = build_lumina2()
    torch.manual_seed(0)
    transformer = LuminaNextDiT2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        learn_sigma=True,
        qk_norm=True,
        cross_attention_dim=8,
        scaling_factor=1.0,
    )
    with torch.no_grad():  # created with torch.empty: fixed so that builds are identical
        transformer.pad_token.copy_(torch.ones_like(transformer.pad_token))
    pipe = LuminaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_four_block_vae(),
        text_encoder=lumina2.text_encoder,
        tokenizer=lumina2.tokenizer,
    )
    return _finish(pipe)


_CHATGLM_DIR: str | None = None


def _chatglm_tokenizer():
    """ChatGLM's tokenizer (Kolors) on a sentencepiece model trained offline once per process (again if removed):
    a character model with byte fallback (any text encodes), 276 pieces + ChatGLM's 9 specials; the directory is
    deleted at exit. Needs ``sentencepiece`` (the ``test`` extra)."""
    import sentencepiece
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    global _CHATGLM_DIR
    if _CHATGLM_DIR is None or not os.path.isfile(os.path.join(_CHATGLM_DIR, "tokenizer.model")):
        d = tempfile.mkdtemp(prefix="tiny_chatglm_tok_")
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        corpus = os.path.join(d, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("a red circle\na blue square on the left\na cat\n")
        sentencepiece.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(d, "tokenizer"), model_type="char", vocab_size=300,
            hard_vocab_limit=False, byte_fallback=True, num_threads=1, minloglevel=2,
        )
        _CHATGLM_DIR = d
    return ChatGLMTokenizer(vocab_file=os.path.join(_CHATGLM_DIR, "tokenizer.model"))


def build_kolors() -> DiffusionPipeline:
    """Kolors: SDXL's tiny UNet and VAE (diffusers' test) with a ChatGLM-3 text encoder (2 layers, hidden size 8) built
    from its config; its prompt embeddings are the penultimate hidden states (256 tokens), its pooled embedding the
    last token's final state."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=56,  # 6 * 8 + 8
        cross_attention_dim=8,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    tokenizer = _chatglm_tokenizer()
    torch.manual_seed(0)
    config = ChatGLMConfig(
        num_layers=2,
        padded_vocab_size=tokenizer.vocab_size,
        hidden_size=8,
        ffn_hidden_size=16,
        kv_channels=4,
        num_attention_heads=2,
        seq_length=256,
        multi_query_attention=True,
        multi_query_group_num=1,
        original_rope=True,
    )
    text_encoder = ChatGLMModel(config, empty_init=False)  # the default skips initialisation
    with torch.no_grad():  # RMSNorm weights are created with torch.empty: fixed so that builds are identical
        for module in text_encoder.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    pipe = KolorsPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Pipelines that pass variables to encode_prompt, encode negative
# prompts in a call of their own, or take noise with a frame axis
# --------------------------------------------------------------------------------------------


def _qwen25_vl_encoder(hidden_size: int = 16):
    """A tiny Qwen2.5-VL (the text encoder of Qwen-Image, HunyuanImage 2.1, Kandinsky 5, ...) over the tiny Qwen
    tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2] if hidden_size == 16 else [2, 2, 4], "rope_type": "default",
                             "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": 1000,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden_size},
        hidden_size=hidden_size,
        vocab_size=1000,
        vision_start_token_id=5,  # the tiny Qwen tokenizer's <|vision_start|>, <|vision_end|>, <|image_pad|>
        vision_end_token_id=6,
        vision_token_id=7,
        image_token_id=7,
        video_token_id=995,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_hunyuanimage() -> DiffusionPipeline:
    """HunyuanImage 2.1: Qwen2.5-VL + ByT5 (glyphs), guidance by AdaptiveProjectedMixGuidance; its ``encode_prompt``
    takes a ``batch_size`` (a variable at the call site) and encodes the negative prompt in a call of its own."""
    from diffusers import (
        AdaptiveProjectedMixGuidance,
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1),
        guidance_embeds=False,
        text_embed_dim=32,
        text_embed_2_dim=32,
        rope_axes_dim=(4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        sample_size=128,
    )
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(
        T5Config(d_model=32, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                 relative_attention_max_distance=32, vocab_size=384, feed_forward_proj="gated-gelu",
                 dense_act_fn="gelu_new", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    )
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        vae=vae,
        text_encoder=_qwen25_vl_encoder(hidden_size=32),
        tokenizer=_qwen_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=ByT5Tokenizer(),  # byte-level: needs no vocabulary file
        transformer=transformer,
        guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2),
        ocr_guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=3),
    )
    return _finish(pipe)


def _unzeroed(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its zero-initialised weights (adaLN gates, output projections) drawn small and seeded instead,
    so that the prompt reaches the image of an untrained tiny model."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module


def _movq_x8():
    """A MoVQ with scale factor 8 (4 blocks; SpatialNorm hard-codes 32 groups: channels are multiples of 32)."""
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(
        block_out_channels=[32, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        vq_embed_dim=4,
    )


def build_kandinsky3() -> DiffusionPipeline:
    """Kandinsky 3: T5, a MoVQ decoder (the pipeline hard-codes its scale factor 8); ``__call__`` sets ``cut_context = True`` and passes it to ``encode_prompt`` as a
    variable (the embeddings are cut to the longest prompt)."""
    from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet

    torch.manual_seed(0)
    unet = Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=4,
        groups=2,
        attention_head_dim=4,
        layers_per_block=3,
        block_out_channels=(32, 64),
        cross_attention_dim=4,
        encoder_hid_dim=32,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, thresholding=False)
    pipe = Kandinsky3Pipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5_encoder(d_model=32), unet=unet,
                              scheduler=scheduler, movq=_movq_x8())
    return _finish(pipe)


class PassingSafetyChecker(ModelMixin, ConfigMixin):
    """Stands in for Cosmos' guardrail (the ``cosmos_guardrail`` package, gigabytes of models): passes everything. A
    diffusers model, so that the pipeline saves and reloads (with this module imported)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("placeholder", torch.zeros(1))  # a model needs a tensor to have a device and a file

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def build_cosmos2() -> DiffusionPipeline:
    """Cosmos 2 text-to-image: T5, a Wan VAE; its noise is a one-frame 5-D latent (B, 16, 1, h, w), scaled by the
    scheduler's ``sigma_max``."""
    from diffusers import AutoencoderKLWan, Cosmos2TextToImagePipeline, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = CosmosTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,  # True resizes the mask with torchvision, which the tests do not install
        extra_pos_embed_type="learnable",
    )
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = Cosmos2TextToImagePipeline(
        text_encoder=_t5_encoder(d_model=32),
        tokenizer=_t5_tokenizer(),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=PassingSafetyChecker(),
    )
    return _finish(pipe)


def _variant(pipeline_class, components: dict, **extra) -> DiffusionPipeline:
    """``pipeline_class`` on the components of another family (those its ``__init__`` takes) and ``extra``."""
    import inspect

    taken = inspect.signature(pipeline_class.__init__).parameters
    return pipeline_class(**{name: value for name, value in components.items() if name in taken}, **extra)


def build_sd3_pag() -> DiffusionPipeline:
    """SD3 with perturbed-attention guidance on its default layer, "blocks.1" (so a transformer of 2 blocks: the
    layers are not saved with the pipeline)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3PAGPipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return _finish(_variant(StableDiffusion3PAGPipeline, {**build_sd3().components, "transformer": transformer}))


def build_sd3_controlnet() -> DiffusionPipeline:
    """SD3 with a ControlNet: needs its ``control_image=`` (64 x 64) on every call."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    torch.manual_seed(0)
    controlnet = SD3ControlNetModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return _finish(_variant(StableDiffusion3ControlNetPipeline, build_sd3().components, controlnet=controlnet))


def build_flux_controlnet() -> DiffusionPipeline:
    """Flux with a ControlNet: needs its ``control_image=`` (64 x 64) on every call."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    torch.manual_seed(0)
    controlnet = FluxControlNetModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return _finish(FluxControlNetPipeline(**build_flux().components, controlnet=controlnet), default_size=64)


def build_flux_control() -> DiffusionPipeline:
    """Flux Control (Canny/Depth): the control image's latents are concatenated to the noise, so the transformer reads
    twice the packed channels; needs its ``control_image=`` (64 x 64) on every call."""
    from diffusers import FluxControlPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=32,  # packed noise (4 latent channels x 2 x 2) and packed control latents
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return _finish(_variant(FluxControlPipeline, {**build_flux().components, "transformer": transformer}), default_size=64)


def build_kandinsky5() -> DiffusionPipeline:
    """Kandinsky 5 text-to-image: Qwen2.5-VL + CLIP (pooled); channels-last noise with a frame axis (B, 1, h, w, 16);
    cumulative sequence lengths (``prompt_cu_seqlens``) beside the embeddings. It snaps every request to one of
    ``resolutions`` (an instance attribute, set here to 64 px as in diffusers' test)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Kandinsky5T2IPipeline, Kandinsky5Transformer3DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        act_fn="silu",
        block_out_channels=[32, 32, 32, 64],  # scale factor 8, which the pipeline hard-codes
        down_block_types=["DownEncoderBlock2D"] * 4,
        force_upcast=True,
        in_channels=3,
        latent_channels=16,
        layers_per_block=1,
        mid_block_add_attention=False,
        norm_num_groups=32,
        out_channels=3,
        sample_size=128,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        up_block_types=["UpDecoderBlock2D"] * 4,
        use_post_quant_conv=False,
        use_quant_conv=False,
    )
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModel(_clip_text_config(hidden_size=16, intermediate_size=16, num_attention_heads=2,
                                                     num_hidden_layers=2, projection_dim=16))
    torch.manual_seed(0)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=16,
        in_text_dim=32,
        in_text_dim2=16,
        time_dim=16,
        out_visual_dim=16,
        patch_size=(1, 2, 2),
        model_dim=16,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(1, 1, 2),
        visual_cond=False,
        attention_type="regular",
    )
    pipe = Kandinsky5T2IPipeline(
        transformer=_unzeroed(transformer),
        vae=vae,
        text_encoder=_qwen25_vl_encoder(hidden_size=32),
        tokenizer=_qwen_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipe.resolutions = [(64, 64), (96, 64), (64, 96)]
    return _finish(pipe)


def _qwen3_model(hidden_size: int = 32, causal_lm: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=1000,
                         max_position_embeddings=1024)
    torch.manual_seed(0)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def build_ovis_image() -> DiffusionPipeline:
    """Ovis-Image: Qwen-3, packed latents like Flux."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    torch.manual_seed(0)
    transformer = OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2 packing
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    pipe = OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=4),
        text_encoder=_qwen3_model(hidden_size=32),
        tokenizer=_qwen_tokenizer(),
        transformer=_unzeroed(transformer),
    )
    return _finish(pipe, default_size=64)


class QwenTextProcessor(PreTrainedTokenizerFast):
    """Stands in for Qwen-Image 2.1's ``Qwen3VLProcessor`` (whose video processor needs torchvision, which the tests do
    not install): the text-to-image path calls it on text only, and reads its ``tokenizer``."""

    @property
    def tokenizer(self):
        return self

    def apply_chat_template(self, conversation, **kwargs):
        # a processor tokenizes a batch: one list of ids per conversation
        ids = super().apply_chat_template(conversation, **kwargs)
        return [ids] if kwargs.get("tokenize") and isinstance(conversation[0], dict) else ids


def _qwen_text_processor() -> QwenTextProcessor:
    tokenizer = _qwen_tokenizer()
    return QwenTextProcessor(tokenizer_object=tokenizer.backend_tokenizer, **{
        key: getattr(tokenizer, key) for key in ("eos_token", "pad_token", "chat_template", "model_max_length")
    })


def build_longcat_image() -> DiffusionPipeline:
    """LongCat-Image: Qwen2.5-VL, packed latents like Flux (16 latent channels, hard-coded). Call it with
    ``enable_prompt_rewrite=False``: its default rewrites the prompt with the text encoder. (Noise PPO refuses it:
    its ``prompt_embeds`` path fails in diffusers 0.42.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    torch.manual_seed(0)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2 x 2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = LongCatImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=16),
        text_encoder=_qwen25_vl_encoder(hidden_size=32),
        tokenizer=_qwen_tokenizer(),
        text_processor=_qwen_text_processor(),
        transformer=_unzeroed(transformer),
    )
    return _finish(pipe, default_size=64)


def build_ernie_image() -> DiffusionPipeline:
    """ERNIE-Image: Mistral-3 (its second-to-last hidden states, a LIST of variable-length embeddings), the Flux.2 VAE
    (patchified latents); it has no ``prepare_latents`` and draws its noise inline in ``__call__``. Its prompt enhancer
    (``pe``) is left out."""
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import Mistral3Model

    torch.manual_seed(0)
    transformer = ErnieImageTransformer2DModel(
        hidden_size=16,
        num_attention_heads=1,
        num_layers=1,
        ffn_hidden_size=16,
        in_channels=16,  # 4 latent channels x 2 x 2 patchify
        out_channels=16,
        patch_size=1,
        text_in_dim=16,
        rope_theta=256,
        rope_axes_dim=(8, 4, 4),
        eps=1e-6,
        qk_layernorm=True,
    )
    torch.manual_seed(0)
    text_encoder = Mistral3Model(_mistral3_config(num_hidden_layers=2))
    pipe = ErnieImagePipeline(
        transformer=_unzeroed(transformer),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=_mistral_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _finish(pipe)


def build_qwenimage21() -> DiffusionPipeline:
    """Qwen-Image 2.1: a Qwen3-VL text encoder read through its processor (a text-only stand-in here), a single-stream
    block-causal transformer, a 16x VAE; true CFG encodes the negative prompt in a call of its own."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline, QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=32,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )
    z_dim = 16
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    config = Qwen3VLConfig(
        text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                     "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
                       "deepstack_visual_indexes": [0], "num_position_embeddings": 16},
        image_token_id=7,  # the tiny Qwen tokenizer's <|image_pad|>, <|vision_start|>, <|vision_end|>
        video_token_id=995,
        vision_start_token_id=5,
        vision_end_token_id=6,
    )
    torch.manual_seed(0)
    text_encoder = Qwen3VLForConditionalGeneration(config)
    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        processor=_qwen_text_processor(),
        transformer=_unzeroed(transformer),
    )
    return _finish(pipe)


def build_bria_fibo() -> DiffusionPipeline:
    """Bria FIBO: SmolLM3 (its last two hidden states), a Wan VAE with 2 x 2 patches (scale factor 16); its ``__call__``
    takes the prompt only as text, no embeddings."""
    from diffusers import AutoencoderKLWan, BriaFiboPipeline, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    transformer = BriaFiboTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        text_encoder_dim=32,
        pooled_projection_dim=None,
        axes_dims_rope=[0, 4, 4],
    )
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, num_res_blocks=1, out_channels=12, patch_size=2,
                           scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
                           z_dim=16)
    torch.manual_seed(0)
    # an empty prompt is encoded as the id 128000 (the pipeline hard-codes SmolLM3's bos): the vocabulary reaches it
    text_encoder = SmolLM3ForCausalLM(SmolLM3Config(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128256,
                                                    max_position_embeddings=512))
    pipe = BriaFiboPipeline(
        transformer=_unzeroed(transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_t5_tokenizer(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------
# Variants built only for the coverage table (``python -m benchmarks.families``), not run by the
# tests: another pipeline class on the components of a tested family
# --------------------------------------------------------------------------------------------


def _sdxl_controlnet_model():
    from diffusers import ControlNetModel

    torch.manual_seed(0)  # one downsampling of the conditioning image, as the tiny VAE's
    return ControlNetModel.from_unet(build_sdxl().unet, conditioning_embedding_out_channels=(16, 32))


def build_flux2_klein_kv() -> DiffusionPipeline:
    from diffusers import Flux2KleinKVPipeline

    return _finish(_variant(Flux2KleinKVPipeline, build_flux2_klein().components, is_distilled=False), default_size=64)


def build_kolors_pag() -> DiffusionPipeline:
    from diffusers import KolorsPAGPipeline

    return _finish(_variant(KolorsPAGPipeline, build_kolors().components))


def build_hunyuandit_pag() -> DiffusionPipeline:
    from diffusers import HunyuanDiTPAGPipeline

    return _finish(_variant(HunyuanDiTPAGPipeline, build_hunyuandit().components))


def build_sana_pag() -> DiffusionPipeline:
    from diffusers import SanaPAGPipeline

    return _finish(_variant(SanaPAGPipeline, build_sana().components))


def build_sd_controlnet_pag() -> DiffusionPipeline:
    from diffusers import StableDiffusionControlNetPAGPipeline

    return _finish(_variant(StableDiffusionControlNetPAGPipeline, _sd_components(), controlnet=_sd_controlnet_model()))


def build_sdxl_controlnet() -> DiffusionPipeline:
    from diffusers import StableDiffusionXLControlNetPipeline

    return _finish(_variant(StableDiffusionXLControlNetPipeline, build_sdxl().components, controlnet=_sdxl_controlnet_model()))


def build_sdxl_controlnet_pag() -> DiffusionPipeline:
    from diffusers import StableDiffusionXLControlNetPAGPipeline

    components = build_sdxl().components
    return _finish(_variant(StableDiffusionXLControlNetPAGPipeline, components, controlnet=_sdxl_controlnet_model()))


def build_sd_sag() -> DiffusionPipeline:
    from diffusers import StableDiffusionSAGPipeline

    return _finish(_variant(StableDiffusionSAGPipeline, _sd_components()))


def build_sd_model_editing() -> DiffusionPipeline:
    from diffusers import StableDiffusionModelEditingPipeline

    return _finish(_variant(StableDiffusionModelEditingPipeline, _sd_components()))


def build_sd_attend_and_excite() -> DiffusionPipeline:
    from diffusers import StableDiffusionAttendAndExcitePipeline

    return _finish(_variant(StableDiffusionAttendAndExcitePipeline, _sd_components()))


def build_sd_panorama() -> DiffusionPipeline:
    from diffusers import StableDiffusionPanoramaPipeline

    return _finish(_variant(StableDiffusionPanoramaPipeline, _sd_components()))


def build_sd_paradigms() -> DiffusionPipeline:
    from diffusers import DDPMParallelScheduler, StableDiffusionParadigmsPipeline

    components = {**_sd_components(), "scheduler": DDPMParallelScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}
    return _finish(_variant(StableDiffusionParadigmsPipeline, components))


def build_cogview4_control() -> DiffusionPipeline:
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel

    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=8,  # the noise and the control image's latents
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
    )
    return _finish(_variant(CogView4ControlPipeline, {**build_cogview4().components, "transformer": transformer}))


def _control_image(size: int = 64):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

FAMILIES: dict[str, Callable[[], DiffusionPipeline]] = {
    "sd": build_sd,
    "sd_vpred": build_sd_vpred,
    "sdxl": build_sdxl,
    "lcm": build_lcm,
    "sd3": build_sd3,
    "flux": build_flux,
    "flux2": build_flux2,
    "flux2_klein": build_flux2_klein,
    "pixart_sigma": build_pixart_sigma,
    "sana": build_sana,
    "kandinsky22": build_kandinsky22,
    "qwenimage": build_qwenimage,
    "auraflow": build_auraflow,
    "lumina2": build_lumina2,
    "cogview4": build_cogview4,
    "pixart_alpha": build_pixart_alpha,
    "sd_pag": build_sd_pag,
    "sdxl_pag": build_sdxl_pag,
    "pixart_sigma_pag": build_pixart_sigma_pag,
    "flux_kontext": build_flux_kontext,
    "controlnet_sd": build_controlnet_sd,
    "bria": build_bria,
    "chroma": build_chroma,
    "hunyuandit": build_hunyuandit,
    "hidream": build_hidream,
    "zimage": build_zimage,
    "sana_sprint": build_sana_sprint,
    "cogview3plus": build_cogview3plus,
    "lumina": build_lumina,
    "kolors": build_kolors,
    "hunyuanimage": build_hunyuanimage,
    "kandinsky3": build_kandinsky3,
    "cosmos2": build_cosmos2,
    "sd3_pag": build_sd3_pag,
    "sd3_controlnet": build_sd3_controlnet,
    "flux_controlnet": build_flux_controlnet,
    "flux_control": build_flux_control,
    "kandinsky5": build_kandinsky5,
    "ovis_image": build_ovis_image,
    "longcat_image": build_longcat_image,
    "ernie_image": build_ernie_image,
    "qwenimage21": build_qwenimage21,
    "bria_fibo": build_bria_fibo,
}

# Built only for the coverage table (benchmarks/families.py): other pipeline classes on a tested family's components.
MORE_FAMILIES: dict[str, Callable[[], DiffusionPipeline]] = {
    "flux2_klein_kv": build_flux2_klein_kv,
    "kolors_pag": build_kolors_pag,
    "hunyuandit_pag": build_hunyuandit_pag,
    "sana_pag": build_sana_pag,
    "sd_controlnet_pag": build_sd_controlnet_pag,
    "sdxl_controlnet": build_sdxl_controlnet,
    "sdxl_controlnet_pag": build_sdxl_controlnet_pag,
    "sd_sag": build_sd_sag,
    "sd_model_editing": build_sd_model_editing,
    "sd_attend_and_excite": build_sd_attend_and_excite,
    "sd_panorama": build_sd_panorama,
    "sd_paradigms": build_sd_paradigms,
    "cogview4_control": build_cogview4_control,
}

MORE_CALL_KWARGS: dict[str, dict] = {
    "hunyuandit_pag": {"use_resolution_binning": False},
    "sd_controlnet_pag": {"image": _control_image()},
    "sdxl_controlnet": {"image": _control_image()},
    "sdxl_controlnet_pag": {"image": _control_image()},
    "sd_attend_and_excite": {"token_indices": [2]},
    "cogview4_control": {"control_image": _control_image()},
}

DEFAULT_SIZE: dict[str, tuple[int, int]] = {name: (64, 64) for name in FAMILIES}

EXPECTED_LATENT_SHAPE: dict[str, tuple[int, ...]] = {
    "sd": (1, 4, 32, 32),  # VAE scale factor 2
    "sd_vpred": (1, 4, 32, 32),
    "sdxl": (1, 4, 32, 32),
    "lcm": (1, 4, 32, 32),
    "sd3": (1, 4, 32, 32),  # 4-D, unpacked
    "flux": (1, 256, 16),  # packed: (B, (H/vsf/2) * (W/vsf/2), C * 4)
    "flux2": (1, 16, 16, 16),  # patchified 4-D: (B, C * 4, H/vsf/2, W/vsf/2)
    "flux2_klein": (1, 16, 16, 16),
    "pixart_sigma": (1, 4, 32, 32),  # 64 x 64 is binned to 256 x 256, scale factor 8
    "sana": (1, 4, 16, 16),  # 64 x 64 is binned to 512 x 512, scale factor 32
    "kandinsky22": (1, 4, 32, 32),  # MoVQ with 2 blocks: 64 // 2**2 * 2
    "qwenimage": (1, 64, 16),  # packed: (B, (H/4/2) * (W/4/2), C * 4); VAE scale factor 4
    "auraflow": (1, 4, 32, 32),
    "lumina2": (1, 4, 8, 8),  # pipeline hard-codes VAE scale factor 8
    "cogview4": (1, 4, 32, 32),
    "pixart_alpha": (1, 4, 32, 32),  # binned to 256 x 256 like PixArt-Sigma
    "sd_pag": (1, 4, 32, 32),
    "sdxl_pag": (1, 4, 32, 32),
    "pixart_sigma_pag": (1, 4, 32, 32),
    "flux_kontext": (1, 256, 16),  # packed like Flux
    "controlnet_sd": (1, 4, 32, 32),
    "bria": (1, 256, 16),  # packed like Flux
    "chroma": (1, 256, 16),  # packed like Flux
    "hunyuandit": (1, 4, 8, 8),  # VAE scale factor 8, binning off
    "hidream": (1, 4, 8, 8),  # VAE scale factor 8
    "zimage": (1, 16, 32, 32),  # VAE scale factor 2
    "sana_sprint": (1, 4, 2, 2),  # binning off, DC-AE scale factor 32
    "cogview3plus": (1, 4, 8, 8),  # VAE scale factor 8
    "lumina": (1, 4, 8, 8),  # VAE scale factor 8
    "kolors": (1, 4, 32, 32),  # SDXL's VAE (scale factor 2)
    "hunyuanimage": (1, 4, 8, 8),  # VAE scale factor 8
    "kandinsky3": (1, 4, 8, 8),  # the pipeline hard-codes scale factor 8
    "cosmos2": (1, 16, 1, 8, 8),  # a frame axis: (B, C, 1, h, w); Wan VAE scale factor 8
    "sd3_pag": (1, 4, 32, 32),
    "sd3_controlnet": (1, 4, 32, 32),
    "flux_controlnet": (1, 256, 16),  # packed like Flux
    "flux_control": (1, 256, 16),  # packed like Flux
    "kandinsky5": (1, 1, 8, 8, 16),  # channels last, with a frame axis: (B, 1, h, w, C); scale factor 8
    "ovis_image": (1, 256, 16),  # packed like Flux
    "longcat_image": (1, 256, 64),  # packed like Flux, 16 latent channels
    "ernie_image": (1, 16, 16, 16),  # patchified 4-D like Flux.2
    "qwenimage21": (1, 16, 16),  # packed without patches: (B, h * w, C); scale factor 16
    "bria_fibo": (1, 16, 16),  # packed without patches: (B, h * w, C); scale factor 16
}

PROMPT_CALL_KWARGS: dict[str, dict] = {
    # the decoder takes CLIP image embeddings (B, 32) instead of a prompt
    "kandinsky22": {"image_embeds": _kandinsky_embeds(0), "negative_image_embeds": _kandinsky_embeds(1)},
    # binning would generate 64 x 64 at 1024 x 1024
    "hunyuandit": {"use_resolution_binning": False},
    # SCM's default intermediate timestep works with exactly 2 steps only
    "sana_sprint": {"use_resolution_binning": False, "intermediate_timesteps": None},
    # the conditioning image, and Kontext's area (default 1 megapixel: the requested 64 x 64 is rescaled to it)
    "controlnet_sd": {"image": _control_image()},
    "flux_kontext": {"max_area": 64 * 64},
    "sd3_controlnet": {"control_image": _control_image()},
    "flux_controlnet": {"control_image": _control_image()},
    "flux_control": {"control_image": _control_image()},
    # its default rewrites the prompt with its text encoder (Noise PPO conditions on the prompt's embeddings)
    "longcat_image": {"enable_prompt_rewrite": False},
}

# Families that take a text ``prompt=`` (and whose ``encode_prompt`` takes text).
TEXT_PROMPT_FAMILIES: tuple[str, ...] = tuple(n for n in FAMILIES if n != "kandinsky22")

# Families whose output_type="pt" images are the raw decoder output in about [-1, 1], neither
# rescaled nor clamped (KandinskyV22Pipeline rescales only for "np"/"pil"). Map with
# (x * 0.5 + 0.5).clamp(0, 1) to compare with other families.
RAW_PT_OUTPUT_FAMILIES: frozenset[str] = frozenset({"kandinsky22", "kandinsky3"})

# Families whose scheduler draws fresh noise inside ``scheduler.step`` (LCM with > 1 step, DDPM, SCM): a
# fixed ``latents=`` does not fix the image unless ``generator=`` is fixed too.
STOCHASTIC_SAMPLER_FAMILIES: frozenset[str] = frozenset({"lcm", "hunyuandit", "sana_sprint", "kandinsky3"})

# Families that multiply given latents by ``scheduler.init_noise_sigma`` (pass unit-variance noise,
# never pre-scale). 1.0 for DDIM/DPM/LCM; for SDXL's Euler it is set by ``set_timesteps``
# (about 1.91 for 2 "leading" steps). Flow-matching schedulers have no such attribute.
INIT_NOISE_SIGMA_FAMILIES: frozenset[str] = frozenset(
    {"sd", "sd_vpred", "sdxl", "lcm", "pixart_sigma", "kandinsky22", "kolors", "kandinsky3"}
)

# Families that draw from the ``generator`` before their noise (Flux ControlNet and Control sample their control image's
# latents): their default noise is not ``randn`` of a fresh generator of the seed.
PRE_NOISE_DRAW_FAMILIES: frozenset[str] = frozenset({"flux_controlnet", "flux_control"})

# Families whose ``latents=`` is PACKED: the pipeline's default draws ``randn`` of this unpacked
# shape and packs it with ``pipe._pack_latents(x, B, C, h, w)`` (C, h, w = x.shape[-3:]).
# All other families draw their default noise as ``randn(EXPECTED_LATENT_SHAPE)`` directly.
UNPACKED_NOISE_SHAPE: dict[str, tuple[int, ...]] = {
    "flux": (1, 4, 32, 32),
    "qwenimage": (1, 1, 4, 16, 16),  # with a frame axis
    "flux_kontext": (1, 4, 32, 32),
    "bria": (1, 4, 32, 32),
    "chroma": (1, 4, 32, 32),
    "flux_controlnet": (1, 4, 32, 32),
    "flux_control": (1, 4, 32, 32),
    "ovis_image": (1, 4, 32, 32),
    "longcat_image": (1, 16, 32, 32),
    "qwenimage21": (1, 16, 4, 4),
    "bria_fibo": (1, 16, 4, 4),  # packed by _pack_latents_no_patch (the default, do_patching=False)
}

# Families whose images have an alpha channel (Qwen-Image 2.1: RGBA).
RGBA_OUTPUT_FAMILIES: frozenset[str] = frozenset({"qwenimage21"})

# Families that snap (height, width) to an aspect-ratio bin before drawing noise (default
# use_resolution_binning=True) and resize the image back: the size actually generated at
# DEFAULT_SIZE.
BINNED_GENERATION_SIZE: dict[str, tuple[int, int]] = {
    "pixart_sigma": (256, 256),
    "sana": (512, 512),
}


def build_pipeline(name: str) -> DiffusionPipeline:
    """Build a fresh tiny pipeline of family ``name`` (see ``FAMILIES`` and ``MORE_FAMILIES``)."""
    try:
        builder = {**FAMILIES, **MORE_FAMILIES}[name]
    except KeyError:
        raise KeyError(f"unknown tiny pipeline family {name!r}; known: {sorted({**FAMILIES, **MORE_FAMILIES})}") from None
    return builder()
