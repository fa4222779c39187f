"""Training configuration: dataclasses with the paper's defaults, YAML presets, key=value overrides.

    config = load_config("demo", ["optim.epochs=3", "model.mae=false"])

A preset is `train/configs/<name>.yaml` (or any YAML path); it may name a `base` preset it extends.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.meta_arch import ModelConfig

PRESETS = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    shards: str = "shards/cc3m/train"
    batch_size: int = 96  # per rank
    backend: str = "auto"
    num_workers: int = 10
    global_crop_px: int = 224
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_px: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    local_crops_number: int = 8
    hue: float = 0.1  # colour jitter's hue range (fraction of the colour circle), all crops
    grayscale_prob: float = 0.2
    shuffle_window: int = 4096


@dataclass
class OptimConfig:
    epochs: int = 25
    lr: float = 5e-4  # per 256 images; scaled by the global batch
    min_lr: float = 1e-6
    warmup_epochs: int = 3
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    clip_grad: float = 3.0  # per parameter, image student and iBOT head; 0 = off
    freeze_last_layer_epochs: int = 1
    teacher_momentum: float = 0.996  # cosine to 1
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
    accept_config_changes: bool = False  # resume even when settings that change the run differ
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops
    max_steps: int = 0  # stop early after this many steps in total (0 = run every epoch)
    collective_timeout_s: int = 600  # a rank that stops answering makes every rank fail after this long


PRECISIONS = ("bf16", "fp16", "fp32")
BACKENDS = ("auto", "dali", "torch")
# Settings a resume may change without changing the run: how often to log and save, where to stop,
# how long to wait, how many loader workers, where the shards are (their content is checked by the
# loader), and data.batch_size, whose product with the number of ranks (the global batch) is checked.
RESUME_MAY_CHANGE = {"run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.resume",
                     "run.accept_config_changes", "run.max_nonfinite_steps", "run.max_steps",
                     "run.collective_timeout_s", "data.num_workers", "data.shards", "data.batch_size",
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
        at_least = {"data.batch_size": 1, "data.num_workers": 0, "data.shuffle_window": 1,
                    "data.local_crops_number": 0, "optim.epochs": 1, "optim.lr": 0, "optim.min_lr": 0,
                    "optim.warmup_epochs": 0, "optim.weight_decay": 0, "optim.weight_decay_end": 0,
                    "optim.clip_grad": 0, "run.log_every": 1, "run.checkpoint_every": 1, "run.keep_checkpoints": 1,
                    "run.max_nonfinite_steps": 1, "run.max_steps": 0, "run.collective_timeout_s": 1}
        for key, minimum in at_least.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not isinstance(value, int | float) or value < minimum:
                raise ValueError(f"{key}={value!r}: it must be a number, at least {minimum}")

    @property
    def run_dir(self):
        return Path(self.run.out_dir) / self.run.name


def _read_preset(preset):
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else PRESETS / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise FileNotFoundError(f"config preset {preset!r} not found ({path}); presets: {', '.join(names)}")
    values = yaml.safe_load(path.read_text()) or {}
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
    parsed = yaml.safe_load(value) if value else ""
    nested = parsed
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _build(cls, values, where):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                         f"{where or 'top level'} has: {', '.join(known)}")
    arguments = {}
    for name, value in values.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING \
            else known[name].default
        if dataclasses.is_dataclass(default):
            arguments[name] = _build(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple):
            arguments[name] = tuple(value)
        else:
            arguments[name] = value
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
    """[(key, saved value, current value)] of two config dicts, every key that differs."""
    saved, current = flatten(saved), flatten(current)
    return [(key, saved.get(key), current.get(key)) for key in sorted(saved.keys() | current.keys())
            if saved.get(key) != current.get(key)]
