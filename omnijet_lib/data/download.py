"""Download the official JetClass files from Zenodo (record 6619768) -- all of them, or just a few.

The record publishes uncompressed tar archives (~14 GB per train part). A tar is a plain sequence
of 512-byte member headers, each followed by the member's data padded to 512 bytes, so HTTP Range
requests can read one header, hop over the data using the size it gives, and fetch only the ROOT
files asked for (e.g. one file per class) instead of the whole archive. Servers without Range
support still work: the archive is then streamed and read until the requested files are in.

Two entry points:

* :func:`download_jetclass` -- selected ROOT files of a split, via Range requests;
* :func:`download_archive` (+ :func:`extract_archive`) -- a whole tar, md5-verified, then unpacked;
* :func:`download_file` -- any one file, resumable (e.g. the published OmniJet-α checkpoints).

Both resume partial downloads, write through a temporary name and rename atomically, and refuse
member paths that would escape the destination. Extraction is bounded (:data:`MAX_UNPACKED` in
all, :data:`MAX_RATIO` per zip member) and all-or-nothing. Only the standard library speaks HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import lzma
import os
import re
import stat
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Collection, Iterator, Sequence

from tqdm.auto import tqdm

from ..io import OmnijetError, atomic_path
from .jetclass import CLASS_FILE_PREFIXES, iter_jetclass
from .schema import class_selection

log = logging.getLogger(__name__)

__all__ = [
    "ZENODO_RECORD",
    "ZENODO_URL",
    "ARCHIVE_MD5",
    "SPLIT_ARCHIVES",
    "TarMember",
    "archive_url",
    "iter_tar_members",
    "check_member",
    "download_jetclass",
    "download_file",
    "download_archive",
    "extract_archive",
    "path_inside",
    "MAX_UNPACKED",
    "MAX_RATIO",
]

ZENODO_RECORD = 6619768
ZENODO_URL = f"https://zenodo.org/records/{ZENODO_RECORD}/files"

_TRAIN_MD5 = (
    "de4fd2dca2e68ab3c85d5cfd3bcc65c3", "9722a359c5ef697bea0fbf79bf50f003",
    "1e9f66cd1f915f9d10e90ae1d7761720", "47348fc8985319fa4806da87500482fa",
    "6b0ce16bd93b442a8d51914466990279", "416e347512e716de51d392bee327b8e9",
    "e9b9c1557b1b39bf0a16e4ab631ae451", "5bfc6cb285ccb7680cefa9ac82ad1a2e",
    "540c1a0d66dfad78d2b363c5740ccf86", "668f40b3275167ff7104c48317c0ae2a",
)
#: Archive file name -> md5 of the whole archive, as published on the Zenodo record.
ARCHIVE_MD5: dict[str, str] = {
    **{f"JetClass_Pythia_train_100M_part{i}.tar": m for i, m in enumerate(_TRAIN_MD5)},
    "JetClass_Pythia_val_5M.tar": "7235ccb577ed85023ea3ab4d5e6160cf",
    "JetClass_Pythia_test_20M.tar": "64e5156d26d101adeb43b8388207d767",
}
#: Split -> the archives holding it, in the order they are searched.
SPLIT_ARCHIVES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"JetClass_Pythia_train_100M_part{i}.tar" for i in range(10)),
    "val": ("JetClass_Pythia_val_5M.tar",),
    "test": ("JetClass_Pythia_test_20M.tar",),
}

_BLOCK = 512  # tar header / padding unit
_CHUNK = 1 << 20  # bytes per read while copying
_TIMEOUT = 60  # seconds per HTTP request
_FILE_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9]+)_(?P<num>\d+)\.root$")

#: Default bound on the bytes an archive may unpack to (the published checkpoints are a few hundred MB).
MAX_UNPACKED = 8 << 30
#: A zip member over :data:`_RATIO_FLOOR` bytes may expand at most this many times its compressed size.
MAX_RATIO = 200
_RATIO_FLOOR = 1 << 20
_TEMP_NAME = re.compile(r"\..+\.(part|partial)")  # our temporaries: atomic_path, _partial_path
#: What reading a damaged member raises (zip CRC/header, deflate/lzma/bz2 streams, truncated tar).
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, OSError)


def archive_url(name: str, base_url: str | None = None) -> str:
    """URL of an archive on Zenodo, or under ``base_url`` (a mirror, or a local test server)."""
    return f"{(base_url or ZENODO_URL).rstrip('/')}/{name}"


# --------------------------------------------------------------------------------------- HTTP
def _request(url: str, start: int | None = None, end: int | None = None):
    """Open ``url`` (bytes ``start..end`` inclusive when given); ``None`` if the range is past the end."""
    headers = {"User-Agent": "omnijet-downloader"}
    if start is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end}"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416:  # Range Not Satisfiable: nothing at or after `start`
            return None
        raise OmnijetError(f"{url}: HTTP error {err.code} ({err.reason})") from None
    except (urllib.error.URLError, OSError) as err:
        raise OmnijetError(f"{url}: cannot connect ({getattr(err, 'reason', err)})") from None


def _check_partial(resp, url: str, start: int) -> None:
    """A Range request must come back as 206 starting at ``start``."""
    if resp.status != 206:
        raise OmnijetError(f"{url}: server ignored an HTTP Range request (status {resp.status})")
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    if not m or int(m[1]) != start:
        raise OmnijetError(f"{url}: server answered a Range request for byte {start} with "
                           f"Content-Range {resp.headers.get('Content-Range')!r}")


def _pump(resp, n: int | None, out: BinaryIO, bar, url: str) -> int:
    """Copy ``n`` bytes (all, if ``None``) from ``resp`` to ``out``; a short read is an error."""
    done = 0
    try:
        while n is None or done < n:
            chunk = resp.read(_CHUNK if n is None else min(_CHUNK, n - done))
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        raise OmnijetError(f"{url}: connection lost after {done} bytes ({err}); run again to resume") from None
    if n is not None and done < n:
        raise OmnijetError(f"{url}: connection ended after {done} of {n} bytes; run again to resume")
    return done


def _read_all(resp, n: int, url: str) -> bytes:
    buf = bytearray()
    try:
        while len(buf) < n:
            chunk = resp.read(n - len(buf))
            if not chunk:
                break
            buf += chunk
    except (OSError, http.client.HTTPException) as err:
        raise OmnijetError(f"{url}: connection lost ({err})") from None
    return bytes(buf)


class _RangeSource:
    """Random access to a remote archive through HTTP Range requests."""

    def __init__(self, url: str):
        self.url = url

    def read(self, offset: int, n: int) -> bytes:
        resp = _request(self.url, offset, offset + n - 1)
        if resp is None:
            return b""
        with resp:
            _check_partial(resp, self.url, offset)
            return _read_all(resp, n, self.url)

    def copy(self, offset: int, n: int, out: BinaryIO, bar) -> None:
        resp = _request(self.url, offset, offset + n - 1)
        if resp is None:
            raise OmnijetError(f"{self.url}: archive ends before byte {offset} (truncated archive?)")
        with resp:
            _check_partial(resp, self.url, offset)
            _pump(resp, n, out, bar, self.url)

    def close(self) -> None:
        pass


class _StreamSource:
    """Forward-only access to an archive streamed from byte 0 (server without Range support)."""

    def __init__(self, url: str, resp):
        self.url, self.resp, self.pos = url, resp, 0

    def _skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise OmnijetError(f"{self.url}: cannot seek backwards in a streamed archive")
        while self.pos < offset:
            chunk = _read_all(self.resp, min(_CHUNK, offset - self.pos), self.url)
            if not chunk:
                break
            self.pos += len(chunk)

    def read(self, offset: int, n: int) -> bytes:
        self._skip_to(offset)
        data = _read_all(self.resp, n, self.url)
        self.pos += len(data)
        return data

    def copy(self, offset: int, n: int, out: BinaryIO, bar) -> None:
        self._skip_to(offset)
        self.pos += _pump(self.resp, n, out, bar, self.url)

    def close(self) -> None:
        self.resp.close()


def _open_archive(url: str):
    """Probe with a one-block Range request; fall back to streaming if the server ignores it."""
    resp = _request(url, 0, _BLOCK - 1)
    if resp is None:
        raise OmnijetError(f"{url}: the archive is empty")
    if resp.status == 206:
        resp.close()
        return _RangeSource(url)
    log.warning("%s: server does not support HTTP Range requests; streaming the archive "
                "from the start (stops once the requested files are in)", url)
    return _StreamSource(url, resp)


# ---------------------------------------------------------------------------------------- tar
@dataclass(frozen=True)
class TarMember:
    name: str  # path inside the archive (after GNU long-name / pax overrides)
    offset: int  # byte offset of the member's data in the archive
    size: int  # data size in bytes
    kind: bytes  # tar typeflag: b"0" regular file, b"5" directory, b"2" symlink, ...


def _tar_number(field: bytes, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, used for sizes >= 8 GiB
        if field[0] == 0xFF:
            raise OmnijetError(f"{where}: negative number in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise OmnijetError(f"{where}: corrupt tar header (bad number {text!r})") from None


def _parse_pax(payload: bytes, where: str) -> dict[str, str]:
    """Pax records are ``"<len> <key>=<value>\\n"``, where ``len`` counts the whole record."""
    out, i = {}, 0
    try:
        while i < len(payload) and payload[i:i + 1] != b"\0":
            space = payload.index(b" ", i)
            length = int(payload[i:space])
            key, _, value = payload[space + 1:i + length - 1].partition(b"=")
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
            i += length
    except ValueError:
        raise OmnijetError(f"{where}: malformed pax extended header") from None
    return out


def iter_tar_members(read: Callable[[int, int], bytes], where: str = "archive") -> Iterator[TarMember]:
    """Walk an uncompressed tar through ``read(offset, n) -> bytes``, hopping over member data.

    Handles ustar name prefixes, GNU long names (``L``) and pax headers (``x``: ``path``, ``size``).
    """
    offset, long_name, pax = 0, None, {}
    while True:
        block = read(offset, _BLOCK)
        if not block or block == bytes(_BLOCK):  # end of archive
            return
        if len(block) < _BLOCK:
            raise OmnijetError(f"{where}: truncated tar header at byte {offset}")
        stored = _tar_number(block[148:156], where)
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        signed = sum(struct.unpack("148b", block[:148])) + 8 * 32 + sum(struct.unpack("356b", block[156:]))
        if stored not in (unsigned, signed):
            raise OmnijetError(f"{where}: not a tar archive, or a corrupt header at byte {offset}")
        size = _tar_number(block[124:136], where)
        kind = block[156:157]
        kind = b"0" if kind in (b"\0", b"7") else kind
        data = offset + _BLOCK
        if kind in (b"L", b"x"):  # metadata for the next member
            if size > _CHUNK:
                raise OmnijetError(f"{where}: implausibly large extended header ({size} bytes) at byte {offset}")
            payload = read(data, size)
            if len(payload) < size:
                raise OmnijetError(f"{where}: truncated extended header at byte {offset}")
            if kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pax = _parse_pax(payload, where)
        elif kind not in (b"K", b"g"):  # K: GNU long link name, g: global pax -- not needed
            name = block[:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\0":  # POSIX: a name prefix lives in bytes 345..500
                prefix = block[345:500].split(b"\0", 1)[0]
                name = prefix + b"/" + name if prefix else name
            name = long_name or pax.get("path") or name.decode("utf-8", "surrogateescape")
            if "size" in pax:
                size = int(pax["size"])
            if kind == b"5":
                name = name.rstrip("/")
            yield TarMember(name, data, size, kind)
            long_name, pax = None, {}
        offset = data + -(-size // _BLOCK) * _BLOCK


def _safe_relpath(name: str, where: str) -> PurePosixPath:
    """The member path relative to the destination; absolute paths and ``..`` are refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
        raise OmnijetError(f"{where}: refusing unsafe member path {name!r} (absolute or contains '..')")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def path_inside(dest: Path, rel: str) -> bool:
    """Whether ``dest/rel`` names something strictly inside ``dest``: ``rel`` is relative, has no
    ``..`` and no symbolic link already in ``dest`` leads it out."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in parts:
        return False
    try:
        root = dest.resolve()
        target = (dest / rel).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loop, NUL byte
        return False
    return target != root and target.is_relative_to(root)


# ----------------------------------------------------------------------------------- checking
def check_member(path: str | os.PathLike, size: int | None = None, name=None) -> None:
    """Integrity check of a file taken out of an archive (md5s exist only for whole archives).

    The size must match the tar header and the file must read as a JetClass ROOT file.
    ``name`` is the path reported in errors (defaults to ``path``).
    """
    path = Path(path)
    name = name or path
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise OmnijetError(f"{name}: {actual} bytes, expected {size} from the tar header (incomplete download)")
    try:
        next(iter_jetclass(path, max_jets=16, step_size=16), None)
    except OmnijetError as err:
        reason = str(err).removeprefix(f"{path}: ")
        raise OmnijetError(f"{name}: downloaded file is not a valid JetClass ROOT file ({reason})") from None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mkdir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OmnijetError(f"{d}: cannot create the download folder, a file is in the way") from None


def _partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


# ---------------------------------------------------------------------------- selective mode
def _class_of(filename: str) -> int | None:
    m = _FILE_RE.match(filename)
    if m and m["prefix"] in CLASS_FILE_PREFIXES:
        return CLASS_FILE_PREFIXES.index(m["prefix"])
    return None


def _fetch_member(source, m: TarMember, final: Path, bar) -> Path:
    """Fetch one member into ``final``, resuming from ``.<name>.partial``; skip it if complete."""
    if final.is_file() and final.stat().st_size == m.size:
        log.info("%s: already complete, skipped", final)
        return final
    _mkdir(final.parent)
    partial = _partial_path(final)
    have = partial.stat().st_size if partial.is_file() else 0
    if have > m.size:  # left over from a different archive version
        partial.unlink()
        have = 0
    bar.total = (bar.total or 0) + m.size
    bar.update(have)
    if have < m.size:
        with open(partial, "ab") as out:
            source.copy(m.offset + have, m.size - have, out, bar)
    with atomic_path(final) as tmp:  # only a checked file ever gets the final name
        os.replace(partial, tmp)
        check_member(tmp, m.size, name=final)
    return final


def download_jetclass(
    split: str = "train",
    classes: Sequence[str | int] | None = None,
    n_files: int | None = 1,
    dest: str | os.PathLike = "data/jetclass",
    base_url: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch ``n_files`` ROOT files per class of a JetClass split, without the whole archive.

    ``split`` is ``"train"``, ``"val"`` or ``"test"``; ``classes`` names or indices (default: all
    ten); ``n_files=None`` takes every file of those classes. Files are the first ones of each
    class in archive order (train parts searched from part0 on) and land at their archive paths
    under ``dest`` (e.g. ``dest/val_5M/HToBB_120.root``). Complete files are skipped, partial ones
    resumed; each is checked (size and a JetClass read) before it gets its final name.
    Returns the paths grouped by class, in the official class order.
    """
    if split not in SPLIT_ARCHIVES:
        raise OmnijetError(f"split must be one of {', '.join(SPLIT_ARCHIVES)}; got {split!r}")
    if n_files is not None and (not isinstance(n_files, int) or n_files < 1):
        raise OmnijetError(f"n_files must be a positive integer (or None for all), got {n_files!r}")
    wanted = class_selection(classes) or list(range(10))
    dest = Path(dest)
    found: dict[int, list[Path]] = {c: [] for c in wanted}

    def need(c: int) -> bool:
        return c in found and (n_files is None or len(found[c]) < n_files)

    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
              desc=f"JetClass {split}") as bar:
        for archive in SPLIT_ARCHIVES[split]:
            if not any(need(c) for c in wanted):
                break
            url = archive_url(archive, base_url)
            source = _open_archive(url)
            try:
                for m in iter_tar_members(source.read, url):
                    rel = _safe_relpath(m.name, url)
                    c = _class_of(rel.name) if m.kind == b"0" else None
                    if c is None or not need(c):
                        continue
                    found[c].append(_fetch_member(source, m, dest / rel, bar))
                    if not any(need(c) for c in wanted):
                        break
            finally:
                source.close()
    if n_files is not None:
        short = [f"{CLASS_FILE_PREFIXES[c]} ({len(found[c])})" for c in wanted if len(found[c]) < n_files]
        if short:
            log.warning("%s split has fewer than %d files for: %s", split, n_files, ", ".join(short))
    return [p for c in wanted for p in found[c]]


# ------------------------------------------------------------------------- full-archive mode
def download_file(url: str, final: str | os.PathLike, md5: str | None = None, progress: bool = True,
                  desc: str | None = None) -> Path:
    """Download ``url`` to ``final``, resuming ``.<name>.partial`` left by an interrupted run.

    The file gets its final name only when complete (and, with ``md5``, verified; a mismatching
    download is removed and reported)."""
    final = Path(final)
    partial = _partial_path(final)
    _mkdir(final.parent)
    if partial.is_symlink():  # appending would write wherever it points
        raise OmnijetError(f"{partial}: is a symbolic link; refusing to write through it (remove it)")
    have = partial.stat().st_size if partial.is_file() else 0
    resp = _request(url, have) if have else _request(url)
    if resp is not None:  # None: 416, the partial file already holds every byte
        with resp:
            if have and resp.status != 206:
                log.warning("%s: server does not support HTTP Range requests; restarting from byte 0", url)
                have = 0
            elif have:
                _check_partial(resp, url, have)
            length = resp.headers.get("Content-Length")
            n = int(length) if length is not None else None
            with open(partial, "ab" if have else "wb") as out, tqdm(
                total=None if n is None else have + n, initial=have, unit="B", unit_scale=True,
                unit_divisor=1024, disable=not progress, desc=desc or final.name,
            ) as bar:
                _pump(resp, n, out, bar, url)
    with atomic_path(final) as tmp:  # a mismatching file is deleted by atomic_path on the raise
        os.replace(partial, tmp)
        if md5 and (got := _md5(tmp)) != md5:
            raise OmnijetError(f"{final}: md5 {got} does not match the published {md5}; "
                               "the file was removed, run again to download it afresh")
    return final


def download_archive(
    name: str,
    dest: str | os.PathLike = "data/jetclass",
    md5: str | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download a whole archive to ``dest/name`` with resume and md5 verification.

    ``md5`` defaults to the published sum (:data:`ARCHIVE_MD5`). A verified existing file is kept
    as is; a mismatching download is removed and reported. Unpack with :func:`extract_archive`.
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise OmnijetError(f"archive name must be a plain file name, got {name!r}")
    md5 = (md5 or ARCHIVE_MD5.get(name) or "").lower()
    if not md5:
        raise OmnijetError(f"{name}: unknown archive and no md5 given (known: {', '.join(ARCHIVE_MD5)})")
    final = Path(dest) / name
    if final.is_file():
        if _md5(final) == md5:
            log.info("%s: present, md5 verified", final)
            return final
        log.warning("%s: md5 mismatch, downloading it again", final)
        final.unlink()
    return download_file(archive_url(name, base_url), final, md5=md5, progress=progress, desc=name)


def extract_archive(path: str | os.PathLike, dest: str | os.PathLike = "data/jetclass",
                    progress: bool = True, *, max_size: int = MAX_UNPACKED, max_ratio: float = MAX_RATIO,
                    reserved: Collection[str] = ()) -> list[Path]:
    """Unpack a tar or zip archive into ``dest`` safely; returns the extracted files.

    Every member is checked before anything is written: no absolute paths, no ``..``, no path that
    a symbolic link already in ``dest`` leads out of it, only regular files and directories (no
    links or devices), each name once, nothing named (at any level) as one of ``reserved``
    (files the caller writes into ``dest`` itself) or as our temporaries; at most ``max_size``
    bytes in all and no zip member over 1 MiB expanding more than ``max_ratio`` times (bombs).
    A member must then hold exactly the bytes its header declares (headers can lie). Files already
    present with the right size are skipped; the others are written to temporaries that get their
    names only once every member is complete, so a failure (bad CRC, truncated archive) leaves
    ``dest`` as it was.
    """
    path, dest = Path(path), Path(dest)
    with open(path, "rb") as f:
        head = f.read(4)  # a tar of zips (e.g. of torch checkpoints) also passes zipfile.is_zipfile
    if head == b"PK\x03\x04" and zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise OmnijetError(f"{path}: not a readable zip archive ({err})") from None
        with zf:
            members = zf.infolist()
            for m in members:
                _safe_relpath(m.filename, str(path))
                if stat.S_ISLNK(m.external_attr >> 16):
                    raise OmnijetError(f"{path}: refusing member {m.filename!r}: links are not extracted")
                if m.flag_bits & 0x1:
                    raise OmnijetError(f"{path}: refusing member {m.filename!r}: it is encrypted")
                if m.file_size > _RATIO_FLOOR and m.file_size > max_ratio * m.compress_size:
                    raise OmnijetError(f"{path}: refusing member {m.filename!r}: {m.compress_size:,} bytes that "
                                       f"expand to {m.file_size:,}, more than {max_ratio:g} times (a zip bomb?)")
            files = [(m.filename, m.file_size, lambda m=m: zf.open(m)) for m in members if not m.is_dir()]
            return _extract(files, path, dest, progress, max_size, reserved)
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as err:
        raise OmnijetError(f"{path}: not a readable uncompressed tar or zip archive ({err})") from None
    with tf:
        members = []
        try:
            for m in tf:  # a member whose data is cut short fails when the next header is sought
                members.append(m)
        except (tarfile.TarError, OSError) as err:
            where = f"member {members[-1].name!r}" if members else "its first member"
            raise OmnijetError(f"{path}: truncated or corrupt tar archive at {where} ({err}); "
                               "nothing was extracted") from None
        for m in members:
            _safe_relpath(m.name, str(path))
            if not (m.isfile() or m.isdir()):
                raise OmnijetError(f"{path}: refusing member {m.name!r}: only regular files and "
                                   "directories are extracted (links and devices are not)")
        files = [(m.name, m.size, lambda m=m: tf.extractfile(m)) for m in members if m.isfile()]
        return _extract(files, path, dest, progress, max_size, reserved)


def _target(name: str, path: Path, dest: Path, reserved: Collection[str]) -> Path:
    """Where member ``name`` goes under ``dest``, or a refusal naming the archive and the member."""
    rel = _safe_relpath(name, str(path))
    if not rel.name:
        raise OmnijetError(f"{path}: refusing member {name!r}: it has no file name")
    for part in rel.parts:  # a folder with such a name would block the file as much
        if part in reserved or _TEMP_NAME.fullmatch(part):
            raise OmnijetError(f"{path}: refusing member {name!r}: {part!r} is a name omnijet writes itself")
    if not path_inside(dest, str(rel)):
        raise OmnijetError(f"{path}: refusing member {name!r}: a symbolic link in {dest} leads it outside")
    return dest / rel


def _new_dirs(d: Path) -> list[Path]:
    """``d`` and its missing parents, outermost first."""
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing[::-1]


def _extract(files, path: Path, dest: Path, progress: bool, max_size: int = MAX_UNPACKED,
             reserved: Collection[str] = ()) -> list[Path]:
    """Write checked ``(name, size, open)`` members under ``dest``, all or none."""
    targets = [_target(name, path, dest, reserved) for name, _, _ in files]
    seen, folders = set(), {d for t in targets for d in t.parents}
    for (name, _, _), target in zip(files, targets):  # one would overwrite or block the other
        if target in seen:
            raise OmnijetError(f"{path}: refusing member {name!r}: the archive holds it more than once")
        if target in folders:
            raise OmnijetError(f"{path}: refusing member {name!r}: the archive also has a folder of that name")
        seen.add(target)
    total = sum(size for _, size, _ in files)
    if total > max_size:
        raise OmnijetError(f"{path}: unpacks to {total:,} bytes, more than the {max_size:,}-byte limit; "
                           "refusing it as a possible archive bomb")
    created: list[Path] = []  # folders made here, removed again if a member fails
    try:
        with contextlib.ExitStack() as staged, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                    disable=not progress, desc=f"extract {path.name}") as bar:
            for (name, size, open_member), target in zip(files, targets):
                if target.is_file() and target.stat().st_size == size:
                    bar.update(size)
                    continue
                created += _new_dirs(target.parent)
                _mkdir(target.parent)
                _copy_member(open_member, staged.enter_context(atomic_path(target)), size, name, path, bar)
    except BaseException:  # the staged temporaries are gone already (atomic_path)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return targets


def _copy_member(open_member, tmp: Path, size: int, name: str, path: Path, bar) -> None:
    """Copy one member into ``tmp``: exactly the ``size`` bytes its header declares."""
    def corrupt(err):
        return OmnijetError(f"{path}: member {name!r} is corrupt ({str(err) or type(err).__name__}); "
                            "nothing was extracted")

    try:
        src = open_member()
    except _CORRUPT as err:
        raise corrupt(err) from None
    done = 0
    with src, open(tmp, "wb") as dst:
        while True:
            try:  # one byte past the declared size shows a stream that holds more
                chunk = src.read(min(_CHUNK, size - done + 1))
            except _CORRUPT as err:
                raise corrupt(err) from None
            if not chunk:
                break
            done += len(chunk)
            if done > size:
                raise OmnijetError(f"{path}: member {name!r} holds more than the {size:,} bytes its header "
                                   "declares; nothing was extracted")
            dst.write(chunk)
            bar.update(len(chunk))
    if done < size:
        raise OmnijetError(f"{path}: member {name!r} ends after {done:,} of the {size:,} bytes its header "
                           "declares (truncated or corrupt archive); nothing was extracted")
