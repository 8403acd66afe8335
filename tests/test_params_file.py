"""params.yaml survives DVC: `dvc exp run -S` rewrites it through a YAML round trip (ruamel, in
dvc.utils.hydra.apply_overrides), which misplaces a comment after a value. Every override that the demo
and the tables apply goes, through DVC's own code, onto a params.yaml already rewritten by a first
workspace experiment, and the result loads with the values asked for."""

import shutil

import pytest
from dvc.utils.hydra import apply_overrides

from cxr14.params import apply, flatten, load
from experiments import demo, presets, tables

from .conftest import REPO

# The first workspace experiment a user runs (README: the small run on the synthetic set)
FIRST = {"data.source": "synthetic", "data.synthetic.image_size": 128, "crop.pixels": 64, "model.pretrained": "none"}


# Every preset (presets/*.yaml): the demo's, and each of the others on top of it.
PRESETS = [("demo",)] + [("demo", path.stem) for path in sorted(presets.FOLDER.glob("*.yaml")) if path.stem != "demo"]


def override_sets() -> list[tuple[str, dict]]:
    sets = [(f"preset-{'+'.join(names)}", presets.load(*names)) for names in PRESETS]
    sets.append(("chexnet-ablation", {"model.backbone": "densenet121", "model.head.hidden": []}))
    for table in tables.load().values():
        for column in table.columns:
            if not column.reference:
                sets.append((f"{table.name}-{column.name}", tables.settings(table, column)))
                sets.append((f"{table.name}-{column.name}-demo", tables.settings(table, column, demo=True)))
    return sets


def lookup(params: dict, key: str):
    node = params
    for part in key.split("."):
        node = node[part]
    return node


def dvc_set(path, settings: dict) -> dict:
    """What `dvc exp run -S ...` does to params.yaml before it runs anything, then the file as the stages read it."""
    apply_overrides(str(path), demo.overrides(settings, load(path)))
    return load(path)


@pytest.mark.parametrize("name, settings", override_sets(), ids=[name for name, _ in override_sets()])
def test_params_yaml_stays_valid_through_dvcs_rewrites(tmp_path, name, settings):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    dvc_set(path, FIRST)
    loaded = dvc_set(path, settings)
    for key, value in settings.items():
        assert lookup(loaded, key) == value, key


def test_comments_stay_on_their_own_lines():
    """A comment after a value is what DVC's round trip moves onto the next key's line."""
    for number, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        assert "#" not in line or not code.strip(), f"params.yaml line {number}: put the comment on its own line above"


# The defaults the report does not state (docs/tables.md, "Not in the report: our choice"), and the settings
# that only say how the pipeline runs: each is marked "ours" in the comment lines above it or above its section.
UNSTATED = (
    "seed", "run_seed", "data.metadata", "data.download", "data.synthetic", "filter.views", "crop.workers",
    "crop.skip_unreadable", "split.method", "split.official.val_fraction", "split.patient.sizes", "split.random.sizes",
    "split.stratify", "model.top", "weights.mirror", "train.epochs", "train.batch_size", "train.adam.lr",
    "train.sgd.lr", "train.sgd.momentum", "train.sgd.nesterov", "train.switch.epoch", "train.switch.patience",
    "train.weight_decay", "train.schedule.kind", "train.schedule.factor", "train.schedule.patience",
    "train.early_stopping_patience", "train.class_weighting", "train.pos_weight", "train.augment.enabled",
    "train.augment.scale", "train.augment.flip", "train.augment.rotate_degrees", "train.select_by",
    "train.precision", "train.compile", "train.device", "train.processes", "evaluate.bootstrap",
    "evaluate.threshold", "evaluate.batch_size", "evaluate.device", "evaluate.calibration_bins", "localize.method",
    "localize.thresholds", "localize.gallery", "localize.batch_size",
)


def comments_above_each_key(text: str) -> dict[str, list[str]]:
    """Dotted key -> the comment lines right above it (a section's apply to its keys: see marked_ours)."""
    out, stack, block = {}, [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped)
            continue
        if not stripped:
            block = [] if not line.startswith(" ") else block
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0]
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        out[".".join(k for _, k in stack)] = block
        block = []
    return out


def marked_ours(comments: dict[str, list[str]], key: str) -> bool:
    parts = key.split(".")
    return any("ours" in " ".join(comments.get(".".join(parts[:n]), [])) for n in range(1, len(parts) + 1))


def test_every_default_the_report_does_not_state_says_ours():
    comments = comments_above_each_key((REPO / "params.yaml").read_text())
    assert set(UNSTATED) <= set(comments), sorted(set(UNSTATED) - set(comments))
    missing = [key for key in UNSTATED if not marked_ours(comments, key)]
    assert not missing, f"params.yaml: no 'ours' above {missing}"
    assert not marked_ours(comments, "crop.pixels") and not marked_ours(comments, "model.head.dropout")  # the report's


@pytest.mark.parametrize("names", PRESETS, ids="+".join)
def test_every_preset_sets_keys_of_params_yaml_to_values_every_stage_accepts(names):
    from stages import check

    settings, base = presets.load(*names), load(REPO / "params.yaml")
    assert [key for key in settings if key not in flatten(base)] == []
    check.check(apply(base, settings))
