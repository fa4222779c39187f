"""Training configuration: dataclasses with the paper's defaults, YAML presets, key=value overrides.

    config = load_config("harmony/demo", ["optim.epochs=3", "model.objectives.mae=false"])

A preset is `train/configs/<method>/<scale>.yaml` (or any YAML path); it may name a `base` preset it extends (the
towers, data and optimisation of a scale are `base/<scale>`) and names the objectives it trains under
`model.objectives`. Every numeric setting declares its valid range next to its field (model/ranges.py), checked when
the config is built. Configs and preset names of the form before objectives owned their settings are read through
train/config_renames.py, with a one-line notice.
`python -m train.config --config <preset> [key=value ...]` checks a config (run.resume and data.shards too):
`make pretrain` runs it before torchrun, so a bad config gets one line and no torchrun traceback.
"""

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datapipe.common.object_store import StorageError
from datapipe.load.loader import CacheOptions
from datapipe.load.mixing import MAX_WEIGHT, open_shards
from model.model_config import ModelConfig, objective_settings, unknown_objective
from model.objectives import OBJECTIVES
from model.ranges import check_ranges, ranged
from train.config_renames import PRESET_RENAMES, migrate, renamed_line
from train.parameter_groups import WEIGHT_DECAY_RULES
from train.step_inputs import VIEW_CHOICES, check_views

PRESETS = Path(__file__).parent / "configs"
MIX_WEIGHT_NOTE = f"a set's reads per epoch: 2 reads it twice, 0.5 half of it; at most {MAX_WEIGHT}, as the epoch's " \
              f"schedule lists the set's shards once per unit of weight"
SCALE_NOTE = "[smallest, largest] share of the image's area a crop covers"
MOMENTUM_NOTE = "an EMA momentum: 0 copies the student, 1 keeps the teacher fixed"


@dataclass
class DataConfig:
    """What the loader reads and the crops it makes."""

    shards: str | list[str] = "shards/cc3m/train"  # a list mixes several sets by mix_weights
    # one per set of `shards` (open_clip's upsampling factors); () = 1 each
    mix_weights: tuple[float, ...] = ranged((), f"(0, {MAX_WEIGHT}]", note=MIX_WEIGHT_NOTE)
    batch_size: int = ranged(96, "[1, inf)")  # per rank
    backend: str = "auto"  # the loader: auto (DALI) | dali | torch (Pillow and torchvision, the reference)
    num_workers: int = ranged(10, "[0, inf)")  # loader worker threads (DALI) or processes (torch) per rank
    global_crop_px: int = ranged(224, "[1, inf)")  # side of the global (or single CLIP) crops, pixels
    global_crop_scale: tuple[float, float] = ranged((0.32, 1.0), "[0, 1]", "(0, 1]", note=SCALE_NOTE)
    local_crop_px: int = ranged(96, "[1, inf)")  # side of the local crops, pixels
    local_crop_scale: tuple[float, float] = ranged((0.05, 0.32), "[0, 1]", "(0, 1]", note=SCALE_NOTE)
    local_crops_number: int = ranged(8, "[0, inf)")  # local crops per sample (multi-crop); 0: none
    # horizontal flip of the global (or single CLIP) crops; 0 for CLIP's weak view
    global_flip_prob: float = ranged(0.5, "[0, 1]", note="a probability")
    # the view recipe (train/step_inputs.py): auto (multi-crop or one crop), slip, clip_rocket, aclip
    views: str = "auto"
    # colour jitter's hue range (fraction of the colour circle), all crops
    hue: float = ranged(0.1, "[0, 0.5]", note="a fraction of the colour circle each way; 0.5 reaches every hue")
    grayscale_prob: float = ranged(0.2, "[0, 1]", note="a probability")
    # samples are shuffled within windows of this many (shard order shuffled too)
    shuffle_window: int = ranged(4096, "[1, inf)")
    # Remote shards (s3://, gs://, hf:// in data.shards) are read through a local cache: its folder ("" =
    # ~/.cache/harmony-pipe/shards), its size limit, and the retries of a broken connection (with backoff).
    cache_dir: str = ""
    cache_limit_gb: float = ranged(50.0, "[0, inf)")  # size limit of the local shard cache
    fetch_retries: int = ranged(4, "[0, inf)")  # retries of a broken connection
    fetch_retry_wait_s: float = ranged(1.0, "[0, inf)")  # first wait between retries, doubling

    ORDERED = ("global_crop_scale", "local_crop_scale")

    def __post_init__(self):
        check_ranges(self, "data.")


@dataclass
class OptimConfig:
    """AdamW, the schedules and the EMA teachers."""

    epochs: int = ranged(25, "[1, inf)")  # training epochs
    lr: float = ranged(5e-4, "(0, inf)")  # per 256 images; scaled by the global batch
    min_lr: float = ranged(1e-6, "[0, inf)")  # the cosine schedule's final learning rate
    warmup_epochs: int = ranged(3, "[0, inf)")  # epochs of linear learning-rate warm-up
    weight_decay: float = ranged(0.04, "[0, inf)")  # weight decay at the start, cosine to weight_decay_end
    weight_decay_end: float = ranged(0.4, "[0, inf)")  # weight decay at the end
    # Which parameters are decayed, as the method's official code (train/parameter_groups.py): harmony (all but
    # biases and 1-D tensors), open_clip (all but biases and tensors of under 2 dimensions: the logit scale and bias
    # too), m3ae (all but biases, embeddings and learned tokens).
    weight_decay_rule: str = "harmony"
    betas: tuple[float, float] = ranged((0.9, 0.98), "[0, 1)", note="AdamW's moment decays")
    eps: float = ranged(1e-6, "(0, inf)")  # AdamW's epsilon
    clip_grad: float = ranged(3.0, "[0, inf)")  # per parameter, image student and iBOT head; 0 = off
    freeze_last_layer_epochs: int = ranged(1, "[0, inf)")  # epochs the iBOT head's last layer stays frozen
    teacher_momentum: float = ranged(0.996, "[0, 1]", note=MOMENTUM_NOTE)  # cosine to teacher_momentum_end
    # BYOLIP: 0.99, as teacher_momentum (a constant momentum)
    teacher_momentum_end: float = ranged(1.0, "[0, 1]", note=MOMENTUM_NOTE)
    teacher_cls_temp: float = ranged(0.04, "(0, inf)")  # iBOT teacher's CLS temperature after its warm-up
    warmup_teacher_cls_temp: float = ranged(0.04, "(0, inf)")  # its start, linear to teacher_cls_temp
    teacher_patch_temp: float = ranged(0.07, "(0, inf)")  # iBOT teacher's patch temperature after its warm-up
    warmup_teacher_patch_temp: float = ranged(0.04, "(0, inf)")  # its start, linear to teacher_patch_temp
    warmup_teacher_temp_epochs: int = ranged(5, "[0, inf)")  # epochs of both temperatures' warm-up
    # alpha: cosine 1 -> this over clip_hard_weight_epochs, then constant
    clip_hard_weight_end: float = ranged(0.2, "[0, 1]")
    clip_hard_weight_epochs: int = ranged(10, "[0, inf)")  # epochs of alpha's cosine

    ORDERED = (("min_lr", "lr"), ("warmup_teacher_cls_temp", "teacher_cls_temp"),
               ("warmup_teacher_patch_temp", "teacher_patch_temp"))

    def __post_init__(self):
        check_ranges(self, "optim.")


@dataclass
class RunConfig:
    """The run folder, precision, logging, checkpoints and stopping."""

    name: str = "harmony"  # the run folder's name, under out_dir
    out_dir: str = "runs"  # where run folders are made
    seed: int = ranged(0, "[0, 2147483647]")  # sets the initialisation and the data order
    precision: str = "bf16"  # bf16 | fp16 | fp32
    log_every: int = ranged(10, "[1, inf)")  # steps
    checkpoint_every: int = ranged(500, "[1, inf)")  # steps; one is also written at the end and on SIGTERM/SIGUSR1
    keep_checkpoints: int = ranged(3, "[1, inf)")  # the newest K are kept, so a damaged one is survivable
    resume: str = "auto"  # auto | none | a checkpoint path
    # run.resume=<path> may load a checkpoint whose .json (size, sha256) is missing or unreadable, unchecked
    trust_unverified_checkpoint: bool = False
    accept_config_changes: bool = False  # resume even when settings that change the run differ
    max_nonfinite_steps: int = ranged(5, "[1, inf)")  # consecutive skipped steps before the run stops
    max_steps: int = ranged(0, "[0, inf)")  # stop early after this many steps in total (0 = run every epoch)
    # a rank that stops answering makes every rank fail after this long
    collective_timeout_s: int = ranged(600, "[1, inf)")

    def __post_init__(self):
        check_ranges(self, "run.")


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
        if self.data.global_crop_px != self.model.global_crop_px:
            raise ValueError(f"data.global_crop_px={self.data.global_crop_px} and model.global_crop_px="
                             f"{self.model.global_crop_px} differ: the model's position table is made for the crops "
                             f"the data makes; set both to the same size")
        if self.optim.weight_decay_rule not in WEIGHT_DECAY_RULES:
            raise ValueError(f"optim.weight_decay_rule={self.optim.weight_decay_rule!r}: choose one of "
                             f"{', '.join(WEIGHT_DECAY_RULES)}")
        if not self.data.shards:
            raise ValueError("data.shards is empty: give the training shards' folder or location (s3://, gs://, "
                             "hf://), or a list of them mixed by data.mix_weights")
        check_views(self, [name for objective in self.model.built_objectives().values()
                           for name in objective.reads])
        if self.run.trust_unverified_checkpoint and self.run.resume in ("auto", "none"):
            raise ValueError(f"run.trust_unverified_checkpoint=true applies to run.resume=<a checkpoint path> only, "
                             f"not run.resume={self.run.resume}: name the checkpoint to trust, or leave it false")

    @property
    def run_dir(self):
        return Path(self.run.out_dir) / self.run.name


def preset_names():
    """Every preset's name (`clip/demo`, `base/demo`, ...), sorted."""
    return sorted(path.relative_to(PRESETS).with_suffix("").as_posix() for path in PRESETS.rglob("*.yaml"))


def renamed_preset(preset):
    """(old name, new name) where `preset` is a preset's name before presets moved to one folder per method."""
    return (preset, PRESET_RENAMES[preset]) if preset in PRESET_RENAMES else None


def _preset_path(preset):
    preset = PRESET_RENAMES.get(preset, preset)
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else PRESETS / f"{preset}.yaml"
    if not path.is_file():
        names = preset_names()
        raise FileNotFoundError(f"config preset {preset!r} not found ({path}). {_did_you_mean(str(preset), names)}"
                                f"Known presets: {', '.join(names)}")
    return path


def _did_you_mean(name, known, prefix=""):
    """"Did you mean <prefix>x or <prefix>y? " with the names of `known` closest to `name`, or "" if none is close."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"Did you mean {' or '.join(prefix + match for match in close)}? " if close else ""


def _read_preset(preset, chain=()):
    """The settings of `preset`, over those of its `base` preset (and its base's, ...); `chain`: the presets that
    named it as their base, so that a cycle of bases is an error that names it."""
    path = _preset_path(preset)
    if path.resolve() in chain:
        cycle = [*(step.stem for step in chain[list(chain).index(path.resolve()):]), path.stem]
        raise ValueError(f"config preset {path}: its bases make a cycle ({' -> '.join(cycle)}); give one of them "
                         f"another base or none")
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
    return _merge(_read_preset(base, (*chain, path.resolve())), values) if base else values


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
    if annotation is float and isinstance(value, str):
        return _float_text(value)
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    return None


def _float_text(text):
    """The float Python reads in `text` (1e9, 5e-4, 1_000.5, inf, nan: YAML takes these for text), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def _build(cls, values, where):
    section = where.rstrip(".") or "the config"
    if not isinstance(values, dict):
        raise ValueError(f"{section}={values!r}: {section} is a section, not a value; set its keys "
                         f"({section}.<key>=...), which are: {', '.join(f.name for f in dataclasses.fields(cls))}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = "".join(_did_you_mean(name, list(known), where) for name in unknown)
        raise ValueError(f"unknown config key(s) {[f'{where}{name}' for name in unknown]}. {hints}"
                         f"{where.rstrip('.') or 'The top level'} has: {', '.join(known)}")
    types = typing.get_type_hints(cls)
    arguments = {}
    for name, value in values.items():
        if known[name].metadata.get("objectives"):
            arguments[name] = _build_objectives(value, f"{where}{name}.")
        elif dataclasses.is_dataclass(types[name]):
            arguments[name] = _build(types[name], value, f"{where}{name}.")
        else:
            arguments[name] = _typed(f"{where}{name}", value, types[name])
    return cls(**arguments)


def _build_objectives(values, where):
    """{name: settings} of `model.objectives`: each objective's settings typed and checked as any section's; false
    or null leaves an objective out."""
    if not isinstance(values, dict):
        raise ValueError(f"{where.rstrip('.')}={values!r}: name the objectives with their settings, e.g. "
                         f"{where}clip.weight=1 or {where}clip={{}}")
    objectives = {}
    for name, value in values.items():
        if name not in OBJECTIVES:
            raise unknown_objective(name)
        if isinstance(value, dict):
            objectives[name] = _build(OBJECTIVES[name].Settings, value, f"{where}{name}.")
        else:
            objectives[name] = objective_settings(name, value)
    return objectives


def load_config(preset="harmony/demo", overrides=(), notices=None):
    """The config of `preset` with `overrides` (key=value). Old preset names and keys are read as their new ones;
    `notices`, a list, receives the one line that says so."""
    values = _read_preset(preset)
    for override in overrides:
        values = _merge(values, _parse_override(override))
    values, renamed = migrate(values)
    line = renamed_line(renamed, renamed_preset(preset))
    if line and notices is not None:
        notices.append(line)
    return _build(TrainConfig, values, "")


def config_from_dict(values):
    """The config a run saved (its config.yaml, a checkpoint's config), old keys read as their new ones."""
    return _build(TrainConfig, migrate(values)[0], "")


def enabled_settings_overrides(preset, settings):
    """`key=value` overrides of `settings` ({objective: {setting: value}}) for the objectives `preset` enables only:
    an override naming another objective would enable it."""
    return [f"model.objectives.{name}.{key}={value}" for name in load_config(preset).model.objectives
            for key, value in settings.get(name, {}).items()]


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


def unflatten(flat):
    """The nested dict of {"optim.lr": 0.004, ...}: flatten's inverse."""
    nested = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        parent = nested
        for section in sections:
            parent = parent.setdefault(section, {})
        parent[name] = value
    return nested


def differences(saved, current):
    """[(key, saved value, current value)] of two nested dicts, every flattened key that differs."""
    saved, current = flatten(saved), flatten(current)
    return [(key, saved.get(key), current.get(key)) for key in sorted(saved.keys() | current.keys())
            if saved.get(key) != current.get(key)]


def resume_differences(saved, current):
    """differences() of a checkpoint's config (old keys read as their new ones) and the current one, where a setting
    the checkpoint's config predates counts as its default there (a setting added later keeps, at its default, what
    the code did before)."""
    return differences(to_dict(config_from_dict(saved)), current)


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


def config_warnings(config):
    """Lines on settings that are valid but likely not meant: a warm-up as long as the run or longer."""
    optim, lines = config.optim, []
    if optim.warmup_epochs >= optim.epochs:
        lines.append(f"optim.warmup_epochs={optim.warmup_epochs} is not below optim.epochs={optim.epochs}: the "
                     f"learning rate warms up for the whole run and never decays from optim.lr; lower "
                     f"optim.warmup_epochs if that is not meant")
    temperatures_warm_up = (optim.warmup_teacher_cls_temp, optim.warmup_teacher_patch_temp) != \
        (optim.teacher_cls_temp, optim.teacher_patch_temp)
    if temperatures_warm_up and optim.warmup_teacher_temp_epochs > optim.epochs:
        lines.append(f"optim.warmup_teacher_temp_epochs={optim.warmup_teacher_temp_epochs} is above optim.epochs="
                     f"{optim.epochs}: the teacher temperatures never reach optim.teacher_cls_temp and "
                     f"optim.teacher_patch_temp; lower optim.warmup_teacher_temp_epochs if that is not meant")
    return lines


def settings_line(config, preset_config, saved_at):
    """One line: the settings of `config` that differ from its preset's (`preset_config`; None: the defaults'),
    and where the whole config is kept."""
    before, now = _objectives_switched(to_dict(preset_config) if preset_config else default_values(), to_dict(config))
    changed = differences(before, now)
    settings = ", ".join(f"{key}={value}" for key, _, value in changed) or "none"
    return (f"config: {'the preset' if preset_config else 'the defaults'} with {settings}; the whole config is "
            f"in {saved_at}")


def _objectives_switched(before, now):
    """(before, now) where an objective `now` leaves out is one setting (false), and one it adds is compared with its
    defaults (true where it keeps every default), not one entry per setting."""
    before_objectives = before.get("model", {}).get("objectives", {})
    now_objectives = now["model"]["objectives"]
    removed = set(before_objectives) - set(now_objectives)
    added = {name: dataclasses.asdict(OBJECTIVES[name].Settings()) for name in now_objectives
             if name not in before_objectives}
    as_defaults = {name for name, defaults in added.items() if now_objectives[name] == defaults}
    before_marked = {**before_objectives, **{name: True for name in removed},
                     **{name: False if name in as_defaults else defaults for name, defaults in added.items()}}
    now_marked = {**now_objectives, **{name: False for name in removed}, **{name: True for name in as_defaults}}
    return ({**before, "model": {**before.get("model", {}), "objectives": before_marked}},
            {**now, "model": {**now["model"], "objectives": now_marked}})


def default_values():
    """The nested dict of every section's defaults (no objectives: a preset names them)."""
    return {section.name: {setting.name: setting.default for setting in dataclasses.fields(section.type)
                           if setting.default is not dataclasses.MISSING}
            for section in dataclasses.fields(TrainConfig)}


def _preset_alone(preset):
    """The config of `preset` without overrides, or None where it is not valid alone (an override completes it)."""
    try:
        return load_config(preset)
    except ValueError:
        return None


def read_command_line(argv, description):
    """(config, its preset's config or None) of `--config <preset> [key=value ...]`, run.resume and data.shards
    checked; a one-line exit on any error (object storage's too: a missing bucket, no credentials, access denied).
    Warnings are printed, by the first rank only."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="harmony/demo", help="a preset in train/configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.epochs=5 data.batch_size=64")
    args = parser.parse_args(argv)
    notices, first_rank = [], os.environ.get("RANK", "0") == "0"
    try:
        config = load_config(args.config, args.overrides, notices)
        if first_rank:
            for line in notices:
                print(line, file=sys.stderr, flush=True)
        check_resume_choice(config.run)
        check_shards(config.data)
    except (ValueError, FileNotFoundError, StorageError) as error:
        raise SystemExit(f"config error: {error}") from None
    if first_rank:
        for line in config_warnings(config):
            print(f"config warning: {line}", file=sys.stderr, flush=True)
    return config, _preset_alone(args.config)


def parse_command_line(argv, description):
    """The config of read_command_line."""
    return read_command_line(argv, description)[0]


if __name__ == "__main__":
    parse_command_line(sys.argv[1:], __doc__)
