import math

import numpy as np

from trl_noise_ppo.evaluation import (
    CARD_SECTION_END,
    CARD_SECTION_START,
    evaluation_metrics,
    interval,
    paired_result,
    results_from_metrics,
    results_table,
    with_card_section,
)


def test_interval_leaves_out_unscored_images():
    stats = interval([1.0, float("nan"), 3.0])
    assert stats["n"] == 2 and stats["mean"] == 2.0
    np.testing.assert_allclose(stats["ci95"], [2.0 - 1.959964, 2.0 + 1.959964])  # s = sqrt(2), n = 2
    assert interval([float("nan"), 5.0]) == {"mean": 5.0, "std": None, "n": 1, "ci95": None}


def test_paired_gain_is_the_interval_of_the_differences():
    base, tuned = [1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 4.0, 4.5]
    result = paired_result(base, tuned)
    assert result["base"] == interval(base) and result["tuned"] == interval(tuned)
    assert result["difference"] == interval([0.5, 0.0, 1.0, 0.5])


def test_metrics_name_rewards_and_judges_and_give_back_the_table():
    results = [
        {"num_inference_steps": 2, "reward": "brightness", "role": "reward", **paired_result([1.0, 2.0, 3.0], [2.0, 2.5, 3.5])},
        {"num_inference_steps": 2, "reward": "shapes_judge", "role": "judge", **paired_result([0.0, 1.0], [math.nan, 1.0])},
    ]
    metrics = evaluation_metrics(results, "eval")
    assert metrics["eval_rewards/brightness/base"] == 2.0 and math.isclose(metrics["eval_rewards/brightness/mean"], 8 / 3)
    gain = results[0]["difference"]
    assert metrics["eval_rewards/brightness/gain"] == gain["mean"]
    assert math.isclose(metrics["eval_rewards/brightness/gain_ci95"], (gain["ci95"][1] - gain["ci95"][0]) / 2)
    assert metrics["eval_judges/shapes_judge/gain"] == 0.0 and math.isnan(metrics["eval_judges/shapes_judge/gain_ci95"])

    table = results_table(results_from_metrics({**metrics, "eval_runtime": 1.0, "epoch": 1.0}, "eval", 2))
    assert table == results_table(results)
    assert "| 2 | shapes_judge (judge) | 0.5 [" in table and "| n/a (fewer than 2 scored images) |" in table
    assert results_from_metrics(metrics, "eval_heldout", 2) == []


def test_card_section_is_replaced_or_placed_before_the_training_procedure():
    card = "# Title\n\nText.\n\n## Training procedure\n\nDetails.\n"
    once = with_card_section(card, "## Evaluation\n\nfirst")
    assert once.index(CARD_SECTION_START) < once.index("## Training procedure") and "Details." in once
    twice = with_card_section(once, "## Evaluation\n\nsecond")
    assert "second" in twice and "first" not in twice and twice.count(CARD_SECTION_START) == twice.count(CARD_SECTION_END) == 1
    assert with_card_section("", "## Evaluation").strip() == f"{CARD_SECTION_START}\n## Evaluation\n{CARD_SECTION_END}"
