"""
Paired comparison of a noise generator with its base pipeline, shared by `NoisePPOTrainer.evaluate` (during
training) and `trl-noise-ppo evaluate`: the statistics, the metric names, and the results table of reports and model
cards.

Both pipelines make each image from the same initial noise: the base pipeline from `eps` itself, the tuned one from the
generator's `mu(c) + sigma(c) * eps`. Over the n rewards r_1..r_n one reward (or judge) gives one pipeline's images:

    mean = sum(r_k) / n,    s = sqrt(sum((r_k - mean)^2) / (n - 1)),    95% CI = mean +/- 1.96 * s / sqrt(n)

(normal approximation over images). The same formula over the paired differences d_k = r_k(tuned) - r_k(base) gives
the gain and its interval; pairing by noise removes most of the image-to-image spread from it. Images of one prompt are
not independent draws of the prompt distribution, so with few prompts the intervals are too narrow for claims about
other prompts.
"""

import math
import re


Z_95 = 1.959964  # two-sided 95% quantile of the standard normal

# result column -> metric name, as in `eval_rewards/<name>/gain`; each is also logged with the half-width of its 95%
# interval, as `eval_rewards/<name>/gain_ci95`
METRIC_NAMES = {"base": "base", "tuned": "mean", "difference": "gain"}

# The model card's evaluation section lies between these lines, so that `trl-noise-ppo evaluate` can replace it
CARD_SECTION_START = "<!-- trl-noise-ppo evaluation -->"
CARD_SECTION_END = "<!-- end of trl-noise-ppo evaluation -->"


def interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and normal-approximation 95% confidence interval of `values`, leaving out NaN
    (an image a reward did not score); `None` where fewer than two values remain."""
    values = [value for value in values if not math.isnan(value)]
    n = len(values)
    if n < 2:
        return {"mean": values[0] if values else None, "std": None, "n": n, "ci95": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half_width = Z_95 * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half_width, mean + half_width]}


def paired_result(base_values: list[float], tuned_values: list[float]) -> dict:
    """The base and tuned means and their paired difference, each with its interval, from the rewards of the same
    images' noise (position k of both lists)."""
    return {
        "base": interval(base_values),
        "tuned": interval(tuned_values),
        "difference": interval([t - b for t, b in zip(tuned_values, base_values, strict=True)]),
    }


def evaluation_metrics(results: list[dict], prefix: str) -> dict[str, float]:
    """Flat metrics of `results` for the Trainer's logs: `{prefix}_rewards/<name>/{base,mean,gain}` for the training
    rewards, `{prefix}_judges/<name>/...` for the judges, each with `..._ci95`, its interval's half-width (NaN where
    there were too few scored images)."""
    metrics = {}
    for result in results:
        for column, metric in METRIC_NAMES.items():
            stats = result[column]
            name = f"{prefix}_{result['role']}s/{result['reward']}/{metric}"
            metrics[name] = math.nan if stats["mean"] is None else stats["mean"]
            metrics[f"{name}_ci95"] = math.nan if stats["ci95"] is None else (stats["ci95"][1] - stats["ci95"][0]) / 2
    return metrics


def results_from_metrics(metrics: dict[str, float], prefix: str, num_inference_steps: int) -> list[dict]:
    """The inverse of `evaluation_metrics`: the results (as far as the metrics hold them) of one logged evaluation."""
    results = []
    for key in metrics:
        match = re.fullmatch(rf"{re.escape(prefix)}_(reward|judge)s/(.+)/gain", key)
        if match is None:
            continue
        role, name = match.groups()
        result = {"num_inference_steps": num_inference_steps, "reward": name, "role": role}
        for column, metric in METRIC_NAMES.items():
            mean, half_width = metrics[f"{prefix}_{role}s/{name}/{metric}"], metrics[f"{prefix}_{role}s/{name}/{metric}_ci95"]
            missing = mean is None or math.isnan(mean) or half_width is None or math.isnan(half_width)
            result[column] = {"mean": mean, "ci95": None if missing else [mean - half_width, mean + half_width]}
        results.append(result)
    return results


def results_table(results: list[dict]) -> str:
    """A markdown table: one row per step count and reward or judge, base -> tuned with intervals, and the gain."""

    def cell(stats: dict) -> str:
        if stats["ci95"] is None:
            return "n/a (fewer than 2 scored images)"
        low, high = stats["ci95"]
        return f"{stats['mean']:.4g} [{low:.4g}, {high:.4g}]"

    lines = ["| steps | reward or judge | base | tuned | difference |", "|---|---|---|---|---|"]
    for result in results:
        name = result["reward"] + (" (judge)" if result["role"] == "judge" else "")
        lines.append(
            f"| {result['num_inference_steps']} | {name} | {cell(result['base'])} | {cell(result['tuned'])} "
            f"| {cell(result['difference'])} |"
        )
    return "\n".join(lines) + "\n"


def with_card_section(card_text: str, section: str) -> str:
    """`card_text` with its evaluation section replaced by `section` (marked as such); a card without one gets it
    before its "Training procedure" heading, or at its end."""
    marked = f"{CARD_SECTION_START}\n{section.strip()}\n{CARD_SECTION_END}"
    if CARD_SECTION_START in card_text and CARD_SECTION_END in card_text:
        before, rest = card_text.split(CARD_SECTION_START, 1)
        return before + marked + rest.split(CARD_SECTION_END, 1)[1]
    heading = "\n## Training procedure"
    if heading in card_text:
        before, after = card_text.split(heading, 1)
        return f"{before.rstrip()}\n\n{marked}\n{heading}{after}"
    return f"{card_text.rstrip()}\n\n{marked}\n"
