"""Run the numbered notebooks with papermill for a parameter profile (``params/<profile>.yaml``).

Profile layout::

    common:            # passed to every notebook that declares the key
      per_class: 300
    01_token_quality:  # passed to that notebook only
      epochs: 2

A key that the target notebook(s) do not declare in their ``parameters`` cell is an error, and so
is a section that names no notebook: a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml

from .io import OmnijetError, atomic_path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PARAMS = REPO / "params"

__all__ = ["notebooks", "load_profile", "resolve_parameters", "run_figures", "main"]


def notebooks(directory: Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order (default: :data:`NOTEBOOKS`)."""
    return sorted(p for p in Path(directory or NOTEBOOKS).glob("[0-9][0-9]_*.ipynb"))


def load_profile(profile: str | Path) -> dict:
    """Load a profile by name (``ci``) or path; bad YAML names the file and line."""
    path = Path(profile)
    if not path.suffix:
        path = PARAMS / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(PARAMS.glob("*.yaml")))
        raise OmnijetError(f"{path}: parameter profile not found (known profiles: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise OmnijetError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise OmnijetError(f"{path}: a profile maps 'common' and notebook names to dicts of parameters")
    data["_path"] = str(path)
    return data


def declared_parameters(nb: Path) -> dict:
    """Parameters declared in the notebook's ``parameters`` cell: ``{name: default}``."""
    import papermill as pm

    try:
        return {k: v["default"] for k, v in pm.inspect_notebook(str(nb)).items()}
    except Exception as err:  # not JSON, not a notebook, unreadable
        raise OmnijetError(f"{nb}: not a readable notebook ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _source_cell(nb: Path, cell_index: int, injected: bool) -> int:
    """1-based number of the failing cell in the user's notebook: papermill's index counts the
    cell it injects after the ``parameters`` cell (or first, when there is none)."""
    import nbformat

    try:
        tags = [c.metadata.get("tags", []) for c in nbformat.read(str(nb), as_version=4).cells]
    except Exception:
        return cell_index + 1
    if not injected or any("injected-parameters" in t for t in tags):  # nothing inserted
        return cell_index + 1
    at = next((i + 1 for i, t in enumerate(tags) if "parameters" in t), 0)  # the injected cell's index
    return cell_index + (1 if cell_index < at else 0)


def resolve_parameters(profile: dict, nbs: list[Path]) -> dict[Path, dict]:
    """Per-notebook parameters from a profile; unknown keys and sections raise OmnijetError."""
    path = profile.get("_path", "profile")
    declared = {nb: declared_parameters(nb) for nb in nbs}
    stems = {nb.stem for nb in nbs}
    common = profile.get("common", {})
    unknown = sorted(set(common) - set().union(*declared.values()))
    if unknown:
        raise OmnijetError(f"{path}: common parameter(s) {', '.join(unknown)} not declared by any notebook")
    for section in profile:
        if section not in ("common", "_path") and section not in stems:
            raise OmnijetError(f"{path}: section '{section}' names no notebook (notebooks: {', '.join(sorted(stems))})")
    out = {}
    for nb in nbs:
        own = profile.get(nb.stem, {})
        bad = sorted(set(own) - set(declared[nb]))
        if bad:
            raise OmnijetError(f"{path}: {nb.stem} has no parameter(s) {', '.join(bad)} "
                               f"(it declares: {', '.join(declared[nb])})")
        params = {k: v for k, v in common.items() if k in declared[nb]}
        params.update(own)
        for k, v in params.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise OmnijetError(f"{path}: {nb.stem}.{k} = {v} must not be negative")
        out[nb] = params
    return out


def run_figures(profile: str = "ci", only: list[str] | None = None, out_dir: Path | None = None,
                dry_run: bool = False) -> list[Path]:
    """Execute the notebooks in order; stop at the first failure naming notebook and cell."""
    plan = resolve_parameters(load_profile(profile), notebooks())  # validate the whole profile
    if only:
        plan = {nb: p for nb, p in plan.items() if any(nb.stem.startswith(o) for o in only)}
        if not plan:
            raise OmnijetError(f"no notebook matches {only}")
    import papermill as pm  # slow to import: only once the profile is known to be valid

    out_dir = Path(out_dir or NOTEBOOKS / "executed")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for nb, params in plan.items():
        print(f"[{nb.stem}] {', '.join(f'{k}={v}' for k, v in params.items()) or 'defaults'}", flush=True)
        if dry_run:
            continue
        target = out_dir / nb.name
        t0 = time.time()
        try:
            pm.execute_notebook(str(nb), str(target), parameters=params, cwd=str(NOTEBOOKS),
                                kernel_name="python3", progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as err:
            src = err.source.strip().splitlines()[0][:60] if err.source and err.source.strip() else ""
            raise OmnijetError(f"{nb.name}: cell {_source_cell(nb, err.cell_index, bool(params))} failed "
                               f"({err.ename}: {_first_line(err.evalue)}) at `{src}`; "
                               f"executed copy: {target}") from None
        except Exception as err:  # kernel died, timeout, missing kernel, ...
            raise OmnijetError(f"{nb.name}: execution aborted ({type(err).__name__}: {_first_line(err)}); "
                               f"executed copy: {target}") from None
        print(f"[{nb.stem}] done in {time.time() - t0:.0f} s", flush=True)
        done.append(target)
    return done


def store_checked_outputs(executed: Path, source: Path) -> int:
    """Copy the outputs of ``# NBVAL_CHECK_OUTPUT`` cells from an executed notebook into its source
    (the reference nbval compares against); every other cell of the source stays output-free."""
    import nbformat

    run, src = nbformat.read(executed, 4), nbformat.read(source, 4)
    ran = [c for c in run.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    if len(ran) != len(src.cells):
        raise OmnijetError(f"{executed}: does not match {source} cell for cell")
    n = 0
    for a, b in zip(ran, src.cells):
        if b.cell_type != "code":
            continue
        b.outputs, b.execution_count = [], None
        if b.source.startswith("# NBVAL_CHECK_OUTPUT"):
            b.outputs = [o for o in a.outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"]
            b.execution_count = n = n + 1  # nbval ignores outputs of cells without a count
    with atomic_path(source) as tmp:
        nbformat.write(src, tmp)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="omnijet figures", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="ci", help="ci | quick | paper | path to a YAML file")
    ap.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 02_generation")
    ap.add_argument("--dry-run", action="store_true", help="validate the profile, run nothing")
    ap.add_argument("--store-checks", action="store_true",
                    help="afterwards, store the check-cell outputs in the source notebooks (maintainers, ci profile)")
    args = ap.parse_args(argv)
    try:
        done = run_figures(args.profile, args.only, dry_run=args.dry_run)
        if args.store_checks:
            for executed in done:
                store_checked_outputs(executed, NOTEBOOKS / executed.name)
    except OmnijetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
