"""How noise reaches a frozen pipeline: through its public `latents=` argument, the same way for every family.

Two things differ from family to family and are discovered from the pipeline itself rather than tabulated:

- the exact shape and dtype of the initial noise (latent channels, VAE scale factor, resolution binning, packing): a
  dry run of the pipeline's own `__call__`, with the call's own arguments, stops at `prepare_latents` and reads what it
  returns; the same dry run draws `eps` with the caller's `generator` exactly as the pipeline would;
- the prompt embeddings: the pipeline's own `encode_prompt` is called once per prompt, the way its `__call__` calls it
  (read from the source: the names it assigns the outputs to, the constants it passes), and every output whose name is
  an argument of `__call__` is passed back under that name, so the text encoders run once.

Pipelines that cannot start from a given noise are refused up front, with the reason and what to use instead.
"""

import ast
import copy
import functools
import inspect
import math
import re
import textwrap
import types
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .noise_generator import NoiseGeneratorConfig


# Pipelines whose `__call__` takes `latents` but cannot be steered by the initial noise alone, by a part of their name.
REFUSED_PIPELINE_NAME_PARTS = {
    "Img2Img": "it starts from an input image, not from pure noise; use the text-to-image pipeline of the family",
    "Inpaint": "it starts from an input image and mask, not from pure noise; use the text-to-image pipeline",
    "PriorPipeline": (
        "it is a prior: its output is image embeddings for a decoder, not an image a reward can score; use a "
        "text-to-image pipeline"
    ),
    "CascadeDecoder": (
        "it is the decoder stage of Stable Cascade, conditioned on the prior's image embeddings, whose own noise "
        "decides the image's content; use a single-stage text-to-image pipeline"
    ),
    "WuerstchenDecoder": (
        "it is the decoder stage of Wuerstchen, conditioned on the prior's image embeddings, whose own noise decides "
        "the image's content; use a single-stage text-to-image pipeline"
    ),
    "StableCascade": (
        "Stable Cascade makes an image in two denoising stages (a prior, then a decoder), each from its own initial "
        "noise, and `latents` reach only the prior; use a single-stage text-to-image pipeline"
    ),
    "Wuerstchen": (
        "Wuerstchen makes an image in two denoising stages (a prior, then a decoder), each from its own initial noise, "
        "and `latents` reach only the prior; use a single-stage text-to-image pipeline"
    ),
    "Combined": (
        "combined Kandinsky pipelines route `latents` to the prior, not to the image decoder; use the decoder "
        "pipeline (for example KandinskyV22Pipeline) with image embeddings"
    ),
    "IFPipeline": "DeepFloyd IF generates in pixel space through a cascade of stages; no single initial noise decides it",
    "Amused": (
        "aMUSEd generates discrete image tokens by masked token prediction: its `latents` are token ids, not Gaussian "
        "noise"
    ),
    "I2I": "it starts from an input image, not from pure noise; use the text-to-image pipeline of the family",
    "Upscale": "it upscales an input image, whose content it keeps; use a text-to-image pipeline",
    "Refiner": "it refines an input image, whose content it keeps; use the text-to-image pipeline of the family",
    "FluxFill": "it fills the masked part of an input image; use a text-to-image pipeline such as FluxPipeline",
    "Video": "it generates video, and Noise PPO's rewards score images; use a text-to-image pipeline",
    "Animate": "it generates video (an animation), and Noise PPO's rewards score images; use a text-to-image pipeline",
    "Audio": "it generates audio, and Noise PPO's rewards score images",
    "Music": "it generates audio, and Noise PPO's rewards score images",
    "AceStep": "it generates audio, and Noise PPO's rewards score images",
    "GlmImage": (
        "GLM-Image makes an image in two stages: an autoregressive model samples image tokens from the prompt (from "
        "the global random state), then a diffusion decoder renders them, and `latents` reach only the decoder; use a "
        "single-stage text-to-image pipeline"
    ),
    "StableUnCLIP": (
        "Stable unCLIP makes an image in two denoising stages (a prior, then a decoder), each from its own initial "
        "noise, and `latents` reach only the decoder; use a single-stage text-to-image pipeline"
    ),
    "LongCatImagePipeline": (
        "in diffusers 0.42 its `encode_prompt` fails on `prompt_embeds` given without a `prompt` (it takes "
        "`len(prompt)`), and Noise PPO passes the pipeline the prompt's embeddings it computed once; use another "
        "text-to-image pipeline, or a diffusers release that fixes it"
    ),
}

# Pipelines that ignore negative embeddings given without their text, and refuse both: the negative prompts a call gives
# go to them as text, one per image.
NEGATIVE_PROMPTS_AS_TEXT = {"CogView3PlusPipeline"}  # its encode_prompt zeroes them unless `negative_prompt` is given

# `__call__` arguments that make a pipeline rewrite the prompt with a language model before encoding it, with the
# component that rewrites: Noise PPO conditions its generator on the embeddings of the prompt as given.
PROMPT_REWRITING_ARGUMENTS = {"use_pe": "pe", "enable_prompt_rewrite": "text_processor"}

# `__call__` arguments that make a pipeline's output a video.
VIDEO_ARGUMENTS = ("num_frames", "video_length")

# `__call__` arguments that `encode_prompts` turns into embeddings.
ENCODED_PROMPT_ARGUMENT = re.compile(r"(negative_)?prompt(_\d)?")


# Pipelines whose `output_type="pt"` images are the decoder's raw output in about [-1, 1] instead of [0, 1].
RAW_PT_OUTPUT_PIPELINES = {"KandinskyV22Pipeline", "Kandinsky3Pipeline"}


@dataclass(frozen=True)
class NoiseSpec:
    """
    The initial noise a pipeline takes as `latents`: the shape of one sample (no batch axis), its dtype and device.
    Packed noise (Flux, Qwen-Image: one row of features per image patch) also has `token_grid`, the (rows, columns)
    of patches its sequence flattens, so that a generator can still work on it as an image. Noise of more than three
    axes (a frame axis: Cosmos 2's `(channels, 1, rows, columns)`, Kandinsky 5's `(1, rows, columns, channels)`) has
    `image_axes`, the axes of its channels, rows and columns; its other axes have size 1.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    token_grid: tuple[int, int] | None = None
    image_axes: tuple[int, int, int] | None = None


class _LatentsPrepared(Exception):
    def __init__(self, latents: torch.Tensor, arguments: dict, draws: list[torch.Tensor]):
        self.latents = latents
        self.arguments = arguments
        self.draws = draws


def _token_grid(sequence_length: int, height: int | None, width: int | None) -> tuple[int, int]:
    # the patch grid has the aspect of the latent image prepare_latents was asked for
    aspect = height / width if height and width else 1.0
    rows = round(math.sqrt(sequence_length * aspect))
    if rows == 0 or sequence_length % rows:
        raise ValueError(
            f"Packed noise of {sequence_length} patches does not form a grid of aspect {aspect:.3f}; please open an "
            "issue with the pipeline class and resolution."
        )
    return rows, sequence_length // rows


def call_parameters(pipeline: DiffusionPipeline) -> set[str]:
    return set(inspect.signature(pipeline.__call__).parameters)


def check_pipeline_takes_noise(pipeline: DiffusionPipeline) -> None:
    """Raises a `ValueError` naming the reason and the alternative if `pipeline` cannot be driven by its initial noise."""
    name = type(pipeline).__name__
    for part, reason in REFUSED_PIPELINE_NAME_PARTS.items():
        if part in name:
            raise ValueError(f"{name} cannot be fine-tuned with Noise PPO: {reason}.")
    parameters = call_parameters(pipeline)
    video = [argument for argument in VIDEO_ARGUMENTS if argument in parameters]
    if video:
        raise ValueError(
            f"{name} cannot be fine-tuned with Noise PPO: it generates video (its `__call__` takes `{video[0]}`), and "
            "Noise PPO's rewards score images. Use a text-to-image pipeline."
        )
    if "latents" not in parameters:
        raise ValueError(
            f"{name}.__call__ has no `latents` argument, so its initial noise cannot be chosen. Noise PPO needs a "
            "text-to-image pipeline that accepts `latents=` (for example StableDiffusionPipeline, "
            "StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline)."
        )
    if not hasattr(pipeline, "encode_prompt") and not any(p.endswith("image_embeds") for p in parameters):
        raise ValueError(
            f"{name} cannot be fine-tuned with Noise PPO: it takes its prompt only as text (it has no `encode_prompt` "
            "and no `prompt_embeds` argument), so the noise generator cannot read the pipeline's own prompt "
            "embeddings. Use a text-to-image pipeline that takes `prompt_embeds=`."
        )


def _first(prepared):
    return prepared[0] if isinstance(prepared, tuple) else prepared


def _with_globals(function: types.FunctionType, **replacements) -> types.FunctionType:
    """A copy of `function` that sees `replacements` among its globals; the function and its module, which other
    threads may be running, are left as they are."""
    copied = types.FunctionType(
        function.__code__, {**function.__globals__, **replacements}, function.__name__, function.__defaults__,
        function.__closure__,
    )
    copied.__kwdefaults__ = function.__kwdefaults__
    return copied


def copy_for_one_call(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """A shallow copy of `pipeline` for one call: it shares the components, but has schedulers of its own, and its own
    attributes, which `__call__` sets (`set_timesteps`, `_guidance_scale`, ...), so that calls from several threads do
    not disturb each other."""
    copied = copy.copy(pipeline)
    for name, component in pipeline.components.items():
        if isinstance(component, SchedulerMixin):
            vars(copied)[name] = copy.deepcopy(component)  # not setattr, which would also rewrite the copy's config
    return copied


def _run_to_prepare_latents(pipeline: DiffusionPipeline, call_kwargs: dict) -> _LatentsPrepared:
    """Calls `pipeline(**call_kwargs)` until `prepare_latents` has run, and returns what it returned, the arguments it
    was given and the noise it drew through its module's `randn_tensor` (the function every diffusers pipeline draws its
    initial noise with). Neither the pipeline nor that module is changed: the dry run calls a copy of the pipeline (see
    `copy_for_one_call`), and a copy of `prepare_latents` that sees a recording `randn_tensor` in its globals."""
    if not hasattr(type(pipeline), "prepare_latents"):
        return _run_to_inline_draw(pipeline, call_kwargs)
    prepare_latents = type(pipeline).prepare_latents
    draws = []

    def recorded_randn_tensor(*args, **kwargs):
        draws.append(randn_tensor(*args, **kwargs))
        return draws[-1]

    recording = prepare_latents
    if prepare_latents.__globals__.get("randn_tensor") is randn_tensor:
        recording = _with_globals(prepare_latents, randn_tensor=recorded_randn_tensor)
    stopping = copy_for_one_call(pipeline)

    def prepare_latents_and_stop(*args, **kwargs):
        arguments = inspect.signature(prepare_latents).bind(stopping, *args, **kwargs).arguments
        raise _LatentsPrepared(_first(recording(**arguments)), arguments, draws)

    stopping.prepare_latents = prepare_latents_and_stop
    try:
        stopping(**call_kwargs)
    except _LatentsPrepared as stop:
        return stop
    raise RuntimeError(
        f"{type(pipeline).__name__} finished without calling `prepare_latents`, so its noise shape cannot be "
        "discovered. Please open an issue with the pipeline class."
    )


def _run_to_inline_draw(pipeline: DiffusionPipeline, call_kwargs: dict) -> _LatentsPrepared:
    """For a pipeline without `prepare_latents` (ERNIE-Image), which draws its noise in `__call__` itself through its
    module's `randn_tensor`: calls `pipeline(**call_kwargs)` until that draw and returns it, with no arguments. As in
    `_run_to_prepare_latents`, neither the pipeline nor its module is changed: a copy of the undecorated `__call__`
    that sees a stopping `randn_tensor` in its globals runs on a copy of the pipeline (under `no_grad`, as `__call__`'s
    own decorator would run it)."""
    call = inspect.unwrap(type(pipeline).__call__)
    if call.__globals__.get("randn_tensor") is not randn_tensor:
        raise RuntimeError(
            f"{type(pipeline).__name__} has no `prepare_latents` and does not draw its noise with diffusers' "
            "`randn_tensor`, so its noise shape cannot be discovered. Please open an issue with the pipeline class."
        )

    def draw_and_stop(*args, **kwargs):
        noise = randn_tensor(*args, **kwargs)
        raise _LatentsPrepared(noise, {}, [noise])

    try:
        with torch.no_grad():
            _with_globals(call, randn_tensor=draw_and_stop)(copy_for_one_call(pipeline), **call_kwargs)
    except _LatentsPrepared as stop:
        return stop
    raise RuntimeError(
        f"{type(pipeline).__name__} finished without drawing its noise, so its noise shape cannot be discovered. "
        "Please open an issue with the pipeline class."
    )


def _prepare(pipeline: DiffusionPipeline, arguments: dict, latents: torch.Tensor | None) -> torch.Tensor:
    # what the pipeline makes of `latents` given by the caller (or draws, if None); a throwaway generator keeps the
    # caller's untouched. A pipeline that draws its noise inline uses the noise it is given as the noise it draws.
    if not hasattr(type(pipeline), "prepare_latents"):
        if latents is None:
            raise TypeError("an inline draw cannot be repeated")
        return latents
    throwaway = torch.Generator(device=torch.device(arguments.get("device") or "cpu")).manual_seed(0)
    generator = arguments.get("generator")
    if isinstance(generator, list):
        throwaway = [throwaway] * len(generator)
    arguments = {**arguments, "latents": latents}
    if "generator" in arguments:
        arguments["generator"] = throwaway
    return _first(type(pipeline).prepare_latents(**arguments))


def _image_axes(pipeline: DiffusionPipeline, stop: _LatentsPrepared) -> tuple[int, int, int] | None:
    # the axes that grow when prepare_latents is asked for an image twice as high, then twice as wide, are the rows
    # and columns; the one other axis longer than 1 holds the channels
    shape = stop.latents.shape[1:]
    grown = []
    for side in ("height", "width"):
        try:
            larger = _prepare(pipeline, {**stop.arguments, side: stop.arguments[side] * 2}, None).shape[1:]
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None
        grown += [axis for axis in range(len(shape)) if larger[axis] != shape[axis]]
    channels = [axis for axis in range(len(shape)) if axis not in grown and shape[axis] > 1]
    if len(grown) != 2 or len(set(grown)) != 2 or len(channels) != 1:
        return None
    return (channels[0], *grown)


def _noise_spec(pipeline: DiffusionPipeline, stop: _LatentsPrepared) -> NoiseSpec:
    # `prepare_latents` returns the noise in the layout the denoiser reads. Most pipelines take `latents` in that same
    # layout; some take it unpacked and pack it themselves (Flux.2: `(channels, rows, columns)` in, `(patches,
    # channels)` out). Each candidate layout is therefore tried on `prepare_latents` itself.
    prepared, arguments = stop.latents, stop.arguments
    candidates = [NoiseSpec(tuple(prepared.shape[1:]), prepared.dtype, prepared.device)]
    if prepared.ndim == 3:
        patches, features = prepared.shape[1:]
        grid = _token_grid(patches, arguments.get("height"), arguments.get("width"))
        candidates = [
            NoiseSpec((patches, features), prepared.dtype, prepared.device, token_grid=grid),
            NoiseSpec((features, *grid), prepared.dtype, prepared.device),
        ]
    elif prepared.ndim != 4:
        candidates = [NoiseSpec(tuple(prepared.shape[1:]), prepared.dtype, prepared.device, image_axes=axes)
                      for axes in [_image_axes(pipeline, stop)] if axes]
    for spec in candidates:
        given = torch.zeros(prepared.shape[0], *spec.shape, dtype=spec.dtype, device=spec.device)
        try:
            accepted = _prepare(pipeline, arguments, given)
        except (RuntimeError, ValueError, TypeError):
            continue
        if accepted.shape == prepared.shape:
            return spec
    raise ValueError(
        f"{type(pipeline).__name__} prepares noise of shape {list(prepared.shape)} and accepts none of the layouts "
        "Noise PPO knows as `latents` (image noise (batch, channels, height, width), packed noise (batch, patches, "
        "features), image noise with axes of size 1 besides (a frame axis)). Please open an issue with the pipeline "
        "class."
    )


def discover_noise_spec(pipeline: DiffusionPipeline, call_kwargs: dict) -> NoiseSpec:
    """
    Runs `pipeline(**call_kwargs)` up to `prepare_latents` and returns the noise it takes as `latents`, one sample's
    worth. The call is cut short there, so no denoising step runs. `call_kwargs` should be those of the real call: every
    argument that reaches `prepare_latents` (`height`, `width`, `use_resolution_binning`, `max_area`, ...) can change
    the shape.
    """
    return _noise_spec(pipeline, _run_to_prepare_latents(pipeline, call_kwargs))


def draw_noise(pipeline: DiffusionPipeline, call_kwargs: dict) -> tuple[NoiseSpec, torch.Tensor]:
    """
    The noise spec of `pipeline(**call_kwargs)` (see `discover_noise_spec`) and `eps`, the unit Gaussian noise of the
    whole batch in that layout, drawn by the pipeline's own `prepare_latents` from `call_kwargs["generator"]`: given as
    `latents`, it makes the pipeline prepare exactly the noise it would have drawn itself, so the same seed gives the
    same image. The generator is left as the pipeline's own call would leave it, for schedulers that draw in their steps;
    or, where the pipeline draws from it before its noise (Flux Control samples its control image's latents), where the
    call found it, so that the call given `latents` draws that again.
    """
    generator = call_kwargs.get("generator")
    generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
    states = [generator.get_state() for generator in generators]
    stop = _run_to_prepare_latents(pipeline, call_kwargs)
    spec = _noise_spec(pipeline, stop)
    if generators and hasattr(type(pipeline), "prepare_latents"):
        for generator, state in zip(generators, states):
            generator.set_state(state)
        if not torch.equal(_first(type(pipeline).prepare_latents(**{**stop.arguments, "latents": None})), stop.latents):
            for generator, state in zip(generators, states):
                generator.set_state(state)
    # The noise drawn (Flux.2: before packing) or the noise prepared (Flux: packed after drawing; SD: scaled by
    # init_noise_sigma, so not this one) is eps when the pipeline, given it, prepares the same noise.
    for candidate in [*stop.draws, stop.latents]:
        if tuple(candidate.shape) == (stop.latents.shape[0], *spec.shape):
            if torch.equal(_prepare(pipeline, stop.arguments, candidate), stop.latents):
                return spec, candidate.to(spec.dtype)
    raise ValueError(
        f"{type(pipeline).__name__}.prepare_latents draws its noise in a way Noise PPO cannot reproduce as `latents`, "
        "so the same seed would not give the same image. Pass `latents=` (unit Gaussian noise of shape "
        f"{[stop.latents.shape[0], *spec.shape]}) instead of a seed, and please open an issue with the pipeline class."
    )


class EncodePromptCall(NamedTuple):
    """One `self.encode_prompt(...)` call in a pipeline's `__call__`, read from its source."""

    names: tuple[str | None, ...]  # the variables the outputs are assigned to (None: not a name)
    constants: dict  # `encode_prompt` argument -> the literal passed (HunyuanDiT: `text_encoder_index=1`)
    variables: dict  # `encode_prompt` argument -> the variable of `__call__` passed (`prompt=negative_prompt`)
    line: int  # where the call is in `__call__`'s source


@functools.cache
def _call_source(pipeline_class: type) -> ast.FunctionDef | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(pipeline_class.__call__))).body[0]
    except (OSError, TypeError):
        return None


def _unset_embeddings_argument(node: ast.AST, parents: dict, parameters: set[str]) -> str | None:
    # the argument of `__call__` an encode_prompt call stands in for, where the call runs only when that argument is
    # None: `if prompt_embeds is not None: text_hiddens = ... else: text_hiddens = self.encode_prompt(...)` (ERNIE-Image)
    while node in parents:
        node, child = parents[node], node
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id in parameters
            and isinstance(test.ops[0], ast.Is | ast.IsNot)
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value is None
        ):
            unset_branch = node.body if isinstance(test.ops[0], ast.Is) else node.orelse
            return test.left.id if child in unset_branch else None
    return None


@functools.cache
def encode_prompt_call_sites(pipeline_class: type) -> tuple[EncodePromptCall, ...]:
    """
    How `pipeline_class.__call__` calls `self.encode_prompt`, read from its source: for each call, the names it assigns
    the outputs to (`prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(...)`; a single output assigned
    to a name of its own, where the call runs only without the `prompt_embeds` argument, gets that argument's name),
    the literals it passes (HunyuanDiT: `text_encoder_index=1, max_sequence_length=256` for its second text encoder)
    and the variables it passes (Flux's true CFG: `prompt=negative_prompt`; Kandinsky 3: `_cut_context=cut_context`).
    """
    function = _call_source(pipeline_class)
    if function is None:
        return ()
    parameters = set(inspect.signature(pipeline_class.__call__).parameters)
    encode_parameters = list(inspect.signature(pipeline_class.encode_prompt).parameters)[1:]  # without self
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    sites = []
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "encode_prompt"
        ):
            target = node.targets[0]
            elements = target.elts if isinstance(target, ast.Tuple) else [target]
            names = tuple(element.id if isinstance(element, ast.Name) else None for element in elements)
            if len(names) == 1 and names[0] not in parameters:
                names = (_unset_embeddings_argument(node, parents, parameters) or names[0],)
            arguments = {**dict(zip(encode_parameters, node.value.args)), **{k.arg: k.value for k in node.value.keywords}}
            constants = {name: value.value for name, value in arguments.items() if isinstance(value, ast.Constant)}
            variables = {name: value.id for name, value in arguments.items() if isinstance(value, ast.Name)}
            sites.append(EncodePromptCall(names, constants, variables, node.lineno))
    return tuple(sorted(sites, key=lambda site: site.line))


_PURE_BUILTINS = {f.__name__: f for f in (len, isinstance, str, list, tuple, int, float, bool, min, max)}


def _evaluate(expression: ast.expr, values: dict):
    return eval(compile(ast.Expression(expression), "<__call__>", "eval"), {"__builtins__": _PURE_BUILTINS}, dict(values))


def _assigned_names(node: ast.AST) -> list[str]:
    if not isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign) or node.value is None:
        return []
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [target.id for target in targets if isinstance(target, ast.Name)]


def _run_assignments(statements: list[ast.stmt], line: int, values: dict, wanted: set[str], arguments: set[str]) -> None:
    # Runs, on `values`, the assignments to `wanted` names that `__call__` makes before `line`, in the branches its
    # `if` tests choose, as far as they can be evaluated from the call's values alone (never from the pipeline's state:
    # no `self`). A local whose assignment cannot be evaluated is unknown from there on; an argument keeps the call's
    # value.
    for statement in statements:
        if statement.lineno > line:
            return
        if statement.end_lineno >= line:  # the call is inside this statement: follow it in
            for block in (getattr(statement, "body", []), getattr(statement, "orelse", [])):
                if block and block[0].lineno <= line <= block[-1].end_lineno:
                    _run_assignments(block, line, values, wanted, arguments)
            return
        if isinstance(statement, ast.If):
            try:
                branch = statement.body if _evaluate(statement.test, values) else statement.orelse
            except Exception:
                continue
            _run_assignments(branch, line, values, wanted, arguments)
        for name in set(_assigned_names(statement)) & wanted:
            try:
                if isinstance(statement, ast.AugAssign):  # `x += ...` is not followed
                    raise NotImplementedError
                values[name] = _evaluate(statement.value, values)
            except Exception:
                if name not in arguments:
                    values.pop(name, None)


def _call_values(pipeline: DiffusionPipeline, prompts: list[str], call_kwargs: dict) -> dict:
    # `__call__`'s arguments in this call (given, else its defaults), with `prompts` as the prompt and the other
    # prompts (`prompt_2`, `negative_prompt`) one per prompt: some refuse a string beside a list
    values = {}
    for name, param in inspect.signature(pipeline.__call__).parameters.items():
        if name not in call_kwargs and param.default is param.empty:
            continue
        value = call_kwargs.get(name, param.default)
        if ENCODED_PROMPT_ARGUMENT.fullmatch(name) and isinstance(value, str):
            value = [value] * len(prompts)
        values[name] = value
    return {**values, "prompt": prompts}


def _site_values(pipeline: DiffusionPipeline, site: EncodePromptCall, values: dict) -> dict:
    """The value of each variable `site` passes, as `__call__` sets it before the call from the call's own values
    (`cut_context = True`; `batch_size = len(prompt)`); unknown variables are left out."""
    function = _call_source(type(pipeline))
    assignments = [node for node in ast.walk(function) if _assigned_names(node)]
    wanted, more = set(), set(site.variables.values())
    while more:  # the variables passed, and those they are computed from
        wanted |= more
        more = {
            name.id
            for node in assignments
            if wanted & set(_assigned_names(node))
            for name in ast.walk(node.value)
            if isinstance(name, ast.Name)
        } - wanted
    local = dict(values)
    _run_assignments(function.body, site.line, local, wanted, set(values))
    return {argument: local[variable] for argument, variable in site.variables.items() if variable in local}


def _encode_prompt_kwargs(pipeline: DiffusionPipeline, site: EncodePromptCall, values: dict, call_kwargs: dict) -> dict:
    # Each argument as the call site passes it: a literal, or a variable of `__call__` as this call sets it; otherwise
    # the call's argument of the same name, else `__call__`'s default, so that the embeddings are those the pipeline
    # would compute for itself. One image per prompt, on the pipeline's device, and the negative prompts' embeddings
    # too (unused by the pipeline where guidance is off, but some refuse `prompt_embeds` without them where it is on).
    fixed = {"device": pipeline._execution_device, "num_images_per_prompt": 1, "do_classifier_free_guidance": True}
    passed = {**_site_values(pipeline, site, values), **site.constants}
    kwargs = {}
    for name, param in inspect.signature(pipeline.encode_prompt).parameters.items():
        if name in fixed:
            kwargs[name] = fixed[name]
        elif name in passed:
            kwargs[name] = passed[name]
        elif name == "prompt" and name not in site.variables:
            kwargs[name] = values[name]
        elif name in values and (name in call_kwargs or "embeds" not in name and not name.startswith("negative")):
            kwargs[name] = values[name]
        elif param.default is param.empty:
            kwargs[name] = None
    return kwargs


def takes_prompt_as_text(pipeline: DiffusionPipeline) -> bool:
    """Whether `pipeline.__call__` takes no embeddings at all (Bria FIBO), so that its prompts go to it as text and their
    embeddings only to the noise generator."""
    parameters = call_parameters(pipeline)
    return "prompt" in parameters and not any("embeds" in name for name in parameters)


def _conditioning_sites(pipeline: DiffusionPipeline) -> list[EncodePromptCall]:
    """The `encode_prompt` calls whose outputs `__call__` also takes as arguments, with the names to keep (None for the
    others); for a pipeline that takes its prompt as text, its own prompt's embeddings and masks (for the generator);
    one nameless call (a pipeline whose source cannot be read) if none."""
    parameters = call_parameters(pipeline)
    sites = []
    for site in encode_prompt_call_sites(type(pipeline)):
        if takes_prompt_as_text(pipeline) and site.variables.get("prompt", "prompt") == "prompt":
            kept = tuple(
                name if name and ("embeds" in name or "mask" in name) and not name.startswith("negative") else None
                for name in site.names
            )
        else:
            kept = tuple(name if name in parameters else None for name in site.names)
        if any(kept):
            sites.append(site._replace(names=kept))
    return sites or [EncodePromptCall((), {}, {}, 0)]


@torch.no_grad()
def _encode(pipeline: DiffusionPipeline, prompts: list[str], call_kwargs: dict) -> dict:
    values = _call_values(pipeline, prompts, call_kwargs)
    encoded = {}
    for site in _conditioning_sites(pipeline):
        kwargs = _encode_prompt_kwargs(pipeline, site, values, call_kwargs)
        if "prompt" in kwargs and kwargs["prompt"] is None:
            continue  # a call of its own for a negative prompt this call does not give (Flux's true CFG): none to encode
        outputs = pipeline.encode_prompt(**kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if site.names:
            encoded.update({name: value for name, value in zip(site.names, outputs) if name and value is not None})
        else:
            encoded.update(_sort_unnamed_outputs(pipeline, outputs, len(prompts)))
    return encoded


def _negative_prompts(values: dict, call_kwargs: dict) -> dict:
    """The negative prompts the call gives (`negative_prompt`, `negative_prompt_2`, ...), one per prompt."""
    return {
        name: values[name]
        for name, value in call_kwargs.items()
        if name.startswith("negative") and ENCODED_PROMPT_ARGUMENT.fullmatch(name) and value is not None
    }


def _sort_unnamed_outputs(pipeline: DiffusionPipeline, outputs: tuple, batch_size: int) -> dict:
    # Without the call site's names, outputs are sorted by what they look like.
    batch_tensors = [t for t in outputs if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[0] == batch_size]
    sequences = [t for t in batch_tensors if t.is_floating_point() and t.ndim == 3]
    pooled = [t for t in batch_tensors if t.is_floating_point() and t.ndim == 2]
    masks = [t for t in batch_tensors if not t.is_floating_point() and t.ndim == 2]
    parameters = call_parameters(pipeline)
    encoded = {"prompt_embeds": sequences[0]} if sequences else {}
    if pooled and "pooled_prompt_embeds" in parameters:
        encoded["pooled_prompt_embeds"] = pooled[0]
    mask_names = [name for name in ("prompt_attention_mask", "prompt_embeds_mask") if name in parameters]
    if masks and mask_names:
        encoded[mask_names[0]] = masks[0]
    return encoded


# Per pipeline, the axis of each `encode_prompt` output along which prompts are stacked, where it is not the first
# (HiDream's Llama embeddings: (layers, prompts, tokens, width)), or CUMULATIVE for cumulative sequence lengths, one
# more than prompts (Kandinsky 5's `prompt_cu_seqlens`: 0, then the running sum of each prompt's length).
_BATCH_AXES = weakref.WeakKeyDictionary()
CUMULATIVE = "cumulative"


def _batch_axes(pipeline: DiffusionPipeline, prompt: str, call_kwargs: dict) -> dict[str, int | str]:
    if pipeline not in _BATCH_AXES:
        # the axis that grows with the number of prompts, found once by encoding one prompt and then two
        one, two = (_encode(pipeline, [prompt] * n, call_kwargs) for n in (1, 2))
        axes = {}
        for name, value in one.items():
            if isinstance(value, torch.Tensor) and value.ndim == 1 and len(value) == 2 and len(two[name]) == 3:
                if not value.is_floating_point() and value[0] == 0:
                    axes[name] = CUMULATIVE
            elif isinstance(value, torch.Tensor):
                grown = [axis for axis in range(value.ndim) if two[name].shape[axis] != value.shape[axis]]
                if grown and grown[0] != 0:
                    axes[name] = grown[0]
        _BATCH_AXES[pipeline] = axes
    return _BATCH_AXES[pipeline]


def encode_prompts(pipeline: DiffusionPipeline, prompts: list[str], **call_kwargs) -> dict:
    """
    Encodes `prompts` once with the pipeline's own `encode_prompt`, as its `__call__` would (see
    `encode_prompt_call_sites`), and returns every output that `__call__` takes as an argument, under that argument's
    name: `prompt_embeds`, and where the family has them pooled embeddings, attention masks of any dtype, a second
    encoder's embeddings (HunyuanDiT's `prompt_embeds_2`), HiDream's `prompt_embeds_t5` / `prompt_embeds_llama3`,
    Z-Image's list of variable-length embeddings, and the negative prompts' counterparts (the call's `negative_prompt`,
    else the pipeline's default), encoded where the pipeline encodes them (beside the prompt, or in a call of their
    own: Flux's true CFG). The prompts of a pipeline that takes no embeddings (Bria FIBO) are returned as text, one per
    prompt, and their embeddings only for the generator. Call the pipeline `without_encoded_prompts`.

    Every value has one row per prompt first (tensors are moved so, cumulative lengths made lengths; lists have one
    entry per prompt):
    `pipeline_arguments` puts them back as the pipeline takes them.
    """
    values = _call_values(pipeline, prompts, call_kwargs)
    for argument, rewriter in PROMPT_REWRITING_ARGUMENTS.items():
        if values.get(argument) and getattr(pipeline, rewriter, None) is not None:
            raise ValueError(
                f"{type(pipeline).__name__} rewrites the prompt with a language model when `{argument}` is on (its "
                "default), and Noise PPO conditions its generator on the embeddings of the prompt as given: pass "
                f"`{argument}=False` (in `pipeline_kwargs` for training)."
            )
    encoded = _encode(pipeline, prompts, call_kwargs)
    if not any(name for name in encoded if "mask" not in name):
        raise ValueError(
            f"{type(pipeline).__name__}.encode_prompt returned no prompt embeddings; Noise PPO conditions its "
            "generator on them. Please open an issue with the pipeline class."
        )
    if takes_prompt_as_text(pipeline):
        # the pipeline encodes its prompts itself: they go to it as text, one per row
        encoded.update({
            name: value for name, value in values.items() if ENCODED_PROMPT_ARGUMENT.fullmatch(name) and value is not None
        })
    negative_prompts = _negative_prompts(values, call_kwargs)
    if negative_prompts and type(pipeline).__name__ in NEGATIVE_PROMPTS_AS_TEXT:
        encoded = {name: value for name, value in encoded.items() if not name.startswith("negative")}
        encoded.update(negative_prompts)
    elif negative_prompts and not any(name.startswith("negative") for name in encoded):
        raise ValueError(
            f"{type(pipeline).__name__} does not return the embeddings of `{next(iter(negative_prompts))}` under an "
            "argument of its `__call__`, so Noise PPO cannot pass it on; call without it, and please open an issue "
            "with the pipeline class."
        )
    for name, axis in _batch_axes(pipeline, prompts[0], call_kwargs).items():
        if name in encoded:
            encoded[name] = encoded[name].diff() if axis == CUMULATIVE else encoded[name].movedim(axis, 0)
    return encoded


def without_encoded_prompts(call_kwargs: dict) -> dict:
    """`call_kwargs` without the prompts `encode_prompts` has turned into embeddings (`prompt_2`, `negative_prompt`,
    ...): the pipeline refuses both a prompt and its embeddings."""
    return {name: value for name, value in call_kwargs.items() if not ENCODED_PROMPT_ARGUMENT.fullmatch(name)}


def pipeline_arguments(pipeline: DiffusionPipeline, conditioning: dict) -> dict:
    """The conditioning (rows first, see `encode_prompts`) as `pipeline`'s `__call__` takes it, the prompts it replaces
    set to `None` (PixArt's `negative_prompt` defaults to `""`, and it refuses both a prompt and its embeddings), without
    what only the generator reads (the embeddings of a pipeline that takes its prompt as text)."""
    axes = _BATCH_AXES.get(pipeline, {})

    def as_taken(name, value):
        if axes.get(name) == CUMULATIVE:
            return torch.cat([value.new_zeros(1), value.cumsum(0, dtype=value.dtype)])
        return value.movedim(0, axes[name]) if name in axes else value

    parameters = call_parameters(pipeline)
    if takes_prompt_as_text(pipeline):
        conditioning = {name: value for name, value in conditioning.items() if name in parameters}
    encoded_prompts = {name: None for name in parameters if ENCODED_PROMPT_ARGUMENT.fullmatch(name)}
    return {**encoded_prompts, **{name: as_taken(name, value) for name, value in conditioning.items()}}


def repeat_rows(conditioning: dict, repeats: int) -> dict:
    """Each row of the conditioning `repeats` times in a row (one row per image of a prompt)."""
    return {
        name: value.repeat_interleave(repeats, dim=0)
        if isinstance(value, torch.Tensor)
        else [row for row in value for _ in range(repeats)]
        for name, value in conditioning.items()
    }


def take_rows(conditioning: dict, rows: slice) -> dict:
    return {name: value[rows] for name, value in conditioning.items()}


def check_generator_fits(config: NoiseGeneratorConfig, noise_spec: NoiseSpec, embeds: dict, pipeline: DiffusionPipeline) -> None:
    """Raises a `ValueError` if a generator with `config` cannot drive `pipeline`'s noise and read its prompt embeddings."""
    problems = []
    grid = tuple(config.token_grid) if config.token_grid else None
    axes = tuple(config.image_axes) if getattr(config, "image_axes", None) else None
    if tuple(config.noise_shape) != noise_spec.shape or (grid, axes) != (noise_spec.token_grid, noise_spec.image_axes):
        problems.append(
            f"it makes noise of shape {list(config.noise_shape)} per image, but the pipeline takes {list(noise_spec.shape)} "
            "at this resolution (use the height and width the generator was trained at)"
        )
    found = {name: None if value is None else value.shape[-1] for name, value in generator_inputs(embeds).items()}
    expected = {"prompt_embeds": config.prompt_embeds_dim, "pooled_prompt_embeds": config.pooled_prompt_embeds_dim}
    for name, dim in expected.items():
        if dim is not None and found[name] != dim:
            problems.append(f"it reads `{name}` of width {dim}, but the pipeline's are {found[name] or 'absent'}")
    if problems:
        raise ValueError(
            f"This NoiseGenerator was trained for {config.pipeline_class} ({config.base_pipeline or 'a local pipeline'}) "
            f"and does not fit this {type(pipeline).__name__}: " + "; ".join(problems) + ". Load it into the pipeline "
            "it was trained for, or train a new generator for this one."
        )


def prompt_conditioning(pipeline: DiffusionPipeline, examples: list[dict], **call_kwargs) -> dict:
    """
    The conditioning of each example, under the names the pipeline's `__call__` takes, one row per example: the text
    embeddings of its `prompt` (see `encode_prompts`), and every other column of the example named after an argument
    of `__call__` (a ControlNet's `control_image`, Flux Kontext's reference `image`). Pipelines conditioned on image
    embeddings instead of text (the Kandinsky 2.2 decoder) need their `image_embeds` columns.
    """
    parameters = call_parameters(pipeline)
    columns = {
        name: [example[name] for example in examples]
        for name in examples[0]
        if name in parameters and name != "prompt" and not name.endswith("image_embeds")
    }
    if hasattr(pipeline, "encode_prompt"):
        return {**encode_prompts(pipeline, [example["prompt"] for example in examples], **call_kwargs), **columns}
    names = sorted(name for name in parameters if name.endswith("image_embeds"))
    missing = [name for name in names if name not in examples[0]]
    if not names or missing:
        raise ValueError(
            f"{type(pipeline).__name__} is conditioned on image embeddings, not on text: give the dataset the columns "
            f"{names or ['image_embeds']} (for Kandinsky 2.2, computed from the prompts with KandinskyV22PriorPipeline), "
            "and keep `prompt` for the rewards."
        )
    embeds = {
        name: torch.tensor([example[name] for example in examples], dtype=pipeline.dtype, device=pipeline._execution_device)
        for name in names
    }
    return {**embeds, **columns}


def generator_inputs(conditioning: dict) -> dict[str, torch.Tensor | None]:
    """
    The arguments of `NoiseGenerator.forward` from the output of `prompt_conditioning`: the first per-token embeddings
    (batch, tokens, width) with the mask of its real tokens, and a pooled embedding (batch, width) (the image
    embedding, for pipelines conditioned on one). A list of variable-length embeddings (Z-Image) is padded, with its
    mask. The negative prompts' embeddings are not read.
    """
    own = {
        name: value
        for name, value in conditioning.items()
        if "embeds" in name and not name.startswith("negative") and "mask" not in name
    }
    masks = [value for name, value in conditioning.items() if "mask" in name and isinstance(value, torch.Tensor)]
    prompt_embeds = mask = pooled = None
    for value in own.values():
        if isinstance(value, list) and value and all(isinstance(row, torch.Tensor) and row.ndim == 2 for row in value):
            if prompt_embeds is None:
                prompt_embeds = torch.nn.utils.rnn.pad_sequence(value, batch_first=True)
                lengths = torch.tensor([len(row) for row in value], device=prompt_embeds.device)
                mask = (torch.arange(prompt_embeds.shape[1], device=prompt_embeds.device) < lengths[:, None]).long()
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.ndim == 3 and prompt_embeds is None:
                prompt_embeds = value
                # the mask of these tokens (AuraFlow's is flattened over the width too: it no longer marks tokens)
                mask = next((m for m in masks if m.shape == value.shape[:2]), None)
            elif value.ndim == 2 and pooled is None:
                pooled = value
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}


def images_in_unit_range(pipeline: DiffusionPipeline, images: torch.Tensor) -> torch.Tensor:
    """`output_type="pt"` images of `pipeline` as rewards take them: RGB (Qwen-Image 2.1's alpha channel left out), in
    [0, 1] (the Kandinsky decoders return [-1, 1])."""
    images = images[:, :3]
    if type(pipeline).__name__ in RAW_PT_OUTPUT_PIPELINES:
        return (images * 0.5 + 0.5).clamp(0, 1)
    return images


def generator_config_for(
    pipeline: DiffusionPipeline, noise_spec: NoiseSpec, embeds: dict, **architecture
) -> NoiseGeneratorConfig:
    """The config of a new generator sized for `pipeline`'s noise and prompt embeddings; `architecture` holds the
    remaining `NoiseGeneratorConfig` fields."""
    inputs = generator_inputs(embeds)
    return NoiseGeneratorConfig(
        noise_shape=list(noise_spec.shape),
        token_grid=list(noise_spec.token_grid) if noise_spec.token_grid else None,
        image_axes=list(noise_spec.image_axes) if noise_spec.image_axes else None,
        prompt_embeds_dim=None if inputs["prompt_embeds"] is None else inputs["prompt_embeds"].shape[-1],
        pooled_prompt_embeds_dim=None if inputs["pooled_prompt_embeds"] is None else inputs["pooled_prompt_embeds"].shape[-1],
        base_pipeline=str(pipeline.name_or_path) if pipeline.name_or_path else None,
        pipeline_class=type(pipeline).__name__,
        **architecture,
    )
