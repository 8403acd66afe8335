"""Stage 2, filter: drop the Azure blacklist (optional) and unwanted view positions.

Outputs: data/filter/index.csv (the images kept), metrics/filter.json (how many were dropped, by reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr14 import metadata as md
from cxr14 import params as P
from cxr14.atomic import read_csv, write_csv, write_json

VIEWS = ("PA", "AP")


@dataclass
class FilterConfig:
    blacklist: bool
    views: list[str]


def check(params: dict) -> FilterConfig:
    section = P.section(params, "filter")
    views = section.get("views")
    if not isinstance(views, list) or not views or any(v not in VIEWS for v in views):
        raise P.ParamError("filter.views", views, f"a non-empty list drawn from {list(VIEWS)}")
    config = FilterConfig(blacklist=section.boolean("blacklist"), views=views)
    section.finish()
    return config


def main(params_path: str = P.PARAMS_FILE, raw: Path = Path("data/raw"), out: Path = Path("data/filter"),
         metrics: Path = Path("metrics/filter.json")) -> None:
    config = check(P.load(params_path))
    index = read_csv(raw / "metadata.csv")
    keep = index["view"].isin(config.views)
    dropped = {"view": int((~keep).sum())}
    if config.blacklist:
        for reason, names in md.read_blacklists().items():
            hit = keep & index["image"].isin(names)
            dropped[f"blacklist_{reason}"] = int(hit.sum())
            keep &= ~hit
    kept = index[keep].reset_index(drop=True)
    write_csv(out / "index.csv", kept)
    write_json(metrics, {"images_in": len(index), "images_kept": len(kept), "dropped": dropped})
    print(f"filter: kept {len(kept)} of {len(index)} images; dropped {dropped}")


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.filter")
