"""A bad value stops a stage before any work, with an error naming the key, the value and what is valid."""

import copy
import socket

import pytest

from cxr14.params import ParamError, load
from stages import crop, download, evaluate, filter, localize, resample, split, train, weights

from .conftest import REPO, params_with, write_params


def error_of(stage, project, changes) -> ParamError:
    with pytest.raises(ParamError) as caught:
        stage.check(load(write_params(project, changes)))
    return caught.value


def test_unknown_source_names_the_valid_ones(project):
    error = error_of(download, project, {"data": {"source": "kaggle"}})
    assert error.key == "data.source" and error.value == "kaggle"
    assert "nih, local, synthetic" in str(error)


def test_local_source_needs_a_folder(project):
    assert error_of(download, project, {"data": {"source": "local"}}).key == "data.local_dir"


@pytest.mark.parametrize("fraction", [0, -0.5, 1.2])
def test_crop_fraction_must_be_in_zero_one(project, fraction):
    error = error_of(crop, project, {"crop": {"fraction": fraction}})
    assert error.key == "crop.fraction" and error.value == fraction
    assert "> 0" in str(error) and "<= 1" in str(error)


def test_negative_size_is_refused(project):
    error = error_of(crop, project, {"crop": {"pixels": -224}})
    assert error.key == "crop.pixels" and "integer >= 8" in str(error)


def test_unknown_label_in_resample_targets(project):
    error = error_of(resample, project, {"resample": {"targets": {"Hernai": 2500}}})
    assert error.key == "resample.targets.Hernai" and "Hernia" in error.valid


def test_a_resample_target_too_large_for_memory_names_the_key(project):
    error = error_of(resample, project, {"resample": {"targets": {"Hernia": 2_500_000_000}}})
    assert error.key == "resample.targets.Hernia" and "<= 1000000" in str(error)


def test_a_misspelt_key_is_an_error_not_a_silent_default(project):
    error = error_of(crop, project, {"crop": {"fracton": 0.5}})
    assert error.key == "crop.fracton" and "fraction" in error.valid


def test_fractions_are_no_official_split_setting(project):
    """Under official the test part is NIH's list: fractions would be silently ignored, so they are refused."""
    error = error_of(split, project, {"split": {"method": "official", "official": {"sizes": [0.8, 0.1, 0.1]}}})
    assert error.key == "split.official.sizes" and "val_fraction" in str(error)
    assert split.check(load(write_params(project, {"split": {"method": "official", "official": {"sizes": None}}}))).sizes is None


def test_split_sizes_must_be_fractions_or_counts(project):
    assert error_of(split, project, {"split": {"random": {"sizes": [0.5, 0.2, 0.2]}}}).key == "split.random.sizes"
    assert error_of(split, project, {"split": {"patient": {"sizes": [700, 100, 200]}}}).key == "split.patient.sizes"


def test_each_split_method_has_its_own_sizes_so_switching_the_method_alone_works(project):
    """`-S split.method=patient` alone: the official method's null sizes are not read as the patient split's."""
    config = split.check(load(write_params(project, {"split": {"method": "patient", "official": {"sizes": None}}})))
    assert config.method == "patient" and config.sizes == params_with()["split"]["patient"]["sizes"]
    config = split.check(load(write_params(project, {"split": {"method": "random"}})))
    assert config.sizes == params_with()["split"]["random"]["sizes"]


def test_filter_views_must_be_known(project):
    assert error_of(filter, project, {"filter": {"views": ["LL"]}}).key == "filter.views"


def test_class_weight_for_a_label_the_task_does_not_predict(project):
    error = error_of(train, project, {"train": {"class_weights": {"No Finding": 0.5}}})
    assert error.key == "train.class_weights.No Finding" and "multilabel14" in error.valid


def test_stage_stops_before_any_work(project):
    write_params(project, {"crop": {"pixels": 0}})
    from typer.testing import CliRunner

    from cli.app import app

    result = CliRunner().invoke(app, ["crop"])
    assert result.exit_code == 2
    assert "crop.pixels = 0" in result.output
    assert not (project / "data" / "crop").exists()


CHECKS = (download, weights, filter, crop, split, resample, train, evaluate, localize)
PARAMS_YAML = load(REPO / "params.yaml")


def leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def without(params: dict, key: str) -> dict:
    out = copy.deepcopy(params)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[last]
    return out


def test_params_yaml_passes_every_stage_check():
    for stage in CHECKS:
        stage.check(PARAMS_YAML)


@pytest.mark.parametrize("key", leaf_keys(PARAMS_YAML))
def test_params_yaml_is_the_only_default_of_every_key(key):
    """Take any key out of params.yaml and some stage stops, naming it: no code default can stand in."""
    params = without(PARAMS_YAML, key)
    with pytest.raises(ParamError) as caught:
        for stage in CHECKS:
            stage.check(params)
    assert caught.value.key == key and "missing" in str(caught.value)


def test_a_whole_missing_section_names_the_section():
    with pytest.raises(ParamError) as caught:
        crop.check(without(PARAMS_YAML, "crop"))
    assert caught.value.key == "crop"


def test_a_misspelt_section_is_an_error_naming_it(project):
    (project / "params.yaml").write_text("seed: 1\ntrian:\n  epochs: 3\n")
    with pytest.raises(ParamError) as caught:
        load(project / "params.yaml")
    assert caught.value.key == "trian" and "the sections are" in str(caught.value)


def test_a_number_in_exponent_form_is_a_number_as_dvc_reads_it(project):
    (project / "params.yaml").write_text("train:\n  adam:\n    lr: 1e-4\n    other: 2.5E+3\n")
    assert load(project / "params.yaml")["train"]["adam"] == {"lr": 0.0001, "other": 2500.0}


def test_broken_yaml_names_the_file_and_line(project):
    (project / "params.yaml").write_text("seed: 1\ntrain:\n  epochs: 3\n lr: [1,\n")
    with pytest.raises(ParamError) as caught:
        load(project / "params.yaml")
    assert "params.yaml: line 4" in str(caught.value)


def test_split_sizes_that_leave_a_part_empty_name_the_key(tiny_pipeline, project):
    from cxr14.atomic import read_csv

    index = read_csv(tiny_pipeline / "data/crop/index.csv")
    with pytest.raises(ParamError) as caught:
        settings = {"split": {"method": "random", "random": {"sizes": [0.9, 0.1, 0.0]}}}
        split.split(index, split.check(load(write_params(project, settings))))
    assert caught.value.key == "split.random.sizes" and "the test part" in str(caught.value)


def test_cxr_check_names_a_bad_value_of_any_section_before_any_work(project):
    from typer.testing import CliRunner

    from cli.app import app

    write_params(project, {"evaluate": {"batch_size": 0}})
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 2 and "evaluate.batch_size = 0" in result.output
    assert not (project / "data" / "check").exists()
    write_params(project)
    assert CliRunner().invoke(app, ["check"]).exit_code == 0
    first = (project / "data/check/params.ok").read_bytes()
    write_params(project, {"train": {"epochs": 7}})
    assert CliRunner().invoke(app, ["check"]).exit_code == 0
    assert (project / "data/check/params.ok").read_bytes() == first  # nothing after it becomes stale


def test_cxr_check_asks_for_missing_imagenet_weights_before_any_work(project, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "empty-hub"))
    with socket.socket() as unused:  # a port nobody listens on: the weights' server cannot be reached
        unused.bind(("127.0.0.1", 0))
        mirror = f"http://127.0.0.1:{unused.getsockname()[1]}"
    write_params(project, {"model": {"pretrained": "imagenet", "backbone": "densenet121"}, "weights": {"mirror": mirror}})
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 2 and "model.pretrained" in result.output and "densenet121-" in result.output
    assert "empty-hub/checkpoints/densenet121-a639ec97.pth" in result.output  # where to put them by hand
    assert not (project / "data" / "check").exists()


def test_a_head_dropout_of_one_is_refused(project):
    """Dropout 1 zeroes every feature the head sees: the model could only learn the label frequencies."""
    error = error_of(train, project, {"model": {"head": {"dropout": 1.0}}})
    assert error.key == "model.head.dropout" and ">= 0 and < 1" in str(error)


def test_a_val_fraction_of_one_is_refused_naming_val_fraction(project):
    error = error_of(split, project, {"split": {"method": "official", "official": {"sizes": None, "val_fraction": 1}}})
    assert error.key == "split.official.val_fraction" and "< 1" in str(error)


def test_an_official_split_left_without_train_images_names_val_fraction(project):
    """NIH's lists as they are: the train part is what val_fraction leaves of train_val."""
    import pandas as pd

    from cxr14 import metadata as md

    official = md.read_official_split()
    names = sorted(official["train_val"])[:2] + sorted(official["test"])[:1]
    index = pd.DataFrame({"image": names, "labels": "No Finding", "patient_id": [int(n[:8]) for n in names]})
    settings = {"method": "official", "official": {"sizes": None, "val_fraction": 0.99}, "stratify": False}
    config = split.check(load(write_params(project, {"split": settings})))
    with pytest.raises(ParamError) as caught:
        split.split(index, config)
    assert caught.value.key == "split.official.val_fraction" and "the train part" in str(caught.value)


@pytest.mark.parametrize("text, where, key", [
    ("seed: 1\ncrop:\n  pixels: 32\nseed: 2\n", "line 4, column 1", "seed"),
    ("seed: 1\ntrain:\n  epochs: 3\n  adam:\n    lr: 0.1\n  epochs: 30\n", "line 6, column 3", "train.epochs"),
])
def test_a_key_given_twice_is_refused_naming_the_file_line_and_key(project, text, where, key):
    """YAML keeps the last of two equal keys without a word: the first value would be silently ignored."""
    (project / "other.yaml").write_text(text)
    with pytest.raises(ParamError) as caught:
        load(project / "other.yaml")
    assert str(caught.value).startswith(f"{project / 'other.yaml'}: {where}: the key {key} is given twice")


def cli(*args):
    from typer.testing import CliRunner

    from cli.app import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("command", ["check", "filter"])
def test_a_binary_params_file_is_one_line_and_exit_2(project, command):
    (project / "some.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    result = cli(command, "-p", "some.bin")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: some.bin: line 1: byte 0x89 is not UTF-8 text: a params file is a YAML text file "
        "(a binary file given as params?)"]


@pytest.mark.parametrize("command, change, shown", [
    ("check", {"evaluate": {"batch_size": 0}}, "evaluate.batch_size = 0"),
    ("crop", {"crop": {"pixels": 0}}, "crop.pixels = 0"),
])
def test_an_error_names_the_params_file_that_was_read(project, command, change, shown):
    write_params(project, change)
    (project / "params.yaml").rename(project / "other.yaml")
    result = cli(command, "-p", "other.yaml")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: other.yaml: {shown} is not valid")


def test_a_local_folder_that_is_not_there_stops_the_check(project, tmp_path):
    error = error_of(download, project, {"data": {"source": "local", "local_dir": str(tmp_path / "nih-copy")}})
    assert error.key == "data.local_dir" and "no folder there" in str(error)
    (tmp_path / "nih-copy").mkdir()
    download.check(load(write_params(project, {"data": {"source": "local", "local_dir": str(tmp_path / "nih-copy")}})))


def test_an_archive_that_the_table_lacks_stops_the_check(project):
    error = error_of(download, project, {"data": {"source": "nih", "download": {"archives": ["images_001.tar.gz",
                                                                                              "images_13.tar.gz"]}}})
    assert error.key == "data.download.archives" and error.value == "images_13.tar.gz"
    assert "names from data/reference/nih_image_archives.tsv: images_001.tar.gz" in str(error)
    assert "images_012.tar.gz" in str(error)
