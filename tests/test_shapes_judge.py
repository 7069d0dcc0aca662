import torch

from trl_noise_ppo.rewards import resolve_reward_funcs
from trl_noise_ppo.shapes.judge import ShapesJudge, detect_objects
from trl_noise_ppo.shapes.render import KINDS, all_scenes, balanced_prompts, parse_caption, render_batch, render_scene


def test_judge_accepts_every_kind_of_clean_render_and_rejects_other_captions():
    prompts = balanced_prompts("training", 120) + balanced_prompts("held-out", 40)
    images, captions, _ = render_batch(range(len(prompts)), [parse_caption(p) for p in prompts])
    judge = ShapesJudge()
    assert judge(images=images, prompts=captions) == [1.0] * len(captions)
    # every image paired with another scene's caption: no two scenes share a caption, so none may pass
    assert judge(images=images, prompts=captions[1:] + captions[:1]) == [0.0] * len(captions)
    assert resolve_reward_funcs("shapes_judge")[0].__name__ == "shapes_judge"


def test_judge_finds_what_is_wrong_in_an_image():
    judge = ShapesJudge()
    cases = {  # rendered scene -> a caption that differs in exactly one claim
        "two red circles": "three red circles",  # count
        "a red circle left of a blue square": "a blue square left of a red circle",  # relation
        "a red circle above a blue square": "a red square above a blue circle",  # binding
        "a yellow triangle on the left": "a yellow triangle on the right",  # position
        "a green square at the top": "a green circle at the top",  # shape
        "a red circle left of a blue square left of a white triangle": "a red circle left of a white square left of a blue triangle",
    }
    for rendered, claimed in cases.items():
        image = render_scene(parse_caption(rendered), seed=3)
        assert judge(images=image[None], prompts=[rendered]) == [1.0], rendered
        assert judge(images=image[None], prompts=[claimed]) == [0.0], claimed


def test_detected_objects_are_the_rendered_ones_from_left_to_right():
    scene = parse_caption("a purple triangle left of a white circle left of a green square")
    for seed in range(5):
        objects = detect_objects(render_scene(scene, seed=seed))
        assert [(obj.colour, obj.shape) for obj in objects] == list(scene.objects)
        assert all(b.x - a.x >= 8 - 1 for a, b in zip(objects, objects[1:]))  # rendered at least 8 px apart
        assert max(obj.y for obj in objects) - min(obj.y for obj in objects) <= 8 + 1  # within +-4 px of the row
    (single,) = detect_objects(render_scene(parse_caption("a red square at the top"), seed=0))
    assert abs(single.x - 16) <= 2.5 and abs(single.y - 8) <= 2.5  # the "top" anchor, jittered by up to 2 px
    assert detect_objects(torch.full((3, 32, 32), 0.1)) == []  # an empty image has no objects


def test_judge_survives_mild_blur_and_noise_and_reads_other_sizes():
    scenes = [scene for kind in KINDS for scene in all_scenes() if scene.kind == kind][::40]
    images, captions, _ = render_batch(range(len(scenes)), scenes)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), (kernel[:, None] * kernel[None])[None, None].repeat(3, 1, 1, 1), groups=3
    )
    noisy = (blurred + 0.02 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    upscaled = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    judge = ShapesJudge()
    assert sum(judge(images=noisy, prompts=captions)) >= 0.95 * len(captions)
    assert judge(images=upscaled, prompts=captions) == [1.0] * len(captions)
