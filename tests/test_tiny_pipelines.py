"""Checks every tiny offline pipeline builder in ``tests/tiny_pipelines.py``."""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_pipelines import (  # noqa: E402
    BINNED_GENERATION_SIZE,
    DEFAULT_SIZE,
    EXPECTED_LATENT_SHAPE,
    FAMILIES,
    INIT_NOISE_SIGMA_FAMILIES,
    PRE_NOISE_DRAW_FAMILIES,
    PROMPT_CALL_KWARGS,
    RGBA_OUTPUT_FAMILIES,
    RAW_PT_OUTPUT_FAMILIES,
    STOCHASTIC_SAMPLER_FAMILIES,
    TEXT_PROMPT_FAMILIES,
    UNPACKED_NOISE_SHAPE,
    build_pipeline,
)

PROMPT = "a photo of a red cube"
STEPS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run several times faster on one intra-op thread on a busy 2-core machine
    (two threads spin against each other); restore the setting for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict = {}


def _pipe(name):
    """One pipeline per family for the calling tests (calls do not change a pipeline's weights)."""
    if name not in _CACHE:
        _CACHE[name] = build_pipeline(name)
    return _CACHE[name]


def _call(pipe, name, **kwargs):
    height, width = DEFAULT_SIZE[name]
    call = dict(PROMPT_CALL_KWARGS.get(name, {}))
    if name in TEXT_PROMPT_FAMILIES:
        call["prompt"] = PROMPT
    call.update(
        height=height,
        width=width,
        num_inference_steps=STEPS,
        output_type="pt",
        # Some schedulers (LCM with >1 step) draw noise inside scheduler.step: always pass a
        # generator, so that fixed latents give a fixed image.
        generator=torch.Generator("cpu").manual_seed(0),
    )
    call.update(kwargs)
    images = pipe(**call)[0]  # Kandinsky 5 calls its images `image`
    if name in RAW_PT_OUTPUT_FAMILIES:
        # Kandinsky 2.2 returns the raw decoder output for "pt"; rescale as it does for "np".
        images = (images * 0.5 + 0.5).clamp(0, 1)
    return images


def test_tables_cover_every_family():
    assert set(DEFAULT_SIZE) == set(FAMILIES)
    assert set(EXPECTED_LATENT_SHAPE) == set(FAMILIES)
    for table in (
        PROMPT_CALL_KWARGS,
        TEXT_PROMPT_FAMILIES,
        RAW_PT_OUTPUT_FAMILIES,
        STOCHASTIC_SAMPLER_FAMILIES,
        INIT_NOISE_SIGMA_FAMILIES,
        PRE_NOISE_DRAW_FAMILIES,
        RGBA_OUTPUT_FAMILIES,
        UNPACKED_NOISE_SHAPE,
        BINNED_GENERATION_SIZE,
    ):
        assert set(table) <= set(FAMILIES)
    # every family either takes a text prompt or says what it takes instead
    assert set(FAMILIES) == set(TEXT_PROMPT_FAMILIES) | set(PROMPT_CALL_KWARGS)


def test_unknown_family_raises():
    with pytest.raises(KeyError, match="unknown tiny pipeline family"):
        build_pipeline("no-such-family")


def _canonical_noise(pipe, name, seed):
    """``randn`` of the family's canonical shape, packed by the pipeline where it packs."""
    g = torch.Generator("cpu").manual_seed(seed)
    if name in UNPACKED_NOISE_SHAPE:
        raw = torch.randn(UNPACKED_NOISE_SHAPE[name], generator=g)
        c, h, w = raw.shape[-3:]
        pack = getattr(pipe, "_pack_latents_no_patch", pipe._pack_latents)  # Bria FIBO packs without patches
        return pack(raw, raw.shape[0], c, h, w)
    return torch.randn(EXPECTED_LATENT_SHAPE[name], generator=g)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_builds_runs_and_takes_latents(name):
    pipe = _pipe(name)
    assert pipe.device.type == "cpu"
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            assert not comp.training
            for p in comp.parameters():
                if p.is_floating_point():
                    assert p.dtype == torch.float32, name

    # 1. a plain call: N x 3 x H x W float in [0, 1]
    height, width = DEFAULT_SIZE[name]
    default = _call(pipe, name, generator=torch.Generator("cpu").manual_seed(3))
    assert isinstance(default, torch.Tensor)
    assert default.is_floating_point()
    assert tuple(default.shape) == (1, 4 if name in RGBA_OUTPUT_FAMILIES else 3, height, width)
    assert torch.isfinite(default).all()
    assert default.min() >= 0.0 and default.max() <= 1.0

    # 2. latents= of EXPECTED_LATENT_SHAPE drawn as the pipeline draws its own noise reproduce
    #    the default call: the table holds the canonical noise shape.
    latents = _canonical_noise(pipe, name, seed=3)
    assert tuple(latents.shape) == EXPECTED_LATENT_SHAPE[name]
    first = _call(pipe, name, latents=latents.clone(), generator=torch.Generator("cpu").manual_seed(3))
    assert first.shape == default.shape
    if name not in STOCHASTIC_SAMPLER_FAMILIES | PRE_NOISE_DRAW_FAMILIES:
        assert torch.equal(first, default), f"{name}: given canonical noise != the default call"

    # 3. the same latents again give the same image; for deterministic samplers that draw nothing else
    #    even with another generator, which shows that latents= (not the generator) set the noise.
    seed = 3 if name in STOCHASTIC_SAMPLER_FAMILIES | PRE_NOISE_DRAW_FAMILIES else 4
    second = _call(pipe, name, latents=latents.clone(), generator=torch.Generator("cpu").manual_seed(seed))
    assert torch.equal(first, second), f"{name}: same latents gave different images"

    # 4. text families: the prompt reaches the model (the offline tokenizer is wired in).
    if name in TEXT_PROMPT_FAMILIES:
        other = _call(
            pipe,
            name,
            latents=latents.clone(),
            generator=torch.Generator("cpu").manual_seed(3),
            prompt="a blue sphere on the grass, at night",
        )
        assert not torch.equal(first, other), f"{name}: the prompt had no effect"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_builds_are_deterministic(name):
    a = _pipe(name)
    b = build_pipeline(name)
    assert a is not b
    for key, comp in a.components.items():
        if isinstance(comp, torch.nn.Module):
            sa, sb = comp.state_dict(), b.components[key].state_dict()
            assert sa.keys() == sb.keys()
            for k in sa:
                assert torch.equal(sa[k], sb[k]), f"{name}.{key}.{k} differs between builds"


@pytest.mark.parametrize("name", sorted(RAW_PT_OUTPUT_FAMILIES))
def test_raw_pt_output_quirk(name):
    """Documents the quirk: "pt" output is unscaled, "np" output is (x / 2 + 0.5).clamp(0, 1)."""
    pipe = _pipe(name)
    height, width = DEFAULT_SIZE[name]
    common = dict(PROMPT_CALL_KWARGS.get(name, {}), **({"prompt": PROMPT} if name in TEXT_PROMPT_FAMILIES else {}))
    common.update(height=height, width=width, num_inference_steps=STEPS)
    raw = pipe(**common, output_type="pt", generator=torch.Generator("cpu").manual_seed(0)).images
    arr = pipe(**common, output_type="np", generator=torch.Generator("cpu").manual_seed(0)).images
    expected = (raw * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(expected - arr).max() < 1e-5


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLER_FAMILIES))
def test_stochastic_sampler_needs_a_generator(name):
    pipe = _pipe(name)
    latents = torch.randn(EXPECTED_LATENT_SHAPE[name], generator=torch.Generator("cpu").manual_seed(1))
    a = _call(pipe, name, latents=latents.clone(), generator=torch.Generator("cpu").manual_seed(0))
    b = _call(pipe, name, latents=latents.clone(), generator=torch.Generator("cpu").manual_seed(1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", list(TEXT_PROMPT_FAMILIES))
def test_encode_prompt_takes_text(name):
    """``pipe.encode_prompt`` works on text with the offline tokenizers."""
    pipe = _pipe(name)
    params = inspect.signature(pipe.encode_prompt).parameters
    fill = {
        "device": torch.device("cpu"),
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": False,
        "prompt_2": None,
        "prompt_3": None,
    }
    kwargs = {k: v for k, v in fill.items() if k in params}

    def first_tensor(prompt):
        out = pipe.encode_prompt(prompt=prompt, **kwargs)
        out = out if isinstance(out, tuple) else (out,)
        # Z-Image returns a list of variable-length embeddings per prompt
        flat = [t for o in out for t in (o if isinstance(o, list) else [o])]
        tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert tensors, f"{name}: encode_prompt returned no embeddings"
        return tensors[0]

    a = first_tensor([PROMPT])
    b = first_tensor(["a blue sphere on the grass, at night"])
    assert (a.shape[0] == 1 or a.ndim == 2) and torch.isfinite(a).all()
    assert not (a.shape == b.shape and torch.equal(a, b))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_and_reload_offline(name, tmp_path):
    """save_pretrained / from_pretrained round-trips every family offline (tokenizers included)."""
    from diffusers import DiffusionPipeline

    pipe = _pipe(name)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for attribute in ("default_sample_size", "resolutions"):  # instance attributes, not kept by save_pretrained
        if attribute in vars(pipe):
            setattr(loaded, attribute, getattr(pipe, attribute))
    assert type(loaded) is type(pipe)
    latents = torch.randn(EXPECTED_LATENT_SHAPE[name], generator=torch.Generator("cpu").manual_seed(1))
    a = _call(pipe, name, latents=latents.clone(), num_inference_steps=1)
    b = _call(loaded, name, latents=latents.clone(), num_inference_steps=1)
    # reloaded CLIP/T5 text encoders differ in the last float bits (~5e-7)
    assert (a - b).abs().max() < 1e-5
