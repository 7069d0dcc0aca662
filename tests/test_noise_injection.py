import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    ErnieImagePipeline,
    FluxPipeline,
    HunyuanDiTPipeline,
    Kandinsky3Pipeline,
    StableDiffusionImg2ImgPipeline,
    UNet2DModel,
)

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGeneratorConfig
from trl_noise_ppo.noise_injection import (
    NoiseSpec,
    check_generator_fits,
    check_pipeline_takes_noise,
    discover_noise_spec,
    encode_prompt_call_sites,
    encode_prompts,
    generator_inputs,
    pipeline_arguments,
)


@pytest.fixture(scope="module")
def sd():
    return build_pipeline("sd")


@pytest.mark.parametrize("height,width,expected", [(64, 64, (4, 32, 32)), (96, 64, (4, 48, 32))])
def test_noise_spec_is_read_from_the_pipeline(sd, height, width, expected):
    spec = discover_noise_spec(sd, {"prompt": "a cat", "height": height, "width": width, "num_inference_steps": 2})
    assert spec == NoiseSpec(shape=expected, dtype=torch.float32, device=torch.device("cpu"))
    # the dry run leaves the pipeline as it was
    assert "prepare_latents" not in vars(sd)


def test_noise_spec_follows_pipeline_dtype():
    pipe = build_pipeline("sd").to(torch.bfloat16)
    spec = discover_noise_spec(pipe, {"prompt": "a cat", "num_inference_steps": 1})
    assert spec.dtype == torch.bfloat16


def test_encode_prompts_reads_the_family_embeddings(sd):
    embeds = encode_prompts(sd, ["a cat", "a dog"])
    assert set(embeds) == {"prompt_embeds", "negative_prompt_embeds"}
    assert embeds["prompt_embeds"].shape[:2] == (2, 77)
    # the same embeddings the pipeline computes for itself, the negative prompt's ("" by default) too
    expected, expected_negative = sd.encode_prompt(["a cat", "a dog"], "cpu", 1, True)
    torch.testing.assert_close(embeds["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(embeds["negative_prompt_embeds"], expected_negative, rtol=0, atol=0)

    sdxl_embeds = encode_prompts(build_pipeline("sdxl"), ["a cat"])
    assert set(sdxl_embeds) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                                "negative_pooled_prompt_embeds"}
    assert sdxl_embeds["pooled_prompt_embeds"].ndim == 2


def test_encode_prompt_calls_are_read_from_the_source():
    # HunyuanDiT encodes twice, with a constant naming the text encoder; the outputs keep the names __call__ gives them
    sites = encode_prompt_call_sites(HunyuanDiTPipeline)
    assert sites[1].names == (
        "prompt_embeds_2", "negative_prompt_embeds_2", "prompt_attention_mask_2", "negative_prompt_attention_mask_2"
    )
    assert sites[1].constants == {"max_sequence_length": 256, "text_encoder_index": 1}
    # Flux's true CFG encodes the negative prompt in a call of its own, passing it as the variable it is
    flux_sites = encode_prompt_call_sites(FluxPipeline)
    assert flux_sites[0].names == ("prompt_embeds", "pooled_prompt_embeds", "text_ids")
    assert flux_sites[1].variables["prompt"] == "negative_prompt"
    # Kandinsky 3 passes a flag set earlier in __call__; ERNIE-Image's output takes the name of the argument it replaces
    assert encode_prompt_call_sites(Kandinsky3Pipeline)[0].variables["_cut_context"] == "cut_context"
    assert [site.names for site in encode_prompt_call_sites(ErnieImagePipeline)] == [("prompt_embeds",), ("negative_prompt_embeds",)]


def test_generator_inputs_pads_lists_and_reads_any_mask():
    # Z-Image: one (tokens, width) tensor per prompt; the negative prompts' are not read
    rows = [torch.ones(3, 4), torch.ones(5, 4)]
    inputs = generator_inputs({"prompt_embeds": rows, "negative_prompt_embeds": [torch.zeros(7, 4)] * 2})
    assert inputs["prompt_embeds"].shape == (2, 5, 4)
    assert inputs["prompt_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # Chroma: a float mask; HunyuanDiT: the mask of the first encoder's tokens
    float_mask = torch.tensor([[1.0, 0.0]])
    inputs = generator_inputs({"prompt_embeds": torch.ones(1, 2, 4), "prompt_attention_mask": float_mask,
                               "prompt_embeds_2": torch.ones(1, 3, 8), "prompt_attention_mask_2": torch.ones(1, 3)})
    assert inputs["prompt_attention_mask"] is float_mask and inputs["prompt_embeds"].shape == (1, 2, 4)
    assert inputs["pooled_prompt_embeds"] is None


def test_embeddings_batched_on_another_axis_are_moved_back(tmp_path):
    # HiDream's Llama states are (layers, prompts, tokens, width): rows first for the trainer, back for the pipeline
    pipe = build_pipeline("hidream")
    embeds = encode_prompts(pipe, ["a cat", "a dog", "a cow"])
    assert embeds["prompt_embeds_llama3"].shape[0] == 3
    assert pipeline_arguments(pipe, embeds)["prompt_embeds_llama3"].shape[1] == 3


def test_pipelines_without_noise_seam_are_refused(sd):
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="no `latents` argument"):
        check_pipeline_takes_noise(DDIMPipeline(unet=unet, scheduler=DDIMScheduler()))
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    with pytest.raises(ValueError, match="input image"):
        check_pipeline_takes_noise(img2img)
    check_pipeline_takes_noise(sd)


def test_generator_mismatch_is_explained(sd):
    embeds = encode_prompts(sd, ["a cat"])
    spec = NoiseSpec(shape=(4, 32, 32), dtype=torch.float32, device=torch.device("cpu"))
    fitting = NoiseGeneratorConfig(noise_shape=[4, 32, 32], prompt_embeds_dim=32, pipeline_class="StableDiffusionPipeline")
    check_generator_fits(fitting, spec, embeds, sd)

    wrong_resolution = NoiseGeneratorConfig(noise_shape=[4, 64, 64], prompt_embeds_dim=32, pipeline_class="X")
    with pytest.raises(ValueError, match=r"shape \[4, 64, 64\].*\[4, 32, 32\].*height and width"):
        check_generator_fits(wrong_resolution, spec, embeds, sd)
    wants_pooled = NoiseGeneratorConfig(noise_shape=[4, 32, 32], prompt_embeds_dim=32, pooled_prompt_embeds_dim=32)
    with pytest.raises(ValueError, match="pooled_prompt_embeds` of width 32, but the pipeline's are absent"):
        check_generator_fits(wants_pooled, spec, embeds, sd)


def test_a_prompt_rewritten_by_a_language_model_is_refused():
    # ERNIE-Image rewrites the prompt with its prompt enhancer (`pe`) when `use_pe` is on, its default
    pipe = build_pipeline("ernie_image")
    encode_prompts(pipe, ["a cat"])  # no enhancer loaded: nothing is rewritten
    pipe.__dict__["pe"] = object()  # stands in for a loaded enhancer
    with pytest.raises(ValueError, match="rewrites the prompt with a language model when `use_pe` is on.*use_pe=False"):
        encode_prompts(pipe, ["a cat"])
    assert encode_prompts(pipe, ["a cat"], use_pe=False)["prompt_embeds"][0].shape[-1] == 16
