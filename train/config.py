"""Training configuration: dataclasses with the paper's defaults, YAML presets, key=value overrides.

    config = load_config("demo", ["optim.epochs=3", "model.mae=false"])

A preset is `train/configs/<name>.yaml` (or any YAML path); it may name a `base` preset it extends.
`python -m train.config --config <preset> [key=value ...]` checks a config (run.resume and data.shards too):
`make pretrain` runs it before torchrun, so a bad config gets one line and no torchrun traceback.
"""

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datapipe.loader import CacheOptions
from datapipe.mixing import open_shards
from datapipe.object_store import StorageError
from model.meta_arch import ModelConfig
from model.objectives import OBJECTIVES
from train.parameter_groups import WEIGHT_DECAY_RULES
from train.views import VIEW_CHOICES, check_views

PRESETS = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    shards: str | list[str] = "shards/cc3m/train"  # a list mixes several sets by mix_weights
    mix_weights: tuple[float, ...] = ()  # one per set of `shards` (open_clip's upsampling factors); () = 1 each
    batch_size: int = 96  # per rank
    backend: str = "auto"
    num_workers: int = 10
    global_crop_px: int = 224
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_px: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    local_crops_number: int = 8
    global_flip_prob: float = 0.5  # horizontal flip of the global (or single CLIP) crops; 0 for CLIP's weak view
    views: str = "auto"  # the view recipe (train/views.py): auto (multi-crop or one crop), slip, clip_rocket, aclip
    hue: float = 0.1  # colour jitter's hue range (fraction of the colour circle), all crops
    grayscale_prob: float = 0.2
    shuffle_window: int = 4096
    # Remote shards (s3://, gs://, hf:// in data.shards) are read through a local cache: its folder ("" =
    # ~/.cache/harmony-pipe/shards), its size limit, and the retries of a broken connection (with backoff).
    cache_dir: str = ""
    cache_limit_gb: float = 50.0
    fetch_retries: int = 4
    fetch_retry_wait_s: float = 1.0


@dataclass
class OptimConfig:
    epochs: int = 25
    lr: float = 5e-4  # per 256 images; scaled by the global batch
    min_lr: float = 1e-6
    warmup_epochs: int = 3
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    # Which parameters are decayed, as the method's official code (train/parameter_groups.py): harmony (all but
    # biases and 1-D tensors), open_clip (all but biases and tensors of under 2 dimensions: the logit scale and bias
    # too), m3ae (all but biases, embeddings and learned tokens).
    weight_decay_rule: str = "harmony"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    clip_grad: float = 3.0  # per parameter, image student and iBOT head; 0 = off
    freeze_last_layer_epochs: int = 1
    teacher_momentum: float = 0.996  # cosine to teacher_momentum_end
    teacher_momentum_end: float = 1.0  # BYOLIP: 0.99, as teacher_momentum (a constant momentum)
    teacher_cls_temp: float = 0.04
    warmup_teacher_cls_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 5
    clip_hard_weight_end: float = 0.2  # alpha: cosine 1 -> this over clip_hard_weight_epochs, then constant
    clip_hard_weight_epochs: int = 10


@dataclass
class RunConfig:
    name: str = "harmony"
    out_dir: str = "runs"
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    log_every: int = 10  # steps
    checkpoint_every: int = 500  # steps; one is also written at the end and on SIGTERM/SIGUSR1
    keep_checkpoints: int = 3  # the newest K are kept, so a damaged one is survivable
    resume: str = "auto"  # auto | none | a checkpoint path
    # run.resume=<path> may load a checkpoint whose .json (size, sha256) is missing or unreadable, unchecked
    trust_unverified_checkpoint: bool = False
    accept_config_changes: bool = False  # resume even when settings that change the run differ
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops
    max_steps: int = 0  # stop early after this many steps in total (0 = run every epoch)
    collective_timeout_s: int = 600  # a rank that stops answering makes every rank fail after this long


PRECISIONS = ("bf16", "fp16", "fp32")
BACKENDS = ("auto", "dali", "torch")
# Settings a resume may change without changing the run: where the run lives (a run folder may be renamed
# or moved), how often to log and save, where to stop, how long to wait, how many loader workers, where
# the shards are (their content is checked by the loader) and how they are cached, and data.batch_size,
# whose product with the number of ranks (the global batch) is checked.
RESUME_MAY_CHANGE = {"run.name", "run.out_dir", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints",
                     "run.resume", "run.trust_unverified_checkpoint", "run.accept_config_changes",
                     "run.max_nonfinite_steps", "run.max_steps", "run.collective_timeout_s", "data.num_workers",
                     "data.shards", "data.batch_size", "data.cache_dir", "data.cache_limit_gb", "data.fetch_retries",
                     "data.fetch_retry_wait_s",
                     "model.activation_checkpointing"}  # recomputing activations changes no value


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.run.precision not in PRECISIONS:
            raise ValueError(f"run.precision={self.run.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.data.backend not in BACKENDS:
            raise ValueError(f"data.backend={self.data.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.data.views not in VIEW_CHOICES:
            raise ValueError(f"data.views={self.data.views!r}: choose one of {', '.join(VIEW_CHOICES)}")
        if self.optim.weight_decay_rule not in WEIGHT_DECAY_RULES:
            raise ValueError(f"optim.weight_decay_rule={self.optim.weight_decay_rule!r}: choose one of "
                             f"{', '.join(WEIGHT_DECAY_RULES)}")
        if not self.data.shards:
            raise ValueError("data.shards is empty: give the training shards' folder or location (s3://, gs://, "
                             "hf://), or a list of them mixed by data.mix_weights")
        if not 0 <= self.data.global_flip_prob <= 1:
            raise ValueError(f"data.global_flip_prob={self.data.global_flip_prob} is a probability: give 0 to 1")
        check_views(self, [name for objective in self.model.objectives
                           for name in OBJECTIVES[objective](self.model).reads])
        at_least = {"data.batch_size": 1, "data.num_workers": 0, "data.shuffle_window": 1,
                    "data.local_crops_number": 0, "data.cache_limit_gb": 0,
                    "data.fetch_retries": 0, "data.fetch_retry_wait_s": 0, "optim.epochs": 1, "optim.lr": 0,
                    "optim.min_lr": 0,
                    "optim.warmup_epochs": 0, "optim.weight_decay": 0, "optim.weight_decay_end": 0,
                    "optim.clip_grad": 0, "run.log_every": 1, "run.checkpoint_every": 1, "run.keep_checkpoints": 1,
                    "run.max_nonfinite_steps": 1, "run.max_steps": 0, "run.collective_timeout_s": 1}
        for key, minimum in at_least.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not isinstance(value, int | float) or value < minimum:
                raise ValueError(f"{key}={value!r}: it must be a number, at least {minimum}")
        if self.run.trust_unverified_checkpoint and self.run.resume in ("auto", "none"):
            raise ValueError(f"run.trust_unverified_checkpoint=true applies to run.resume=<a checkpoint path> only, "
                             f"not run.resume={self.run.resume}: name the checkpoint to trust, or leave it false")

    @property
    def run_dir(self):
        return Path(self.run.out_dir) / self.run.name


def _read_preset(preset):
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else PRESETS / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise FileNotFoundError(f"config preset {preset!r} not found ({path}); presets: {', '.join(names)}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"config preset {path} is not valid YAML{where}: "
                         f"{getattr(error, 'problem', None) or error}; fix the file") from None
    if not isinstance(values, dict):
        raise ValueError(f"config preset {path} must hold `key: value` settings (sections model, data, optim, "
                         f"run), not a {type(values).__name__}")
    base = values.pop("base", None)
    return _merge(_read_preset(base), values) if base else values


def _merge(base, update):
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _parse_override(text):
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value (e.g. optim.lr=0.001)")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        raise ValueError(f"override {text!r}: {value!r} is not a value (a number, true/false, text, or a list "
                         f"such as [0.5, 1.0]); quote text that holds YAML characters") from None
    nested = parsed
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


ONE_VALUE = {int: "a whole number", float: "a number", bool: "true or false",
             str: "text (quote it if it reads as a number or true/false)"}
LIST_OF = {int: "whole numbers, e.g. [1, 2]", float: "numbers, e.g. [1, 2]", bool: "true/false values",
           str: "texts, e.g. [a, b]"}


def _expected(annotation):
    """What a value of `annotation` is, in words."""
    origin, items = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is types.UnionType:
        return " or ".join(_expected(choice) for choice in items)
    if origin is tuple and Ellipsis not in items:
        return f"a list of {len(items)} values, e.g. [0.5, 1.0]"
    if origin in (tuple, list):
        return f"a list of {LIST_OF[items[0]]}"
    return ONE_VALUE[annotation]


def _takes_a_list(annotation):
    if typing.get_origin(annotation) is types.UnionType:
        return any(_takes_a_list(choice) for choice in typing.get_args(annotation))
    return typing.get_origin(annotation) in (tuple, list)


def _typed(key, value, annotation):
    """`value` as the field's declared type: int, float, bool or str; a tuple of them (of a fixed length, or any
    length as `tuple[float, ...]`) or a list; or a choice of those (`str | list[str]`). A ValueError naming the key
    otherwise. Integers are taken for floats; nothing is rounded or guessed."""
    converted = _converted(value, annotation)
    if converted is not None:
        return converted
    one_value = "it takes one value, not a list; " if isinstance(value, list) and not _takes_a_list(annotation) else ""
    raise ValueError(f"{key}={value!r}: {one_value}it must be {_expected(annotation)}")


def _converted(value, annotation):
    """`value` as `annotation` (see _typed), or None when it is not one."""
    origin, items = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is types.UnionType:
        return next((typed for choice in items if (typed := _converted(value, choice)) is not None), None)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return None
        if origin is list or Ellipsis in items:
            items = items[:1] * len(value)
        if len(value) != len(items):
            return None
        typed = [_converted(item, item_type) for item, item_type in zip(value, items, strict=True)]
        return None if None in typed else origin(typed)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    return None


def _build(cls, values, where):
    section = where.rstrip(".") or "the config"
    if not isinstance(values, dict):
        raise ValueError(f"{section}={values!r}: {section} is a section, not a value; set its keys "
                         f"({section}.<key>=...), which are: {', '.join(f.name for f in dataclasses.fields(cls))}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                         f"{where or 'top level'} has: {', '.join(known)}")
    types = typing.get_type_hints(cls)
    arguments = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(types[name]):
            arguments[name] = _build(types[name], value, f"{where}{name}.")
        else:
            arguments[name] = _typed(f"{where}{name}", value, types[name])
    return cls(**arguments)


def load_config(preset="demo", overrides=()):
    values = _read_preset(preset)
    for override in overrides:
        values = _merge(values, _parse_override(override))
    return _build(TrainConfig, values, "")


def to_dict(config):
    return dataclasses.asdict(config)


def flatten(values, prefix=""):
    """{"optim.lr": 0.004, ...} from a nested config dict."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = list(value) if isinstance(value, tuple) else value
    return flat


def differences(saved, current):
    """[(key, saved value, current value)] of two nested dicts, every flattened key that differs."""
    saved, current = flatten(saved), flatten(current)
    return [(key, saved.get(key), current.get(key)) for key in sorted(saved.keys() | current.keys())
            if saved.get(key) != current.get(key)]


def resume_differences(saved, current):
    """differences() of a checkpoint's config and the current one, where a setting the checkpoint's config predates
    counts as its default there (a setting added later keeps, at its default, what the code did before)."""
    return differences({**flatten(to_dict(TrainConfig())), **flatten(saved)}, current)


def cache_options(data):
    """How remote shards are cached: data.cache_dir ("" = the default folder), its limit, the retries."""
    folder = {"folder": Path(data.cache_dir)} if data.cache_dir else {}
    return CacheOptions(**folder, limit_gb=data.cache_limit_gb, fetch_retries=data.fetch_retries,
                        retry_wait_s=data.fetch_retry_wait_s)


def check_shards(data):
    """Raise ValueError, FileNotFoundError or StorageError unless data.shards opens as training opens it: each set
    there with its indexes, the weights fitting the sets, a remote set's manifest read and its objects listed with
    the user's credentials, and its cache folder made or found a cache (nothing is fetched)."""
    open_shards(data.shards, data.mix_weights, cache_options(data))


def check_resume_choice(run):
    """Raise ValueError unless run.resume is auto, none or an existing checkpoint file."""
    if run.resume in ("auto", "none") or Path(run.resume).is_file():
        return
    problem = "is a folder, not a checkpoint file" if Path(run.resume).is_dir() else "does not exist"
    close = difflib.get_close_matches(run.resume, ("auto", "none"), n=1)
    hint = f"Did you mean run.resume={close[0]}? " if close else ""
    raise ValueError(f"run.resume={run.resume!r}: {problem}. {hint}The value must be auto (the newest good "
                     f"checkpoint of the run folder), none (start afresh) or the path of a checkpoint-<step>.pt")


def parse_command_line(argv, description):
    """The config of `--config <preset> [key=value ...]`, run.resume and data.shards checked; a one-line exit on
    any error (object storage's too: a missing bucket, no credentials, access denied)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="a preset in train/configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.epochs=5 data.batch_size=64")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_resume_choice(config.run)
        check_shards(config.data)
    except (ValueError, FileNotFoundError, StorageError) as error:
        raise SystemExit(f"config error: {error}") from None
    return config


if __name__ == "__main__":
    parse_command_line(sys.argv[1:], __doc__)
