"""Input paths: a file is taken literally before any glob expansion, and everything that is not a
regular file — a folder, a FIFO, a device, a dangling link, a link loop — or a file given twice is
one line before anything is opened (a FIFO would otherwise block the reader forever)."""

from __future__ import annotations

import os
import shutil

import pytest

from omnijet_lib.cli import main as cli
from omnijet_lib.data import load_padded, read_jetclass, write_jetclass
from omnijet_lib.data.paths import input_files
from omnijet_lib.data.shards import shard_paths

from .conftest import one_line_error, random_jets, snapshot

READERS = {"read_jetclass": read_jetclass, "load_padded": load_padded}


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    return d


def _jets(path, n=12, seed=0):
    return write_jetclass(path, random_jets(n, seed=seed))


@pytest.mark.parametrize("reader", READERS)
def test_a_name_with_brackets_is_that_file_not_a_glob(folder, reader):
    """Before: ``a[1].root`` was a glob and read ``a1.root`` without a word."""
    _jets(folder / "a[1].root", n=5)
    _jets(folder / "a1.root", n=7)
    got = READERS[reader](str(folder / "a[1].root"))
    assert len(got[0] if isinstance(got, tuple) else got) == 5


@pytest.mark.parametrize("name", ["only[2].root", "star*.root", "what?.root"])
def test_a_lone_file_with_glob_characters_is_found(folder, name):
    """Before: ``only[2].root`` alone gave "no files match" for a file that exists."""
    _jets(folder / name, n=4)
    assert input_files(str(folder / name)) == [folder / name]
    assert len(read_jetclass(str(folder / name))) == 4


def test_a_glob_still_expands_when_no_file_has_its_name(folder):
    for n in ("x1.root", "x2.root"):
        _jets(folder / n)
    assert [p.name for p in input_files(str(folder / "x[12].root"))] == ["x1.root", "x2.root"]


def test_a_glob_matching_nothing(folder):
    with one_line_error(f"{folder}/nope*.root: no files match this pattern", unchanged=folder):
        input_files(str(folder / "nope*.root"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("reader", READERS)
def test_a_fifo_is_refused_without_blocking(folder, reader):
    fifo = folder / "pipe.root"
    os.mkfifo(fifo)
    with one_line_error(f"{fifo}: is a FIFO (named pipe), not a regular file", unchanged=folder):
        READERS[reader](fifo)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_a_device_is_refused():
    with one_line_error("/dev/null: is a device, not a regular file"):
        read_jetclass("/dev/null")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_a_symlink_loop_is_one_line(folder):
    os.symlink(folder / "b.root", folder / "a.root")
    os.symlink(folder / "a.root", folder / "b.root")
    with one_line_error(f"{folder / 'a.root'}: symbolic link loop", unchanged=folder):
        read_jetclass(folder / "a.root")
    with one_line_error("symbolic link loop", unchanged=folder):  # found by a glob too
        load_padded(str(folder / "*.root"))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_a_dangling_symlink_is_one_line(folder):
    os.symlink(folder / "gone.root", folder / "link.root")
    with one_line_error(f"{folder / 'link.root'}: dangling symbolic link", unchanged=folder):
        read_jetclass(folder / "link.root")


@pytest.mark.parametrize("reader", READERS)
def test_the_same_file_twice_is_an_error(folder, reader):
    f = _jets(folder / "a.root")
    with one_line_error(f"{f}: given twice; each input file may appear only once", unchanged=folder):
        READERS[reader]([f, f])
    with one_line_error(f"{f}: given twice", unchanged=folder):  # once by name, once by a glob
        READERS[reader]([f, str(folder / "*.root")])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_the_same_file_under_two_names_is_an_error(folder):
    f = _jets(folder / "a.root")
    os.symlink(f, folder / "alias.root")
    with one_line_error(f"{folder / 'alias.root'}: given twice (the same file as {f})", unchanged=folder):
        load_padded([f, folder / "alias.root"])
    shutil.copy(f, folder / "copy.root")  # a copy is another file: fine
    assert len(read_jetclass([f, folder / "copy.root"])) == 24


def test_a_folder_gets_a_glob_hint(folder):
    with one_line_error(f"{folder}: is a directory; pass a file or a glob like '{folder}/*.root'", unchanged=folder):
        read_jetclass(folder)


def test_token_shards_follow_the_same_rules(folder):
    (folder / "s[1].npz").write_bytes(b"")
    (folder / "s1.npz").write_bytes(b"")
    assert shard_paths(str(folder / "s[1].npz"))[0] == [folder / "s[1].npz"]
    with one_line_error(f"{folder / 'nope.npz'}: file not found", unchanged=folder):
        shard_paths(str(folder / "nope.npz"))
    with one_line_error("given twice", unchanged=folder):
        shard_paths([folder / "s1.npz", folder / "s1.npz"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_tokenize_cli_names_the_fifo(folder, tmp_path, capsys):
    os.mkfifo(folder / "pipe.root")
    tok = tmp_path / "tok.safetensors"
    tok.write_bytes(b"unused: the inputs are checked first")
    before = snapshot(tmp_path)
    assert cli(["tokenize", "--tokenizer", str(tok), "--in", str(folder / "pipe.root"), "--out",
                str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {folder / 'pipe.root'}: is a FIFO (named pipe), not a regular file; pass the file itself"]
    assert snapshot(tmp_path) == before
