"""A parameter profile never runs code (issue #33, point 1).

Profiles are files people share. Each test plants code in one kind of profile value (binary data,
YAML tags, nested dicts, keys, dates, sets, ...) and checks that it is refused with one line before
anything runs — in ``--dry-run`` and in a real run — and that the marker file the code would
create never appears. A second line of defence is tested on its own: values that got past the
profile checks (``load_profile`` and ``resolve_parameters`` bypassed) are stopped by the check of
the parameters cell papermill injects, before any kernel starts.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import json
import re

import pytest
import yaml

import omnijet_lib.figures as figures
from omnijet_lib.figures import load_profile, notebooks, resolve_parameters, run_figures

from .conftest import one_line_error, write_notebook, snapshot

NOT_PLAIN = "is not allowed (only strings, numbers, booleans, null, lists and mappings)"


def _b64(payload: str) -> str:
    return base64.b64encode(payload.encode()).decode()


def hostile_profiles(marker) -> dict[str, tuple[str, str]]:
    """name: (profile text planting code that would create ``marker``, fragment of the refusal)."""
    m = str(marker)
    run = f"open(r'{m}', 'w').close()"
    in_bytes = f'open(r"{m}", "w").close()'  # no single quote: the repr of bytes keeps the double quotes as they are
    closes_dict, closes_text = _b64(f'"}}; {in_bytes}; _ = {{"'), _b64(f'"; {in_bytes}; _ = "')
    return {
        # the probe's exploit: bytes whose repr closes the string literal papermill writes
        "binary_closes_string": (f"05_token_explorer:\n  trainer:\n    x: !!binary {closes_dict}\n",
                                 f"line 3: 05_token_explorer.trainer.x: !!binary {NOT_PLAIN}"),
        "binary_top_level": (f"05_token_explorer:\n  figures_dir: !!binary {closes_text}\n",
                             "05_token_explorer.figures_dir: !!binary"),
        "python_apply": (f"common:\n  figures_dir: !!python/object/apply:os.system ['touch {m}']\n",
                         f"common.figures_dir: !!python/object/apply:os.system {NOT_PLAIN}"),
        "python_name": ("common:\n  figures_dir: !!python/name:os.system\n", "!!python/name:os.system"),
        "custom_tag": (f"05_token_explorer:\n  kind: !code \"{run}\"\n", f"05_token_explorer.kind: !code {NOT_PLAIN}"),
        "nested_dict": (f"05_token_explorer:\n  trainer: {{devices: [0, {{x: !!binary {_b64(run)}}}]}}\n",
                        "05_token_explorer.trainer.devices[1].x: !!binary"),
        "key_closes_string": (f"05_token_explorer:\n  trainer: {{\"x'); {run}; ('\": 1}}\n",
                              "section 05_token_explorer: trainer.x'); open("),
        "key_is_code": (f"05_token_explorer:\n  \"kind = 1; {run} #\": 1\n",
                        "05_token_explorer has no parameter(s) kind = 1; open("),
        "key_with_newline": (f"common:\n  \"x\\n{run}\": 1\n", 'common parameter(s) "x\\nopen('),
        "binary_key": (f"05_token_explorer:\n  trainer: {{!!binary {_b64(run)}: 1}}\n",
                       "05_token_explorer.trainer: key"),
        "timestamp": ("05_token_explorer:\n  figures_dir: 2024-01-01\n", "2024-01-01 is a date (!!timestamp)"),
        "set": (f"05_token_explorer:\n  trainer: {{devices: !!set {{\"{run}\"}}}}\n", "!!set " + NOT_PLAIN),
        "merge_key": (f"base: &b {{figures_dir: \"{m}\"}}\ncommon:\n  <<: *b\n", "merge keys (<<) are not allowed"),
    }


def _no_kernel(monkeypatch):
    """A run refused before execution starts no kernel: fail loudly if one is asked for."""
    import papermill.engines

    def started(*args, **kwargs):
        raise AssertionError("a kernel was started")

    monkeypatch.setattr(papermill.engines.papermill_engines, "execute_notebook_with_engine", started)


@pytest.mark.parametrize("entry", ["run_figures_dry_run", "cli_dry_run", "cli_run", "cli_run_jobs"])
def test_code_planted_in_any_profile_value_never_runs(entry, tmp_path, capsys, monkeypatch):
    _no_kernel(monkeypatch)
    marker, executed = tmp_path / "MARKER", tmp_path / "executed"
    for name, (text, fragment) in hostile_profiles(marker).items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        before = snapshot(tmp_path)
        if entry == "run_figures_dry_run":
            with one_line_error(str(path), fragment, unchanged=tmp_path):
                run_figures(str(path), dry_run=True)
        else:
            argv = {"cli_dry_run": ["--dry-run"], "cli_run": ["--only", "05"], "cli_run_jobs": ["--jobs", "2"]}[entry]
            assert figures.main(["--profile", str(path), "--executed-dir", str(executed), *argv]) == 1, name
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
            assert fragment in err and str(path) in err, (name, err)
        assert not marker.exists(), name
        assert not executed.exists() and snapshot(tmp_path) == before, name


# ------------------------------------------------------------------------------------ catalogue
def _bomb() -> str:
    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 10)}]")
    return "\n".join(levels) + "\n"


CATALOGUE = {
    "binary": ("02_generation:\n  trainer:\n    x: !!binary aGVsbG8=\n",
               f"line 3: 02_generation.trainer.x: !!binary {NOT_PLAIN}"),
    "timestamp": ("common:\n  figures_dir: 2024-01-01\n",
                  "line 2: common.figures_dir: 2024-01-01 is a date (!!timestamp) and is not allowed (only strings, "
                  "numbers, booleans, null, lists and mappings): quote it to keep it as text"),
    "set": ("01_token_quality:\n  kinds: !!set {conditional, binned}\n", f"01_token_quality.kinds: !!set {NOT_PLAIN}"),
    "omap": ("01_token_quality:\n  kinds: !!omap [{a: 1}]\n", f"01_token_quality.kinds: !!omap {NOT_PLAIN}"),
    "pairs": ("01_token_quality:\n  kinds: !!pairs [{a: 1}]\n", f"01_token_quality.kinds: !!pairs {NOT_PLAIN}"),
    "python_tag": ("common:\n  seed: !!python/object/apply:os.getpid []\n",
                   f"common.seed: !!python/object/apply:os.getpid {NOT_PLAIN}"),
    "custom_tag": ("common:\n  seed: !mine 3\n", f"line 2: common.seed: !mine {NOT_PLAIN}"),
    "tag_with_line_break": ("common:\n  seed: !a%0Ab 3\n", "common.seed: '!a\\nb' is not allowed"),
    "merge_key": ("base: &b {seed: 2}\ncommon:\n  <<: *b\n", "line 3: common: merge keys (<<) are not allowed"),
    "float_key": ("03_transfer_learning:\n  max_epochs: {1.5: 3}\n",
                  "03_transfer_learning.max_epochs: key 1.5 is a !!float: keys are text or integers "
                  "(quote it to make it text)"),
    "null_key": ("common:\n  trainer: {~: 1}\n", "common.trainer: key ~ is a !!null: keys are text or integers"),
    "bool_key": ("common:\n  trainer: {on: 1}\n", "common.trainer: key on is a !!bool: keys are text or integers"),
    "list_key": ("common:\n  trainer: {[1]: 1}\n", "common.trainer: a list as a key is not allowed"),
    "int_section": ("5: {}\n", "section and parameter names are text, got 5"),
    "duplicate_top_level": ("common: {seed: 1}\ncommon: {seed: 2}\n", "line 2: duplicate key common"),
    "duplicate_parameter": ("common:\n  seed: 1\n  seed: 2\n", "line 3: common: duplicate key seed"),
    "duplicate_nested": ("02_generation:\n  trainer: {precision: 32, precision: 16}\n",
                         "line 2: 02_generation.trainer: duplicate key precision"),
    "duplicate_as_text": ("common:\n  tokenizer: {per_size: {64: {epochs: 1}, '64': {epochs: 2}}}\n",
                          "common.tokenizer.per_size: duplicate key 64"),
    "alias_bomb": (_bomb(), "more than 10000 values (aliases count each time they are used)"),
    "alias_loop": ("common:\n  kinds: &a [*a]\n", "nested too deeply for a parameter profile"),
    "deep_nesting": ("common:\n  kinds: " + "[" * 3000 + "]" * 3000 + "\n",
                     "nested too deeply for a parameter profile"),
    "nan": ("03_transfer_learning:\n  lr: .nan\n", "line 2: 03_transfer_learning.lr: .nan is not a finite number"),
    "inf": ("02_generation:\n  temperature: .inf\n", "02_generation.temperature: .inf is not a finite number"),
    "minus_inf_in_list": ("02_generation:\n  scaling_fractions: [0.5, -.inf]\n",
                          "02_generation.scaling_fractions[1]: -.inf is not a finite number"),
    "int_of_5000_digits": ("common:\n  seed: " + "9" * 5000 + "\n", "common.seed: 99999"),
    "explicit_bad_int": ("common:\n  seed: !!int twelve\n", "common.seed: twelve is not a valid !!int"),
    "two_documents": ("common: {}\n---\ncommon: {}\n", "invalid YAML (but found another document)"),
    "not_utf8": (b"common: {figures_dir: \xff}\n", "invalid YAML (unacceptable character #x00ff"),
    "huge_file": ("# padding\n" * 120_000, "more than 1024 kB; a parameter profile is a few kB of YAML"),
    # dict parameters: their keys and values against the config class that takes them
    "gpt_config_unknown_key": ("common:\n  backbone: {gpt_config: {n_emb: 64}}\n",
                               "section common: backbone.gpt_config.n_emb: unknown key; known: n_embd, n_head, "
                               "n_layer, ffn, dropout, max_len"),
    "gpt_config_set_by_notebook": ("03_transfer_learning:\n  backbone: {gpt_config: {vocab_size: 10}}\n",
                                   "section 03_transfer_learning: backbone.gpt_config.vocab_size: unknown key"),
    "gpt_config_wrong_type": ("02_generation:\n  backbone: {gpt_config: {n_embd: '64'}}\n",
                              "section 02_generation: backbone.gpt_config.n_embd must be int, got str '64' (text in "
                              "YAML: write it without quotes)"),
    "backbone_unknown_key": ("common:\n  backbone: {epoch: 3}\n",
                             "section common: backbone.epoch: unknown key; known: gpt_config, epochs, batch_size,"),
    "reuse_unknown_word": ("common:\n  reuse: strikt\n", "section common: reuse must be auto or strict, got 'strikt'"),
    "epic_config_unknown_word": ("04_epic_fm_comparison:\n  epic_config: heavy\n",
                                 "epic_config must be light or jetclass, got 'heavy'"),
    "gpt_config_outside_backbone": ("02_generation:\n  gpt_config: {n_embd: 64}\n", "gpt_config"),
    "trainer_unknown_key": ("common:\n  trainer: {max_epoch: 3}\n",
                            "section common: trainer.max_epoch: unknown key; known: procedure, max_epochs, max_steps,"),
    "trainer_wrong_type": ("05_token_explorer:\n  trainer: {precision: {bits: 16}}\n",
                           "section 05_token_explorer: trainer.precision must be str or int or list[int], got dict"),
    "trainer_float_for_bool": ("05_token_explorer:\n  trainer: {loss_over_padding: 0.5}\n",
                               "trainer.loss_over_padding must be bool, got float 0.5"),
    "tokenizer_unknown_key": ("common:\n  tokenizer: {epoch: 3}\n",
                              "section common: tokenizer.epoch: unknown key; known: epochs, model_kw,"),
    "model_kw_unknown_key": ("common:\n  tokenizer: {model_kw: {hidden: 32}}\n",
                             "section common: tokenizer.model_kw.hidden: unknown key; known: input_dim, hidden_dim,"),
    "model_kw_bool_for_int": ("01_token_quality:\n  tokenizer: {model_kw: {num_blocks: true}}\n",
                              "tokenizer.model_kw.num_blocks must be int, got bool True"),
    "per_size_unknown_key": ("common:\n  tokenizer: {per_size: {64: {model_kw: {drop: 0.0}}}}\n",
                             "section common: tokenizer.per_size.64.model_kw.drop: unknown key; known: input_dim,"),
    "per_size_wrong_type": ("common:\n  tokenizer: {per_size: {64: {model_kw: {dropout: [0.1]}}}}\n",
                            "tokenizer.per_size.64.model_kw.dropout must be float, got list[float] [0.1]"),
    "tokenizer_trainer_unknown_key": ("common:\n  tokenizer: {trainer: {max_epoch: 3}}\n",
                                      "section common: tokenizer.trainer.max_epoch: unknown key; known: procedure,"),
    "classifier_kw_unknown_arch": ("01_token_quality:\n  classifier_kw: {mlp: {}}\n",
                                   "classifier_kw.mlp: unknown key; known: deepsets, transformer"),
    "classifier_kw_unknown_key": ("01_token_quality:\n  classifier_kw: {transformer: {depth: 2}}\n",
                                  "classifier_kw.transformer.depth: unknown key; known: n_features, dim, num_heads,"),
    "classifier_kw_not_a_dict": ("01_token_quality:\n  classifier_kw: {deepsets: [100]}\n",
                                 "classifier_kw.deepsets must be dict, got list[int] [100]"),
    "classifier_kw_list_of_text": ("01_token_quality:\n  classifier_kw: {deepsets: {phi: ['100']}}\n",
                                   "classifier_kw.deepsets.phi must be list[int], got list[str] ['100']"),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_profile_value_catalogue(case, tmp_path):
    text, fragment = CATALOGUE[case]
    path = tmp_path / "profile.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    with one_line_error(str(path), fragment, unchanged=tmp_path):
        run_figures(str(path), dry_run=True)


def test_every_dict_parameter_has_a_schema():
    """No notebook parameter is "any dict": each dict default has a schema, or a fully typed kind."""
    schemas = figures._dict_schemas()
    for nb in notebooks():
        for name, default in figures._defaults(nb).items():
            if not isinstance(default, dict):
                continue
            if name in schemas:
                continue
            kinds = figures.PARAMETER_TYPES.get(name, ())  # then every dict and list in them says what it holds
            assert kinds and not any(re.search(r"\b(dict|list)\b(?!\[)", k) for k in kinds), (nb, name)
    with one_line_error("x.yaml: a_new_dict: no schema declares the keys of this dict parameter"):
        figures.check_parameter("x.yaml", "a_new_dict", {"a": 1}, {})


def test_schemas_are_the_config_classes_fields():
    from omnijet_lib.models.gpt import GPTConfig
    from omnijet_lib.tokenizers.vqvae import VQVAEConfig
    from omnijet_lib.training.fit import TrainConfig

    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    schemas = figures._dict_schemas()
    assert set(schemas["backbone"]["gpt_config"]) == names(GPTConfig) - {"vocab_size", "n_classes"}
    assert set(schemas["tokenizer"]["model_kw"]) == names(VQVAEConfig) - {"conditional", "num_codes"}
    from omnijet_lib.studies.tokens import TOKENIZER_DATA_KEYS, TOKENIZER_DEFAULTS, TOKENIZER_SIZE_KEYS

    assert set(schemas["tokenizer"]) == set(TOKENIZER_DEFAULTS) | set(TOKENIZER_DATA_KEYS)
    assert set(schemas["tokenizer"]["per_size"].schema) == set(TOKENIZER_SIZE_KEYS)
    from omnijet_lib.studies.generation import BACKBONE_DATA_KEYS, BACKBONE_DEFAULTS, BACKBONE_MODEL_KEYS

    assert set(schemas["backbone"]) == set(BACKBONE_DEFAULTS) | set(BACKBONE_DATA_KEYS)
    assert set(schemas["backbone"]["per_model"].schema) == set(BACKBONE_MODEL_KEYS)
    assert set(schemas["trainer"]) == names(TrainConfig) | {"procedure"}
    assert schemas["trainer"]["patience"] == ("int", "None")
    assert schemas["trainer"]["limit_train_batches"] == ("int", "float")


def test_shipped_profiles_and_their_dicts_pass():
    for name in ("ci", "quick", "paper", "published"):
        plan = resolve_parameters(load_profile(name), notebooks())
        for nb, params in plan.items():
            figures._prepared(nb, params)  # their injected cells pass the check


# ------------------------------------------------------------------- legitimate text arrives as is
TRICKY = ["it's \"quoted\"", 'x"); open("MARKER", "w"); ("', "two\nlines\r\n", '"""triple"""', "'''", "back\\slash\\",
          "\\n not a newline", "tab\tand \x00 nul", "ünïcödé and 🚀", "{curly} %s", "# not a comment", ""]


def test_text_with_quotes_and_line_breaks_passes_the_injected_cell_check():
    nb = figures.NOTEBOOKS / "05_token_explorer.ipynb"
    params = {"figures_dir": "".join(TRICKY), "kind": TRICKY[1], "trainer": {"precision": TRICKY[3], "devices": [0, 1]}}
    node = figures._prepared(nb, params)
    cell = next(c for c in node.cells if "injected-parameters" in c.metadata.get("tags", []))
    given = {s.targets[0].id: ast.literal_eval(s.value) for s in ast.parse(cell.source).body}
    assert given == params
    per_size = {"tokenizer": {"per_size": {8192: {"epochs": 2}}}}
    node = figures._prepared(figures.NOTEBOOKS / "01_token_quality.ipynb", per_size)
    cell = next(c for c in node.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert ast.literal_eval(cell.source.split(" = ", 1)[1]) == {"per_size": {"8192": {"epochs": 2}}}  # keys as text


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """notebooks/00_tiny.ipynb (parameters ``text``, ``texts``) that writes them to values.json."""
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir()
    params.mkdir()
    write_notebook(nbs / "00_tiny.ipynb", ['text = "."\ntexts = ["."]',
                                      "import json\nopen('values.json', 'w').write(json.dumps([text, texts]))"])
    monkeypatch.setattr(figures, "NOTEBOOKS", nbs)
    monkeypatch.setattr(figures, "PARAMS", params)
    return nbs, params


def test_text_with_quotes_and_line_breaks_arrives_unchanged_in_a_real_run(tiny, tmp_path):
    nbs, params = tiny
    (params / "tricky.yaml").write_text(yaml.safe_dump({"00_tiny": {"text": "".join(TRICKY), "texts": TRICKY}}))
    run_figures("tricky", out_dir=tmp_path / "executed", progress_every=60)
    assert json.loads((nbs / "values.json").read_text()) == ["".join(TRICKY), TRICKY]
    assert not (nbs / "MARKER").exists() and not (tmp_path / "MARKER").exists()


# ------------------------------------------------------------------ defence in depth: the injected cell
ASSIGNMENT = "injected parameter text: `open("  # ... `, "w").close()` is not an assignment of a parameter


class _CodeFloat(float):
    """A number whose text is code: papermill writes ``f"{value}"``."""

    def __init__(self, value):
        self.code = ""

    def __str__(self):
        return self.code


def hostile_values(marker) -> dict[str, tuple[object, str]]:
    """name: (a value no profile can hold, fragment of the refusal); each would create ``marker``."""
    run = f'open(r"{marker}", "w").close()'  # no single quote: the repr of bytes keeps the double quotes as they are
    code_float = _CodeFloat(1.0)
    code_float.code = f"1.0; {run}"
    code_in_dict = _CodeFloat(1.0)
    code_in_dict.code = f"1.0}}; {run}; _ = {{1: 1"
    return {
        "bytes_closing_the_string": (f"\"; {run}; _ = \"".encode(), ASSIGNMENT),
        "bytes_in_a_list_of_dicts": ([{"x": f"\"}}]; {run}; _ = [{{\"".encode()}], ASSIGNMENT),
        "bytes_commenting_out_the_rest": (f"\"; {run} #".encode(), ASSIGNMENT),
        "bytes_breaking_the_syntax": (f"\"; {run}; (".encode(),
                                      "injected parameter text: the cell is not valid Python"),
        "number_whose_text_is_code": (code_float, ASSIGNMENT),
        "number_in_a_dict": ({"a": code_in_dict}, ASSIGNMENT),
        "bytes_that_stay_a_string": (b"harmless", "injected parameter text holds a bytes, not plain data"),
        "tuple": ((1, 2), "injected parameter text holds a tuple, not plain data"),
        "infinity": (float("inf"), "injected parameter text: `float('inf')` is not a literal"),
        "object": (object(), "00_tiny.ipynb: the parameters could not be injected (TypeError"),
    }


@pytest.mark.parametrize("dry_run", [False, True])
def test_injected_cell_check_stops_values_that_bypass_the_profile_checks(dry_run, tiny, tmp_path, monkeypatch):
    _no_kernel(monkeypatch)
    marker, executed = tmp_path / "MARKER", tmp_path / "executed"
    monkeypatch.setattr(figures, "load_profile", lambda profile: {"_path": "hostile.yaml"})
    for name, (value, fragment) in hostile_values(marker).items():
        monkeypatch.setattr(figures, "resolve_parameters", lambda profile, nbs: {nb: {"text": value} for nb in nbs})
        with one_line_error(f"00_tiny.ipynb: ", fragment, "nothing was run", unchanged=tmp_path):
            run_figures("hostile", out_dir=executed, dry_run=dry_run)
        assert not marker.exists() and not executed.exists(), name


def test_injected_cell_check_comes_before_parallel_runs(tiny, tmp_path, monkeypatch):
    nbs, _ = tiny
    write_notebook(nbs / "01_other.ipynb", ['text = "."', "pass"])
    marker = tmp_path / "MARKER"
    value = hostile_values(marker)["bytes_closing_the_string"][0]
    monkeypatch.setattr(figures, "load_profile", lambda profile: {"_path": "hostile.yaml"})
    monkeypatch.setattr(figures, "resolve_parameters", lambda profile, nbs: {nb: {"text": value} for nb in nbs})
    monkeypatch.setattr(figures, "run_parallel", lambda *a, **k: pytest.fail("children started"))
    with one_line_error("00_tiny.ipynb: injected parameter text:", unchanged=tmp_path):
        run_figures("hostile", out_dir=tmp_path / "executed", jobs=2)
    assert not marker.exists()
