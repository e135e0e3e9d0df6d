"""Where checkpoints come from and how they are written: local dirs or hub ids; atomic saves into a folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Written last by every save: the files it wrote, so the next save into the same folder replaces (or removes)
# exactly those and nothing else.
SAVE_MANIFEST = ".dove-save.json"
_ROLLBACK = ".dove-rollback.json"
# Test hook, for timing only: seconds to sleep right after a save has replaced its first file in an existing
# folder (the moment a kill is most harmful), so a test can SIGKILL the process there. Unset in normal use.
SAVE_PAUSE_ENV = "DOVE_TEST_PAUSE_SAVE"


def resolve_pretrained_dir(path_or_id: str | os.PathLike, revision: str | None = None, subfolder: str = "") -> Path:
    """A local directory for a checkpoint: the path itself, or a hub snapshot (downloaded once, cached)."""
    local = Path(path_or_id).expanduser()
    interrupted = previous_save_readable(local)
    if interrupted is not None:
        local = interrupted  # a save was killed while replacing files: the previous version is intact here
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


class CorruptWeightsError(ValueError):
    """A weights file that cannot be read: truncated, empty, or not a safetensors file at all."""


def corrupt_weights_error(path: str | os.PathLike, err: Exception) -> CorruptWeightsError:
    """The message every loader gives for an unreadable weights file: which file, and what to do about it."""
    return CorruptWeightsError(
        f"{path} is damaged and cannot be read ({type(err).__name__}: {err}): it may be truncated, empty or not a "
        "safetensors file. Copy or download the model again, or save it again from its source (a training "
        "run's checkpoints hold complete copies)"
    )


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """`safetensors.torch.load_file`, with a damaged file reported by name (`CorruptWeightsError`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise corrupt_weights_error(path, err) from err


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the architecture; the message names the keys."""


def load_state_dict_exactly(module: Any, state: dict[str, Any], what: str) -> None:
    """Load `state` into `module` only if every key and shape matches, else raise CheckpointMismatchError
    naming what is misshapen, missing or unexpected (`what` says whose weights, e.g. the file)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        parts = []
        if misshapen:
            shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in misshapen[:8])
            parts.append(f"{len(misshapen)} misshapen (checkpoint vs model): {shown}")
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}")
        raise CheckpointMismatchError(f"{what} does not match: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, owned: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging directory; on success its files replace their namesakes in `target`.

    Only what a save writes is touched: the files written into the staging directory, the files the
    previous save recorded in `SAVE_MANIFEST` (so a file it wrote and this one does not, e.g. a LoRA
    adapter, does not linger) and the names in `owned` (for folders written before the manifest
    existed). Anything else in `target` (a user's notes, other runs) stays as it was.

    A process killed at any point leaves the previous model loadable: before the first file is
    replaced, a complete copy of every file about to change is committed (hard links, one rename) to
    `retired_path(target)`; `resolve_pretrained_dir` reads from there while it exists, and the next
    save into `target` puts it back before writing.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save a model to {target}: it is a file, not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        written = _relative_files(staging)
        (staging / SAVE_MANIFEST).write_text(json.dumps({"files": written}, indent=1) + "\n")
        _fsync_tree(staging)
        if target.exists():
            _replace_files(staging, target, written, owned)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def retired_path(target: Path) -> Path:
    """Where the previous version of `target`'s files waits while a save replaces them (and survives a kill)."""
    return target.parent / f".{target.name}.old"


def recover_interrupted_save(target: str | os.PathLike) -> None:
    """Put back the previous model if a save into `target` was killed while replacing its files."""
    target = Path(target)
    retired = retired_path(target)
    if retired.is_dir():
        if not target.exists():  # killed between the two renames of a whole-directory swap
            os.replace(retired, target)
        elif (retired / _ROLLBACK).is_file():
            added = json.loads((retired / _ROLLBACK).read_text())["added"]
            # Copied back (linked), not moved: the retired copy stays complete, and loadable, until the end.
            for rel in _relative_files(retired, skip=(_ROLLBACK,)):
                restoring = (target / rel).with_name(f".{Path(rel).name}.dove-restore")
                restoring.unlink(missing_ok=True)
                _link_or_copy(retired / rel, restoring)
                os.replace(restoring, target / rel)
            for rel in added:
                _remove_file(target, rel)
            _discard_retired(retired)
        else:  # a completed whole-directory swap whose cleanup was cut short
            shutil.rmtree(retired, ignore_errors=True)
    shutil.rmtree(target.parent / f".{target.name}.old-tmp", ignore_errors=True)


def previous_save_readable(target: Path) -> Path | None:
    """The retired copy of `target` when a save into it was interrupted mid-replacement, else None."""
    retired = retired_path(target)
    if retired.is_dir() and (not target.exists() or (retired / _ROLLBACK).is_file()):
        return retired
    return None


def saved_files(directory: str | os.PathLike) -> list[str]:
    """The files the last `atomic_directory` save into `directory` wrote (relative paths); [] if unknown."""
    manifest = Path(directory) / SAVE_MANIFEST
    if not manifest.is_file():
        return []
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        # Unreadable: this save still replaces the files it writes, it only cannot remove stale ones.
        warnings.warn(f"{manifest} is not a valid save manifest ({err}); leaving the files it named", stacklevel=2)
        return []
    return [str(f) for f in files if _is_inside(str(f))] + [SAVE_MANIFEST]


def remove_saved_files(directory: str | os.PathLike) -> None:
    """Delete what the last save into `directory` wrote (and the directory if nothing else is left in it)."""
    directory = Path(directory)
    recover_interrupted_save(directory)
    for rel in saved_files(directory):
        _remove_file(directory, rel)
    with contextlib.suppress(OSError):
        directory.rmdir()


def _replace_files(staging: Path, target: Path, written: list[str], owned: Sequence[str]) -> None:
    previous = set(saved_files(target)) | {name for name in owned if (target / name).is_file()}
    written_set = set(written) | {SAVE_MANIFEST}
    changed = sorted(rel for rel in previous | written_set if (target / rel).is_file())
    backup = target.parent / f".{target.name}.old-tmp"
    shutil.rmtree(backup, ignore_errors=True)
    backup.mkdir()
    for rel in changed:
        _link_or_copy(target / rel, backup / rel)
    added = sorted(written_set - set(changed))
    (backup / _ROLLBACK).write_text(json.dumps({"added": added}) + "\n")
    _fsync_tree(backup)
    os.replace(backup, retired_path(target))  # from here on, a kill is undone by `recover_interrupted_save`
    # The manifest goes last: until it is in place, the folder's record still names the previous files.
    for index, rel in enumerate([*written, SAVE_MANIFEST]):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target / rel)
        if index == 0:
            _maybe_pause_save()
    for rel in sorted(previous - written_set):
        _remove_file(target, rel)
    _discard_retired(retired_path(target))


def _discard_retired(retired: Path) -> None:
    """Its marker first (one unlink), so a kill during the removal never leaves a partial copy that counts."""
    (retired / _ROLLBACK).unlink(missing_ok=True)
    shutil.rmtree(retired, ignore_errors=True)


def _relative_files(directory: Path, skip: Sequence[str] = ()) -> list[str]:
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory).as_posix() not in skip
    )


def _is_inside(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _remove_file(directory: Path, rel: str) -> None:
    """Delete one file a save wrote, then its parent folders inside `directory` if that left them empty."""
    if not _is_inside(rel):
        return
    path = directory / rel
    path.unlink(missing_ok=True)
    for parent in path.parents:
        if parent == directory or directory not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, destination)


def _maybe_pause_save() -> None:
    seconds = os.environ.get(SAVE_PAUSE_ENV)
    if seconds:
        print(f"{SAVE_PAUSE_ENV}: paused", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
