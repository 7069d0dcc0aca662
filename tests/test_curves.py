"""benchmarks.curves: the layout oracle, the ceiling its learning curves are read against."""

import torch

from benchmarks.curves import (
    LAYOUT_ORACLES, VARIANTS, CurvesArguments, LayoutOracleEncoder, count_of, layout_of, read_rows, references,
)
from benchmarks.defaults import POOLED_MLP_DEFAULTS
from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig, NoisePPOConfig
from trl_noise_ppo.noise_injection import prompt_conditioning
from trl_noise_ppo.shapes import balanced_prompts, held_out_prompts, load_shapes_pipeline, training_prompts


def test_layout_of_names_twelve_layouts():
    layouts = {layout_of(caption) for caption in training_prompts() + held_out_prompts()}
    assert len(layouts) == 12
    assert layout_of("a yellow square on the right") == "single, right"
    assert layout_of("four yellow triangles") == "count, scattered, 4"
    assert layout_of("a white square left of a blue circle left of a yellow triangle") == "row, left of"


def test_layout_oracle_gives_a_grid_per_layout_from_the_prompt_embeddings():
    pipe = load_shapes_pipeline()
    captions = sorted(set(balanced_prompts("training", 64) + balanced_prompts("held-out", 64)))
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=pipe.text_encoder.config.hidden_size)
    encoder = LayoutOracleEncoder(NoiseGenerator(config).grid_encoder, pipe, captions)
    # shuffled and in another batch than the lookup table was computed in
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
    asked = [captions[i] for i in order]
    embeds = prompt_conditioning(pipe, [{"prompt": caption} for caption in asked])["prompt_embeds"]
    with torch.no_grad():
        grids = encoder(embeds, None, None).flatten(1)
    layouts = [layout_of(caption) for caption in asked]
    for i in range(len(asked)):
        for j in range(i + 1, len(asked)):
            assert torch.equal(grids[i], grids[j]) == (layouts[i] == layouts[j]), (asked[i], asked[j])


def test_count_oracle_tells_counts_apart_and_nothing_else():
    pipe = load_shapes_pipeline()
    captions = ["four yellow triangles", "four blue circles", "two red squares", "a yellow square on the right",
                "a white square left of a blue circle left of a yellow triangle"]
    assert LAYOUT_ORACLES["count_oracle+beta=0+project_to_shell"].label_of is count_of
    assert LAYOUT_ORACLES["layout_oracle+beta=0+project_to_shell"].label_of is layout_of
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=pipe.text_encoder.config.hidden_size)
    encoder = LayoutOracleEncoder(NoiseGenerator(config).grid_encoder, pipe, captions, label_of=count_of)
    embeds = prompt_conditioning(pipe, [{"prompt": caption} for caption in captions])["prompt_embeds"]
    with torch.no_grad():
        grids = encoder(embeds, None, None).flatten(1)
    assert torch.equal(grids[0], grids[1]) and torch.equal(grids[3], grids[4])
    assert not torch.equal(grids[0], grids[2]) and not torch.equal(grids[0], grids[3])


def test_layout_oracle_with_embeddings_also_reads_the_prompt():
    pipe = load_shapes_pipeline()
    captions = ["a yellow square on the right", "a blue circle on the right"]  # one layout, two prompts
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=pipe.text_encoder.config.hidden_size)
    embeds = prompt_conditioning(pipe, [{"prompt": caption} for caption in captions])["prompt_embeds"]
    with torch.no_grad():
        layout_only = LayoutOracleEncoder(NoiseGenerator(config).grid_encoder, pipe, captions)(embeds, None, None)
        with_embeddings = LayoutOracleEncoder(NoiseGenerator(config).grid_encoder, pipe, captions, with_embeddings=True)(embeds, None, None)
    assert torch.equal(layout_only[0], layout_only[1])
    assert not torch.allclose(with_embeddings[0], with_embeddings[1])


def test_every_variant_sets_fields_of_the_config(tmp_path):
    for name, overrides in VARIANTS.items():
        config = NoisePPOConfig(output_dir=str(tmp_path), **overrides)  # an unknown field raises TypeError
        assert all(getattr(config, field) == value for field, value in overrides.items()), name
    # every variant but the default was measured as overrides of the pooled_mlp defaults, and keeps them
    assert VARIANTS["default"] == {} and VARIANTS["pooled_mlp"] == POOLED_MLP_DEFAULTS
    assert VARIANTS["layout_oracle+beta=0"] == {**POOLED_MLP_DEFAULTS, "beta": 0.0}
    assert all(VARIANTS[name] == {**POOLED_MLP_DEFAULTS, **oracle.overrides} for name, oracle in LAYOUT_ORACLES.items())
    assert VARIANTS["prompt_clusters+beta=0"] == {**POOLED_MLP_DEFAULTS, "generator_architecture": "prompt_clusters",
                                                  "beta": 0.0}


def test_the_defaults_are_the_variant_they_were_chosen_from(tmp_path):
    defaults = NoisePPOConfig(output_dir=str(tmp_path))
    chosen = NoisePPOConfig(output_dir=str(tmp_path), **VARIANTS["prompt_clusters+images=2+beta=0+project_to_shell"])
    # the cluster means, by default, only where each training prompt has a cluster of its own: on the 1,024 training
    # prompts the defaults train the chosen variant's generator
    assert defaults.to_dict() == {**chosen.to_dict(), "generator_cluster_means": None, "output_dir": defaults.output_dir}
    previous = NoisePPOConfig(output_dir=str(tmp_path), **VARIANTS["pooled_mlp"])
    assert previous.generator_architecture == "pooled_mlp" and previous.beta == 0.02 and not previous.project_to_shell


def test_gain_by_kind_reloads_a_saved_layout_oracle_generator_with_its_weights(tmp_path):
    from benchmarks.gain_by_kind import load_generator

    pipe = load_shapes_pipeline()
    captions = ["a yellow square on the right", "four yellow triangles", "a blue circle on the left"]
    config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=pipe.text_encoder.config.hidden_size)
    generator = NoiseGenerator(config)
    generator.grid_encoder = LayoutOracleEncoder(generator.grid_encoder, pipe, captions)
    torch.nn.init.normal_(generator.head.weight)  # an untrained head writes zeros for every prompt
    folder = tmp_path / "budget-layout_oracle+beta=0+project_to_shell-shapes_judge-1-steps-seed-0"
    generator.save_pretrained(folder)  # as benchmarks.curves saves it, through trainer.save_model
    embeds = prompt_conditioning(pipe, [{"prompt": caption} for caption in captions])["prompt_embeds"]
    loaded = load_generator(str(folder), pipe, captions)
    with torch.no_grad():
        means = generator(prompt_embeds=embeds).mean
        assert means.abs().sum() > 0
        assert torch.equal(loaded(prompt_embeds=embeds).mean, means)


def test_best_of_n_reports_the_gain_of_the_reward_that_picks(tmp_path):
    args = CurvesArguments(output_dir=str(tmp_path), steps=[1], rewards=["shapes_alignment"], images_per_set=16,
                           best_of=[1, 4], search_prompts=0)
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    references(args, pipe)
    rows = {row["method"]: row for row in read_rows(str(tmp_path), "references")}
    assert sorted(rows) == ["best-of-1", "best-of-4"]  # search_prompts=0 runs no per-prompt search
    # the first noise alone is the base model; keeping the best of four by a reward never lowers that reward
    assert rows["best-of-1"]["held-out reward gain"]["mean"] == 0 and rows["best-of-1"]["held-out gain"]["mean"] == 0
    assert rows["best-of-4"]["held-out reward gain"]["mean"] > 0
