"""End-to-end tests of the JetClass downloader against a local HTTP server (never the internet).

The server (written here, with optional HTTP Range support) serves small tars built in the test
from JetClass-schema ROOT files of tiny random jets, laid out like the Zenodo archives.
"""

import hashlib
import io
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import awkward as ak
import numpy as np
import pytest
import vector

from omnijet_lib.data import CLASS_FILE_PREFIXES, make_jets, read_jetclass, write_jetclass
from omnijet_lib.data import download as dl
from omnijet_lib.io import OmnijetError

VAL = "JetClass_Pythia_val_5M.tar"


# ------------------------------------------------------------------------------- local server
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        status, body, headers = 200, data, {}
        if rng and srv.ranges:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        srv.sent += len(body)  # counted before writing, so the client never sees a stale count
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # client stopped reading a stream early
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def _server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server(_server):
    """The shared server, reset: ``files`` {url path: bytes}, ``ranges`` on, request log empty."""
    _server.files, _server.ranges, _server.requests, _server.sent = {}, True, [], 0
    _server.base_url = f"http://127.0.0.1:{_server.server_address[1]}/records/6619768/files"
    return _server


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
    """Any connection to a host other than 127.0.0.1 fails the test."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to reach {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


def serve(server, name, data):
    server.files[f"/records/6619768/files/{name}"] = data


# ---------------------------------------------------------------------------------- test data
def _random_jets(label, n=6, seed=0):
    rng = np.random.default_rng(seed + label)
    counts = rng.integers(3, 12, n)
    pt = ak.unflatten(rng.exponential(30, counts.sum()) + 1, counts)
    eta = ak.unflatten(rng.normal(0.3, 0.2, counts.sum()), counts)
    phi = ak.unflatten(rng.normal(1.0, 0.2, counts.sum()), counts)
    v = vector.zip({"pt": pt, "eta": eta, "phi": phi, "mass": pt * 0})
    return make_jets(vector.zip({"px": v.px, "py": v.py, "pz": v.pz, "E": v.E}), label)


@pytest.fixture(scope="module")
def root_bytes(tmp_path_factory):
    """One small JetClass-schema ROOT file per class (bytes), labelled with its class."""
    d = tmp_path_factory.mktemp("roots")
    return [write_jetclass(d / f"{c}.root", _random_jets(c)).read_bytes() for c in range(10)]


def make_tar(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def val_members(root_bytes, folder="val_5M"):
    """Like the official val tar: a folder, then files 120 and 121 of every class."""
    out = [(folder, None)]
    for num in (120, 121):
        out += [(f"{folder}/{p}_{num}.root", root_bytes[c]) for c, p in enumerate(CLASS_FILE_PREFIXES)]
    return out


# -------------------------------------------------------------------------------------- tests
def test_constants_describe_the_zenodo_record():
    assert len(dl.ARCHIVE_MD5) == 12 and all(re.fullmatch(r"[0-9a-f]{32}", m) for m in dl.ARCHIVE_MD5.values())
    assert sum(len(v) for v in dl.SPLIT_ARCHIVES.values()) == 12
    assert set(dl.ARCHIVE_MD5) == {a for v in dl.SPLIT_ARCHIVES.values() for a in v}
    assert dl.ARCHIVE_MD5["JetClass_Pythia_train_100M_part0.tar"] == "de4fd2dca2e68ab3c85d5cfd3bcc65c3"
    assert dl.archive_url(VAL) == f"https://zenodo.org/records/6619768/files/{VAL}"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_header_walk_matches_tarfile(root_bytes, fmt):
    folder = "val_5M" if fmt == tarfile.USTAR_FORMAT else "val_5M/" + "long_folder_name_" * 8 + "ü"
    data = make_tar(val_members(root_bytes[:2] * 5, folder), fmt)
    ours = [(m.name, m.offset, m.size) for m in dl.iter_tar_members(lambda o, n: data[o:o + n])]
    ref = [(m.name, m.offset_data, m.size) for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()]
    assert ours == ref
    assert dl._tar_number(bytes([0x80]) + (9 << 30).to_bytes(11, "big"), "x") == 9 << 30  # base-256


@pytest.mark.parametrize("fmt, folder", [
    (tarfile.USTAR_FORMAT, "val_5M"),
    (tarfile.GNU_FORMAT, "val_5M/" + "g" * 120),  # GNU long-name ('L') headers
    (tarfile.PAX_FORMAT, "val_5M/" + "p" * 120),  # pax ('x') headers
])
def test_selective_download_one_file_per_class(server, root_bytes, tmp_path, fmt, folder):
    tar = make_tar(val_members(root_bytes, folder), fmt)
    serve(server, VAL, tar)
    paths = dl.download_jetclass("val", n_files=1, dest=tmp_path, base_url=server.base_url, progress=False)
    assert [p.name for p in paths] == [f"{p}_120.root" for p in CLASS_FILE_PREFIXES]
    assert all(p.parent == tmp_path / folder for p in paths)
    assert [p.read_bytes() for p in paths] == root_bytes
    jets = read_jetclass(paths)
    assert sorted(np.unique(ak.to_numpy(jets.label))) == list(range(10))
    # Only Range requests, and the second half of the archive (files 121) was never sent.
    assert all(r is not None for r in server.requests)
    assert server.sent < 0.6 * len(tar)
    assert not list(tmp_path.rglob("*.partial"))

    # A second call finds every file complete and fetches headers only.
    before = server.sent
    assert dl.download_jetclass("val", n_files=1, dest=tmp_path, base_url=server.base_url, progress=False) == paths
    assert server.sent - before < 512 * 30


def test_classes_and_n_files(server, root_bytes, tmp_path):
    serve(server, VAL, make_tar(val_members(root_bytes)))
    paths = dl.download_jetclass("val", classes=["Tbqq", "QCD"], n_files=2, dest=tmp_path,
                                 base_url=server.base_url, progress=False)
    # official class order; 'TTBar' must not pick up 'TTBarLep' files
    assert [p.name for p in paths] == ["ZJetsToNuNu_120.root", "ZJetsToNuNu_121.root",
                                       "TTBar_120.root", "TTBar_121.root"]
    assert len(list(tmp_path.rglob("*.root"))) == 4


def test_train_split_searches_parts_in_order(server, root_bytes, tmp_path):
    part0 = make_tar([(f"train_100M/{p}_000.root", root_bytes[c]) for c, p in enumerate(CLASS_FILE_PREFIXES[:5])])
    part1 = make_tar([(f"train_100M/{p}_010.root", root_bytes[c]) for c, p in enumerate(CLASS_FILE_PREFIXES)])
    serve(server, "JetClass_Pythia_train_100M_part0.tar", part0)
    serve(server, "JetClass_Pythia_train_100M_part1.tar", part1)
    paths = dl.download_jetclass("train", classes=["QCD", "Tbl"], dest=tmp_path,
                                 base_url=server.base_url, progress=False)
    assert [p.name for p in paths] == ["ZJetsToNuNu_000.root", "TTBarLep_010.root"]  # part2 never asked


def test_resume_partial_member(server, root_bytes, tmp_path):
    tar = make_tar(val_members(root_bytes))
    serve(server, VAL, tar)
    member = tarfile.open(fileobj=io.BytesIO(tar)).getmember("val_5M/HToBB_120.root")
    partial = tmp_path / "val_5M" / ".HToBB_120.root.partial"
    partial.parent.mkdir()
    partial.write_bytes(root_bytes[1][:1000])
    (path,) = dl.download_jetclass("val", classes=["Hbb"], dest=tmp_path, base_url=server.base_url,
                                   progress=False)
    assert path.read_bytes() == root_bytes[1]
    assert f"bytes={member.offset_data + 1000}-{member.offset_data + member.size - 1}" in server.requests
    assert not partial.exists()


def test_server_without_range_support_streams(server, root_bytes, tmp_path, caplog):
    server.ranges = False
    tar = make_tar(val_members(root_bytes))
    serve(server, VAL, tar)
    paths = dl.download_jetclass("val", n_files=1, dest=tmp_path, base_url=server.base_url, progress=False)
    assert [p.read_bytes() for p in paths] == root_bytes
    assert "does not support HTTP Range" in caplog.text
    assert len(server.requests) == 1  # one streamed response, abandoned once the files were in


def test_corrupt_member_fails_integrity_check(server, root_bytes, tmp_path):
    serve(server, VAL, make_tar([("val_5M/HToBB_120.root", b"not a ROOT file" * 100)]))
    with pytest.raises(OmnijetError, match=r"HToBB_120\.root.*not a valid JetClass ROOT file"):
        dl.download_jetclass("val", classes=["Hbb"], dest=tmp_path, base_url=server.base_url, progress=False)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("bad", ["../escape/HToBB_120.root", "/tmp/abs/HToBB_120.root",
                                 "val_5M/../../HToBB_120.root"])
def test_unsafe_member_path_is_refused(server, root_bytes, tmp_path, bad):
    tar = make_tar([("val_5M/ZToQQ_120.root", root_bytes[6]), (bad, root_bytes[1])])
    serve(server, VAL, tar)
    dest = tmp_path / "dest"
    with pytest.raises(OmnijetError, match="unsafe member path"):
        dl.download_jetclass("val", classes=["Hbb"], dest=dest, base_url=server.base_url, progress=False)
    (tmp_path / "evil.tar").write_bytes(tar)
    with pytest.raises(OmnijetError, match="unsafe member path"):
        dl.extract_archive(tmp_path / "evil.tar", dest, progress=False)
    assert not list(tmp_path.rglob("HToBB_120.root"))  # nothing written, inside dest or outside
    assert not dest.exists() or not any(dest.rglob("*.root"))


def test_download_archive_resume_verify_extract(server, root_bytes, tmp_path, monkeypatch):
    tar = make_tar(val_members(root_bytes))
    serve(server, VAL, tar)
    monkeypatch.setitem(dl.ARCHIVE_MD5, VAL, hashlib.md5(tar).hexdigest())
    half = len(tar) // 2
    (tmp_path / f".{VAL}.partial").write_bytes(tar[:half])
    path = dl.download_archive(VAL, tmp_path, base_url=server.base_url, progress=False)
    assert path == tmp_path / VAL and path.read_bytes() == tar
    assert server.requests == [f"bytes={half}-"] and server.sent == len(tar) - half
    assert not (tmp_path / f".{VAL}.partial").exists()

    # A good existing file is kept without touching the network.
    assert dl.download_archive(VAL, tmp_path, base_url=server.base_url, progress=False) == path
    assert len(server.requests) == 1

    files = dl.extract_archive(path, tmp_path / "out", progress=False)
    assert len(files) == 20 and files[0] == tmp_path / "out" / "val_5M" / "ZJetsToNuNu_120.root"
    assert len(read_jetclass(files)) == 20 * 6

    # A corrupted existing file is replaced by a fresh download.
    path.write_bytes(b"x" * len(tar))
    assert dl.download_archive(VAL, tmp_path, base_url=server.base_url, progress=False).read_bytes() == tar


def test_download_archive_md5_mismatch_removes_file(server, root_bytes, tmp_path, monkeypatch):
    serve(server, VAL, make_tar(val_members(root_bytes)))
    monkeypatch.setitem(dl.ARCHIVE_MD5, VAL, "0" * 32)
    with pytest.raises(OmnijetError, match=rf"{VAL}: md5 [0-9a-f]{{32}} does not match"):
        dl.download_archive(VAL, tmp_path, base_url=server.base_url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_errors_are_clear(server, tmp_path):
    with pytest.raises(OmnijetError, match=rf"{VAL}: HTTP error 404"):
        dl.download_jetclass("val", dest=tmp_path, base_url=server.base_url, progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OmnijetError, match="cannot connect"):
        dl.download_archive(VAL, tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "training"}, "split must be one of"),
    ({"n_files": 0}, "n_files must be a positive integer"),
    ({"classes": ["Higgs"]}, "unknown jet class"),
])
def test_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(OmnijetError, match=match):
        dl.download_jetclass(**{"split": "val", "dest": tmp_path, "base_url": "http://127.0.0.1:9", **kwargs})


def test_download_archive_edge_resumes(server, root_bytes, tmp_path, monkeypatch):
    tar = make_tar(val_members(root_bytes))
    serve(server, VAL, tar)
    monkeypatch.setitem(dl.ARCHIVE_MD5, VAL, hashlib.md5(tar).hexdigest())
    partial = tmp_path / f".{VAL}.partial"
    # The partial file already holds every byte: the server answers 416, the md5 decides.
    partial.write_bytes(tar)
    assert dl.download_archive(VAL, tmp_path, base_url=server.base_url, progress=False).read_bytes() == tar
    assert server.sent == 0
    # A server without Range support: the partial file is discarded and the archive restarted.
    (tmp_path / VAL).unlink()
    server.ranges = False
    partial.write_bytes(b"junk" * 100)
    assert dl.download_archive(VAL, tmp_path, base_url=server.base_url, progress=False).read_bytes() == tar
    assert server.sent == len(tar) and not partial.exists()
