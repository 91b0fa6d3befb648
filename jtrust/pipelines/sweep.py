"""Sweeps split across workers: a config's grid expands into cells, each worker runs its share.

A sweep config (JSON):

    {"out": "runs/sweep",
     "analysis": "trace",                       # or a list in the grid: "analysis": [...]
     "base": {"model": "smollm2", "dims": ["toxicity"], "limit": 400},
     "grid": {"model": ["smollm2", "path/to/series"], "dims": [["toxicity"], ["fairness"]],
              "c": [0.1, 1.0]}}

`model` and `dims` (trace only) name what a cell analyses; every other key is a field of the
analysis' options dataclass (`TraceOptions`, `AttributeOptions`, `LfpOptions`, `DetoxOptions`).
The cells are the cartesian product of the grid over the base. Each cell has an id (a hash of its
canonical JSON) and belongs to worker `int(id, 16) % workers`, so N machines each run
`jtrust sweep --config F --worker i --workers N` on a shared directory and together cover every
cell once. A cell runs into `out/cells/<id>/run/` under the cell's lock and counts as done only
when `out/cells/<id>/result.json` is written (atomically) after the analysis returns: a killed
worker leaves no done cell behind, and rerunning it redoes only its unfinished cells (each
analysis resumes its own stages). `merge` writes `out/results.json` and `out/report.md` from the
done cells, and refuses while any cell is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import time
from typing import Callable

from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.core.options import from_config
from jtrust.pipelines.attribute import AttributeOptions, attribute
from jtrust.pipelines.detox import DetoxOptions, run_detox
from jtrust.pipelines.lfp import LfpOptions, run_lfp
from jtrust.pipelines.report import markdown, read_cells, say
from jtrust.pipelines.trace import TraceOptions, trace


def _trace(model, dims, out, options, progress):
    trace(model, dims, out, options, progress=progress)
    rows, steering = read_cells(out)
    return dict(rows=rows, steering=steering)


def _report_results(run: Callable) -> Callable:
    """The runner of a pipeline `run(model, out, options, progress=) -> report path` whose
    results.json lies beside its report."""
    def runner(model, dims, out, options, progress):
        return json.loads((run(model, out, options, progress=progress).parent / "results.json").read_text())
    return runner


# analysis -> run(model, dims, out_dir, options, progress) -> the cell's results (JSON-able)
RUNNERS: dict[str, Callable] = dict(trace=_trace, attribute=_report_results(attribute),
                                    lfp=_report_results(run_lfp), detox=_report_results(run_detox))
OPTIONS: dict[str, type] = dict(trace=TraceOptions, attribute=AttributeOptions, lfp=LfpOptions,
                                detox=DetoxOptions)
CELL_KEYS = ("analysis", "model", "dims")  # what a cell analyses; the other keys are options


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str  # 16 hex digits of the spec's sha256
    spec: dict  # analysis, model, dims (trace) and the options that differ from the defaults

    def worker(self, workers: int) -> int:
        return int(self.id, 16) % workers


def read_config(path: str | os.PathLike) -> dict:
    """The sweep config at `path` (a JSON object with "grid" and "out"; see the module doc)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"--config {path}: no such file (examples in experiments/configs/sweep_*.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("grid", {}), dict):
        raise InputError(f"--config {path}: expected an object with a \"grid\" object of lists")
    return config


def expand(config: dict) -> list[Cell]:
    """Every cell of the sweep, in the grid's order. Each cell's options are checked here (by
    the analysis' options dataclass), so a bad value stops the sweep before any cell runs."""
    base, grid = dict(config.get("base", {})), dict(config.get("grid", {}))
    if "analysis" in config:
        base.setdefault("analysis", config["analysis"])
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"sweep grid {name!r}: expected a non-empty list of values, got {values!r}")
    cells, seen = [], set()
    for combo in itertools.product(*grid.values()):
        spec = {**base, **dict(zip(grid, combo))}
        spec = _checked(spec)
        cell = Cell(store.text_hash(json.dumps(spec, sort_keys=True))[:16], spec)
        if cell.id not in seen:  # a grid repeating a value yields the same cell once
            seen.add(cell.id)
            cells.append(cell)
    if not cells:
        raise InputError("the sweep has no cells: give \"grid\" at least one option with values")
    return cells


def _checked(spec: dict) -> dict:
    """`spec` with its analysis, model and options validated (InputError naming the key)."""
    analysis = spec.get("analysis")
    if analysis not in RUNNERS:
        raise InputError(f"sweep analysis {analysis!r}: choose one of {sorted(RUNNERS)}")
    if not isinstance(spec.get("model"), (str, list)):
        raise InputError("every sweep cell needs a \"model\" (a checkpoint spec or a series) in base or grid")
    if analysis == "trace":
        dims = spec.get("dims")
        if isinstance(dims, str):
            spec = {**spec, "dims": [dims]}
        elif not (isinstance(dims, list) and dims and all(isinstance(d, str) for d in dims)):
            raise InputError("a trace sweep cell needs \"dims\": a dimension name or a list of them")
    elif "dims" in spec:
        raise InputError(f"\"dims\" applies to trace only, not to {analysis}")
    options = {k: v for k, v in spec.items() if k not in CELL_KEYS}
    from_config(OPTIONS[analysis], options)  # unknown names and bad values raise here
    return json.loads(json.dumps(spec))  # as it reads back from JSON (tuples become lists)


def options_of(cell: Cell):
    """The options dataclass of `cell`."""
    options = {k: v for k, v in cell.spec.items() if k not in CELL_KEYS}
    return from_config(OPTIONS[cell.spec["analysis"]], options)


def cell_dir(out: pathlib.Path, cell: Cell) -> pathlib.Path:
    return pathlib.Path(out) / "cells" / cell.id


def is_done(out: pathlib.Path, cell: Cell) -> bool:
    return store.read_cell(cell_dir(out, cell) / "result.json", cell.spec) is not None


def run_worker(config: dict, worker: int = 0, workers: int = 1, progress: bool = True,
               load: Callable | None = None) -> list[str]:
    """Run the cells of `config` that fall to `worker` of `workers` and are not done yet; a cell
    another process is running is skipped (that process finishes it). Returns the ids run here.

    load: model spec -> Model or Series (default `jtrust.io.loading.load`), cached per spec.
    """
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"--workers {workers}: give the number of workers, at least 1")
    if not isinstance(worker, int) or not 0 <= worker < workers:
        raise InputError(f"--worker {worker}: give an index in [0, {workers}) (Slurm: $SLURM_ARRAY_TASK_ID; "
                         "Kubernetes: $JOB_COMPLETION_INDEX)")
    out = _out(config)
    cells = [c for c in expand(config) if c.worker(workers) == worker]
    if load is None:
        from jtrust.io.loading import load
    models: dict[str, object] = {}
    ran = []
    for n, cell in enumerate(cells, 1):
        if is_done(out, cell):
            continue
        directory = cell_dir(out, cell)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(store.lock_dir(directory))
            except InputError:  # lock_dir's only InputError: another process holds the cell
                say(progress, f"sweep: cell {cell.id} is being run by another process; skipped")
                continue
            if is_done(out, cell):  # finished by another process while we waited
                continue
            say(progress, f"sweep: worker {worker}/{workers} cell {n}/{len(cells)} {cell.id} {_describe(cell.spec)}")
            key = json.dumps(cell.spec["model"])
            if key not in models:
                models[key] = load(cell.spec["model"])
            t = time.perf_counter()
            results = RUNNERS[cell.spec["analysis"]](models[key], cell.spec.get("dims"), directory / "run",
                                                     options_of(cell), progress)
            store.write_cell(directory / "result.json", cell.spec, dict(results=results, seconds=time.perf_counter() - t))
            ran.append(cell.id)
    return ran


def merge(config: dict) -> pathlib.Path:
    """Write out/results.json and out/report.md from every cell; InputError if any is not done."""
    out = _out(config)
    cells = expand(config)
    missing = [c for c in cells if not is_done(out, c)]
    if missing:
        raise InputError(f"{len(missing)} of {len(cells)} sweep cells are not done "
                         f"({', '.join(c.id for c in missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                         "run the workers again (`jtrust sweep --config ... --worker i --workers N`) "
                         "or once with --workers 1")
    merged = [dict(id=c.id, cell=c.spec, **store.read_cell(cell_dir(out, c) / "result.json", c.spec))
              for c in cells]
    store.write_json(out / "results.json", dict(cells=merged))
    varying = list(config.get("grid", {}))
    page = [("h1", "Sweep"),
            ("p", f"{len(cells)} cells over {', '.join(varying) or 'no grid'}; each cell's own report is "
                  "under `cells/<id>/run/`."),
            ("table", ["cell", *varying, "summary", "seconds"],
             [[f"[{m['id']}](cells/{m['id']}/run/)", *[_short(m["cell"].get(k)) for k in varying],
               _summary(m["cell"]["analysis"], m["results"]), f"{m['seconds']:.0f}"] for m in merged])]
    report = out / "report.md"
    store.write_text(report, markdown(page))
    return report


def _out(config: dict) -> pathlib.Path:
    if "out" not in config:
        raise InputError("the sweep config needs \"out\": the directory every worker shares")
    return pathlib.Path(config["out"])


def _describe(spec: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in spec.items())


def _short(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _summary(analysis: str, results: dict) -> str:
    """One line per cell: the best probe layer per dimension for trace, else the results' keys."""
    if analysis == "trace":
        best = {}
        for r in results["rows"]:
            if r["dimension"] not in best or r["accuracy"] > best[r["dimension"]]["accuracy"]:
                best[r["dimension"]] = r
        return "; ".join(f"{d}: {r['checkpoint']} layer {r['layer']} accuracy {r['accuracy']:.3f}"
                         for d, r in best.items())
    return ", ".join(sorted(results))[:120]
