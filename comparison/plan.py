"""A comparison's plan (plan.json): its runs, one per (method, seed), each with the fingerprint of what can change
its result, so that a comparison grows without training anything twice.

A run's fingerprint is its resolved config (less the settings a resume may change), the training shards' manifests,
the evaluation sets, the budget and evaluation points, and the digest of the code that trains and evaluates. Run
again with more methods or seeds, a comparison adds only the new runs; a run whose fingerprint changed is refused,
naming what changed, unless the user accepts the change (ACCEPT_CHANGES=1): the run is then kept as trained and the
report marks it. Anything else (the report, the charts, the README) is in no fingerprint.

Plans written before seeds (version 1: one seed, runs in <name>/<method>/) are read as version 2 with their runs
where they are. Plans written before objectives owned their settings are read with today's preset names and keys
(train/config_renames.py), so the same settings compare equal.
"""

import json

from datapipe.common.manifest import write_atomic
from train.config import differences, flatten, unflatten
from train.config_renames import PRESET_RENAMES, migrate

PLAN_FILE = "plan.json"
VERSION = 2


def run_key(method, seed):
    return f"{method}/seed{seed}"


def new_run(method, seed, preset, fingerprint):
    """A run's record; its folder is <comparison>/<method>/seed<seed>/."""
    return {"method": method, "seed": seed, "preset": preset, "run_dir": run_key(method, seed),
            "fingerprint": fingerprint, "accepted_changes": []}


def from_version_1(saved):
    """A version-1 plan ({"settings", "methods"}: one seed, every method's run in <name>/<method>/) as version 2."""
    settings, runs, measured = saved["settings"], {}, {}
    # Its train_args are in each method's config already; its runs had one rank each.
    shared = {**{key: value for key, value in settings.items() if key not in ("methods", "seed", "train_args")},
              "ranks": 1}
    for method, entry in saved["methods"].items():
        fingerprint = {"config": settings["methods"][method]["config"], **shared}
        run = {**new_run(method, settings["seed"], entry["preset"], fingerprint), "run_dir": method}
        run.update({key: entry[key] for key in ("steps", "epochs", "eval_steps") if key in entry})
        runs[run_key(method, settings["seed"])] = run
        if "measured" in entry:
            measured[method] = entry["measured"]
    return {"version": VERSION, "runs": runs, "measured": measured}


def in_todays_keys(config):
    """A fingerprint's config (flat keys) in today's keys: a config written before objectives owned their settings
    names its objectives under model.objectives, with the settings it had (those of objectives it left out dropped)."""
    migrated, renamed = migrate(unflatten(config))
    if not renamed:
        return config
    objectives = migrated["model"]["objectives"]
    migrated["model"]["objectives"] = {name: settings for name, settings in objectives.items() if settings is not False}
    return flatten(migrated)


def with_todays_names(plan):
    """`plan` with each run's preset and config in today's names."""
    for run in plan["runs"].values():
        run["preset"] = PRESET_RENAMES.get(run["preset"], run["preset"])
        run["fingerprint"]["config"] = in_todays_keys(run["fingerprint"]["config"])
    return plan


def load(out_dir):
    """The comparison's plan, or an empty one."""
    path = out_dir / PLAN_FILE
    if not path.is_file():
        return {"version": VERSION, "runs": {}, "measured": {}}
    saved = json.loads(path.read_text())
    return with_todays_names(saved if saved.get("version") == VERSION else from_version_1(saved))


def save(out_dir, plan):
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / PLAN_FILE, json.dumps(plan, indent=2))


def changes_said(changed, most=4):
    said = "; ".join(f"{key}: {before!r} -> {now!r}" for key, before, now in changed[:most])
    return said + (f" (and {len(changed) - most} more)" if len(changed) > most else "")


def add_runs(plan, wanted, accept_changes=False, where="the comparison"):
    """Add the `wanted` runs ({key: new_run(...)}) to `plan`. A run already there with another fingerprint is
    refused (ValueError naming each change), or with `accept_changes` kept as trained, its changes recorded
    (`accepted_changes`, marked in the report) and its fingerprint brought up to date."""
    refused = []
    for key, run in wanted.items():
        if key not in plan["runs"]:
            plan["runs"][key] = run
            continue
        saved = plan["runs"][key]
        changed = differences(saved["fingerprint"], run["fingerprint"])
        if changed and not accept_changes:
            refused.append(f"{key}: {changes_said(changed)}")
        elif changed:
            saved["accepted_changes"] = sorted(set(saved["accepted_changes"]) | {key for key, _, _ in changed})
            saved["fingerprint"] = run["fingerprint"]
    if refused:
        raise ValueError(f"{where} holds runs made with other settings or code: {' | '.join(refused)}. Run it with "
                         "their settings to continue it, ACCEPT_CHANGES=1 to keep those runs as trained (the report "
                         "marks them), or start another comparison (COMPARE_NAME=...)")
