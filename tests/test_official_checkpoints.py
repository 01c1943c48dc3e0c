"""The published OmniJet-α checkpoints: safe reading, loading, refusals, conversion and download.

The archive cannot be downloaded here; :mod:`official_format` writes the parity fixtures in its
format and layout (same pickle globals as a real Lightning checkpoint of gabbro's modules), and
a local HTTP server (test_download) serves it as a tar or zip.
"""

import io
import json
import os
import shutil
import tarfile
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
import yaml

import official_format as of
from omnijet_lib import official
from omnijet_lib.cli import main as cli
from omnijet_lib.io import LOCK_FILE, OmnijetError, exclusive_lock
from omnijet_lib.tokenizers import load_tokenizer, reconstruct, tokenize
from omnijet_lib.training.gpt import load_gpt
from omnijet_lib.training.store import ModelStore
from reliability.conftest import one_line_error, snapshot
from test_download import _Handler, _no_internet, _server, server  # noqa: F401  (fixtures)

URL_PATH = "/public.php/dav/files/HX388YZbjSGPNcC/"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return of.fixture_archive(tmp_path_factory.mktemp("published"))


def _fixture_state(name):
    sd, kw = of._fixture(name)
    return sd, kw


# ------------------------------------------------------------------------------ safe reading
class _Call:
    """Pickles as a call of ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch(path):  # a module-level function the unpickler must stub, never call
    open(path, "w").close()


@pytest.mark.parametrize("func, arg, named", [(os.system, "touch {m}", "system"), (eval, "open('{m}', 'w')", "eval"),
                                              (exec, "open('{m}', 'w')", "exec")])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, func, arg, named):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Call(func, arg.format(m=marker))}, path)
    with pytest.raises(OmnijetError, match=rf"evil.ckpt: refused, the pickle references \w+\.{named}"):
        official.read_lightning_checkpoint(path)
    assert not marker.exists()


def test_other_globals_are_inert_stand_ins(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cb": _Call(touch, str(marker))}, path)
    ckpt = official.read_lightning_checkpoint(path)
    assert not marker.exists()
    assert isinstance(ckpt["cb"], official.Opaque) and ckpt["cb"].qualname.endswith(".touch")
    assert ckpt["cb"].args == (str(marker),) and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))


@pytest.mark.parametrize("content, msg", [(b"", "not a checkpoint"), (b"PK\x03\x04garbage", "not a checkpoint"),
                                          (None, "not a Lightning checkpoint")])
def test_not_a_checkpoint(tmp_path, content, msg):
    path = tmp_path / "x.ckpt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(OmnijetError, match=msg):
        official.read_lightning_checkpoint(path)


def test_truncated_checkpoint(archive, tmp_path):
    data = (archive / of.BACKBONE_DIR / of.BACKBONE_NAME).read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OmnijetError, match="cut.ckpt: not a"):
        official.read_lightning_checkpoint(path)


# ------------------------------------------------------------------------------ the format
def test_pickle_globals_are_those_of_a_real_lightning_checkpoint(archive):
    real = json.loads((of.FIXTURES / "lightning_globals.json").read_text())
    assert of.pickle_globals(archive / of.TOKENIZER_DIR / "model_ckpt.ckpt") == set(real["tokenizer"])
    assert of.pickle_globals(archive / of.BACKBONE_DIR / of.BACKBONE_NAME) == set(real["backbone"])


def test_hyper_parameters_come_out_plain(archive):
    hp = official.plain(official.read_lightning_checkpoint(archive / of.TOKENIZER_DIR / "model_ckpt.ckpt")
                        ["hyper_parameters"])
    _, kw = _fixture_state("vqvae_conditional")
    assert hp["model_kwargs"] == kw and hp["model_type"] == "VQVAENormFormer"
    assert hp["optimizer"] == {"_target_": "torch.optim.adamw.AdamW", "lr": 1e-3, "weight_decay": 1e-2}
    assert hp["scheduler"]["_target_"] == "gabbro.schedulers.lr_scheduler.OneCycleCooldown"


# ------------------------------------------------------------------------------ loaders
def test_loaders_give_the_parity_models(archive):
    sd, kw = _fixture_state("vqvae_conditional")
    want = official.tokenizer_from_official(sd, kw, "VQVAENormFormer")
    tok = official.load_official_tokenizer(archive / of.TOKENIZER_DIR)
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), want.state_dict().values()))
    sd, kw = _fixture_state("gpt")
    want = official.gpt_from_official(sd, kw)
    gpt = official.load_official_backbone(archive / of.BACKBONE_DIR / of.BACKBONE_NAME)
    assert gpt.config.max_len == 130 and gpt.config.vocab_size == tok.vocab_size == 34
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), want.state_dict().values()))


def test_classifier_loader(tmp_path):
    sd, kw = _fixture_state("classifier")
    path = of.write_checkpoint(tmp_path / "cls.ckpt", sd, {"model_kwargs": kw, "class_head_type": "summation"})
    model = official.load_official_classifier(path)
    assert torch.equal(model.out.weight, sd["head.classification_head_linear_class.weight"])
    of.write_checkpoint(path, sd, {"model_kwargs": kw, "class_head_type": "class_attention"})
    with pytest.raises(OmnijetError, match="class_head_type 'class_attention' is not supported"):
        official.load_official_classifier(path)


def _tokenizer_dir(tmp_path, sd=None, kw=None, features=None):
    """A tokenizer folder from the fixture with changes."""
    sd0, kw0 = _fixture_state("vqvae_conditional")
    d = tmp_path / of.TOKENIZER_DIR
    of.write_checkpoint(d / "model_ckpt.ckpt", sd0 if sd is None else sd,
                        {"model_kwargs": kw0 if kw is None else kw, "model_type": "VQVAENormFormer"})
    (d / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset_kwargs_common": {
        "feature_dict": of.FEATURE_DICT if features is None else features}}}, sort_keys=False))
    return d


def test_tokenizer_refusals(tmp_path):
    sd, kw = _fixture_state("vqvae_conditional")
    d = _tokenizer_dir(tmp_path, sd={k: v for k, v in sd.items() if "decoder_normformer.blocks.1" not in k})
    with pytest.raises(OmnijetError, match=r"model_ckpt.ckpt: tensors missing: \['decoder.blocks.1"):
        official.load_official_tokenizer(d)
    d = _tokenizer_dir(tmp_path, sd={**sd, "model.output_projection.weight": torch.zeros(5, 16)})
    with pytest.raises(OmnijetError, match=r"decoder.out.weight \(5, 16\) vs \(3, 16\)"):
        official.load_official_tokenizer(d)
    d = _tokenizer_dir(tmp_path, sd={**sd, "model.extra.weight": torch.zeros(1)})
    with pytest.raises(OmnijetError, match=r"does not have: \['model.extra.weight'\]"):
        official.load_official_tokenizer(d)
    d = _tokenizer_dir(tmp_path, kw={k: v for k, v in kw.items() if k != "latent_dim"})
    with pytest.raises(OmnijetError, match=r"model_kwargs lack \['latent_dim'\]"):
        official.load_official_tokenizer(d)
    features = json.loads(json.dumps(of.FEATURE_DICT))
    features["part_pt"]["subtract_by"] = 2.0
    d = _tokenizer_dir(tmp_path, features=features)
    with pytest.raises(OmnijetError, match=r"config.yaml: feature_dict.part_pt.subtract_by is 2.0, ours is 1.8"):
        official.load_official_tokenizer(d)
    d = _tokenizer_dir(tmp_path, features={"part_pt": {}, "part_eta": {}, "part_phi": {}})
    with pytest.raises(OmnijetError, match=r"features \['part_pt', 'part_eta', 'part_phi'\] differ from ours"):
        official.load_official_tokenizer(d)
    (d / "config.yaml").unlink()
    with pytest.raises(OmnijetError, match="config.yaml: not found; the official tokenizer needs"):
        official.load_official_tokenizer(d)


def test_backbone_refusals(archive, tmp_path):
    sd, kw = _fixture_state("gpt")
    path = of.write_checkpoint(tmp_path / "b.ckpt", {k: v for k, v in sd.items() if not k.startswith("head.")},
                               {"model_kwargs": kw})
    with pytest.raises(OmnijetError, match=r"b.ckpt: no next-token head"):
        official.load_official_backbone(path)
    tok_sd, _ = _fixture_state("vqvae_conditional")
    of.write_checkpoint(path, tok_sd, {"model_kwargs": kw})
    with pytest.raises(OmnijetError, match=r"b.ckpt: no module\.\* tensors: not an official backbone"):
        official.load_official_backbone(path)
    of.write_checkpoint(path, sd, {"optimizer": None})
    with pytest.raises(OmnijetError, match="hyper_parameters.model_kwargs missing"):
        official.load_official_backbone(path)


# ------------------------------------------------------------------------------ conversion
def test_convert_into_the_store_once(archive, tmp_path):
    models, said = tmp_path / "models", []
    out = official.convert_published(archive, ModelStore(models, progress=said.append), progress=said.append)
    assert out.tokenizer_file == out.tokenizer.path / "tokenizer.safetensors" and out.tokenizer.trained
    assert out.tokenizer.path.parent == models / "published_tokenizer"
    assert out.backbone_file.parent.parent == models / "published_gpt_combined" and out.backbone.trained
    assert "published tokenizer: conditional, K = 32" in said and "vocabulary 34" in said[-2]
    record = json.loads((out.backbone.path / "run.json").read_text())
    assert record["complete"] and record["settings"] == official.CONVERSION
    assert record["data"]["checkpoint"]["file"] == f"{of.BACKBONE_DIR}/{of.BACKBONE_NAME}"  # no absolute path
    tok, gpt = load_tokenizer(out.tokenizer_file), load_gpt(out.backbone_file, vocab_size=34)
    x = torch.randn(4, 10, 3).numpy()
    mask = np.ones((4, 10), bool)
    want = official.load_official_tokenizer(archive / of.TOKENIZER_DIR)
    assert np.array_equal(tokenize(tok, x, mask), tokenize(want, x, mask))
    assert np.allclose(reconstruct(tok, tokenize(tok, x, mask), mask), reconstruct(want, tokenize(want, x, mask), mask))
    want_gpt = official.load_official_backbone(archive / of.BACKBONE_DIR / of.BACKBONE_NAME)
    seq = torch.tensor([[0, 5, 7, 33]])
    assert torch.allclose(gpt(seq), want_gpt(seq))
    # the same files, also moved elsewhere: both runs reused, nothing rewritten, nothing converted
    moved = shutil.copytree(archive, tmp_path / "moved")
    before = snapshot(models)
    said.clear()
    again = official.convert_published(moved, ModelStore(models, progress=said.append), progress=said.append)
    assert (again.tokenizer_file, again.backbone_file) == (out.tokenizer_file, out.backbone_file)
    assert not (again.tokenizer.trained or again.backbone.trained)
    assert snapshot(models) == before and len(said) == 2 and all(": reusing " in m for m in said)
    assert cli(["checkpoints", "convert", str(moved), str(models)]) == 0 and snapshot(models) == before


def test_other_sources_convert_into_other_runs_and_strict_refuses_them(archive, tmp_path):
    models = tmp_path / "models"
    first = official.convert_published(archive, ModelStore(models, progress=lambda m: None), progress=lambda m: None)
    other = shutil.copytree(archive, tmp_path / "other")
    ckpt = other / of.BACKBONE_DIR / of.BACKBONE_NAME
    sd, kw = _fixture_state("gpt")
    of.write_checkpoint(ckpt, {**sd, "head.fc1.bias": sd["head.fc1.bias"] + 1}, {"model_kwargs": kw})
    before = snapshot(models)
    with one_line_error(f"{models / 'published_gpt_combined'}: reuse: strict, and no run was trained with these "
                        "settings: data.checkpoint.sha256 is ", unchanged=models):
        official.convert_published(other, ModelStore(models, reuse="strict", progress=lambda m: None))
    second = official.convert_published(other, ModelStore(models, progress=lambda m: None), progress=lambda m: None)
    assert second.tokenizer.path == first.tokenizer.path and not second.tokenizer.trained  # the same tokenizer
    assert second.backbone.path != first.backbone.path and second.backbone.trained
    assert {k: v for k, v in snapshot(models).items() if k in before} == before  # the first runs stay
    assert torch.equal(load_gpt(second.backbone_file).head.bias, load_gpt(first.backbone_file).head.bias + 1)
    with one_line_error(f"{tmp_path / 'm2' / 'published_tokenizer'}: reuse: strict, and no finished run of it "
                        "exists (reuse: auto would train it)", unchanged=tmp_path):
        official.convert_published(archive, ModelStore(tmp_path / "m2", reuse="strict"))


def test_a_second_conversion_waits_for_the_first_and_reuses(archive, tmp_path, capsys):
    done = official.convert_published(archive, ModelStore(tmp_path / "first", progress=lambda m: None))
    models, got = tmp_path / "models", []
    run_dirs = [models / run.path.relative_to(tmp_path / "first") for run in (done.tokenizer, done.backbone)]
    with exclusive_lock(run_dirs[0]):  # another process converting the tokenizer
        t = threading.Thread(target=lambda: got.append(official.convert_published(
            archive, ModelStore(models, progress=print), progress=print)))
        t.start()
        out = ""
        for _ in range(300):
            out += capsys.readouterr().out
            if "waiting for it to finish" in out:
                break
            time.sleep(0.05)
        assert f"{run_dirs[0]}: in use by process {os.getpid()} on " in out and not got
        for run, path in zip((done.tokenizer, done.backbone), run_dirs):  # ... which converts both
            shutil.copytree(run.path, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LOCK_FILE))
    t.join(timeout=60)
    assert [got[0].tokenizer.path, got[0].backbone.path] == run_dirs
    assert not (got[0].tokenizer.trained or got[0].backbone.trained) and "reusing" in capsys.readouterr().out


def test_convert_refusals(archive, tmp_path):
    # a tokenizer with another vocabulary than the backbone's
    sd, kw = _fixture_state("vqvae_conditional")
    d = tmp_path / "mixed"
    _tokenizer_dir(d, sd={**sd, "model.vqlayer.codebook.weight": sd["model.vqlayer.codebook.weight"][:30],
                          "model.vqlayer._counts": sd["model.vqlayer._counts"][:30]},
                   kw={**kw, "vq_kwargs": {**kw["vq_kwargs"], "num_codes": 30}})
    (d / of.BACKBONE_DIR).mkdir()
    (d / of.BACKBONE_DIR / of.BACKBONE_NAME).write_bytes((archive / of.BACKBONE_DIR / of.BACKBONE_NAME).read_bytes())
    models = tmp_path / "m2"
    with one_line_error(f"{d / of.BACKBONE_DIR / of.BACKBONE_NAME}: backbone vocabulary 34 does not fit the tokenizer "
                        f"{d / of.TOKENIZER_DIR / 'model_ckpt.ckpt'} (30 codes + start/stop = 32)"):
        official.convert_published(d, ModelStore(models, progress=lambda m: None), progress=lambda m: None)
    assert not (models / "published_gpt_combined").exists()  # nothing written for the backbone
    runs = list(models.glob("*/*/run.json"))  # the tokenizer's run only, complete
    assert [p.parent.parent.name for p in runs] == ["published_tokenizer"]
    assert json.loads(runs[0].read_text())["complete"]
    (d / of.TOKENIZER_DIR / "config.yaml").unlink()
    with one_line_error("config.yaml: not found; the official tokenizer needs the config.yaml of its training",
                        unchanged=models):
        official.convert_published(d, ModelStore(models))
    shutil.rmtree(d / of.BACKBONE_DIR)
    with pytest.raises(OmnijetError, match="mixed: no published backbone"):
        official.find_published(d)
    assert cli(["checkpoints", "convert", str(tmp_path / "nowhere"), str(tmp_path / "m3")]) == 1


# ------------------------------------------------------------------------------ download
def _pack(root, fmt: str, top: str = "checkpoints") -> bytes:
    buf = io.BytesIO()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w") as z:
            for p in files:
                z.write(p, f"{top}/{p.relative_to(root)}")
    else:
        with tarfile.open(fileobj=buf, mode="w") as t:
            for p in files:
                t.add(p, f"{top}/{p.relative_to(root)}")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_fetch_unpacks_records_and_verifies(server, archive, tmp_path, fmt, capsys):
    data = _pack(archive, fmt)
    server.files[URL_PATH] = data
    url = f"http://127.0.0.1:{server.server_address[1]}{URL_PATH}"
    dest = tmp_path / "ckpt"
    (dest / ".omnijet_checkpoints.download.partial").parent.mkdir(parents=True)
    (dest / ".omnijet_checkpoints.download.partial").write_bytes(data[:1000])  # an interrupted run
    found = official.fetch_published(dest, url=url, progress=False)
    assert server.requests == ["bytes=1000-"]
    assert found["backbone"] == dest / "checkpoints" / of.BACKBONE_DIR / of.BACKBONE_NAME
    manifest = json.loads((dest / official.MANIFEST).read_text())
    assert len(manifest) == 3 and not list(dest.glob("*omnijet_checkpoints.download*"))
    # reuse: verified, no request
    official.fetch_published(dest, url=url, progress=False)
    assert len(server.requests) == 1
    # a damaged file is fetched again and restored
    tok = found["tokenizer"]
    good = tok.read_bytes()
    tok.write_bytes(good[:-10] + b"x" * 10)
    official.fetch_published(dest, url=url, progress=False)
    assert len(server.requests) == 2 and tok.read_bytes() == good
    # the CLI prints what it found
    assert cli(["checkpoints", "fetch", "--dest", str(dest), "--url", url]) == 0
    assert f"backbone: {found['backbone']}" in capsys.readouterr().out


def test_fetch_refuses_unsafe_members_and_reports_http_errors(server, tmp_path, capsys):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../escape.ckpt", b"x")
    server.files[URL_PATH] = buf.getvalue()
    url = f"http://127.0.0.1:{server.server_address[1]}{URL_PATH}"
    with pytest.raises(OmnijetError, match=r"refusing unsafe member path '../escape.ckpt'"):
        official.fetch_published(tmp_path / "d", url=url, progress=False)
    assert not (tmp_path / "escape.ckpt").exists()
    assert cli(["checkpoints", "fetch", "--dest", str(tmp_path / "e"), "--url", url + "missing"]) == 1
    assert "404" in capsys.readouterr().err
