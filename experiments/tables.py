"""`cxr table`: the report's tables (tables.yaml) as named DVC experiments, shown beside its figures.

    cxr table list
    cxr table run NAME [--demo] [-S key=value ...]   # one `dvc exp run --temp -n NAME-COLUMN` per column
    cxr table run NAME [NAME ...] --jobs N           # the same through DVC's queue, N columns at a time
    cxr table run all --jobs N                       # every table's columns (the whole report)
    cxr table show NAME [--why]                      # markdown on the terminal, plots/tables/NAME.{md,html};
                                                     # --why: where each setting comes from

Columns run one after another, or N at a time (`dvc exp run --queue`, `dvc queue start --jobs N`; each
train and evaluate takes a GPU of its own: cxr14/gpus.py); a failed column is reported and the rest
still run; a column whose experiment already exists with the same params is not run again. Stages
that a column shares with an earlier one (download, filter, crop, split, resample, weights) come from
DVC's run cache, linked, not copied (.dvc/config: cache.type); train never does (its checkpoint is a
persistent output, and DVC's run cache skips a stage with one), so neither do evaluate and localize unless
the new model.pt is the same bytes; columns running at the same time each run the stages they share.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cxr14.atomic import atomic_path
from cxr14.compare import DIRECTIONS
from cxr14.labels import ALL_LABELS, FINDINGS
from cxr14.params import apply, seed
from cxr14.params import load as load_params
from experiments import demo as demo_settings

CATALOG = Path("tables.yaml")
ROW_KINDS = ("loss", "micro", "macro", "labels", "binary", "counts", "images")
BINARY_ROWS = ("threshold", "tn", "fp", "fn", "tp", "accuracy", "precision", "recall", "f1", "auroc")
SAME_RUN = "same_run_as"
CLAIM_DIRECTIONS = DIRECTIONS  # what a claim may say of A against B: cxr14/compare.py's verdicts


@dataclass
class Column:
    name: str
    title: str
    set: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    reference: bool = False  # figures only (e.g. the CheXNet paper): never run
    why: dict[str, str] = field(default_factory=dict)  # set's keys (and same_run_as): where each comes from
    ours: bool = False  # a column this repo adds: the report has no such column
    same_run_as: str | None = None  # "table/column": the report's figures show both are one run
    reuses: tuple[Table, Column] | None = field(default=None, repr=False)  # same_run_as, resolved by load()


@dataclass
class Claim:
    """One conclusion the report draws from a table: A is better than, worse than or similar to B."""
    quote: str  # the report's words, verbatim (whitespace aside)
    columns: list[str]  # [A, B]: a column of this table, or TABLE/COLUMN of another
    metric: str  # macro, micro, binary (a binary table's AUROC) or a label of the table's task
    direction: str  # better (A better than B), worse, similar (|A - B| within margin)
    margin: float | None = None  # similar only: the largest difference in AUROC still called similar
    note: str | None = None  # where the pair differs in more than the compared setting, or reads the words freely
    sides: tuple[tuple[Table, Column], tuple[Table, Column]] | None = field(default=None, repr=False)  # by load()


@dataclass
class Table:
    name: str
    title: str
    task: str
    rows: list[str]
    set: dict[str, Any]
    columns: list[Column]
    why: dict[str, str] = field(default_factory=dict)  # set's keys: where each comes from
    notes: list[str] = field(default_factory=list)  # what the report leaves unstated, what a column reuses
    contradictions: list[str] = field(default_factory=list)  # where the report disagrees with itself
    claims: list[Claim] = field(default_factory=list)  # the report's conclusions from this table

    def experiment(self, column: Column, run_seed: int | None = None) -> str:
        """NAME-COLUMN, or NAME-COLUMN-sK for the run with run_seed K (`cxr table run --seeds N`)."""
        return f"{self.name}-{column.name}" + (f"-s{run_seed}" if run_seed else "")

    def experiments(self, column: Column, seeds: int | None = None) -> list[str]:
        return [self.experiment(column)] if not seeds else [self.experiment(column, k) for k in range(1, seeds + 1)]

    @property
    def runnable(self) -> list[Column]:
        return [c for c in self.columns if not c.reference]


def load(path: Path | None = None) -> dict[str, Table]:
    path = Path(path or CATALOG)
    raw = yaml.safe_load(path.read_text())
    tables = {}
    for name, entry in raw.items():
        columns = [Column(**column) for column in entry["columns"]]
        table = Table(name=name, title=entry["title"], task=entry["task"], rows=entry["rows"],
                      set=entry.get("set") or {}, columns=columns, why=entry.get("why") or {},
                      notes=entry.get("notes") or [], contradictions=entry.get("contradictions") or [])
        unknown = set(table.rows) - set(ROW_KINDS)
        if unknown:
            raise ValueError(f"{path}: table {name}: unknown rows {sorted(unknown)}; valid: {', '.join(ROW_KINDS)}")
        _check_why(f"{path}: table {name}", table.set, table.why)
        for column in columns:
            auroc = column.report.get("auroc")
            if auroc is not None and len(auroc) != len(FINDINGS):
                raise ValueError(f"{path}: {name}/{column.name}: report.auroc has {len(auroc)} values, not 14")
            _check_why(f"{path}: {name}/{column.name}", column.set, column.why, column.same_run_as)
        tables[name] = table
    for table in tables.values():
        for column in table.columns:
            if column.same_run_as:
                column.reuses = _resolve(tables, f"{path}: {table.name}/{column.name}", column.same_run_as)
        table.claims = [_claim(tables, table, f"{path}: table {table.name}, claim {k}", entry)
                        for k, entry in enumerate(raw[table.name].get("claims") or [], start=1)]
    return tables


def claim_metrics(task: str) -> tuple[str, ...]:
    """What a claim on a table of this task may compare: a binary table has one AUROC; the others their labels'."""
    if task == "binary":
        return ("binary",)
    return ("macro", "micro", *(ALL_LABELS if task == "multilabel15" else FINDINGS))


def _claim(tables: dict[str, Table], table: Table, where: str, entry: dict) -> Claim:
    """A claim of the catalog, checked field by field: its columns exist, its metric is one of the table's."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with quote, columns, metric, direction, got {entry!r}")
    known = {f for f in Claim.__dataclass_fields__ if f != "sides"}
    problems = [f"unknown field {f!r}" for f in sorted(set(entry) - known)]
    problems += [f"no {f}" for f in ("quote", "columns", "metric", "direction") if f not in entry]
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)} (the fields: {', '.join(sorted(known))})")
    claim = Claim(**entry)
    where = f"{where} ({str(claim.quote)[:40]!r}...)"
    if not isinstance(claim.quote, str) or not claim.quote.strip():
        raise ValueError(f"{where}: quote {claim.quote!r}: expected the report's words")
    if not isinstance(claim.columns, list) or len(claim.columns) != 2 or claim.columns[0] == claim.columns[1]:
        raise ValueError(f"{where}: columns {claim.columns!r}: expected two different columns [A, B]")
    claim.sides = tuple(_claim_side(tables, table, where, name) for name in claim.columns)
    if claim.metric not in claim_metrics(table.task):
        raise ValueError(f"{where}: metric {claim.metric!r}: expected one of {', '.join(claim_metrics(table.task))}")
    if claim.direction not in CLAIM_DIRECTIONS:
        raise ValueError(f"{where}: direction {claim.direction!r}: expected one of {', '.join(CLAIM_DIRECTIONS)}")
    if claim.direction == "similar" and not (isinstance(claim.margin, (int, float)) and claim.margin > 0):
        raise ValueError(f"{where}: margin {claim.margin!r}: a 'similar' claim needs a margin above 0 (AUROC)")
    if claim.direction != "similar" and claim.margin is not None:
        raise ValueError(f"{where}: margin {claim.margin!r}: only a 'similar' claim has one")
    return claim


def _claim_side(tables: dict[str, Table], table: Table, where: str, name: str) -> tuple[Table, Column]:
    """A claim's column: NAME of its own table, or TABLE/NAME of another."""
    other, _, column_name = name.rpartition("/")
    owner = tables.get(other) if other else table
    column = next((c for c in owner.columns if c.name == column_name), None) if owner else None
    if column is None:
        names = ", ".join(c.name for c in table.columns)
        raise ValueError(f"{where}: columns: {name!r} is not a column of {table.name} ({names}) nor TABLE/COLUMN of the catalog")
    return owner, column


def _check_why(where: str, settings: dict, why: dict, same_run_as: str | None = None) -> None:
    """Every setting says where it comes from (the report's words, or 'ours: ...'), and nothing else does."""
    wanted = set(settings) | ({SAME_RUN} if same_run_as else set())
    missing = sorted(k for k in wanted if not str(why.get(k) or "").strip())
    if missing:
        raise ValueError(f"{where}: no provenance for {', '.join(missing)}: add why: {{{missing[0]}: "
                         "\"the report's words\" or \"ours: ...\"}")
    stale = sorted(set(why) - wanted)
    if stale:
        raise ValueError(f"{where}: why names {', '.join(stale)}, which it does not set")


def _resolve(tables: dict[str, Table], where: str, target: str) -> tuple[Table, Column]:
    table_name, _, column_name = target.partition("/")
    table = tables.get(table_name)
    column = next((c for c in table.columns if c.name == column_name), None) if table else None
    if column is None or column.reference:
        raise ValueError(f"{where}: same_run_as {target!r} is not a run column of the catalog (TABLE/COLUMN)")
    if column.same_run_as:
        raise ValueError(f"{where}: same_run_as {target!r}, which is itself the run of {column.same_run_as}: "
                         "name that one")
    return table, column


def settings(table: Table, column: Column, demo: bool = False, extra: dict | None = None) -> dict[str, Any]:
    """The -S overrides of one column, later ones winning: the table's, the demo's (the table's shared
    settings shrink to smoke scale), the column's own (what the table compares), the demo's data scale
    (split.fraction; image counts: SMOKE_FRACTIONS, or NIH's lists under official), the column's demo, the
    user's. A column that is the same run as another (same_run_as) starts from that one's settings: its
    table's as shared, its column's as its own."""
    reused_table, reused = column.reuses or (None, None)
    merged = {**(reused_table.set if reused_table else {}), **table.set}
    if demo:
        merged.update(demo_settings.DEMO)
    merged.update({**(reused.set if reused else {}), **column.set})
    if demo:
        merged["split.fraction"] = demo_settings.DEMO["split.fraction"]
        if merged.get("split.official.sizes") is not None:  # image counts: NIH's lists as they are
            merged["split.official.sizes"] = None
        if merged.get("split.random.sizes") is not None:
            merged["split.random.sizes"] = demo_settings.SMOKE_FRACTIONS
        merged.update({**(reused.demo if reused else {}), **column.demo})
    merged.update(extra or {})
    return merged


def provenance(table: Table) -> str:
    """Where each setting of the table comes from: the report's words, or this repo's choice."""
    def lines(settings: dict, why: dict, indent: str) -> list[str]:
        return [f"{indent}{key} = {json.dumps(value)}    # {why[key]}" for key, value in settings.items()]

    out = [f"{table.name}: where each setting comes from (everything else: params.yaml)", "  every column:"]
    out += lines(table.set, table.why, "    ") or ["    (nothing)"]
    for column in table.columns:
        mark = " [reference: figures only, not run]" if column.reference else " [ours: not in the report]" * column.ours
        out.append(f"  {column.name} ({column.title}){mark}:")
        if column.same_run_as:
            out.append(f"    the same run as {column.same_run_as}, with its settings (`cxr table show "
                       f"{column.same_run_as.partition('/')[0]} --why`)    # {column.why[SAME_RUN]}")
        out += lines(column.set, column.why, "    ")
        if not column.set and not column.same_run_as and not column.reference:
            out.append("    (only the table's settings)")
    out += [f"  note: {note}" for note in table.notes]
    return "\n".join(out) + "\n"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['train.epochs=2', ...] -> {'train.epochs': 2}, values read as YAML (as `dvc exp run -S` does)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"-S {item!r}: expected key=value, such as train.epochs=2")
        out[key] = yaml.safe_load(value)
    return out


def _exp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", "exp", *args], capture_output=True, text=True)


def _same_params(name: str, wanted: dict[str, Any]) -> bool:
    """The experiment ran with exactly the params this column would run with today: params.yaml as it is
    now (its defaults may have changed since) with the column's overrides."""
    import dvc.api

    try:
        have = dvc.api.params_show(rev=name)
    except Exception:  # the experiment is gone or unreadable: run it again
        return False
    return have == apply(load_params(), wanted)


def run(names: str | list[str], demo: bool = False, extra: list[str] = (), jobs: int = 1, seeds: int | None = None) -> int:
    """Run the columns of one or more tables (`all`: every table) that are missing or whose params changed:
    one after another (jobs 1), or through DVC's queue, `jobs` at a time (each train and evaluate on a GPU
    of its own: cxr14/gpus.py). A column that is the same run as another being run (same_run_as) waits for
    it, so that it takes the shared stages from DVC's run cache; it trains and evaluates again (train is
    never in the run cache). With `seeds` N, each column runs N times (NAME-COLUMN-s1 ... -sN, run_seed 1
    to N): only the training randomness differs, the split and the test set stay the same."""
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: expected 1 or more experiments at a time")
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds {seeds}: expected 1 or more training runs a column")
    names = [names] if isinstance(names, str) else list(names)
    chosen = [_get(name) for name in names] if names != ["all"] else list(load().values())
    wanted_extra = parse_overrides(list(extra))
    existing = set(_exp("list", "--name-only").stdout.split())
    todo, skipped = {}, []  # experiment name -> (column, its -S overrides)
    for table in chosen:
        for column in table.runnable:
            for k, exp in enumerate(table.experiments(column, seeds), start=1):
                wanted = {**settings(table, column, demo, wanted_extra), **({"run_seed": k} if seeds else {})}
                if exp in existing and _same_params(exp, wanted):
                    skipped.append(exp)
                    print(f"{exp}: already run with these params, kept")
                    continue
                if exp in existing:
                    _exp("remove", exp)
                todo[exp] = (column, [a for item in demo_settings.overrides(wanted) for a in ("-S", item)])
    done, failed = [], []
    for wave in waves(chosen, todo, seeds):
        ran, broke = _run_queued(wave, jobs) if jobs > 1 and len(wave) > 1 else _run_one_by_one(wave)
        done, failed = done + ran, failed + broke
    for table in chosen:
        mine = {e for c in table.runnable for e in table.experiments(c, seeds)}
        ran, kept, broke = ([e for e in found if e in mine] for found in (done, skipped, failed))
        print(f"\ntable {table.name}: {len(ran)} run, {len(kept)} kept, {len(broke)} failed"
              + (f": {', '.join(broke)}" if broke else ""))
        print(f"see it with: cxr table show {table.name}")
    return 1 if failed else 0


def waves(tables: list[Table], todo: dict[str, tuple], seeds: int | None = None) -> list[dict[str, tuple]]:
    """The columns to run in two waves: first every run, then the columns that are the same run as one of
    the first wave (same_run_as), which then take the stages they share from DVC's run cache."""
    owner = {e: table for table in tables for c in table.runnable for e in table.experiments(c, seeds)}
    first_runs = {f"{owner[exp].name}/{column.name}" for exp, (column, _) in todo.items()}
    later = {exp for exp, (column, _) in todo.items() if column.same_run_as in first_runs}
    return [w for w in ({e: v for e, v in todo.items() if e not in later},
                        {e: v for e, v in todo.items() if e in later}) if w]


def _exp_run_each(todo: dict[str, tuple[Column, list[str]]], how: str, failure: str) -> tuple[list[str], list[str]]:
    """`dvc exp run HOW -n NAME -S ...` for each column, printed before it runs; (succeeded, failed) names."""
    done, failed = [], []
    for exp, (column, overrides) in todo.items():
        command = ["dvc", "exp", "run", how, "-n", exp, *overrides]
        print(f"\n== {exp}: {column.title}\n$ {' '.join(command)}", flush=True)
        if subprocess.run(command).returncode:
            failed.append(exp)
            print(f"{exp}: {failure} (the other columns still run)", flush=True)
        else:
            done.append(exp)
    return done, failed


def _run_one_by_one(todo: dict[str, tuple[Column, list[str]]]) -> tuple[list[str], list[str]]:
    return _exp_run_each(todo, "--temp", "FAILED")


# ---------------------------------------------------------------- several at once: DVC's queue

QUEUE_POLL_SECONDS = 10


def _queue_status(tries: int = 1) -> list[dict] | None:
    """DVC's queue, task by task (rev, name, status: Queued, Running, Success, Failed); None while unreadable."""
    from dvc.repo import Repo

    for attempt in range(tries):
        try:
            with Repo() as repo:
                return repo.experiments.celery_queue.status()
        except Exception:  # a task changing state as it is read: ask again
            if attempt + 1 < tries:
                time.sleep(2)
    return None


def _start_workers(jobs: int) -> bool:
    """`dvc queue start --jobs N`, telling the stages that N of them share the CPU (cxr14/gpus.py reads it):
    the workers pass their environment on to the experiments they run."""
    from cxr14.gpus import JOBS_VARIABLE

    env = {**os.environ, JOBS_VARIABLE: str(jobs)}
    return subprocess.run(["dvc", "queue", "start", "--jobs", str(jobs)], env=env).returncode == 0


# DVC 3.67 saves a stage's run-cache entry through a temporary file that a second experiment saving the same
# stage at the same moment can take away (seen in CI: two columns' identical `filter` stages). Such a column
# is run again, once: the stages it shares then come from the run cache.
RUN_CACHE_RACE = re.compile(r"failed to reproduce '[^']+': \[Errno 2\] No such file or directory: "
                            r"'[^']*\.dvc/cache/runs/[^']*\.tmp'")


def lost_a_run_cache_race(log: str) -> bool:
    """Whether a failed experiment's log (`dvc queue logs NAME`) says it lost that race."""
    return bool(RUN_CACHE_RACE.search(log))


def _run_queued(todo: dict[str, tuple[Column, list[str]]], jobs: int, again: bool = True) -> tuple[list[str], list[str]]:
    """Queue each column (`dvc exp run --queue`, which takes the workspace as `--temp` does: tracked files
    with their uncommitted edits, params with the -S overrides), run them `jobs` at a time, wait, and
    name each failure with the command that shows its log. A column that lost a race over DVC's run cache
    is run again once (`again`)."""
    before = _queue_status(tries=5)
    if before is None:
        raise ValueError("DVC's queue cannot be read (`dvc queue status` says why)")
    stale = [e["rev"] for e in before if e["name"] in todo and e["status"] in ("Success", "Failed")]
    if stale:  # earlier tasks of these names: forgotten, so that `dvc queue logs NAME` shows the new run
        subprocess.run(["dvc", "queue", "remove", *stale], capture_output=True)
    seen = {e["rev"] for e in before}
    _, failed = _exp_run_each(todo, "--queue", "FAILED to queue")
    ours = {e["rev"]: e["name"] for e in _queue_status(tries=5) or [] if e["rev"] not in seen and e["name"] in todo}
    if not ours:
        return [], failed
    workers = min(jobs, len(ours))
    print(f"\n$ dvc queue start --jobs {workers}", flush=True)
    if _start_workers(workers):
        print("follow one with `dvc queue logs NAME --follow`; all: `dvc queue status`", flush=True)
        states = _wait(ours, workers)
    else:
        print("dvc queue start failed: the queued columns stay queued (`dvc queue status`)", flush=True)
        return [], failed + list(ours.values())
    done = []
    existing = set(_exp("list", "--name-only").stdout.split())
    for rev, exp in ours.items():
        if states.get(rev) == "Success" and exp in existing:
            done.append(exp)
        else:
            failed.append(exp)
    raced = [exp for exp in failed if again and exp in ours.values() and lost_a_run_cache_race(
        subprocess.run(["dvc", "queue", "logs", exp], capture_output=True, text=True).stdout)]
    if raced:
        print(f"\n{', '.join(raced)}: lost a race with another experiment over DVC's run cache (both saved the "
              "same stage at once): run again", flush=True)
        ran, failed_again = _run_queued({exp: todo[exp] for exp in raced}, jobs, again=False)
        done, failed = done + ran, [exp for exp in failed if exp not in raced] + failed_again
    for exp in failed:
        if exp in ours.values() and exp not in raced:
            print(f"{exp}: FAILED; its log: dvc queue logs {exp}", flush=True)
    return done, failed


def _wait(ours: dict[str, str], workers: int) -> dict[str, str]:
    """Poll the queue until each of our tasks has ended, printing each change of state."""
    states, stalled = {}, 0
    try:
        while True:
            status = _queue_status()
            if status is not None:
                now = {e["rev"]: e["status"] for e in status if e["rev"] in ours}
                for rev, state in now.items():
                    if state != states.get(rev):
                        print(f"{time.strftime('%H:%M:%S')} {ours[rev]}: {state.lower()}", flush=True)
                states.update(now)
                if all(states.get(rev) in ("Success", "Failed") for rev in ours):
                    return states
                waiting = [r for r in ours if states.get(r) == "Queued"]
                running = [r for r in ours if states.get(r) == "Running"]
                stalled = stalled + 1 if waiting and not running else 0
                if stalled == 3:  # queued, yet nothing runs: the workers ended (they stop when idle); start them again
                    _start_workers(workers)
                    stalled = 0
            time.sleep(QUEUE_POLL_SECONDS)
    except KeyboardInterrupt:
        live = [r for r in ours if states.get(r) not in ("Success", "Failed")]
        print(f"\ninterrupted: stopping {', '.join(ours[r] for r in live)} (dvc queue kill, dvc queue remove)", flush=True)
        subprocess.run(["dvc", "queue", "kill", *live], capture_output=True)
        subprocess.run(["dvc", "queue", "remove", *live], capture_output=True)
        raise


def _get(name: str) -> Table:
    tables = load()
    if name not in tables:
        raise KeyError(f"no table {name!r}; the tables are: {', '.join(tables)}")
    return tables[name]


# ---------------------------------------------------------------- show

def _read(path: str, rev: str):
    import dvc.api

    try:
        return json.loads(dvc.api.read(path, rev=rev))
    except Exception:
        return None


def results(table: Table, existing: set[str] | None = None) -> dict[str, list[dict]]:
    """Each run column's runs (its seeds, or its one run): evaluate and resample metrics and params, read
    through DVC ([] : not run)."""
    import dvc.api

    from experiments.evidence import column_runs

    existing = set(_exp("list", "--name-only").stdout.split()) if existing is None else existing
    return {column.name: [{"evaluate": _read("metrics/evaluate.json", exp) or {},
                           "resample": _read("metrics/resample.json", exp) or {},
                           "params": dvc.api.params_show(rev=exp)}
                          for exp in column_runs(table.experiment(column), existing)]
            for column in table.runnable}


def row_names(table: Table) -> list[tuple[str, str]]:
    """(row kind, label or figure) in the order the report lays them out."""
    names = ALL_LABELS if table.task == "multilabel15" else FINDINGS
    rows = []
    for kind in table.rows:
        if kind == "labels":
            rows += [("labels", n) for n in names]
        elif kind == "binary":
            rows += [("binary", n) for n in BINARY_ROWS]
        elif kind == "counts":
            rows += [("counts", n) for n in ALL_LABELS]
        elif kind == "images":
            rows.append(("images", "Training images"))
        else:
            rows.append((kind, kind))
    return rows


def measured(kind: str, key: str, result: dict | None):
    """One figure of one run."""
    if not result:
        return None
    evaluate = result["evaluate"]
    if kind == "loss":
        return evaluate.get("loss")
    if kind in ("micro", "macro"):
        return evaluate.get(f"auroc_{kind}")
    if kind == "labels":
        return (evaluate.get("auroc") or {}).get(key)
    if kind == "binary":
        binary = evaluate.get("binary") or {}
        return binary.get("confusion", {}).get(key, binary.get(key))
    if kind == "counts":
        return ((result["resample"].get("labels") or {}).get(key) or {}).get("after")
    if kind == "images":
        return result["resample"].get("images_after")
    return None


def reported(kind: str, key: str, column: Column):
    report = column.report or {}
    if kind == "labels":
        values = report.get("auroc")
        return values[FINDINGS.index(key)] if values and key in FINDINGS else None
    if kind == "binary":
        return (report.get("binary") or {}).get(key)
    if kind == "counts":
        return (report.get("counts") or {}).get(key)
    return report.get(kind)


def mean_of(kind: str, key: str, runs: list[dict]) -> float | None:
    values = [v for v in (measured(kind, key, r) for r in runs) if v is not None]
    return float(np.mean(values)) if values else None


def _measured_cell(kind: str, key: str, runs: list[dict]) -> str:
    """One run's figure; several runs' mean ± standard deviation (n runs)."""
    values = [v for v in (measured(kind, key, r) for r in runs) if v is not None]
    if len(values) < 2:
        return _fmt(values[0] if values else None, kind)
    decimals = 1 if all(float(v).is_integer() for v in values) else 4 if kind == "loss" else 3  # counts: 629.5 ± 0.7
    return f"{np.mean(values):,.{decimals}f} ± {np.std(values, ddof=1):,.{decimals}f} (n={len(values)})"


def _reported_cell(kind: str, key: str, column: Column) -> str:
    """The report's figure in brackets; a binary figure that its own confusion matrix contradicts gets both. A
    reference column (figures only, e.g. the CheXNet paper's) has no figure of this repo's: its cell is the figure
    of the source that its title names, without brackets (which would make it the report's: the paper's macro
    0.841 is not in the report)."""
    old = reported(kind, key, column)
    if column.reference:
        return _fmt(old, kind)
    if old is None:
        return ""
    derived = (column.report.get("binary_from_matrix") or {}).get(key) if kind == "binary" else None
    return f" ({_fmt(old, kind)}" + (f"; its matrix: {_fmt(derived, kind)}" if derived is not None else "") + ")"


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (kind == "counts" and float(value).is_integer()):
        return f"{int(value):,}"
    return f"{value:.4f}" if kind == "loss" else f"{value:.3f}"


def markdown(table: Table, found: dict[str, list[dict]]) -> str:
    header = ["", *[c.title + (" [ours: not in the report]" if c.ours else "")
                    + (" [reference: figures only, not run]" if c.reference else "") for c in table.columns]]
    lines = [f"### {table.title}", "", "Each cell: this repo's figure, or its mean ± standard deviation over n training "
             "runs (seeds) (the report's in brackets); a reference column: the figures of the source its title names.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, key in row_names(table):
        label = {"loss": "Loss", "micro": "Micro average AUROC", "macro": "Macro average AUROC",
                 "counts": f"{key} (training images)"}.get(kind, key)
        cells = []
        for column in table.columns:
            new = "" if column.reference else _measured_cell(kind, key, found.get(column.name) or [])
            cells.append(new + _reported_cell(kind, key, column))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sources = sorted({r["params"].get("data", {}).get("source", "?") for runs in found.values() for r in runs})
    missing = [c.name for c in table.runnable if not found.get(c.name)]
    lines.append("")
    if table.contradictions:  # one line each, under the table
        lines += [f"- The report disagrees with itself: {note}" for note in table.contradictions] + [""]
    if sources:
        lines.append(f"Data: {', '.join(sources)}." + (" Figures from the synthetic data set test the pipeline; "
                                                       "they say nothing about NIH." if "synthetic" in sources else ""))
    if missing:
        lines.append(f"Not run yet: {', '.join(missing)} (`cxr table run {table.name}`).")
    return "\n".join(lines) + "\n"


def figure(table: Table, found: dict[str, list[dict]]):
    """Grouped bars of the measured per-label AUROC, the report's figure for each as a dash on its bar."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    names = [key for kind, key in row_names(table) if kind == "labels"] or ["micro", "macro"]
    per_label = "labels" in table.rows
    bars = [c for c in table.columns if not c.reference]
    width = 0.8 / max(len(bars), 1)
    fig = go.Figure()
    for k, column in enumerate(table.columns):
        color = "black" if column.reference else qualitative.Plotly[k % 10]
        if column.reference:  # e.g. the CheXNet paper: a star at the label's center
            xs = list(range(len(names)))
        else:
            slot = bars.index(column)
            xs = [i - 0.4 + width * (slot + 0.5) for i in range(len(names))]
            values = [mean_of("labels" if per_label else n, n, found.get(column.name) or []) for n in names]
            fig.add_bar(x=xs, y=values, width=width, name=column.title, marker_color=color)
        report = [reported("labels" if per_label else n, n, column) for n in names]
        if any(v is not None for v in report):
            fig.add_scatter(x=xs, y=report, mode="markers", name=column.title if column.reference else f"report: {column.title}",
                            marker={"symbol": "star" if column.reference else "line-ew-open", "size": 14,
                                    "color": color, "line": {"width": 3}})
    fig.update_layout(title=table.title, barmode="overlay", yaxis_title="test AUROC", yaxis_range=[0, 1.02],
                      xaxis={"tickvals": list(range(len(names))), "ticktext": names},
                      legend={"orientation": "h", "y": -0.3}, template="plotly_white", height=600)
    return fig


def show(name: str, out_dir: Path = Path("plots/tables"), rounds: int | None = None) -> str:
    """The table (each cell: one run, or the mean ± sd of its seeds), each column's difference against the
    first with its 95% interval, and a verdict on each of the report's claims; also written to
    out_dir/NAME.md, NAME.html (plotly) and NAME.json. `rounds`: of the bootstrap (params.yaml's
    evaluate.bootstrap when None)."""
    from experiments import evidence

    table = _get(name)
    existing = set(_exp("list", "--name-only").stdout.split())
    found = results(table, existing)
    claims, against_first = [], {}
    if rounds != 0:
        params = load_params()
        rounds = params["evaluate"]["bootstrap"] if rounds is None else rounds
        runs = evidence.Runs(existing)
        claims = evidence.claim_verdicts(table, runs, rounds, seed(params))
        against_first = evidence.baseline_differences(table, runs, rounds, seed(params))
    text = markdown(table, found) + evidence.markdown(claims, against_first)
    with atomic_path(out_dir / f"{name}.md") as tmp:
        tmp.write_text(text)
    with atomic_path(out_dir / f"{name}.html") as tmp:
        figure(table, found).write_html(tmp, include_plotlyjs=True)
    with atomic_path(out_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps({"table": name, "runs": {c: len(r) for c, r in found.items()},
                                   "against_first": against_first, "claims": claims, "bootstrap_rounds": rounds},
                                  indent=1, default=float))
    return text
