"""dvc.yaml tells the truth: each stage's code deps are exactly the project files its module imports,
no stage imports another (but the check, which runs their checks), and imports flow one way (cli -> stages and
tools -> library)."""

import copy
import re

import pytest
import yaml

from cxr14 import imports

from .conftest import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = list(DVC_YAML["stages"])
PROCESSING = STAGES[1:]  # after `check`, which runs every stage's params check
PIPELINE = [f"stages/{name}.py" for name in PROCESSING]


def module_of(dvc_yaml: dict, stage: str) -> str:
    """The module a stage's cmd runs: `python -m stages.crop` -> stages.crop, `python -m pkg` -> pkg.__main__."""
    module = re.search(r"-m (\S+)", dvc_yaml["stages"][stage]["cmd"]).group(1)
    return module if "." in module else f"{module}.__main__"


def code_deps(dvc_yaml: dict, stage: str) -> set[str]:
    return {dep for dep in dvc_yaml["stages"][stage]["deps"] if isinstance(dep, str) and dep.endswith(".py")}


def mismatches(dvc_yaml: dict) -> dict[str, dict[str, list[str]]]:
    """For each stage whose code deps differ from its imports: what dvc.yaml misses and what it lists in excess."""
    out = {}
    for stage in dvc_yaml["stages"]:
        imported, listed = set(imports.project_files(module_of(dvc_yaml, stage))), code_deps(dvc_yaml, stage)
        if imported != listed:
            out[stage] = {"missing": sorted(imported - listed), "extra": sorted(listed - imported)}
    return out


def test_the_pipeline_has_the_check_then_the_stages_in_order():
    assert STAGES == ["check", "download", "weights", "filter", "crop", "split", "resample", "train", "evaluate",
                      "localize"]
    for stage in STAGES:
        assert DVC_YAML["stages"][stage]["cmd"] == f"python -m stages.{stage}"


def test_the_check_comes_before_any_work_and_reads_every_section():
    from cxr14.params import SECTIONS

    assert "data/check/params.ok" in DVC_YAML["stages"]["download"]["deps"]
    assert "data/check/params.ok" in DVC_YAML["stages"]["weights"]["deps"]
    assert set(DVC_YAML["stages"]["check"]["params"]) == set(SECTIONS)


def test_every_stage_lists_exactly_the_code_it_imports():
    assert mismatches(DVC_YAML) == {}


def test_the_check_fails_when_a_dep_is_removed_or_added():
    broken = copy.deepcopy(DVC_YAML)
    broken["stages"]["split"]["deps"].remove("cxr14/labels.py")
    broken["stages"]["filter"]["deps"].append("cxr14/models.py")
    assert mismatches(broken) == {"split": {"missing": ["cxr14/labels.py"], "extra": []},
                                  "filter": {"missing": [], "extra": ["cxr14/models.py"]}}


def test_the_labels_module_is_a_dep_of_every_stage_that_reads_labels():
    users = {stage for stage in STAGES if "cxr14/labels.py" in code_deps(DVC_YAML, stage)}
    # download: the synthetic generator draws a sign per finding; check: it runs every stage's checks;
    # localize: the box list's findings are checked against the labels
    assert users == {"check", "download", "split", "resample", "train", "evaluate", "localize"}


@pytest.mark.parametrize("stage", PROCESSING)
def test_no_stage_imports_another_stage(stage):
    imported = set(imports.project_files(f"stages.{stage}"))
    assert imported & set(PIPELINE) == {f"stages/{stage}.py"}


def test_the_library_imports_neither_stages_nor_tools():
    for module in sorted((REPO / "cxr14").glob("*.py")):
        imported = imports.project_files(f"cxr14.{module.stem}")
        assert not [f for f in imported if not f.startswith("cxr14/")], module.name


def test_the_check_runs_every_stages_check():
    from stages import check

    assert {stage.__name__ for stage in check.STAGES} == {f"stages.{s}" for s in PROCESSING}


def test_the_tools_import_no_stage_module():
    for module in sorted((REPO / "experiments").glob("*.py")):
        imported = imports.project_files(f"experiments.{module.stem}")
        assert not set(imported) & set(PIPELINE), module.name


@pytest.mark.parametrize("package", ["stages", "experiments"])
def test_the_command_line_is_the_top_layer_and_no_stage_imports_the_tools(package):
    """cli imports stages and experiments; stages import neither (so a stage's deps never hold the tools)."""
    above = ("cli/",) if package == "experiments" else ("cli/", "experiments/")
    for module in sorted((REPO / package).glob("*.py")):
        imported = imports.project_files(f"{package}.{module.stem}")
        assert not [f for f in imported if f.startswith(above)], f"{package}/{module.name}"


def test_imports_are_found_wherever_they_are_written(tmp_path):
    """Function-local, relative and `from package import module` imports all count; other packages do not."""
    for name, text in {
        "stages/__init__.py": "",
        "stages/one.py": "import os\nfrom cxr14 import helper as h\n\ndef f():\n    from cxr14.deep import thing\n",
        "cxr14/__init__.py": "",
        "cxr14/helper.py": "from . import sibling\n",
        "cxr14/sibling.py": "import numpy\n",
        "cxr14/deep/__init__.py": "thing = 1\n",
        "cxr14/unused.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert imports.project_files("stages.one", tmp_path) == [
        "cxr14/__init__.py", "cxr14/deep/__init__.py", "cxr14/helper.py", "cxr14/sibling.py",
        "stages/__init__.py", "stages/one.py"]


def test_the_trained_model_is_declared_a_dvc_model_artifact():
    from dvc.repo import Repo

    (artifact,) = Repo(str(REPO)).artifacts.read()["dvc.yaml"].values()
    assert artifact.type == "model" and artifact.desc and artifact.labels
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert artifact.path in [next(iter(out)) if isinstance(out, dict) else out for out in train["outs"]]


# ---------------------------------------------------------------- params: what each stage reads, dvc.yaml declares


def keys_read(check, params: dict, monkeypatch) -> set[str]:
    """The params keys `check(params)` reads, through cxr14.params (Section.get and seed), as dotted leaves."""
    import sys

    from cxr14.params import Section, seed, training_seed

    read: set[str] = set()
    get = Section.get

    def recorded_get(self, name):
        read.add(self.key(name))
        return get(self, name)

    def recorded_seed(params):
        read.add("seed")
        return seed(params)

    def recorded_training_seed(params):
        read.update(("seed", "run_seed"))
        return training_seed(params)

    with monkeypatch.context() as patch:
        patch.setattr(Section, "get", recorded_get)
        for name, module in list(sys.modules.items()):  # `from cxr14.params import seed` binds it in each module
            if name.startswith(("stages.", "cxr14.")) and getattr(module, "seed", None) is seed:
                patch.setattr(module, "seed", recorded_seed)
            if name.startswith(("stages.", "cxr14.")) and getattr(module, "training_seed", None) is training_seed:
                patch.setattr(module, "training_seed", recorded_training_seed)
        check(params)
    return {key for key in read if not any(other.startswith(key + ".") for other in read)}  # sections read: leaves


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_declares_exactly_the_params_it_reads(stage, monkeypatch):
    """Each stage's check reads its params (its main calls it first, and reads nothing else through cxr14.params):
    the keys it reads, on the committed params.yaml and on the tests' synthetic one, are those dvc.yaml declares
    for it, a declared section covering its keys. Not counted: the train stage's resume fingerprint hashes the
    upstream stages' sections too (they reach it through its data deps), and the model file records the whole
    params as a note of the run."""
    import importlib

    from cxr14.params import load

    from .conftest import params_with

    check = importlib.import_module(module_of(DVC_YAML, stage)).check
    read = keys_read(check, load(REPO / "params.yaml"), monkeypatch) | keys_read(check, params_with(), monkeypatch)
    declared = DVC_YAML["stages"][stage]["params"]
    assert sorted(k for k in read if not any(covers(d, k) for d in declared)) == [], "read, not declared"
    assert [d for d in declared if not any(covers(d, k) for k in read)] == [], "declared, never read"


def test_the_files_that_params_name_are_deps_of_the_stage_that_reads_them():
    deps = DVC_YAML["stages"]["download"]["deps"]
    assert "${data.metadata}" in deps and "${data.download.archives_table}" in deps
