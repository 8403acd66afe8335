"""Stage 2, filter: drop the Azure blacklist (optional) and unwanted view positions.

Outputs: data/filter/index.csv (the images kept), metrics/filter.json (how many were dropped, by reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr14 import metadata as md
from cxr14.atomic import read_csv, write_csv, write_json
from cxr14.params import PARAMS_FILE, ParamError, StageError, load, section

VIEWS = ("PA", "AP")


@dataclass
class FilterConfig:
    blacklist: bool
    views: list[str]


def check(params: dict) -> FilterConfig:
    settings = section(params, "filter")
    views = settings.get("views")
    if not isinstance(views, list) or not views or any(v not in VIEWS for v in views):
        raise ParamError("filter.views", views, f"a non-empty list drawn from {list(VIEWS)}")
    config = FilterConfig(blacklist=settings.boolean("blacklist"), views=views)
    settings.finish()
    return config


def main(params_path: str = PARAMS_FILE, raw: Path = Path("data/raw"), out: Path = Path("data/filter"),
         metrics: Path = Path("metrics/filter.json")) -> None:
    config = check(load(params_path))
    index = read_csv(raw / "metadata.csv")
    keep = index["view"].isin(config.views)
    dropped = {"view": int((~keep).sum())}
    if config.blacklist:
        for reason, names in md.read_blacklists().items():
            hit = keep & index["image"].isin(names)
            dropped[f"blacklist_{reason}"] = int(hit.sum())
            keep &= ~hit
    if not keep.any():
        raise StageError(nothing_kept(index, config, dropped, raw / "metadata.csv"))
    kept = index[keep].reset_index(drop=True)
    write_csv(out / "index.csv", kept)
    write_json(metrics, {"images_in": len(index), "images_kept": len(kept), "dropped": dropped})
    print(f"filter: kept {len(kept)} of {len(index)} images; dropped {dropped}")


def nothing_kept(index, config: FilterConfig, dropped: dict[str, int], path: Path) -> str:
    """Why no image is left, in one line: the views the data has, what filter.views keeps, what the blacklist took."""
    if index.empty:
        return f"{path} lists no image: run the download stage again and look at its counts"
    views = index["view"].replace("", "(empty)").value_counts()
    have = ", ".join(f"{view} {count:,}" for view, count in views.items())
    by_views = len(index) - dropped["view"]
    blacklisted = sum(count for reason, count in dropped.items() if reason.startswith("blacklist_"))
    message = (f"no image is kept of the {len(index):,} in {path}: their views are {have}; "
               f"filter.views = {config.views} keeps {by_views:,}")
    if config.blacklist:
        message += f", and the Azure blacklist (filter.blacklist: true) removed {blacklisted:,} of those"
    usable = sorted(set(views.index) & set(VIEWS) - set(config.views))
    if by_views == 0 and usable:
        return message + f". Add {', '.join(usable)} to filter.views"
    if by_views == 0:
        return message + (f". The models take frontal chest X-rays: filter.views can name only {' and '.join(VIEWS)}, "
                          "and a data set without them cannot be used (check the View Position column of its metadata)")
    return message + ". Set filter.blacklist: false to keep them"


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.filter")
