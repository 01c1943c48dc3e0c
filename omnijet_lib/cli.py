"""``omnijet`` command line: ``simulate | tokenize | figures | bench | checkpoints | train | finetune | classify |
generate | score``.

Errors meant for users (bad files, parameters, checkpoints) are printed as one line and the
command exits with status 1; no traceback soup.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .io import WAIT_HELP, OmnijetError


def _simulate(argv) -> int:
    from .data.schema import class_selection
    from .simulation import simulate_dataset

    ap = argparse.ArgumentParser(prog="omnijet simulate", description="Simulate JetClass-like jets "
                                 "(Pythia 8 + FastJet), one ROOT file per class.")
    ap.add_argument("--per-class", type=int, required=True, help="accepted jets per class")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="processes (one Pythia each)")
    ap.add_argument("--classes", nargs="*", help="subset, e.g. QCD Tbqq (default: all ten)")
    ap.add_argument("--wait", action="store_true", help=WAIT_HELP)
    a = ap.parse_args(argv)
    if a.per_class <= 0:
        raise OmnijetError(f"--per-class must be positive, got {a.per_class}")
    if a.workers <= 0:
        raise OmnijetError(f"--workers must be positive, got {a.workers}")
    class_selection(a.classes, "--classes")  # an empty --classes would simulate nothing
    for p in simulate_dataset(a.out, per_class=a.per_class, seed=a.seed, workers=a.workers, classes=a.classes,
                              wait=a.wait):
        print(p)
    return 0


def _tokenize(argv) -> int:
    from .tokenizers.streaming import main as tokenize_main

    return tokenize_main(argv)


def _figures(argv) -> int:
    from .figures import main as figures_main

    return figures_main(argv)


def _bench(argv) -> int:
    from .bench import main as bench_main

    return bench_main(argv)


def _checkpoints(argv) -> int:
    from .official import PUBLISHED_URL, convert_published, fetch_published
    from .training.store import ModelStore

    ap = argparse.ArgumentParser(prog="omnijet checkpoints", description="The published OmniJet-α weights "
                                 "(uhh-pd-ml/omnijet_alpha, checkpoints/download_checkpoints.sh).")
    sub = ap.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download and unpack the published archive (resumes; sha256 of every "
                       "file recorded and checked on reuse)")
    f.add_argument("--dest", required=True, help="directory to unpack into, e.g. data/checkpoints/published")
    f.add_argument("--url", default=PUBLISHED_URL, help="archive URL (default: the authors' DESY Sync&Share folder)")
    f.add_argument("--wait", action="store_true", help=WAIT_HELP)
    c = sub.add_parser("convert", help="convert the published tokenizer and backbone once into two runs of "
                       "the model store, DEST/published_tokenizer/HASH/ and DEST/published_gpt_combined/HASH/ "
                       "(our safetensors checkpoints; a second conversion of the same files reuses them, "
                       "another process converting them is waited for)")
    c.add_argument("src", help="a directory holding the published files (fetch's --dest)")
    c.add_argument("dest", help="the model store: a profile's models_dir, e.g. data/models/published")
    a = ap.parse_args(argv)
    if a.action == "fetch":
        for what, path in fetch_published(a.dest, url=a.url, wait=a.wait).items():
            print(f"{what}: {path}")
    else:
        def say(msg):  # progress to stderr; stdout holds the two files
            print(msg, file=sys.stderr)

        published = convert_published(a.src, ModelStore(a.dest, progress=say), progress=say)
        print(f"tokenizer: {published.tokenizer_file}")
        print(f"backbone: {published.backbone_file}")
    return 0


DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda when present)"


def _backbone_options(ap, store_default=None, store_help="model store holding the converted published backbone "
                      "(--backbone published)") -> None:
    """The options of the commands that use a pre-trained backbone: --backbone, --tokenizer, --store, --device."""
    ap.add_argument("--backbone", required=True, metavar="RUN", help="a backbone run folder (STORE/gpt_combined/HASH), "
                    "its model folder (its newest run), or 'published' (the converted published backbone of --store)")
    ap.add_argument("--tokenizer", metavar="RUN", help="tokenizer run folder (default: the one the backbone was "
                    "trained with)")
    ap.add_argument("--store", metavar="DIR", default=store_default, help=store_help)
    ap.add_argument("--device", default=None, help=DEVICE_HELP)


def _open_backbone(a):
    """``(Backbone, device)`` of the options :func:`_backbone_options` added."""
    from .io import check_device, default_device
    from .training.gpt import open_backbone

    device = check_device(a.device or default_device(), "--device")
    return open_backbone(a.backbone, a.tokenizer, store=a.store, device=device), device


def _finetune(argv) -> int:
    from .io import write_json
    from .studies.finetune import finetune_files
    from .training.store import ModelStore

    ap = argparse.ArgumentParser(
        prog="omnijet finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a pre-trained backbone to tag jets of your labelled JetClass-schema ROOT files. The "
        "classifier becomes a run of the model store --store (the same settings on the same jets reuse it; an "
        "interrupted training resumes); its validation and test accuracy and AUC are printed as JSON. Every class "
        "named is a label of its own: one signal and one background class make a binary tagger, more a multi-class "
        "one. Without --val/--test, 20%% of the training jets of each class validate (early stopping) and 20%% test.",
        epilog="example:\n  omnijet finetune --backbone data/models/quick/gpt_combined --train my_jets/*.root \\\n"
               "      --signal Tbqq --background QCD --n-train 300 --store data/models/mine --out metrics.json")
    _backbone_options(ap, store_default="data/models/finetune", store_help="model store of the classifier (and of a "
                      "published backbone)")
    ap.add_argument("--train", required=True, nargs="+", help="labelled JetClass-schema ROOT files (globs allowed)")
    ap.add_argument("--signal", required=True, nargs="+", help="signal class(es), e.g. Tbqq")
    ap.add_argument("--background", required=True, nargs="+", help="background class(es), e.g. QCD")
    ap.add_argument("--strategy", default="finetune", choices=["finetune", "frozen", "scratch", "from_scratch"],
                    help="finetune: backbone and head trained; frozen: head only; scratch: same network, random start")
    ap.add_argument("--n-train", type=int, help="balanced number of training jets (default: the whole training pool)")
    ap.add_argument("--val", nargs="+", help="validation files (default: 20%% of --train)")
    ap.add_argument("--test", nargs="+", help="test files (default: 20%% of --train)")
    ap.add_argument("--epochs", type=int, default=30, help="at most this many epochs (early stopping ends sooner)")
    ap.add_argument("--patience", type=int, help="early-stopping patience (default: the paper's 20/10/5 by size)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (paper: 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the metrics JSON here")
    a = ap.parse_args(argv)
    for opt, v in (("--n-train", a.n_train), ("--epochs", a.epochs), ("--batch-size", a.batch_size)):
        if v is not None and v <= 0:
            raise OmnijetError(f"{opt} must be positive, got {v}")
    from .data.schema import class_selection

    signal, background = class_selection(a.signal, "--signal"), class_selection(a.background, "--background")
    if set(background) & set(signal):
        raise OmnijetError(f"--signal and --background both name {sorted(set(background) & set(signal))}")
    classes = background + signal
    backbone, device = _open_backbone(a)
    trainer = {"accelerator": "gpu" if device.startswith("cuda") else "cpu"}
    result, run = finetune_files(
        backbone, ModelStore(a.store, progress=_say), a.train, classes,
        strategy="from_scratch" if a.strategy == "scratch" else a.strategy, n_train=a.n_train, val_files=a.val,
        test_files=a.test, max_epochs=a.epochs, patience=a.patience, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        trainer=trainer, progress=_say)
    report = {**result, "classifier": run.summary(), "backbone": str(backbone.run)}
    if a.out:
        write_json(a.out, report)
    print(json.dumps(report, indent=1))
    return 0


def _classify(argv) -> int:
    from .io import check_device, default_device
    from .studies.finetune import classify_files, scores_path, write_scores

    ap = argparse.ArgumentParser(
        prog="omnijet classify", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score every jet of JetClass-schema ROOT files with a classifier of omnijet finetune: one row "
        "per jet with the file and entry it came from, the class its file gives it (label, 0..9 in JetClass order) "
        "and one probability p_<class> per class. Written atomically as .npz (numpy.load) or .parquet (pyarrow, pandas).",
        epilog="example:\n  omnijet classify --model data/models/mine/classifier_finetune_QCD_Tbqq --in data/*.root "
               "--out scores.npz")
    ap.add_argument("--model", required=True, help="classifier run folder (or its model folder: the newest run)")
    ap.add_argument("--in", dest="inputs", required=True, nargs="+", help="JetClass-schema ROOT files (globs allowed)")
    ap.add_argument("--out", required=True, help="scores.npz or scores.parquet")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--device", default=None, help=DEVICE_HELP)
    a = ap.parse_args(argv)
    if a.batch_size <= 0:
        raise OmnijetError(f"--batch-size must be positive, got {a.batch_size}")
    scores_path(a.out)  # a bad --out is said before any jet is read
    scores = classify_files(a.model, a.inputs, batch_size=a.batch_size,
                            device=check_device(a.device or default_device(), "--device"), progress=_say)
    print(write_scores(scores, a.out))
    _say(f"{len(scores['entry'])} jets scored")
    return 0


TRAIN_SECTIONS = {"tokenizer": "02_generation", "backbone": "02_generation", "epicfm": "04_epic_fm_comparison"}


def _train(argv) -> int:
    import os

    from .figures import NOTEBOOKS, section_parameters
    from .studies.generation import BACKBONE_CLASSES
    from .training.fit import TrainConfig

    ap = argparse.ArgumentParser(
        prog="omnijet train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the tokenizer, a backbone or the EPiC-FM baseline of a profile into its model store, "
        "exactly as the figure "
        "notebooks ask for them: a model trained here is the one the notebooks then reuse (same settings, same "
        "run folder). An interrupted training resumes. Paths in the profile are relative to notebooks/, as in the "
        "notebooks. The trainer options override the profile's trainer settings; they are settings of the model "
        "(a 4-GPU run is another run than a 1-GPU one). Under torchrun or srun, Lightning reads the ranks; "
        "with --devices N alone it starts the N processes itself.",
        epilog="examples:\n"
               "  omnijet train tokenizer --profile quick\n"
               "  omnijet train backbone --profile quick --name top\n"
               "  omnijet train epicfm --profile my_profile.yaml --accelerator gpu\n"
               "  omnijet tokenize --tokenizer STORE/tokenizer_conditional_8192/HASH/tokenizer.safetensors \\\n"
               "      --in 'data/jetclass/train_100M/*.root' --out data/shards/train\n"
               "  srun omnijet train backbone --profile paper --shards data/shards/train --accelerator gpu \\\n"
               "      --devices 4 --num-nodes 2 --strategy ddp")
    ap.add_argument("model", choices=list(TRAIN_SECTIONS), help="what to train")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--profile", help="profile name (params/NAME.yaml) or a profile YAML file")
    where.add_argument("--config", dest="profile", help="a YAML file in the format of a profile (the same as "
                       "--profile FILE): common: and notebook sections")
    ap.add_argument("--section", help="the notebook whose parameters to take (default: 02_generation; "
                    "epicfm: 04_epic_fm_comparison)")
    ap.add_argument("--kind", default="conditional", choices=["conditional", "unconditional"], help="tokenizer kind")
    ap.add_argument("--num-codes", type=int, help="tokenizer codebook size K (default: the section's num_codes)")
    ap.add_argument("--name", default="combined", choices=list(BACKBONE_CLASSES),
                    help="backbone: combined (q/g + t→bqq'), qcd or top")
    ap.add_argument("--shards", help="backbone: stream the token shards of this folder (omnijet tokenize) "
                    "instead of the profile's jets; each DDP rank reads other shards")
    for opt, kind, what in (("--accelerator", str, "cpu, gpu, auto"), ("--devices", str, "devices per node, or auto"),
                            ("--num-nodes", int, "nodes"), ("--strategy", str, "auto, ddp, ..."),
                            ("--precision", str, "32-true, bf16-mixed, 16-mixed, ...")):
        ap.add_argument(opt, type=kind, help=f"trainer: {what}")
    a = ap.parse_args(argv)
    overrides = {k: getattr(a, k) for k in ("accelerator", "devices", "num_nodes", "strategy", "precision")
                 if getattr(a, k) is not None}
    if isinstance(overrides.get("devices"), str) and overrides["devices"].isdigit():
        overrides["devices"] = int(overrides["devices"])
    TrainConfig.from_params(overrides)  # a bad trainer option fails here, before anything loads
    p = section_parameters(a.profile, a.section or TRAIN_SECTIONS[a.model])
    # the trainer options and --shards are settings of the model trained, not of the tokenizer it uses
    own = dict(p.get(a.model) or {}) if a.model != "epicfm" else {}
    own["trainer"] = {**(own.get("trainer", p.get("trainer")) or {}), **overrides}
    if a.model == "epicfm":  # its settings are the notebook's own
        p["trainer"], own = own["trainer"], None
    shards = Path(a.shards).resolve() if a.shards else None
    if shards is not None:
        if a.model != "backbone":
            raise OmnijetError("--shards: only a backbone trains on token shards")
        from .data.shards import read_manifest

        read_manifest(shards)  # no shards there: said before the tokenizer is looked for
        own["shards"] = str(shards)
    if own is not None:
        p[a.model] = own
    # Lightning's DDP launcher starts the other ranks with this command line from the folder we are
    # in then (notebooks/): it must name the files absolutely
    _absolute_options(sys.argv, {"--profile": Path(a.profile).resolve() if Path(a.profile).is_file() else None,
                                 "--shards": shards})
    here = os.getcwd()
    os.chdir(NOTEBOOKS)  # the profile's paths are the notebooks' (and so are the store's records of them)
    try:
        path = _train_in_store(a, p).path.resolve()  # the store's paths are relative to notebooks/
    finally:
        os.chdir(here)
    print(path)
    return 0


def _absolute_options(argv: list[str], paths: dict) -> None:
    """Replace the values of the options in ``paths`` (``--opt VALUE`` or ``--opt=VALUE``) in ``argv``."""
    for i, arg in enumerate(argv):
        for opt, path in paths.items():
            if path is None:
                continue
            if arg == opt and i + 1 < len(argv):
                argv[i + 1] = str(path)
            elif arg.startswith(opt + "="):
                argv[i] = f"{opt}={path}"


def _train_in_store(a, p: dict):
    """:func:`_train`'s training, in the notebooks' folder: the store run of the model asked for
    (a backbone needs the profile's tokenizer: it is trained first when the store lacks it)."""
    from .datasets import load_dataset
    from .studies.generation import backbone_data, profile_backbone, profile_epic_fm
    from .studies.tokens import profile_tokenizer, tokenizer_data
    from .training.store import ModelStore

    store = ModelStore(p["models_dir"], progress=_say)
    if a.model == "epicfm":  # as notebook 04 asks for it (q/g and t→bqq' beside the published backbone)
        combined = bool(p.get("checkpoint_dir"))
        jets = load_dataset(p["data_files"], per_class=p["per_class"], seed=p["seed"],
                            classes=["QCD", "Tbqq"] if combined else ["Tbqq"])
        return profile_epic_fm(store, jets, p["data_files"], p["per_class"], p["seed"], p["epic_config"], p["epochs"],
                               p["batch_size"], p["trainer"], combined)[1]
    data = tokenizer_data(p.get("tokenizer"), p.get("data_files"), p["per_class"], p["seed"], p["trainer"])
    tok, run = profile_tokenizer(store, a.kind, a.num_codes or p["num_codes"], data)
    if a.model == "backbone":
        shards = (p["backbone"] or {}).get("shards") is not None
        data = backbone_data(p["backbone"], p.get("data_files"), p["per_class"], p["seed"], p["trainer"],
                             load=not shards)  # streamed from shards: no jets in memory
        _, run = profile_backbone(store, a.name, tok, run, data)
    return run


def _say(msg: str) -> None:
    """Progress to stderr (stdout holds the results), one write per line: the lines of DDP ranks
    sharing the stream stay whole."""
    sys.stderr.write(f"{msg}\n")
    sys.stderr.flush()


def _generate(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="omnijet generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate jets with a pre-trained backbone into one JetClass-schema ROOT file (part_px, py, pz,\n"
        "energy; jet_* recomputed from the constituents, jet_sdmass 0) and their token sequences beside it\n"
        "(g.root -> g.tokens/: token shards as omnijet tokenize writes them). Generated jets have no truth:\n"
        "label_* is --class, or the backbone's training class when it had one (gpt_top: Tbqq), else QCD. Jets whose stop\n"
        "token comes first (no constituent) are dropped and more are drawn. Written chunk by chunk, renamed\n"
        "into place only when complete; an existing --out is refused unless --overwrite.",
        epilog="example:\n  omnijet generate --backbone data/models/quick/gpt_top -n 1000 --out g.root --top-k 100 "
               "--seed 1\n  omnijet generate --backbone data/models/quick/gpt_all_conditional --class Hbb -n 1000 "
               "--out hbb.root")
    _backbone_options(ap)
    ap.add_argument("-n", dest="n_jets", type=int, required=True, metavar="N", help="number of jets to write")
    ap.add_argument("--out", required=True, metavar="FILE", help="output .root file (its folder must exist)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out and its tokens folder")
    ap.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (default 1)")
    ap.add_argument("--top-k", type=int, metavar="K", help="draw among the K most probable next tokens only (1: "
                    "greedy, the same jets for every seed; default: all)")
    ap.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: draw among the fewest most probable "
                    "next tokens whose probabilities sum to at least P, in (0, 1] (after --top-k; default 1: all)")
    ap.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed and options give the same jets")
    ap.add_argument("--batch-size", type=int, default=256, metavar="B", help="jets generated at once (default 256)")
    ap.add_argument("--class", dest="jet_class", metavar="NAME", help="a class-conditional backbone (gpt_all_conditional) "
                    "generates jets of this class (QCD, Hbb, ..., Tbl); default: its unconditional mode")
    a = ap.parse_args(argv)
    from .studies.generation import generate_to_root  # after parsing: --help and usage errors are instant

    backbone, _ = _open_backbone(a)
    done = generate_to_root(backbone, a.n_jets, a.out, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            seed=a.seed, batch_size=a.batch_size, overwrite=a.overwrite, progress=_say,
                            jet_class=a.jet_class)
    print(done["out"])
    print(done["tokens"])
    _say(f"{done['jets']} jets (label {done['label']}) in {done['seconds']:.1f} s: {done['jets_per_second']:.0f} "
         f"jets/s; {done['empty']} empty jets dropped")
    return 0


def _score(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="omnijet score", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The likelihood of every jet of JetClass-schema ROOT files under a pre-trained backbone: the\n"
        "log-probability (natural log) of its tokens, its constituents then stop, each given the ones before.\n"
        "One row per jet: source_file, entry, label (the class its file gives it, 0..9 in JetClass order),\n"
        "log_likelihood (the total), per_token (total / n_tokens) and n_tokens (the constituents the tokenizer\n"
        "reads, the 128 hardest within |eta_rel|, |phi_rel| < 0.8, + 1). A backbone trained on background jets\n"
        "only gives anomalous jets a low likelihood. Written atomically as .npz (numpy.load) or .parquet.",
        epilog="example:\n  omnijet score --backbone data/models/quick/gpt_qcd --in data/*.root --out scores.npz")
    _backbone_options(ap)
    ap.add_argument("--in", dest="inputs", required=True, nargs="+", metavar="FILE",
                    help="JetClass-schema ROOT files (globs allowed)")
    ap.add_argument("--out", required=True, metavar="FILE", help="scores.npz or scores.parquet (its folder must exist)")
    ap.add_argument("--batch-size", type=int, default=1024, metavar="B", help="jets per forward pass (default 1024)")
    a = ap.parse_args(argv)
    from .studies.finetune import scores_path, write_scores  # after parsing: --help and usage errors are instant
    from .studies.likelihood import score_files

    if a.batch_size <= 0:
        raise OmnijetError(f"--batch-size must be positive, got {a.batch_size}")
    scores_path(a.out)  # a bad --out is said before any jet is read
    backbone, _ = _open_backbone(a)
    scores = score_files(backbone, a.inputs, batch_size=a.batch_size, progress=_say)
    print(write_scores(scores, a.out))
    _say(f"{len(scores['entry'])} jets scored by {backbone.run}")
    return 0


COMMANDS = {"simulate": _simulate, "tokenize": _tokenize, "figures": _figures, "bench": _bench,
            "checkpoints": _checkpoints, "finetune": _finetune, "classify": _classify, "generate": _generate,
            "train": _train, "score": _score}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: omnijet {{{'|'.join(COMMANDS)}}} [options]   (omnijet COMMAND --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.WARNING)  # its INFO lines would bury our errors
    try:
        return COMMANDS[argv[0]](argv[1:])
    except OmnijetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # permission denied, disk full, a file where a folder should be, ...
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
