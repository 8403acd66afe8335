"""Stage 0b, weights: torchvision's ImageNet weights of model.backbone, for model.pretrained: imagenet.

Fetched once from torchvision's own URL (or weights.mirror, a base URL serving the same file names)
into data/weights/checkpoints/<torchvision's file name>, torch.hub's layout, so that torchvision
loads it from there. Resumable (a .part in data/.weights-download, continued with HTTP Range),
retried with data.download's retries, backoff and timeout, checked against the SHA-256 prefix in the
file name (as torch.hub does), and renamed into place only when it matches. A copy already in torch's
own cache (~/.cache/torch/hub/checkpoints) is checked and copied instead of a download.
model.pretrained: none needs nothing: the output then says so.

Outputs: data/weights/ (DVC-tracked, so `dvc exp run` and every other workspace get it from the
cache and it is never fetched twice), with weights.json saying what it is (backbone, URL, SHA-256).
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cxr14 import models, progress
from cxr14.atomic import write_json
from cxr14.fetch import DownloadError, digest, resume
from cxr14.params import PARAMS_FILE, ParamError, load, section

PARTIAL = Path("data/.weights-download")  # outside the DVC output, which DVC empties before the stage runs
PROBE_SECONDS = 10  # how long `cxr check` waits for the weights' server (not a setting: promptness)


@dataclass(frozen=True)
class WeightsConfig:
    backbone: str
    pretrained: str
    mirror: str | None
    retries: int
    backoff: float
    timeout: float

    @property
    def file_name(self) -> str:
        import torchvision  # here, not at the top: model.pretrained none needs neither torch nor torchvision

        return Path(torchvision.models.get_model_weights(self.backbone).DEFAULT.url).name

    @property
    def url(self) -> str:
        import torchvision

        official = torchvision.models.get_model_weights(self.backbone).DEFAULT.url
        return f"{self.mirror.rstrip('/')}/{self.file_name}" if self.mirror else official


def check(params: dict) -> WeightsConfig:
    backbone, pretrained = models.check_backbone(params)
    settings = section(params, "weights")
    mirror = settings.get("mirror")
    if mirror is not None and (not isinstance(mirror, str) or not mirror.startswith(("http://", "https://"))):
        raise ParamError("weights.mirror", mirror, "null (torchvision's own URL) or an http(s):// base URL "
                                                   "that serves torchvision's file names")
    settings.finish()
    download = section(params, "data").section("download")  # the download stage checks the whole of it
    return WeightsConfig(backbone, pretrained, mirror,
                         retries=download.number("retries", low=0, integer=True),
                         backoff=download.number("backoff_seconds", low=0),
                         timeout=download.number("timeout_seconds", low=0, low_open=True))


def sha256_prefix(file_name: str) -> str:
    """The hash prefix torchvision puts in its file names: densenet169-b2777c0a.pth -> b2777c0a."""
    import torch

    match = torch.hub.HASH_REGEX.search(file_name)
    if not match or not match.group(1):
        raise DownloadError(f"{file_name}: no SHA-256 prefix in the file name to check it against")
    return match.group(1)


def matches(path: Path, file_name: str) -> bool:
    return path.is_file() and digest(path, "sha256").startswith(sha256_prefix(file_name))


def hub_copy(config: WeightsConfig) -> Path:
    """Where torchvision itself would have cached the file."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / config.file_name


def where_to_put_it(config: WeightsConfig) -> str:
    return (f"place {config.file_name} (from {config.url}) at {hub_copy(config)}, or set weights.mirror to a URL "
            f"that serves it, or set model.pretrained: none to train {config.backbone} from scratch")


def reachable(config: WeightsConfig) -> None:
    """`cxr check`'s question, in seconds, before a 45 GB download: can this stage get the weights?
    Yes if they are already fetched or in torch's cache, or if the server answers for the file."""
    if matches(models.weights_file(config.backbone, models.WEIGHTS_DIR), config.file_name) or hub_copy(config).exists():
        return
    request = urllib.request.Request(config.url, headers={"Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_SECONDS) as response:
            kind = response.headers.get("Content-Type", "")
            if kind.startswith("text/"):
                raise OSError(f"it answers with a web page ({kind}), not the file")
    except (OSError, urllib.error.URLError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise ParamError("model.pretrained", "imagenet",
                         f"weights the weights stage can get: {config.url} cannot be reached ({reason}); "
                         + where_to_put_it(config)) from None


def fetch(config: WeightsConfig, target: Path) -> str:
    """Put the checked file at `target`; return where it came from."""
    cached = hub_copy(config)
    if matches(cached, config.file_name):
        staging = PARTIAL / f"{config.file_name}.copy"
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, staging)
        os.replace(staging, target)
        return str(cached)
    part = PARTIAL / f"{config.file_name}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    with progress.transfer() as bar:
        task = bar.add_task(config.file_name, total=None)
        try:
            size = resume(config.url, part, None, retries=config.retries, backoff=config.backoff,
                          timeout=config.timeout, report=lambda done: bar.update(task, completed=done),
                          what="the weights file", hint="check weights.mirror")
        except DownloadError as error:
            raise DownloadError(f"{error}. Or {where_to_put_it(config)}") from None
        bar.update(task, total=size, completed=size)
    got = digest(part, "sha256")
    if not got.startswith(sha256_prefix(config.file_name)):
        part.unlink()
        raise DownloadError(f"{config.file_name}: SHA-256 {got} does not start with {sha256_prefix(config.file_name)} "
                            f"as its name says: {config.url} sent another file; it was deleted and never used. "
                            f"Check weights.mirror, or {where_to_put_it(config)}")
    os.replace(part, target)
    return config.url


def main(params_path: str = PARAMS_FILE, out: Path = models.WEIGHTS_DIR) -> None:
    config = check(load(params_path))
    out.mkdir(parents=True, exist_ok=True)
    if config.pretrained == "none":
        write_json(out / "weights.json", {"pretrained": "none", "backbone": config.backbone})
        print(f"weights: model.pretrained is none: {config.backbone} trains from scratch, nothing to fetch")
        return
    target = models.weights_file(config.backbone, out)
    target.parent.mkdir(parents=True, exist_ok=True)
    source = "already there" if matches(target, config.file_name) else fetch(config, target)
    sha256 = digest(target, "sha256")
    write_json(out / "weights.json", {"pretrained": "imagenet", "backbone": config.backbone, "url": config.url,
                                      "file": config.file_name, "bytes": target.stat().st_size, "sha256": sha256})
    print(f"weights: {target} ({target.stat().st_size:,} bytes, SHA-256 {sha256[:12]}...) from {source}")


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.weights")
