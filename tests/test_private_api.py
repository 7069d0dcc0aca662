"""
The private and internal symbols of trl, transformers, diffusers (and accelerate, datasets) that trl-noise-ppo relies
on, checked one by one, so that an upgrade that removes or renames one fails here, naming it, instead of somewhere
inside a training run. `test_the_list_is_complete` keeps the list honest: it reads the package's source for imports
from the libraries' internal modules, private names it imports, uses or overrides, and fails naming any not listed.
"""

import ast
import importlib
import inspect
import pkgutil
import types
import unittest.mock
from pathlib import Path

import pytest
import transformers
from datasets import Dataset
from diffusers.utils.torch_utils import randn_tensor

import trl_noise_ppo
from tests.tiny_pipelines import FAMILIES, build_pipeline
from trl_noise_ppo import NoisePPOConfig, NoisePPOTrainer
from trl_noise_ppo.noise_injection import encode_prompt_call_sites


LIBRARIES = ("trl", "transformers", "diffusers", "accelerate", "datasets")
PACKAGE = Path(trl_noise_ppo.__file__).parent

# "module:attribute.path", looked up by importing the module and following the path
SYMBOLS = [
    # trl: the trainer and config bases (private since trl 1.0), their model-card attributes, and trl.trainer.utils
    "trl.trainer.base_trainer:_BaseTrainer",
    "trl.trainer.base_trainer:_BaseTrainer._tag_names",
    "trl.trainer.base_trainer:_BaseTrainer._name",
    "trl.trainer.base_trainer:_BaseTrainer._paper",
    "trl.trainer.base_config:_BaseConfig",
    "trl.trainer.utils:RepeatSampler",
    "trl.trainer.utils:get_callable_name",
    "trl.trainer.utils:is_async_callable",
    "trl.trainer.utils:get_trackio_space_url",
    "trl.trainer.utils:get_comet_experiment_url",
    "trl.scripts.utils:TrlParser.set_defaults_with_config",  # ConfigCheckingParser checks the config's values there
    # transformers: the Trainer methods NoisePPOTrainer overrides or calls, and internal modules
    "transformers.trainer:Trainer._save_checkpoint",
    "transformers.trainer:Trainer._get_output_dir",
    "transformers.trainer:Trainer._save",
    "transformers.trainer:Trainer._load_from_checkpoint",
    "transformers.trainer:Trainer._prepare_inputs",
    "transformers.trainer:Trainer._get_dataloader",
    "transformers.trainer:Trainer._get_train_sampler",
    "transformers.trainer:Trainer._set_signature_columns_if_needed",
    "transformers.trainer:Trainer._push_from_checkpoint",
    "transformers.trainer:TRAINER_STATE_NAME",
    "transformers.trainer:OPTIMIZER_NAME",
    "transformers.trainer:SCHEDULER_NAME",
    "transformers.trainer:TRAINING_ARGS_NAME",
    "transformers.trainer:hf_api",  # the Hub client the Trainer's pushes (and NoisePPOTrainer's) go through
    "transformers.trainer_pt_utils:safe_globals",
    "transformers.trainer_utils:PREFIX_CHECKPOINT_DIR",
    "transformers.trainer_utils:HubStrategy",
    "transformers.trainer_utils:rotate_checkpoints",
    "transformers.trainer_utils:speed_metrics",
    "transformers.training_args:TrainingArguments._VALID_DICT_FIELDS",  # extended by NoisePPOConfig
    "transformers.modeling_utils:PreTrainedModel._init_weights",  # NoiseGenerator zero-initialises its head there
    "transformers.modeling_utils:PreTrainedModel._keep_in_fp32_modules_strict",  # the rewards' CLIP logit scale
    "transformers.utils:cached_file",
    "transformers.utils:PushInProgress",
    "transformers.utils:PushInProgress.is_done",
    "transformers.utils:CONFIG_NAME",
    "transformers.utils:SAFE_WEIGHTS_NAME",
    "transformers.utils:ADAPTER_CONFIG_NAME",
    "transformers.utils:ADAPTER_SAFE_WEIGHTS_NAME",
    "transformers.image_utils:OPENAI_CLIP_MEAN",
    "transformers.image_utils:OPENAI_CLIP_STD",
    # diffusers: the noise every pipeline draws, and the device its components run on
    "diffusers.utils.torch_utils:randn_tensor",
    "diffusers.pipelines.pipeline_utils:DiffusionPipeline._execution_device",
    # accelerate: internal modules
    "accelerate.utils:gather_object",
    "accelerate.utils:is_peft_model",
    "accelerate.commands.launch:launch_command",
    "accelerate.commands.launch:launch_command_parser",
]


def _trainer(**config):
    args = NoisePPOConfig(output_dir="unused", num_generations=2, per_device_train_batch_size=2, report_to="none", **config)
    return NoisePPOTrainer(build_pipeline("sd"), lambda images, **kwargs: [0.0] * len(images), args=args,
                           train_dataset=Dataset.from_dict({"prompt": ["a cat"]}))


def _pushing_trainer():
    """A trainer that pushes to a stand-in Hub: `Trainer.init_hf_repo` sets `push_in_progress`."""

    class Hub:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=f"user/{repo_id}")

    with unittest.mock.patch("transformers.trainer.hf_api", Hub):
        return _trainer(push_to_hub=True)


# private attributes of objects, rather than of classes: attribute -> how to get an object that has it
INSTANCE_ATTRIBUTES = {
    "_signature_columns": _trainer,  # set by Trainer.__init__, filled by _set_signature_columns_if_needed
    "_train_batch_size": _trainer,
    "push_in_progress": _pushing_trainer,  # read and replaced by NoisePPOTrainer._push_from_checkpoint
    "jobs": lambda: importlib.import_module("transformers.utils").PushInProgress(),  # extended by it
    "_fingerprint": lambda: Dataset.from_dict({"prompt": ["a cat"]}),  # datasets: keys the evaluation's base scores
    "_actions": lambda: importlib.import_module("accelerate.commands.launch").launch_command_parser(),  # argparse's
}
# private-looking names the package uses that are documented public API
PUBLIC = {"_exit", "_replace", "_asdict", "_fields"}  # os._exit, a namedtuple's public _replace, _asdict, _fields


def _lookup(symbol: str):
    module_name, path = symbol.split(":")
    target = importlib.import_module(module_name)
    for name in path.split("."):
        target = getattr(target, name)
    return target


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_symbol_exists(symbol):
    try:
        _lookup(symbol)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{symbol} is gone ({error}): trl-noise-ppo relies on it; adapt the code that uses it, or pin the "
                    "library below the version that removed it.")


@pytest.mark.parametrize("attribute", sorted(INSTANCE_ATTRIBUTES))
def test_instance_attribute_exists(attribute):
    assert hasattr(INSTANCE_ATTRIBUTES[attribute](), attribute), f"{attribute} is gone: trl-noise-ppo relies on it"


@pytest.fixture(scope="module")
def pipeline_classes():
    return {family: type(build_pipeline(family)) for family in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_noise_discovery_seams_hold_for_every_family(family, pipeline_classes):
    """noise_injection records the noise a pipeline draws with a copy of its `prepare_latents` (or of its undecorated
    `__call__`) whose globals hold a recording `randn_tensor` in place of its module's, and reads how `__call__` calls
    `encode_prompt` from its source."""
    pipeline_class = pipeline_classes[family]
    name = pipeline_class.__name__
    # a pipeline without prepare_latents (ERNIE-Image) draws its noise in __call__, through its module's randn_tensor
    drawing_function = getattr(pipeline_class, "prepare_latents", None) or inspect.unwrap(pipeline_class.__call__)
    assert drawing_function.__globals__.get("randn_tensor") is randn_tensor, (
        f"{name}.{drawing_function.__name__}.__globals__['randn_tensor'] is no longer diffusers.utils.torch_utils.randn_tensor")
    if hasattr(pipeline_class, "encode_prompt"):
        assert encode_prompt_call_sites(pipeline_class), f"inspect.getsource({name}.__call__) shows no self.encode_prompt call"


def _package_modules():
    return [importlib.import_module(module.name)
            for module in pkgutil.walk_packages([str(PACKAGE)], prefix="trl_noise_ppo.")]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_list_is_complete():
    listed = {symbol.split(":")[1].split(".")[-1] for symbol in SYMBOLS} | set(INSTANCE_ATTRIBUTES) | PUBLIC
    trees = {path: ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}
    defined = set()  # private names the package itself defines
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)

    missing = set()
    for path, tree in trees.items():
        for node in ast.walk(tree):
            # imports from the libraries' internal modules, and private names imported from them
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
                for alias in node.names:
                    symbol = f"{node.module}:{alias.name}"
                    if ("." in node.module or _private(alias.name)) and symbol not in SYMBOLS:
                        missing.add(f"{symbol} ({path.relative_to(PACKAGE)})")
            # private attributes used but defined nowhere in the package: some library's
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in defined | listed:
                missing.add(f".{node.attr} ({path.relative_to(PACKAGE)})")

    # private attributes of library classes that the package's subclasses define: overrides, and attributes a library
    # class sets on itself (`self._signature_columns` in Trainer) that a subclass assigns
    for module in _package_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            libraries = [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] in LIBRARIES]
            for name in filter(_private, vars(cls)):
                owner = next((base for base in libraries if name in vars(base)), None)
                if owner is not None and f"{owner.__module__}:{owner.__name__}.{name}" not in SYMBOLS:
                    missing.add(f"{owner.__module__}:{owner.__name__}.{name} (overridden by {cls.__name__})")
            source = inspect.getsource(cls)
            for name in {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute) and _private(node.attr)}:
                owner = next((base for base in libraries if f"self.{name} =" in inspect.getsource(base)), None)
                if owner is not None and name not in listed:
                    missing.add(f"self.{name} (set by {owner.__name__}, used by {cls.__name__})")
    assert not missing, f"add these to SYMBOLS or INSTANCE_ATTRIBUTES: {sorted(missing)}"


def test_transformers_is_bounded_to_the_tested_minor_versions():
    """setup.py allows only the transformers versions the Trainer overrides above were tested with."""
    setup = (PACKAGE.parent / "setup.py").read_text()
    requirement = next(line.strip(' ",') for line in setup.splitlines() if '"transformers' in line)
    assert "<" in requirement, requirement
    installed = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    upper = tuple(int(part) for part in requirement.split("<")[1].split(".")[:2])
    assert installed < upper, f"transformers {transformers.__version__} is installed, beyond {requirement}"
