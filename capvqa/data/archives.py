"""Safe, all-or-nothing extraction of downloaded zip archives into the dataset layout.

The official archives are not laid out the way the dataset loaders read them (some have a top folder,
some do not; a questions zip may hold several splits), so each archive comes with an explicit rule that
maps its members to paths under the data root. Extraction is defensive because the archives come from
the network (or a mirror): every member name is checked before anything is written, and files are
first written into a scratch directory inside the root and only then renamed into place, so an
interrupted extraction never leaves a half-written file at a final path.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from capvqa.errors import DataError

# Members that archivers add and that never belong in the layout.
_JUNK_PREFIXES = ("__MACOSX/",)
_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db"})


class UnsafeArchiveError(DataError):
    """An archive member would escape the destination (absolute path, ``..`` or a symlink)."""


class ExtractRule(Protocol):
    """Maps member names of one archive to paths relative to the data root."""

    def plan(self, names: Sequence[str]) -> list[tuple[str, PurePosixPath]]:
        """Return ``(member name, destination relative to root)`` for the members to extract."""
        ...

    def outputs_present(self, root: Path, extracted: int) -> bool:
        """Whether a previous extraction that wrote ``extracted`` files still looks complete."""
        ...

    def describe(self) -> str:
        """Where the files go, for ``capvqa data list``."""
        ...


@dataclass(frozen=True)
class MemberFiles:
    """Extract named files, found by their base name wherever they sit in the archive.

    Matching by base name makes the rule indifferent to whether the zip has a top folder; every listed
    member is required, so a renamed upstream file fails loudly instead of silently producing nothing.
    ``files`` pairs a member base name with its destination relative to the root.
    """

    files: tuple[tuple[str, str], ...]

    def plan(self, names: Sequence[str]) -> list[tuple[str, PurePosixPath]]:
        by_base: dict[str, list[str]] = {}
        for name in names:
            if not name.endswith("/") and not _is_junk(name):
                by_base.setdefault(PurePosixPath(name).name, []).append(name)
        planned = []
        for base, destination in self.files:
            found = by_base.get(base, [])
            if not found:
                raise DataError(
                    f"archive has no member named {base!r} (it contains: {_preview(names)})"
                )
            if len(found) > 1:
                raise DataError(f"archive has several members named {base!r}: {', '.join(found)}")
            planned.append((found[0], PurePosixPath(destination)))
        return planned

    def outputs_present(self, root: Path, extracted: int) -> bool:
        return all((root / destination).is_file() for _, destination in self.files)

    def describe(self) -> str:
        return ", ".join(destination for _, destination in self.files)


@dataclass(frozen=True)
class MemberTree:
    """Extract every file of a folder archive (COCO images) into one destination directory.

    Members under ``top_folder/`` lose that prefix; members at the archive root are taken as they are
    (some mirrors repack without the top folder); anything in another folder is ignored. Only the part
    below the top folder is kept, so ``val2014/COCO_val2014_000000000042.jpg`` lands at
    ``{destination}/COCO_val2014_000000000042.jpg``.
    """

    top_folder: str
    destination: str

    def plan(self, names: Sequence[str]) -> list[tuple[str, PurePosixPath]]:
        prefix = self.top_folder.strip("/") + "/"
        planned = []
        for name in names:
            if name.endswith("/") or _is_junk(name):
                continue
            if name.startswith(prefix):
                relative = name[len(prefix) :]
            elif "/" not in name:
                relative = name
            else:
                continue
            planned.append((name, PurePosixPath(self.destination) / relative))
        if not planned:
            raise DataError(
                f"archive has no files under {prefix!r} or at its root (it contains: {_preview(names)})"
            )
        return planned

    def outputs_present(self, root: Path, extracted: int) -> bool:
        directory = root / self.destination
        if not directory.is_dir():
            return False
        # A directory scan is cheap even for 80k images and catches a partly deleted folder.
        return sum(1 for _ in _iter_files(directory)) >= extracted

    def describe(self) -> str:
        return f"{self.destination}/ ({self.top_folder}/*)"


def check_member_safe(info: zipfile.ZipInfo) -> None:
    """Reject a member whose name or type could write outside the destination directory."""
    name = info.filename
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    if "\x00" in name:
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: NUL byte in name")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: absolute path")
    if ".." in parts:
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: '..' in path")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"unsafe archive member {name!r}: symbolic link")


def extract(archive: Path, rule: ExtractRule, root: Path, scratch: Path) -> list[PurePosixPath]:
    """Extract ``archive`` under ``root`` following ``rule``; return the destinations written.

    All members are checked before anything is written. Files are written into ``scratch`` (which must
    be on the same filesystem as ``root``, e.g. inside it) and renamed into place only once every
    member has been read and CRC-checked; ``scratch`` is removed afterwards whatever happens.
    """
    if scratch.exists():
        shutil.rmtree(scratch)  # left over from an interrupted run
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                try:
                    check_member_safe(info)
                except UnsafeArchiveError as error:
                    raise UnsafeArchiveError(f"{archive.name}: {error}") from None
            try:
                plan = rule.plan([info.filename for info in infos])
            except DataError as error:
                raise DataError(f"{archive.name}: {error}") from None
            _check_destinations(plan, archive)
            scratch.mkdir(parents=True)
            for member, destination in plan:
                staged = scratch / destination
                staged.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as source, open(staged, "wb") as sink:
                    shutil.copyfileobj(source, sink, length=1 << 20)
        for _, destination in plan:
            final = root / destination
            final.parent.mkdir(parents=True, exist_ok=True)
            (scratch / destination).replace(final)
        return [destination for _, destination in plan]
    except zipfile.BadZipFile as error:
        raise DataError(
            f"{archive} is not a valid zip archive ({error}); delete it, or rerun the download with --force"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_destinations(plan: Iterable[tuple[str, PurePosixPath]], archive: Path) -> None:
    """Two members must not land on the same path, and no destination may climb out of the root."""
    seen: dict[PurePosixPath, str] = {}
    for member, destination in plan:
        if destination.is_absolute() or ".." in destination.parts:
            raise UnsafeArchiveError(f"{archive.name}: member {member!r} maps outside the root")
        if destination in seen:
            raise DataError(
                f"{archive.name}: members {seen[destination]!r} and {member!r} both map to {destination}"
            )
        seen[destination] = member


def _is_junk(name: str) -> bool:
    return name.startswith(_JUNK_PREFIXES) or PurePosixPath(name).name in _JUNK_NAMES


def _iter_files(directory: Path) -> Iterable[Path]:
    for path in directory.rglob("*"):
        if path.is_file():
            yield path


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (shown + more) or "nothing"
