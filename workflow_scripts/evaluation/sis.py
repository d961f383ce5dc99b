"""Synergistic Information Score (SIS), gains and their confidence intervals from probe scores.

    SIS(Y; z1, z2) = (I(Y; z3) − max(I(Y; z1), I(Y; z2))) / max(I(Y; z1), I(Y; z2))

with z1 = the GEX embedding, z2 = the image embedding, z3 = a fused embedding, and the information I(Y; z)
approximated by the linear-probe score (macro-F1 for classification, R² for regression), as the paper and the
reference do (Richter et al. 2026, doi:10.64898/2026.02.23.707420; docs/reference.md#sis). The scores are
averaged over all folds and seeds FIRST, then the ratio is taken (reference ``compute_sis``). The ratio is
undefined when the best unimodal mean is ≤ 0 (possible for R²); the table then writes NaN with a note.

Added to the paper's SIS, per protocol, method, task and metric (docs/evaluation.md#reading-the-sis-table):

* ``gain`` = mean(fused) − max(mean(GEX), mean(IMG)), in the probe metric's units;
* the same gain and SIS against the best dimension-matched control (``best_control``: the control of this method,
  ``control_<kind>@<method>``, with the highest mean score; :mod:`workflow_scripts.evaluation.controls`);
* a 95 % interval for the mean score, every gain and every SIS from a paired cluster bootstrap over the
  (seed, fold) cells that all compared embeddings share (:mod:`workflow_scripts.evaluation.bootstrap`; units =
  the ``unit`` column of the probe table: one cell, or all cells that hold out the same donors), the ratio
  recomputed in each resample with the best reference re-chosen there, and ``*_excludes_0`` (True / False; empty
  when the interval is undefined).

Output columns (:data:`SIS_COLUMNS`); ``sd`` is ``np.std`` (ddof 0) over all fold × seed values, ``n`` their
count, ``n_units`` the bootstrap units. The protocol comparison (:func:`protocols_table`, :data:`PROTOCOL_COLUMNS`)
puts the protocols of each method and task side by side and adds the unimodal baselines' scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..io import json_arg, setup_logging
from .bootstrap import bootstrap_means, excludes_zero, gain, percentile_interval, sis_ratio
from .controls import CONTROL_KINDS, control_name

log = logging.getLogger(__name__)

SIS_COLUMNS = [
    "dataset", "protocol", "method", "task", "metric", "protocol_note",
    "mean", "mean_lo", "mean_hi", "sd", "n", "n_units",
    "gex_mean", "gex_sd", "img_mean", "img_sd", "best_unimodal", "best_unimodal_mean",
    "gain", "gain_lo", "gain_hi", "gain_excludes_0",
    "sis", "sis_lo", "sis_hi", "sis_excludes_0",
    "best_control", "best_control_mean",
    "gain_ctrl", "gain_ctrl_lo", "gain_ctrl_hi", "gain_ctrl_excludes_0",
    "sis_ctrl", "sis_ctrl_lo", "sis_ctrl_hi", "sis_ctrl_excludes_0",
    "chance", "mean_cc", "best_unimodal_cc", "gain_cc", "gain_cc_lo", "gain_cc_hi",
    "note",
]
PROTOCOL_COLUMNS = [
    "dataset", "task", "metric", "method", "protocol", "protocol_note", "score", "score_lo", "score_hi",
    "gain", "gain_lo", "gain_hi", "sis", "sis_lo", "sis_hi", "excludes_0",
    "best_control", "gain_ctrl", "gain_ctrl_lo", "gain_ctrl_hi", "ctrl_excludes_0", "n_units",
]
PROBE_KEYS = ["dataset", "embedding", "task", "metric", "value"]
DEFAULT_PROTOCOL = "transductive"
SCHEME_NOTES = {
    "kfold": "interface trained on all spots; KFold over the task's spots (paper protocol)",
    "group_slide": "interface trained on all spots; folds grouped by slide",
    "donor": "interface and probe fit on training donors, scored on held-out donors",
    "spatial_block": "spatial blocks with a buffer; interface trained without the held-out spots",
}


def sis(fused: float, gex: float, img: float) -> float:
    """SIS = (fused − max(gex, img)) / max(gex, img) (docs/reference.md#sis; scores are mean probe scores).

    Raises ValueError when ``max(gex, img) <= 0`` (ratio undefined) or a score is not finite.
    """
    vals = np.array([fused, gex, img], dtype=float)
    if not np.isfinite(vals).all():
        raise ValueError(f"SIS needs finite scores, got fused={fused}, gex={gex}, img={img}")
    best = max(gex, img)
    if best <= 0:
        raise ValueError(f"SIS undefined: best unimodal score {best:.4g} <= 0")
    return float((fused - best) / best)


def _stats(v: pd.Series) -> tuple[float, float, int]:
    v = v.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return np.nan, np.nan, 0
    return float(np.mean(v)), float(np.std(v)), int(len(v))


def _prepare(probes: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in PROBE_KEYS if c not in probes.columns]
    if missing:
        raise ValueError(f"probe table lacks columns {missing} (expected the output of workflow_scripts.evaluation.probes)")
    df = probes.copy()
    df["embedding"] = df["embedding"].astype(str)
    if "protocol" not in df.columns:
        df["protocol"] = DEFAULT_PROTOCOL
    seed = df["seed"].astype(str) if "seed" in df.columns else "0"
    fold = df["fold"].astype(str) if "fold" in df.columns else pd.Series(np.arange(len(df)), index=df.index).astype(str)
    df["_cell"] = "s" + seed + ":f" + fold
    if "unit" not in df.columns:
        df["unit"] = df["_cell"]
    df["unit"] = df["unit"].astype(str)
    return df


def _group_seed(seed: int, *keys) -> list[int]:
    return [int(seed), zlib.crc32("|".join(map(str, keys)).encode())]


def _interval(samples: np.ndarray, level: float) -> tuple[float, float, bool | None]:
    lo, hi = percentile_interval(samples, level)
    return lo, hi, excludes_zero(lo, hi)


def _paired(by: Mapping[str, pd.DataFrame], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``names`` on the cells all of them share, and each cell's unit."""
    frames = [by[n].set_index("_cell") for n in names]
    common = frames[0].index
    for f in frames[1:]:
        common = common.intersection(f.index, sort=True)
    if len(common) == 0:
        return np.zeros((0, len(names))), np.zeros(0, dtype=str)
    vals = np.column_stack([f.loc[common, "value"].to_numpy(float) for f in frames])
    ok = np.isfinite(vals).all(axis=1)
    return vals[ok], frames[0].loc[common, "unit"].to_numpy(str)[ok]


def _chance_corrected(r: dict, rows: pd.DataFrame, metric: str) -> None:
    """Add the chance level and the chance-corrected scores to one SIS row (in place).

    ``chance``: the mean over the method's folds of the probe table's ``chance`` column (the expected macro-F1 of a
    stratified random classifier on each fold; 0 for R², and when the column is absent, for macro-F1 NaN).
    ``mean_cc`` = (mean − chance) / (1 − chance), likewise ``best_unimodal_cc`` (Cohen's kappa normalisation;
    :func:`workflow_scripts.evaluation.scores.chance_corrected`), and ``gain_cc`` = their difference = gain /
    (1 − chance), whose interval is the gain's interval divided by (1 − chance). The folds are shared, so the
    chance level is that of every compared embedding.
    """
    from .scores import chance_corrected

    if metric.startswith("r2"):
        chance = 0.0
    elif "chance" in rows.columns and rows["chance"].notna().any():
        chance = float(rows["chance"].astype(float).mean())
    else:
        chance = np.nan
    r["chance"] = chance
    r["mean_cc"] = chance_corrected(r.get("mean", np.nan), chance)
    r["best_unimodal_cc"] = chance_corrected(r.get("best_unimodal_mean", np.nan), chance)
    r["gain_cc"] = r["mean_cc"] - r["best_unimodal_cc"]
    scale = 1.0 / (1.0 - chance) if np.isfinite(chance) and chance < 1 else np.nan
    r["gain_cc_lo"] = r.get("gain_lo", np.nan) * scale
    r["gain_cc_hi"] = r.get("gain_hi", np.nan) * scale


def sis_table(
    probes: pd.DataFrame,
    methods: Sequence[str],
    gex_name: str = "unimodal_gex",
    img_name: str = "unimodal_img",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    notes: Mapping[tuple[str, str], str] | None = None,
) -> pd.DataFrame:
    """SIS, gains and intervals per dataset × protocol × method × task × metric from the collected probe table.

    Parameters
    ----------
    probes : long table of :mod:`workflow_scripts.evaluation.probes` (columns ``dataset, embedding, task, metric,
        value``, and ``protocol, seed, fold, unit`` when present), one row per embedding × seed × fold; the
        controls of method m are the embeddings ``control_<kind>@m``.
    methods : embedding names to score (the fused methods, plus e.g. ``random`` as a floor).
    gex_name, img_name : the unimodal references.
    n_boot, seed, level : bootstrap resamples, seed (combined with the group's names, so each row is reproducible
        alone) and interval level.
    notes : ``{(protocol, task): note}`` written in ``protocol_note`` (default: one sentence per fold scheme).

    Returns
    -------
    DataFrame with :data:`SIS_COLUMNS`. Means are over all fold × seed values (paper's SIS); intervals come from
    the cells every compared embedding was scored on. Rows whose scores are missing, or whose best unimodal mean is
    ≤ 0, get NaN and a ``note``.

    Raises
    ------
    ValueError naming missing columns, or an embedding (method, ``gex_name``, ``img_name``) with no row at all.
    """
    df = _prepare(probes)
    present = set(df["embedding"])
    absent = [m for m in [*methods, gex_name, img_name] if m not in present]
    if absent:
        raise ValueError(f"probe table has no rows for embeddings {absent}; it holds {sorted(present)}")
    rows = []
    for (dataset, protocol, task, metric), g in df.groupby(["dataset", "protocol", "task", "metric"], sort=True):
        by = {name: gg for name, gg in g.groupby("embedding")}
        empty = g.iloc[:0]
        gm, gs, _ = _stats(by.get(gex_name, empty)["value"])
        im, is_, _ = _stats(by.get(img_name, empty)["value"])
        scheme = str(g["scheme"].iloc[0]) if "scheme" in g.columns else "kfold"
        pnote = (notes or {}).get((protocol, task)) or SCHEME_NOTES.get(scheme, scheme)
        rseed = _group_seed(seed, dataset, protocol, task, metric)
        for m in methods:
            mean, sd, n = _stats(by.get(m, empty)["value"])
            r = dict(dataset=dataset, protocol=protocol, method=m, task=task, metric=metric, protocol_note=pnote,
                     mean=mean, sd=sd, n=n, gex_mean=gm, gex_sd=gs, img_mean=im, img_sd=is_, best_unimodal="",
                     best_unimodal_mean=np.nan, sis=np.nan, best_control="", note="")
            notes_m = []
            if not (np.isfinite(gm) and np.isfinite(im)):
                notes_m.append("unimodal scores missing: " + ", ".join(
                    x for x, v in ((gex_name, gm), (img_name, im)) if not np.isfinite(v)))
            elif n == 0:
                r.update(best_unimodal="gex" if gm >= im else "img", best_unimodal_mean=max(gm, im))
                notes_m.append(f"no probe scores for {m}")
            else:
                r.update(best_unimodal="gex" if gm >= im else "img", best_unimodal_mean=max(gm, im))
                try:
                    r["sis"] = sis(mean, gm, im)
                except ValueError as e:
                    notes_m.append(str(e))
                vals, units = _paired(by, [m, gex_name, img_name])
                if len(vals):
                    boot = bootstrap_means(vals, units, n_boot, rseed)
                    r["n_units"] = len(set(units))
                    r["mean_lo"], r["mean_hi"], _ = _interval(boot[:, 0], level)
                    r["gain"] = mean - max(gm, im)
                    r["gain_lo"], r["gain_hi"], r["gain_excludes_0"] = _interval(gain(boot, 0, [1, 2]), level)
                    r["sis_lo"], r["sis_hi"], r["sis_excludes_0"] = _interval(sis_ratio(boot, 0, [1, 2]), level)
                ctrls = [control_name(k, m) for k in CONTROL_KINDS if control_name(k, m) in by]
                if ctrls:
                    cmeans = {c: _stats(by[c]["value"])[0] for c in ctrls}
                    best = max(ctrls, key=lambda c: (cmeans[c], c))
                    r.update(best_control=best, best_control_mean=cmeans[best])
                    cvals, cunits = _paired(by, [m, *ctrls])
                    if len(cvals):
                        cboot = bootstrap_means(cvals, cunits, n_boot, rseed)
                        refs = list(range(1, len(ctrls) + 1))
                        r["gain_ctrl"] = mean - cmeans[best]
                        r["sis_ctrl"] = r["gain_ctrl"] / cmeans[best] if cmeans[best] > 0 else np.nan
                        r["gain_ctrl_lo"], r["gain_ctrl_hi"], r["gain_ctrl_excludes_0"] = _interval(
                            gain(cboot, 0, refs), level)
                        r["sis_ctrl_lo"], r["sis_ctrl_hi"], r["sis_ctrl_excludes_0"] = _interval(
                            sis_ratio(cboot, 0, refs), level)
            _chance_corrected(r, by.get(m, empty), metric)
            if notes_m:
                r["note"] = "; ".join(notes_m)
                log.warning("%s %s %s %s %s: SIS not computed (%s)", dataset, protocol, m, task, metric, r["note"])
            rows.append(r)
    out = pd.DataFrame(rows).reindex(columns=SIS_COLUMNS)
    for c in [c for c in SIS_COLUMNS if c.endswith("_excludes_0")]:
        out[c] = out[c].astype(object).where(out[c].notna(), None)
    log.info("SIS table: %d rows (%d methods, %d protocol × task × metric groups, %d bootstrap resamples, level %g)",
             len(out), len(methods), out.groupby(["dataset", "protocol", "task", "metric"]).ngroups if len(out) else 0,
             n_boot, level)
    return out


def score_intervals(probes: pd.DataFrame, embeddings: Sequence[str], n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> pd.DataFrame:
    """Mean score and its bootstrap interval per dataset × protocol × embedding × task × metric.

    ``probes``: as for :func:`sis_table`; ``embeddings``: names to summarise (absent ones are skipped). Returns
    columns ``dataset, protocol, embedding, task, metric, mean, lo, hi, n, n_units`` (cluster bootstrap over the
    embedding's own cells, :mod:`workflow_scripts.evaluation.bootstrap`).
    """
    df = _prepare(probes)
    df = df[df["embedding"].isin(list(embeddings))].dropna(subset=["value"])
    rows = []
    for (dataset, protocol, emb, task, metric), g in df.groupby(["dataset", "protocol", "embedding", "task", "metric"],
                                                                sort=True):
        vals = g["value"].to_numpy(float)[:, None]
        boot = bootstrap_means(vals, g["unit"].to_numpy(str), n_boot,
                               _group_seed(seed, dataset, protocol, task, metric, emb))
        lo, hi = percentile_interval(boot[:, 0], level)
        rows.append(dict(dataset=dataset, protocol=protocol, embedding=emb, task=task, metric=metric,
                         mean=float(vals.mean()), lo=lo, hi=hi, n=len(vals), n_units=g["unit"].nunique()))
    return pd.DataFrame(rows, columns=["dataset", "protocol", "embedding", "task", "metric", "mean", "lo", "hi", "n",
                                       "n_units"])


def protocols_table(sis_df: pd.DataFrame, probes: pd.DataFrame, baselines: Sequence[str] = ("unimodal_gex",
                    "unimodal_img"), n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """The protocols side by side: one row per method (and unimodal baseline) × task × protocol.

    ``sis_df``: the output of :func:`sis_table`; ``probes``: the probe table (for the baselines' scores). Columns
    :data:`PROTOCOL_COLUMNS`: ``score`` (mean) with its interval, the gain and SIS against the best unimodal
    embedding with intervals, ``excludes_0`` (of the gain interval), and the gain over the best control. Baseline
    rows carry their score only. Sorted by dataset, task, metric, method, protocol.
    """
    s = sis_df.rename(columns={"mean": "score", "mean_lo": "score_lo", "mean_hi": "score_hi",
                               "gain_excludes_0": "excludes_0", "gain_ctrl_excludes_0": "ctrl_excludes_0"})
    parts = [s.reindex(columns=PROTOCOL_COLUMNS)]
    notes = sis_df.drop_duplicates(["dataset", "protocol", "task"]).set_index(["dataset", "protocol", "task"])[
        "protocol_note"].to_dict() if len(sis_df) else {}
    b = score_intervals(probes, baselines, n_boot, seed, level)
    if len(b):
        b = b.rename(columns={"embedding": "method", "mean": "score", "lo": "score_lo", "hi": "score_hi"})
        b["protocol_note"] = [notes.get(k, "") for k in zip(b["dataset"], b["protocol"], b["task"])]
        parts.append(b.reindex(columns=PROTOCOL_COLUMNS))
    out = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else parts[0]
    order = {p: i for i, p in enumerate(["transductive", "inductive"])}
    out = out.assign(_p=out["protocol"].map(lambda p: order.get(p, 9)))
    return out.sort_values(["dataset", "task", "metric", "method", "_p"], kind="stable").drop(columns="_p") \
        .reset_index(drop=True)


def read_notes(paths: Sequence[str | Path]) -> dict[tuple[str, str], str]:
    """``{(protocol, task): note}`` from fold side files (``results/<d>/folds/<protocol>/seed<s>.json``; the first
    file of a protocol that names a task wins). FileNotFoundError naming a missing file."""
    out: dict[tuple[str, str], str] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"fold side file not found: {p} (run the `folds` rule)")
        meta = json.loads(p.read_text())
        for task, tm in (meta.get("tasks") or {}).items():
            out.setdefault((meta.get("protocol", DEFAULT_PROTOCOL), task), tm.get("note", ""))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.sis --probes PROBES.tsv --methods JSON_LIST [--gex-name N]
    [--img-name N] [--bootstrap JSON] [--folds-meta F.json ...] --out SIS.tsv [--protocols-out PROTOCOLS.tsv]
    --log LOG``; writes :func:`sis_table` (and :func:`protocols_table`) as TSV. ``--bootstrap``:
    ``{"n_boot": 2000, "level": 0.95, "seed": 0}`` (``config: bootstrap``)."""
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.evaluation.sis", description=__doc__.split("\n")[0])
    p.add_argument("--probes", required=True, help="collected probe table (TSV)")
    p.add_argument("--methods", required=True, help='JSON list of embedding names, e.g. ["cca", "comm"]')
    p.add_argument("--gex-name", default="unimodal_gex")
    p.add_argument("--img-name", default="unimodal_img")
    p.add_argument("--bootstrap", default="{}", help='JSON {"n_boot", "level", "seed"}')
    p.add_argument("--folds-meta", nargs="*", default=[], help="fold side files (.json) whose notes to use")
    p.add_argument("--out", required=True)
    p.add_argument("--protocols-out", default=None)
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log)
    methods = json_arg(args.methods, "--methods")
    if not isinstance(methods, list):
        raise SystemExit(f"--methods must be a JSON list, got {args.methods!r}")
    bs = json_arg(args.bootstrap, "--bootstrap") or {}
    kw = dict(n_boot=int(bs.get("n_boot", 2000)), seed=int(bs.get("seed", 0)), level=float(bs.get("level", 0.95)))
    path = Path(args.probes)
    if not path.exists():
        raise FileNotFoundError(f"probe table not found: {path} (run the rule that collects the probes first)")
    probes = pd.read_csv(path, sep="\t")
    out = sis_table(probes, [str(m) for m in methods], args.gex_name, args.img_name,
                    notes=read_notes(args.folds_meta), **kw)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, sep="\t", index=False)
    log.info("wrote %d rows to %s", len(out), args.out)
    if args.protocols_out:
        prot = protocols_table(out, probes, (args.gex_name, args.img_name), **kw)
        Path(args.protocols_out).parent.mkdir(parents=True, exist_ok=True)
        prot.to_csv(args.protocols_out, sep="\t", index=False)
        log.info("wrote %d rows to %s", len(prot), args.protocols_out)


if __name__ == "__main__":
    main()
