"""The validation table of a synthetic dataset: every expectation of ``docs/synthetic.md#expectations`` as a row.

Each row is one check: a quantity of one task (and embedding), its planted value where there is one, the estimate,
an interval where one is given, the expectation in words and whether it holds. Three kinds of rows:

* ``pid``: planted vs estimated BROJA term (redundancy, unique_gex, unique_img, synergy; bits) of the unimodal pair;
  holds when |estimate − planted| ≤ ``tol_bits``.
* ``gain``: absolute gain of concat (and every other fused embedding; not the controls) over the best unimodal
  score, on a task whose planted synergy is ~0 (< ``zero_bits``); expected within noise: the interval contains 0
  when an interval is given, else |gain| ≤ ``tol_gain``.
* ``chance``: the chance-corrected score (:mod:`workflow_scripts.evaluation.scores`; R² as is) of the unimodal
  embeddings, concat and tensor_fusion on a task whose planted information is mostly synergy (≥ 50 % of I(Y; X1,
  X2)): unimodal and concat at chance (|score| ≤ ``tol_chance``), tensor_fusion well above (≥ ``min_control``).

Also reported on every ``gain`` / ``chance`` row: the fused and best unimodal means and the SIS (NaN where the best
unimodal score is ≤ 0). Intervals come from a callable; the CLI uses the paired bootstrap over (seed, fold) cells of
the SIS table (:func:`bootstrap_gain_interval`); without one the ``lower``/``upper`` columns are NaN. Only one
protocol is scored (the transductive one when the probe table holds several, :func:`one_protocol`).
"""

from __future__ import annotations

import argparse
import logging
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .pid import PAIR, PID_TERMS
from .controls import parse_control_name
from .scores import absolute_gain, chance_corrected

log = logging.getLogger(__name__)

VALIDATION_COLUMNS = [
    "dataset", "check", "task", "embedding", "quantity", "unit", "planted", "estimate", "lower", "upper",
    "fused_mean", "best_unimodal_mean", "sis", "expected", "holds",
]
VALIDATION_DEFAULTS = {"tol_bits": 0.15, "zero_bits": 0.05, "tol_gain": 0.03, "tol_chance": 0.1,
                       "min_control": 0.5, "synergy_share": 0.5}
UNIMODAL = ("unimodal_gex", "unimodal_img")

#: interval(values_by_embedding, fused, task) -> (lower, upper) of the gain; values are fold-paired per embedding
IntervalFn = Callable[[pd.DataFrame, str, str], tuple[float, float]]


def pid_rows(truth: pd.DataFrame, pid: pd.DataFrame, tol_bits: float) -> list[dict]:
    """Planted vs estimated PID terms per task (``pid`` rows of the module docstring)."""
    est = pid[pid["embedding"] == PAIR].set_index("task")
    rows = []
    for _, t in truth.iterrows():
        if t["task"] not in est.index:
            log.warning("task %s: no PID estimate (skipped by the PID rule?)", t["task"])
            continue
        e = est.loc[t["task"]]
        for term in (*PID_TERMS, "i_joint"):
            err = float(e[term]) - float(t[term])
            rows.append(dict(dataset=t["dataset"], check="pid", task=t["task"], embedding=PAIR, quantity=term,
                             unit="bits", planted=float(t[term]), estimate=float(e[term]),
                             expected=f"|estimate - planted| <= {tol_bits:g} bits", holds=bool(abs(err) <= tol_bits)))
    return rows


def one_protocol(probes: pd.DataFrame, protocol: str = "transductive") -> pd.DataFrame:
    """The rows of one evaluation protocol (``protocol`` if present, else the first), so that (seed, fold) cells
    of different protocols are never paired; tables without a ``protocol`` column are returned as they are."""
    if "protocol" not in probes.columns:
        return probes
    present = list(dict.fromkeys(probes["protocol"].astype(str)))
    chosen = protocol if protocol in present else present[0]
    if len(present) > 1:
        log.info("validation: scoring the %s protocol (the probe table holds %s)", chosen, present)
    return probes[probes["protocol"].astype(str) == chosen]


def bootstrap_gain_interval(n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> IntervalFn:
    """An :data:`IntervalFn`: the paired bootstrap interval of the gain over the best unimodal embedding, each
    (seed, fold) cell a unit (:mod:`workflow_scripts.evaluation.bootstrap`, as in the SIS table)."""
    from .bootstrap import bootstrap_means, gain, percentile_interval

    def interval(m: pd.DataFrame, fused: str, task: str) -> tuple[float, float]:
        v = m[[fused, *UNIMODAL]].dropna()
        if len(v) < 2:
            return np.nan, np.nan
        units = [f"{a}:{b}" for a, b in v.index]
        boot = bootstrap_means(v.to_numpy(float), units, n_boot, [int(seed), zlib.crc32(f"{task}|{fused}".encode())])
        return percentile_interval(gain(boot, 0, [1, 2]), level)

    return interval


def score_matrix(probes: pd.DataFrame, task: str, metric: str) -> pd.DataFrame:
    """Fold-level scores of one task as a (seed, fold) × embedding table (paired rows)."""
    sub = probes[(probes["task"] == task) & (probes["metric"] == metric)]
    return sub.pivot_table(index=["seed", "fold"], columns="embedding", values="value", aggfunc="first")


def validation_table(
    truth: pd.DataFrame,
    pid: pd.DataFrame,
    probes: pd.DataFrame,
    chance: Mapping[str, float] | None = None,
    interval: IntervalFn | None = None,
    params: Mapping | None = None,
) -> pd.DataFrame:
    """Build the validation table (module docstring).

    Parameters
    ----------
    truth : planted PID (:func:`workflow_scripts.evaluation.pid.pid_truth_table`), one row per task.
    pid : estimated PID table (:func:`workflow_scripts.evaluation.pid.pid_table`).
    probes : collected fold-level probe table (columns ``dataset, embedding, seed, task, metric, fold, value``).
    chance : {task: chance level of its metric} (macro-F1 of a stratified random classifier,
        :func:`workflow_scripts.evaluation.scores.expected_macro_f1`); missing tasks use 0 (right for R²).
    interval : optional callable giving the (lower, upper) interval of a fused embedding's gain from the paired
        score matrix (:func:`score_matrix`).
    params : :data:`VALIDATION_DEFAULTS` overrides.

    Returns the table with :data:`VALIDATION_COLUMNS`. Raises ValueError for unknown params or missing columns.
    """
    p = {**VALIDATION_DEFAULTS, **dict(params or {})}
    unknown = sorted(set(p) - set(VALIDATION_DEFAULTS))
    if unknown:
        raise ValueError(f"validation: unknown parameter(s) {unknown}; allowed: {sorted(VALIDATION_DEFAULTS)}")
    need = {"dataset", "embedding", "seed", "task", "metric", "fold", "value"}
    if need - set(probes.columns):
        raise ValueError(f"probe table lacks columns {sorted(need - set(probes.columns))}")
    probes = one_protocol(probes)
    chance = dict(chance or {})
    rows = pid_rows(truth, pid, float(p["tol_bits"]))
    dataset = str(truth["dataset"].iloc[0]) if len(truth) else ""
    for _, t in truth.iterrows():
        task = t["task"]
        metrics = probes.loc[probes["task"] == task, "metric"].unique()
        if len(metrics) == 0:
            log.warning("task %s: no probe scores", task)
            continue
        metric = str(metrics[0])
        m = score_matrix(probes, task, metric)
        if not set(UNIMODAL) <= set(m.columns):
            log.warning("task %s: unimodal scores missing; no gain rows", task)
            continue
        means = m.mean()
        gex, img = float(means["unimodal_gex"]), float(means["unimodal_img"])
        best = max(gex, img)
        c = float(chance.get(task, 0.0))
        # the fused embeddings; the dimension-matched controls (control_<kind>@<method>) are probe references, and a
        # control of one modality cannot hold the other's unique information, so they get no gain row
        fused = [e for e in m.columns if e not in (*UNIMODAL, "random") and parse_control_name(e) is None]
        synergistic = float(t["i_joint"]) > 0 and float(t["synergy"]) >= float(p["synergy_share"]) * float(t["i_joint"])
        base = dict(dataset=dataset, task=task, planted=np.nan, lower=np.nan, upper=np.nan)
        if float(t["synergy"]) < float(p["zero_bits"]):
            for e in fused:
                gain = absolute_gain(float(means[e]), gex, img)
                lo, hi = interval(m, e, task) if interval is not None else (np.nan, np.nan)
                if np.isfinite(lo) and np.isfinite(hi):
                    expected, holds = "gain interval contains 0", bool(lo <= 0 <= hi)
                else:
                    expected, holds = f"|gain| <= {p['tol_gain']:g}", bool(abs(gain) <= float(p["tol_gain"]))
                rows.append(dict(base, check="gain", embedding=e, quantity="gain", unit=metric, estimate=gain,
                                 lower=lo, upper=hi, fused_mean=float(means[e]), best_unimodal_mean=best,
                                 sis=(float(means[e]) - best) / best if best > 0 else np.nan,
                                 expected=expected, holds=holds))
        if synergistic:
            for e in [*UNIMODAL, "concat", "tensor_fusion"]:
                if e not in m.columns:
                    continue
                cc = float(chance_corrected(float(means[e]), c))
                if e == "tensor_fusion":
                    expected, holds = f"well above chance (>= {p['min_control']:g})", cc >= float(p["min_control"])
                else:
                    expected, holds = f"at chance (|score| <= {p['tol_chance']:g})", abs(cc) <= float(p["tol_chance"])
                rows.append(dict(base, check="chance", embedding=e, quantity=f"chance_corrected_{metric}",
                                 unit=metric, planted=0.0 if e != "tensor_fusion" else np.nan, estimate=cc,
                                 fused_mean=float(means[e]), best_unimodal_mean=best,
                                 sis=(float(means[e]) - best) / best if best > 0 else np.nan,
                                 expected=expected, holds=bool(holds)))
    out = pd.DataFrame(rows, columns=VALIDATION_COLUMNS)
    n_fail = int((~out["holds"].astype(bool)).sum()) if len(out) else 0
    log.info("validation: %d checks, %d hold, %d do not", len(out), len(out) - n_fail, n_fail)
    return out


def chance_levels(adata, tasks: Mapping[str, Mapping], probe_params: Mapping, seed: int,
                  min_class_size: int = 10) -> dict[str, float]:
    """Chance macro-F1 of every classification task: the mean over the probe's folds (the same
    :func:`workflow_scripts.evaluation.probes.cv_splits`) of :func:`expected_macro_f1_from_labels`."""
    from .probes import cv_splits, task_targets
    from .scores import expected_macro_f1_from_labels

    out = {}
    for task, spec in tasks.items():
        if spec.get("type") != "classification":
            continue
        y = task_targets(adata, task, spec, min_class_size)
        if y is None:
            continue
        groups = adata.obs.loc[y.index, "slide"].astype(str).to_numpy()
        yv = y.to_numpy()
        vals = [expected_macro_f1_from_labels(yv[tr], yv[te]) for tr, te in cv_splits(len(yv), groups, probe_params,
                                                                                      seed, what=f"task {task}")]
        if vals:
            out[task] = float(np.mean(vals))
            log.info("task %s: chance macro-F1 %.4f (stratified random classifier, mean over %d folds)", task,
                     out[task], len(vals))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.validation --truth T.tsv --pid P.tsv --probes PROBES.tsv
    --spots spots.h5ad --tasks JSON --probe-params JSON [--min-class-size N] --out V.tsv --log LOG``."""
    from ..io import json_arg, setup_logging
    from .probes import read_spots

    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.evaluation.validation",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--truth", required=True)
    ap.add_argument("--pid", required=True)
    ap.add_argument("--probes", required=True)
    ap.add_argument("--spots", required=True)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--probe-params", required=True)
    ap.add_argument("--min-class-size", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    setup_logging(a.log)
    tables = {}
    for name in ("truth", "pid", "probes"):
        path = Path(getattr(a, name))
        if not path.exists():
            raise FileNotFoundError(f"--{name} table not found: {path}")
        tables[name] = pd.read_csv(path, sep="\t")
    probes = one_protocol(tables["probes"])
    adata = read_spots(a.spots)
    probe_params = json_arg(a.probe_params, "--probe-params")
    per_seed: dict[str, list[float]] = {}
    for seed in sorted(probes["seed"].unique()):
        for task, v in chance_levels(adata, json_arg(a.tasks, "--tasks"), probe_params, int(seed),
                                     a.min_class_size).items():
            per_seed.setdefault(task, []).append(v)
    chance = {t: float(np.mean(v)) for t, v in per_seed.items()}
    out = validation_table(tables["truth"], tables["pid"], probes, chance, interval=bootstrap_gain_interval())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(a.out, sep="\t", index=False)
    log.info("wrote %d rows to %s", len(out), a.out)


if __name__ == "__main__":
    main()
