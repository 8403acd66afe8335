"""Stage 0, check: every section of params.yaml by every stage's own rules, so that a bad value anywhere stops
the pipeline in seconds, before a 45 GB download or an hour of cropping; and, for model.pretrained imagenet,
whether the weights stage can get the weights.

Output: data/check/params.ok, the same bytes whatever the params, so that a check that passes again never
makes download (or anything after it) stale. It runs without the workspace lock: `cxr check` beside a
running stage reads params and writes only that file.
"""

from __future__ import annotations

from pathlib import Path

from cxr14.atomic import atomic_path
from cxr14.params import PARAMS_FILE, load
from stages import crop, download, evaluate, filter, localize, resample, split, train, weights

CHECKED = Path("data/check/params.ok")
STAGES = (download, weights, filter, crop, split, resample, train, evaluate, localize)


def check(params: dict) -> None:
    for stage in STAGES:
        stage.check(params)


def main(params_path: str = PARAMS_FILE, out: Path = CHECKED) -> None:
    params = load(params_path)
    check(params)
    wanted = weights.check(params)
    if wanted.pretrained == "imagenet":  # can the weights stage get them? Say so now, not after a 45 GB download
        weights.reachable(wanted)
    with atomic_path(out) as tmp:
        tmp.write_text("every section of params.yaml passed every stage's check\n")
    print(f"check: {params_path} passes every stage's check")


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.check", lock=False)
