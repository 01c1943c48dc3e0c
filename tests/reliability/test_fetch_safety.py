"""``omnijet checkpoints fetch`` never touches a file outside ``--dest``, and extraction is bounded.

The attack of issue #33: an archive plants ``omnijet_checkpoints.sha256.json`` listing ``../x`` and
absolute paths, then fails to extract, and the next fetch -- even from the legitimate URL -- deletes
every listed path. Here archive members with our own names are refused before anything is written,
a record listing anything outside ``--dest`` is discarded, archive bombs (total size, zip ratio,
lying headers) and damaged members (bad CRC, truncated tar) are one line, and a failed extraction
leaves ``--dest`` as it was. Archives are served by the loopback server (``http_dir``) or unpacked
with :func:`extract_archive` directly.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import types
import zipfile
from pathlib import Path

import pytest

from omnijet_lib import official
from omnijet_lib.cli import main as cli
from omnijet_lib.data import download as dl
from omnijet_lib.data.download import extract_archive

from .conftest import assert_cli_error, one_line_error, snapshot

TOK = "checkpoints/vqvae_8192_tokens/model_ckpt.ckpt"
GPT = "checkpoints/generative_8192_tokens/OmniJet_generative_model_1.ckpt"
LEGIT = {TOK: b"tokenizer" * 50, "checkpoints/vqvae_8192_tokens/config.yaml": b"a: 1\n", GPT: b"backbone" * 80}
SHA0 = "0" * 64


def make_zip(members, compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in dict(members).items():
            z.writestr(name, data)
    return buf.getvalue()


def make_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in dict(members).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pack(fmt: str, members) -> bytes:
    return make_zip(members) if fmt == "zip" else make_tar(members)


def patch_zip(data: bytes, index: int, **fields) -> bytes:
    """Overwrite ``crc``, ``size`` (uncompressed) or ``flags`` of member ``index`` in the local
    header and the central directory alike, as a forged archive would."""
    local = {"flags": (6, "<H"), "crc": (14, "<I"), "size": (22, "<I")}
    central = {"flags": (8, "<H"), "crc": (16, "<I"), "size": (24, "<I")}
    out = bytearray(data)
    for sig, where in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        pos = -1
        for _ in range(index + 1):
            pos = out.index(sig, pos + 1)
        for key, value in fields.items():
            off, fmt = where[key]
            struct.pack_into(fmt, out, pos + off, value)
    return bytes(out)


def bad_crc_zip(members, bad: int) -> bytes:
    """A stored zip whose member ``bad`` has a damaged byte (its CRC no longer matches)."""
    data = bytearray(make_zip(members))
    pos = -1
    for _ in range(bad + 1):
        pos = data.index(b"PK\x03\x04", pos + 1)
    name_len, extra_len = struct.unpack_from("<HH", data, pos + 26)
    data[pos + 30 + name_len + extra_len] ^= 0xFF  # the member's first data byte
    return bytes(data)


def outside(tmp_path: Path) -> dict:
    """Snapshot of everything under tmp_path except ``dest`` (the folder fetch may write)."""
    return {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("dest/")}


@pytest.fixture
def site(tmp_path, http_dir):
    """``(dest, serve)``: ``serve(bytes) -> url``; ``tmp_path/x`` and ``tmp_path/victim.txt`` sit
    next to ``dest`` as the files an attacker would like deleted."""
    folder, base = http_dir
    (tmp_path / "x").write_text("precious")
    (tmp_path / "victim.txt").write_text("precious too")

    def serve(data: bytes, name: str = "archive.zip") -> str:
        (folder / name).write_bytes(data)
        return f"{base}/{name}"

    return tmp_path / "dest", serve


def fetch(dest: Path, url: str) -> dict:
    return official.fetch_published(dest, url=url, progress=False)


def archive_of(dest: Path) -> Path:
    return dest / "omnijet_checkpoints.download"


# ---------------------------------------------------------------------------- our own names
@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize("name", [official.MANIFEST, "omnijet_checkpoints.download",
                                  ".omnijet_checkpoints.download.partial", "checkpoints/.model.ckpt.k3j9x.part",
                                  f"checkpoints/{official.MANIFEST}", f"{official.MANIFEST}/inside"])
def test_members_named_as_our_files_are_refused(site, tmp_path, fmt, name):
    dest, serve = site
    url = serve(pack(fmt, {**LEGIT, name: b'{"../x": "%s"}' % SHA0.encode()}))
    with one_line_error(archive_of(dest), f"refusing member {name!r}", "is a name omnijet writes itself",
                        unchanged=tmp_path):
        fetch(dest, url)


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_planted_record_then_failed_extraction_then_legit_fetch(site, tmp_path, fmt):
    """Issue #33 point 2, step by step: the record is never extracted, so nothing is deleted."""
    dest, serve = site
    planted = {official.MANIFEST: f'{{"../x": "{SHA0}", "{tmp_path / "victim.txt"}": "{SHA0}"}}'.encode()}
    if fmt == "zip":  # extraction would fail after the record: a damaged last member
        evil = bad_crc_zip({**LEGIT, **planted, "zz.bin": b"z" * 100}, bad=4)
    else:  # ... or a file that is also a folder
        evil = make_tar({**LEGIT, **planted, "a": b"1", "a/b": b"2"})
    url = serve(evil)
    before = outside(tmp_path)
    with one_line_error(archive_of(dest), f"refusing member {official.MANIFEST!r}", unchanged=tmp_path):
        fetch(dest, url)
    url = serve(pack(fmt, LEGIT), "legit.zip")
    before = outside(tmp_path)
    found = fetch(dest, url)
    assert outside(tmp_path) == before
    assert found == {"tokenizer": dest / TOK, "backbone": dest / GPT}
    assert set(snapshot(dest)) == {*LEGIT, official.MANIFEST}


@pytest.mark.parametrize("record, problem", [
    ({"../x": SHA0}, "'../x' is not a path inside"),
    ({"{tmp}/victim.txt": SHA0}, "/victim.txt' is not a path inside"),  # an absolute path
    ({"link/victim.txt": SHA0}, "'link/victim.txt' is not a path inside"),  # dest/link -> tmp_path
    ({"checkpoints/a/../../../x": SHA0}, "is not a path inside"),
    ([["../x", SHA0]], "not a JSON mapping of file -> sha256"),
    ({TOK: "not-a-sha"}, f"the sha256 of {TOK!r} is not 64 hex digits"),
    ({TOK: 7}, f"the sha256 of {TOK!r} is not 64 hex digits"),
    ("{not json", "not a JSON mapping of file -> sha256"),
])
def test_a_record_naming_paths_outside_dest_is_discarded(site, tmp_path, caplog, record, problem):
    dest, serve = site
    dest.mkdir()
    (dest / "link").symlink_to(tmp_path, target_is_directory=True)
    text = record if isinstance(record, str) else json.dumps(record).replace("{tmp}", str(tmp_path))
    (dest / official.MANIFEST).write_text(text)
    url = serve(make_zip(LEGIT))
    before = outside(tmp_path)
    with caplog.at_level(logging.WARNING, logger="omnijet_lib.official"):
        found = fetch(dest, url)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(dest / official.MANIFEST) in warnings[0] and problem in warnings[0]
    assert warnings[0].endswith("discarding it as corrupt")
    assert outside(tmp_path) == before  # victim.txt and x are still there, unchanged
    assert found["backbone"] == dest / GPT
    assert set(json.loads((dest / official.MANIFEST).read_text())) == set(LEGIT)


def test_a_record_that_is_a_symlink_is_discarded_and_replaced(site, tmp_path, caplog):
    dest, serve = site
    dest.mkdir()
    (tmp_path / "elsewhere.json").write_text(f'{{"../x": "{SHA0}"}}')
    (dest / official.MANIFEST).symlink_to(tmp_path / "elsewhere.json")
    url = serve(make_zip(LEGIT))
    before = outside(tmp_path)
    with caplog.at_level(logging.WARNING, logger="omnijet_lib.official"):
        fetch(dest, url)
    assert "discarding it as corrupt" in caplog.text
    assert outside(tmp_path) == before and not (dest / official.MANIFEST).is_symlink()


def test_legit_refetch_restores_a_damaged_file_and_nothing_else(site, tmp_path):
    dest, serve = site
    url = serve(make_zip(LEGIT))
    fetch(dest, url)
    (dest / TOK).write_bytes(b"damaged")
    (dest / "mine.txt").write_text("a file of the user's, not in the record")
    before = outside(tmp_path)
    fetch(dest, url)
    assert outside(tmp_path) == before
    assert (dest / TOK).read_bytes() == LEGIT[TOK] and (dest / "mine.txt").exists()
    assert not list(dest.rglob("*.part*")) and not archive_of(dest).exists()


def test_a_repacked_dest_with_its_record_is_refused_on_refetch(site, tmp_path):
    """Someone zips up a fetched folder, record included, and serves it: the record is refused."""
    dest, serve = site
    fetch(dest, serve(make_zip(LEGIT)))
    repack = make_zip({rel: (dest / rel).read_bytes() for rel in snapshot(dest)})
    (dest / TOK).write_bytes(b"damaged")  # so the next fetch downloads again
    url = serve(repack, "repack.zip")
    before = snapshot(dest)
    with one_line_error(archive_of(dest), f"refusing member {official.MANIFEST!r}"):
        fetch(dest, url)
    del before[TOK]  # the damaged file listed in the (valid) record is the one thing removed
    assert snapshot(dest) == before


# ------------------------------------------------------------------------------ extraction
def test_a_symlink_in_dest_leading_outside_is_refused(tmp_path):
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "a.zip").write_bytes(make_zip(LEGIT))
    with one_line_error(tmp_path / "a.zip", f"refusing member {TOK!r}", f"a symbolic link in {dest} leads it outside",
                        unchanged=tmp_path):
        extract_archive(tmp_path / "a.zip", dest, progress=False)
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_total_unpacked_size_is_bounded(tmp_path, fmt):
    (tmp_path / "big").write_bytes(pack(fmt, {"a.bin": b"a" * 600, "b.bin": b"b" * 600}))
    with one_line_error(tmp_path / "big", "unpacks to 1,200 bytes, more than the 1,000-byte limit",
                        "archive bomb", unchanged=tmp_path):
        extract_archive(tmp_path / "big", tmp_path / "out", progress=False, max_size=1000)
    assert not (tmp_path / "out").exists()


def test_zip_bomb_by_ratio_is_refused(tmp_path):
    (tmp_path / "bomb.zip").write_bytes(make_zip({"zeros.bin": bytes(4 << 20)}, zipfile.ZIP_DEFLATED))
    with one_line_error(tmp_path / "bomb.zip", "refusing member 'zeros.bin'", "expand to 4,194,304",
                        "more than 200 times", unchanged=tmp_path):
        extract_archive(tmp_path / "bomb.zip", tmp_path / "out", progress=False)


def test_a_zip_member_declaring_less_than_it_holds_stops_there(tmp_path):
    # The stream is cut at the declared size (so no bomb gets through) and then fails its CRC.
    data = make_zip({"a.bin": b"x" * 5000}, zipfile.ZIP_DEFLATED)
    (tmp_path / "lie.zip").write_bytes(patch_zip(data, 0, size=100))
    with one_line_error(tmp_path / "lie.zip", "member 'a.bin' is corrupt", "Bad CRC-32", unchanged=tmp_path):
        extract_archive(tmp_path / "lie.zip", tmp_path / "out", progress=False)


def test_a_zip_member_declaring_more_than_it_holds(tmp_path):
    data = make_zip({"a.bin": b"x" * 5000}, zipfile.ZIP_DEFLATED)
    (tmp_path / "lie.zip").write_bytes(patch_zip(data, 0, size=9000))
    with one_line_error(tmp_path / "lie.zip", "member 'a.bin' ends after 5,000 of the 9,000 bytes",
                        unchanged=tmp_path):
        extract_archive(tmp_path / "lie.zip", tmp_path / "out", progress=False)


def test_a_member_stream_longer_than_declared_is_stopped(tmp_path):
    # zipfile and tarfile already cut streams at the declared size; the copy does not rely on it.
    files = [("a.bin", 10, lambda: io.BytesIO(b"x" * (3 << 20)))]
    with one_line_error("x.zip: member 'a.bin' holds more than the 10 bytes", unchanged=tmp_path):
        dl._extract(files, Path("x.zip"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_crc_is_one_line(tmp_path):
    (tmp_path / "crc.zip").write_bytes(bad_crc_zip({"a.bin": b"a" * 100, "b.bin": b"b" * 100}, bad=1))
    with one_line_error(tmp_path / "crc.zip", "member 'b.bin' is corrupt (Bad CRC-32 for file 'b.bin')",
                        "nothing was extracted", unchanged=tmp_path):
        extract_archive(tmp_path / "crc.zip", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_deflate_stream_is_one_line(tmp_path):
    data = bytearray(make_zip({"a.bin": bytes(range(256)) * 64}, zipfile.ZIP_DEFLATED))
    data[60:90] = b"\xff" * 30  # inside the compressed data
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    with one_line_error(tmp_path / "bad.zip", "member 'a.bin' is corrupt", unchanged=tmp_path):
        extract_archive(tmp_path / "bad.zip", tmp_path / "out", progress=False)


def test_truncated_tar_is_one_line(tmp_path):
    data = make_tar({"a.bin": b"a" * 600, "b.bin": b"b" * 3000})
    (tmp_path / "cut.tar").write_bytes(data[:2048])  # inside b.bin's data
    with one_line_error(tmp_path / "cut.tar", "truncated or corrupt tar archive at member 'b.bin'",
                        "nothing was extracted", unchanged=tmp_path):
        extract_archive(tmp_path / "cut.tar", tmp_path / "out", progress=False)


def test_encrypted_zip_member_is_refused(tmp_path):
    (tmp_path / "enc.zip").write_bytes(patch_zip(make_zip({"a.bin": b"a" * 10}), 0, flags=1))
    with one_line_error(tmp_path / "enc.zip", "refusing member 'a.bin': it is encrypted", unchanged=tmp_path):
        extract_archive(tmp_path / "enc.zip", tmp_path / "out", progress=False)


@pytest.mark.parametrize("members, message", [
    ([("a.bin", b"1"), ("a.bin", b"2")], "refusing member 'a.bin': the archive holds it more than once"),
    ([("a", b"1"), ("a/b", b"2")], "refusing member 'a': the archive also has a folder of that name"),
])
def test_members_that_would_overwrite_each_other_are_refused(tmp_path, members, message):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:  # a tar may repeat a name; a dict would not
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (tmp_path / "dup.tar").write_bytes(buf.getvalue())
    with one_line_error(tmp_path / "dup.tar", message, unchanged=tmp_path):
        extract_archive(tmp_path / "dup.tar", tmp_path / "out", progress=False)


def test_a_failed_extraction_leaves_dest_as_it_was(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("was here before")
    (dest / "a.bin").write_text("older, other size")
    archive = bad_crc_zip({"new/dir/c.bin": b"c" * 100, "a.bin": b"a" * 100, "z.bin": b"z" * 100}, bad=2)
    (tmp_path / "x.zip").write_bytes(archive)
    with one_line_error(tmp_path / "x.zip", "member 'z.bin' is corrupt", unchanged=tmp_path):
        extract_archive(tmp_path / "x.zip", dest, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin", "keep.txt"]  # no new folder, no temporaries


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("archive, fragment", [
    (make_zip({**LEGIT, official.MANIFEST: b"{}"}), "is a name omnijet writes itself"),
    (make_zip({"zeros.bin": bytes(2 << 20)}, zipfile.ZIP_DEFLATED), "more than 200 times"),
    (bad_crc_zip({**LEGIT, "z.bin": b"z" * 100}, bad=3), "Bad CRC-32"),
    (make_tar({**LEGIT, "z.bin": b"z" * 3000}).split(b"z" * 1000)[0], "corrupt tar archive at member 'z.bin'"),
    (make_zip({"../../x": b"gotcha"}), "refusing unsafe member path '../../x'"),
])
def test_cli_fetch_prints_one_error_line(site, tmp_path, capsys, archive, fragment):
    dest, serve = site
    url = serve(archive)
    before = outside(tmp_path)
    code = cli(["checkpoints", "fetch", "--dest", str(dest), "--url", url])
    err = capsys.readouterr().err
    assert_cli_error(types.SimpleNamespace(returncode=code, stderr=err), str(archive_of(dest)), fragment,
                     strict=False)
    assert outside(tmp_path) == before
    assert not [p for p in dest.rglob("*") if p.is_file() and p.name != ".lock"]
