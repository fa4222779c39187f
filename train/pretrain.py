"""Pretraining of any method: `python -m train.pretrain --config harmony/demo [key=value ...]`, under torchrun for N
processes.

One step (docs/methods/harmony.md 4.1): the teachers run once; then each objective the config names (Harmony: iBOT,
CLIP, masked text (MLM + text distillation) and MAE) runs its passes forward and backward in turn, so only one pass's
activations are alive at a time; gradients are averaged across ranks once; per-parameter clipping on the image student
and iBOT head; the iBOT output layer stays frozen during the first epoch; AdamW; then the EMA teachers.
"""

import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import tqdm
import yaml
from torch.profiler import record_function

from datapipe import make_loader
from datapipe.common.folder_lock import FolderBusy
from datapipe.common.object_store import StorageError
from model.meta_arch import MetaArch
from train import checkpoint
from train.checkpoint import CheckpointError, UnverifiedCheckpoint
from train.config import (
    RESUME_MAY_CHANGE,
    cache_options,
    check_resume_choice,
    read_command_line,
    resume_differences,
    settings_line,
    to_dict,
)
from train.distributed import all_ranks_agree, average_gradients, close_distributed, init_distributed
from train.ema import update_teachers
from train.log import MetricsLog
from train.parameter_groups import parameter_groups
from train.preemption import EXIT_PREEMPTED, StopRequest
from train.run_folder import lock_run, nonfinite_stop_reason, write_status
from train.schedules import Schedules
from train.step_inputs import model_views, view_recipe

TEACHER_WEIGHTS = "teacher_weights.pt"


def autocast(device, precision):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def forwards_under_autocast(passes, device, precision, name):
    """Runs each backward pass's forward (the iterator's next item) under autocast; the caller's backward runs
    outside it, as torch recommends. Each forward is the profiler range `<name> forward`."""
    while True:
        with autocast(device, precision), record_function(f"{name} forward"):
            item = next(passes, None)
        if item is None:
            return
        yield item


@torch.no_grad()
def clip_per_parameter(params, max_norm):
    """Scale each gradient to norm <= max_norm on its own (DINO style), without a host sync, in a few launches
    whatever the number of parameters (the scales of all gradients at once)."""
    grads = [param.grad for param in params if param.grad is not None]
    if grads and max_norm > 0:
        norms = torch.stack(torch._foreach_norm(grads))  # (P,)
        scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)  # (P,)
        torch._foreach_mul_(grads, scales.unbind())


class StepFlags:
    """Whether the loss is finite on every rank and whether any rank asked to stop: all ranks skip or apply the step
    together and stop after the same step. One all-reduce; the flags start their way to the host at once and
    `read()` waits for them alone, so work launched in between (the fused optimizer's step) keeps the device busy
    while the host reads. The stop flag is filled on the device: a copy from the host would wait for it once more."""

    def __init__(self, loss, stop_requested, world_size):
        keep_going = loss.new_full((), 0.0 if stop_requested else 1.0, dtype=torch.float32)
        self.on_device = torch.stack([torch.isfinite(loss).float().reshape(()), keep_going])  # (2,)
        if world_size > 1:
            torch.distributed.all_reduce(self.on_device, op=torch.distributed.ReduceOp.MIN)
        self.copied = None
        if self.on_device.is_cuda:
            self.on_host = torch.empty(2, pin_memory=True)
            self.on_host.copy_(self.on_device, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.on_host = self.on_device

    @property
    def nonfinite(self):
        """1.0 on the device where the step must be skipped (the fused optimizer's found_inf), else 0.0."""
        return 1.0 - self.on_device[0]

    def read(self):
        """(loss finite on every rank, stop requested on any rank): the step's one host read."""
        if self.copied is not None:
            self.copied.synchronize()
        finite, keep_going = self.on_host.tolist()
        return finite == 1.0, keep_going == 0.0


def module_gradient_norms(model):
    """{module: gradient norm} for each top-level student module (read at log steps only)."""
    norms = {}
    for name, module in model.named_children():
        grads = [param.grad for param in module.parameters() if param.grad is not None]
        if grads and name != "teachers":
            norms[f"grad_norm/{name}"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return norms


def save_teacher_weights(model, path):
    """The evaluation towers (EMA teachers where they exist), the logit scale (and SigLIP's logit bias) and the
    model config."""
    image, text = model.evaluation_towers()
    bias = {"logit_bias": model.logit_bias.detach().cpu()} if hasattr(model, "logit_bias") else {}
    return checkpoint.save_atomic({
        "model_config": json.dumps(dataclasses.asdict(model.config)),
        "image_tower": image.state_dict(),
        "logit_scale": getattr(model, "logit_scale", torch.tensor(0.0)).detach().cpu(), **bias,
        "text_tower": text.state_dict() if text is not None else {}}, path)


class Trainer:
    def __init__(self, config, world):
        self.config, self.world = config, world
        torch.manual_seed(config.run.seed)  # the same on every rank, as the official code
        self.model = MetaArch(config.model).to(world.device)
        self.trainable = [param for param in self.model.parameters() if param.requires_grad]
        self.clipped = self.model.clipped_parameters()
        self.last_layer = self.model.last_layer_parameters()
        self.teacher_params, self.student_params = self.model.ema_pairs()
        optim = config.optim
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, optim.weight_decay_rule), lr=optim.lr,
                                           betas=optim.betas, eps=optim.eps, fused=world.device.type == "cuda" or None)
        self.scaler = torch.amp.GradScaler(world.device.type) if config.run.precision == "fp16" else None
        # The fused AdamW skips a step with non-finite gradients on the device (found_inf, as GradScaler uses it):
        # it is launched before the host reads the step's flags. GradScaler keeps its own found_inf.
        self.skips_on_device = bool(self.optimizer.defaults.get("fused")) and self.scaler is None
        self.loader = make_loader(
            config.data.shards, view_recipe(config), config.data.batch_size, backend=config.data.backend,
            device=world.device, rank=world.rank, world_size=world.world_size, seed=config.run.seed,
            dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.run.precision],
            num_workers=config.data.num_workers, shuffle_window=config.data.shuffle_window,
            cache=cache_options(config.data), mix_weights=config.data.mix_weights)
        self.schedules = Schedules(optim, len(self.loader), config.data.batch_size * world.world_size)
        self.step = self.reduced_bytes = 0
        self.saved_step = None
        self.nonfinite_in_a_row = self.nonfinite_total = 0

    # One training step.

    def train_step(self, batch, values, stop_requested=False):
        """One step; returns (metrics, whether the step was applied, whether any rank asked to stop)."""
        config, model = self.config, self.model
        epoch = self.step // len(self.loader)
        self.optimizer.zero_grad(set_to_none=True)
        views = model_views(batch, trim=model.config.uses_text)  # text views cut to (n, B, T <= 77)
        # Profiler ranges name each part (tools/gpu/profile.py): "teachers forward", "<objective> forward|backward".
        with autocast(self.world.device, config.run.precision), record_function("teachers forward"):
            teacher = model.forward_teachers(views)
        losses, metrics = [], {}
        for group in model.backward_groups:
            passes = model.group_passes(group, views, teacher, **values)
            for loss, stats in forwards_under_autocast(passes, self.world.device, config.run.precision, group):
                with record_function(f"{group} backward"):
                    (self.scaler.scale(loss) if self.scaler else loss).backward()  # frees this pass's graph
                losses.append(loss.detach())
                for name, value in stats.items():  # a group's metrics are the sum of its passes'
                    metrics[name] = metrics[name] + value if name in metrics else value
        metrics["loss"] = torch.stack(losses).sum()
        self.reduced_bytes = average_gradients(self.trainable, self.world.world_size)  # the step's one sync
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip_per_parameter(self.clipped, config.optim.clip_grad)
        if epoch < config.optim.freeze_last_layer_epochs:
            for param in self.last_layer:
                param.grad = None  # AdamW skips them, weight decay included
        for group in self.optimizer.param_groups:  # a skipped step uses none of them
            group["lr"] = values["lr"]
            if group["apply_weight_decay"]:
                group["weight_decay"] = values["weight_decay"]
        flags = StepFlags(metrics["loss"], stop_requested, self.world.world_size)
        if self.skips_on_device:
            self.optimizer.found_inf = flags.nonfinite
            self.optimizer.step()
        finite, stopping = flags.read()  # the host waits for the flags, not for the optimizer's step
        if not finite:
            return metrics, False, stopping
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not self.skips_on_device:
            self.optimizer.step()
        model.after_optimizer_step()
        update_teachers(self.teacher_params, self.student_params, values["teacher_momentum"])
        return metrics, True, stopping

    # Checkpoints.

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "step": self.step,
                "loader": self.loader.state_dict(), "rng": checkpoint.rng_state(),
                "nonfinite_total": self.nonfinite_total, "config": json.dumps(to_dict(self.config))}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.nonfinite_total = state["step"], state["nonfinite_total"]
        self.saved_step = self.step
        self.loader.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])

    def save(self):
        """Rank 0 writes checkpoint-<step>.pt (and the evaluation towers), then keeps the newest K; returns its path."""
        if not self.world.is_main:
            return None
        run_dir = self.config.run_dir
        path = run_dir / "checkpoints" / f"checkpoint-{self.step:08d}.pt"
        if self.saved_step != self.step:
            checkpoint.save_atomic(self.state_dict(), path)
            save_teacher_weights(self.model, run_dir / TEACHER_WEIGHTS)
            checkpoint.keep_latest(run_dir, self.config.run.keep_checkpoints)
            self.saved_step = self.step
        return path


def log_values(trainer, metrics, values, images_per_s, data_wait):
    numbers = dict(metrics)
    numbers.update(module_gradient_norms(trainer.model))
    scalars = dict(zip(numbers, torch.stack([value.float().reshape(()) for value in numbers.values()]).tolist(),
                       strict=True))  # one transfer for all of them
    scalars.update({name: values[name] for name in trainer.model.scheduled_values})  # those this method uses
    scalars.update(images_per_s=images_per_s, data_wait_fraction=data_wait,
                   nonfinite_steps=trainer.nonfinite_total, gradient_bytes_all_reduced=trainer.reduced_bytes)
    if trainer.world.device.type == "cuda":
        scalars["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        scalars["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return scalars


def lock_run_folder(config, world):
    """Rank 0 takes the run folder's lock; every rank stops with the reason if it is taken."""
    lock, busy = None, ""
    if world.is_main:
        try:
            lock = lock_run(config.run_dir)
        except FolderBusy as error:
            busy = str(error)
    if not all_ranks_agree(not busy, world):
        raise FolderBusy(busy or f"{config.run_dir} is in use by another trainer (rank 0 says which)")
    return lock


def resume_point(config, world):
    """(checkpoint path, its contents) to resume from, the same on every rank, or (None, None)."""
    choice = config.run.resume
    if choice == "none":
        return None, None
    if choice != "auto":
        check_resume_choice(config.run)
        try:
            return Path(choice), checkpoint.load(choice, config.run.trust_unverified_checkpoint,
                                                 report=print if world.is_main else lambda _: None)
        except UnverifiedCheckpoint as error:
            raise CheckpointError(f"{error}. If this file is the checkpoint you mean (copied without its .json, "
                                  f"say), add run.trust_unverified_checkpoint=true to load it unchecked") from None
    path = None
    if world.is_main:  # picks the newest checkpoint that verifies, reporting the ones it skips
        path, _ = checkpoint.latest_good(config.run_dir)
    if world.world_size > 1:
        chosen = [str(path) if path else None]
        torch.distributed.broadcast_object_list(chosen, src=0)
        path = Path(chosen[0]) if chosen[0] else None
    return (path, checkpoint.load(path)) if path else (None, None)


def new_run_choices():
    """How to start a new run instead of resuming: through make (make pretrain), with its variables."""
    return "RUN=runs/<name> or TRAIN_ARGS=run.resume=none" if "MAKELEVEL" in os.environ else \
        "run.name=... or run.resume=none"


def reconcile_with_checkpoint(config, state, world):
    """The config to resume with: every value that differs from the checkpoint's is reported; those that
    change the run are refused unless run.accept_config_changes; data.batch_size follows the number of ranks
    so that the global batch stays the checkpoint's (elastic resume): a data.batch_size other than the
    checkpoint's that gives another global batch is replaced with a warning."""
    say = print if world.is_main else (lambda *_: None)
    saved = json.loads(state["config"])
    saved_global = state["loader"]["global_batch_size"]
    if config.data.batch_size * world.world_size != saved_global:
        if saved_global % world.world_size:
            raise ValueError(f"cannot resume on {world.world_size} ranks: the checkpoint's global batch of "
                             f"{saved_global} does not split evenly; use a number of ranks that divides it")
        per_rank = saved_global // world.world_size
        if config.data.batch_size == saved["data"]["batch_size"]:  # the run's own value, on another number of ranks
            say(f"resuming on {world.world_size} rank(s): data.batch_size {config.data.batch_size} -> "
                f"{per_rank}, keeping the checkpoint's global batch of {saved_global}")
        elif world.is_main:
            print(f"warning: data.batch_size={config.data.batch_size} is not used: on {world.world_size} rank(s) it "
                  f"would make a global batch of {config.data.batch_size * world.world_size}, and a resume keeps "
                  f"the checkpoint's global batch of {saved_global}, so data.batch_size is {per_rank}. To train "
                  f"with another batch, start a new run ({new_run_choices()}).", file=sys.stderr,
                  flush=True)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=per_rank))
    changed = resume_differences(saved, to_dict(config))
    for key, before, now in changed:
        say(f"resume: {key} was {before!r} in the checkpoint, now {now!r}")
    refused = [key for key, _, _ in changed if key not in RESUME_MAY_CHANGE]
    if refused and not config.run.accept_config_changes:
        raise ValueError(f"resuming {config.run_dir} with other values for {', '.join(refused)} would not continue "
                         f"the run the checkpoint belongs to. Resume with the checkpoint's values, start a new run "
                         f"({new_run_choices()}), or accept the change with run.accept_config_changes=true")
    return config


def train(config, preset_config=None):
    """Run (or resume) the training described by `config`; returns the run directory. It prints the settings that
    differ from `preset_config` (None: from the defaults); the whole config is written to the run folder.

    A stop request (SIGTERM, SIGUSR1, torchrun gone) ends the current step on every rank, rank 0 checkpoints
    it, and the process exits with EXIT_PREEMPTED. An error on any rank stops every rank: this one leaves the
    process group at once, which fails the others' pending collectives (or they time out after
    run.collective_timeout_s)."""
    world = init_distributed(config.run.collective_timeout_s)
    stop, lock, failed = StopRequest(), None, True
    run_dir = config.run_dir
    try:
        lock = lock_run_folder(config, world)
        resumed_from, state = resume_point(config, world)
        if state is not None:
            config = reconcile_with_checkpoint(config, state, world)
        trainer = Trainer(config, world)
        if state is not None:
            trainer.load_state_dict(state)
            del state
        if world.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
            print(settings_line(config, preset_config, run_dir / "config.yaml"), flush=True)
            if resumed_from:
                print(f"resumed from {resumed_from} at step {trainer.step}")
            write_status(run_dir, "running", trainer.step)
        log = MetricsLog(run_dir, resume_step=trainer.step) if world.is_main else None
        per_epoch = len(trainer.loader)
        total = config.optim.epochs * per_epoch
        if config.run.max_steps:
            total = min(total, config.run.max_steps)
        global_batch = config.data.batch_size * world.world_size
        bar = tqdm.tqdm(total=total, initial=trainer.step, desc=config.run.name, disable=not world.is_main,
                        unit="step")
        started, first_step = time.perf_counter(), trainer.step
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        while trainer.step < total:
            trainer.loader.set_epoch(trainer.step // per_epoch)
            before_data = time.perf_counter()
            for batch in trainer.loader:
                data_wait += time.perf_counter() - before_data
                values = trainer.schedules.at(trainer.step)
                metrics, applied, stopping = trainer.train_step(batch, values, stop.reason is not None)
                trainer.step += 1
                window_steps += 1
                if applied:
                    trainer.nonfinite_in_a_row = 0
                else:
                    trainer.nonfinite_in_a_row += 1
                    trainer.nonfinite_total += 1
                    if reason := nonfinite_stop_reason(trainer.nonfinite_in_a_row, trainer.step - first_step,
                                                       config.run.max_nonfinite_steps, trainer.step, run_dir, total):
                        raise FloatingPointError(reason)
                bar.update(1)
                if trainer.step % config.run.log_every == 0 or trainer.step == total or stopping:
                    elapsed = time.perf_counter() - window_start
                    scalars = log_values(trainer, metrics, values, window_steps * global_batch / elapsed,
                                         data_wait / elapsed)
                    if log:
                        log.write(trainer.step, scalars)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", img_s=f"{scalars['images_per_s']:.0f}")
                    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                if trainer.step % config.run.checkpoint_every == 0 or stopping:
                    path = trainer.save()
                if stopping:
                    bar.close()
                    if log:
                        log.close()  # flush TensorBoard and redraw the plots up to this step
                    if world.is_main:
                        reason = stop.reason or "a stop request on another rank"
                        write_status(run_dir, "preempted", trainer.step, checkpoint=str(path), reason=reason)
                        print(f"stopped after step {trainer.step} ({reason}); checkpoint {path}. Run the same "
                              f"command again to continue (run.resume=auto).", flush=True)
                    failed = False
                    raise SystemExit(EXIT_PREEMPTED)
                if trainer.step >= total:
                    break
                before_data = time.perf_counter()
        bar.close()
        path = trainer.save()
        if log:
            write_status(run_dir, "finished", trainer.step, checkpoint=str(path))
            plots = log.close()
            elapsed = time.perf_counter() - started
            print(f"trained {trainer.step} steps ({trainer.step * global_batch} images, {elapsed:.0f} s, "
                  f"{trainer.nonfinite_total} skipped as non-finite); run in {run_dir}: checkpoints, metrics.jsonl, "
                  f"tensorboard/, {', '.join(str(path.name) for path in plots)}")
        failed = False
        return run_dir
    except (Exception, KeyboardInterrupt) as error:
        report_failure(error, world, run_dir, lock)
        raise
    finally:
        stop.restore()
        close_distributed(failed)
        if lock:
            lock.release()


def report_failure(error, world, run_dir, lock):
    """Say which rank stopped and why, before the process group goes; rank 0 records it in status.json."""
    collective = isinstance(error, torch.distributed.DistError) or "gloo" in str(error).lower()
    hint = " (a collective failed: another rank has most likely stopped; its error is printed above it)" \
        if collective else ""
    # On a line of its own, not after the progress bar's.
    tqdm.tqdm.write(f"rank {world.rank}: stopped by {type(error).__name__}: {error}{hint}", file=sys.stderr)
    sys.stderr.flush()
    if lock is not None:  # rank 0, holding the run folder
        with contextlib.suppress(OSError, CheckpointError):
            write_status(run_dir, "failed", None, error=f"{type(error).__name__}: {error}")


def main(argv=None):
    config, preset_config = read_command_line(argv, __doc__)
    try:
        train(config, preset_config)
    except (CheckpointError, FolderBusy, StorageError, ValueError, FileNotFoundError,
            FloatingPointError) as error:  # reported above
        raise SystemExit(1) from error


if __name__ == "__main__":
    sys.exit(main())
