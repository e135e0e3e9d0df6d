"""Where checkpoints come from and how they are written: local dirs or hub ids; atomic directory writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def resolve_pretrained_dir(path_or_id: str | os.PathLike, revision: str | None = None, subfolder: str = "") -> Path:
    """A local directory for a checkpoint: the path itself, or a hub snapshot (downloaded once, cached)."""
    local = Path(path_or_id).expanduser()
    if not local.exists() and retired_path(local).is_dir():
        local = retired_path(local)  # a save was killed mid-swap: the previous version is intact here
    if local.exists():
        directory = local / subfolder if subfolder else local
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        return directory
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise FileNotFoundError(f"checkpoint path does not exist: {path_or_id}")
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*", f"{subfolder}/**"] if subfolder else None
    try:
        snapshot = Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types; the user needs the id and the cause
        raise FileNotFoundError(
            f"{name!r} is neither a local path nor a reachable Hugging Face hub repository ({type(err).__name__}: {err})"
        ) from err
    return snapshot / subfolder if subfolder else snapshot


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    A process killed while writing leaves `target` as it was (the half-written sibling is removed on the
    next write), so the previous checkpoint always stays loadable.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    retired = retired_path(target)
    if retired.exists():
        if target.exists():
            shutil.rmtree(retired, ignore_errors=True)
        else:  # killed between the two renames below: put the previous version back first
            os.replace(retired, target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def retired_path(target: Path) -> Path:
    """Where the previous version of `target` waits during the swap (and survives a kill there)."""
    return target.parent / f".{target.name}.old"


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
