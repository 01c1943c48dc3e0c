"""``omnijet`` command line: ``simulate | tokenize | figures | bench | checkpoints``.

Errors meant for users (bad files, parameters, checkpoints) are printed as one line and the
command exits with status 1; no traceback soup.
"""

from __future__ import annotations

import argparse
import logging
import sys

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


COMMANDS = {"simulate": _simulate, "tokenize": _tokenize, "figures": _figures, "bench": _bench,
            "checkpoints": _checkpoints}


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
