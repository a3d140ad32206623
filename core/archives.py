"""Unpacking an untrusted zip archive into a local folder, with limits.

`extract_zip` reads the central directory (never the entries' data into memory), refuses what
is unsafe or malformed before writing it, and streams each entry to its own new file in small
chunks, counting the bytes actually written against the caps on bytes per entry and in total
(a zip's declared sizes may lie). So memory stays a few chunks whatever the archive, and a zip
bomb costs at most the caps in disk, in a folder the caller removes on any error.

What is refused, and as what:
- `ArchiveTooLargeError` (413): more entries than allowed, an entry or the total over its cap.
- `ArchiveEntryError` (422, field `file`): a path that is absolute, has `..`, a backslash, a
  drive letter or an empty part, is longer than the path limit or has a part over 255 bytes;
  a symlink; an encrypted entry; a compression method other than stored or deflate; a name
  that appears twice, or is both a file and a folder; and a malformed entry (a local header
  whose name differs from the central directory, a bad CRC, a corrupt deflate stream, a
  truncated archive).
"""

from __future__ import annotations

import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from core.errors import InvalidInputError, PayloadTooLargeError

CHUNK_BYTES = 64 * 1024
# The longest file name part Linux file systems take (NAME_MAX).
NAME_MAX_BYTES = 255
SUPPORTED_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_ENCRYPTED_FLAG = 0x1


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_entry_bytes: int
    max_total_bytes: int
    max_path_chars: int


@dataclass(frozen=True)
class ExtractedEntry:
    path: PurePosixPath
    file: Path
    size_bytes: int


def entry_error(name: str, detail: str) -> InvalidInputError:
    shown = name if len(name) <= 120 else name[:117] + "..."
    return InvalidInputError.one("file", f"{detail}: {shown!r}")


def safe_entry_path(info: zipfile.ZipInfo, limits: ArchiveLimits) -> PurePosixPath:
    """The entry's relative path, or 422 for one that is unsafe, too long or unsupported."""
    name = info.filename
    if len(name) > limits.max_path_chars:
        raise entry_error(name, f"entry path longer than {limits.max_path_chars} characters")
    unsafe = (
        name.startswith("/")
        or "\\" in name
        or ":" in name
        or "\x00" in name
        or any(part in ("..", ".", "") for part in PurePosixPath(name.rstrip("/")).parts)
        or name.rstrip("/") == ""
    )
    if unsafe:
        raise entry_error(name, "unsafe path in the archive")
    path = PurePosixPath(name.rstrip("/"))
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
            raise entry_error(name, f"a path part is longer than {NAME_MAX_BYTES} bytes")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise entry_error(name, "symlinks are not allowed")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise entry_error(name, "encrypted entries are not supported")
    if info.compress_type not in SUPPORTED_METHODS:
        raise entry_error(
            name,
            f"compression method {info.compress_type} is not supported"
            f" (only {' and '.join(SUPPORTED_METHODS.values())})",
        )
    return path


def open_zip(source: IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise InvalidInputError.one("file", f"not a readable zip archive: {exc}") from exc


def extract_zip(
    source: IO[bytes],
    folder: Path,
    limits: ArchiveLimits,
    *,
    skip: Callable[[PurePosixPath, zipfile.ZipInfo], bool] | None = None,
    check: Callable[[PurePosixPath], None] | None = None,
) -> list[ExtractedEntry]:
    """Unpack `source` (a seekable zip) into the existing, empty `folder`; returns the files
    written. `skip` leaves entries out (folders always are); `check` refuses a path before
    anything of it is written. On an error, what was written stays for the caller to remove
    with the folder."""
    with open_zip(source) as archive:
        entries = archive.infolist()
        if len(entries) > limits.max_entries:
            raise PayloadTooLargeError(
                f"the archive has {len(entries)} entries, more than {limits.max_entries}"
            )
        paths = [(info, safe_entry_path(info, limits)) for info in entries]
        _refuse_duplicates(paths)
        root = folder.resolve()
        written: list[ExtractedEntry] = []
        total = 0
        for info, path in paths:
            if info.is_dir() or (skip is not None and skip(path, info)):
                continue
            if check is not None:
                check(path)
            target = root.joinpath(*path.parts)
            if not target.resolve().is_relative_to(root):
                raise entry_error(info.filename, "unsafe path in the archive")
            size = _write_entry(archive, info, target, limits, total)
            total += size
            written.append(ExtractedEntry(path, target, size))
        return written


def _refuse_duplicates(paths: list[tuple[zipfile.ZipInfo, PurePosixPath]]) -> None:
    """Two entries with one name would overwrite each other; a file that is also a folder of
    another entry could not be written."""
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    for info, path in paths:
        if info.is_dir():
            folders.add(path)
            continue
        if path in files:
            raise entry_error(info.filename, "duplicate entry name in the archive")
        files.add(path)
        folders.update(path.parents)
    clash = files & folders
    if clash:
        raise entry_error(str(min(clash)), "an entry is both a file and a folder")


def _write_entry(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    target: Path,
    limits: ArchiveLimits,
    total_before: int,
) -> int:
    name = info.filename
    size = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as entry, open(target, "xb") as out:
            while chunk := entry.read(CHUNK_BYTES):
                size += len(chunk)
                if size > limits.max_entry_bytes:
                    raise PayloadTooLargeError(
                        f"entry {name[:120]!r} unpacks to more than {limits.max_entry_bytes} bytes"
                    )
                if total_before + size > limits.max_total_bytes:
                    raise PayloadTooLargeError(
                        f"the archive unpacks to more than {limits.max_total_bytes} bytes"
                    )
                out.write(chunk)
    except zipfile.BadZipFile as exc:  # header name differs, bad CRC, bad magic
        raise entry_error(name, f"malformed entry ({exc})") from exc
    except zlib.error as exc:
        raise entry_error(name, f"corrupt compressed data ({exc})") from exc
    except EOFError as exc:
        raise entry_error(name, "the archive ends inside this entry") from exc
    except NotImplementedError as exc:
        raise entry_error(name, f"unsupported entry ({exc})") from exc
    except RuntimeError as exc:  # zipfile: "File ... is encrypted, password required"
        raise entry_error(name, f"unreadable entry ({exc})") from exc
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise entry_error(name, "an entry is both a file and a folder") from exc
    except OSError as exc:
        if exc.errno == 36:  # ENAMETOOLONG: the folder plus the entry's path is past PATH_MAX
            raise entry_error(name, "entry path too long for this file system") from exc
        raise
    return size
