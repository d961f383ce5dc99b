"""Synergistic Information Score (SIS) from probe scores (docs/reference.md#sis).

    SIS(Y; z1, z2) = (I(Y; z3) − max(I(Y; z1), I(Y; z2))) / max(I(Y; z1), I(Y; z2))

with z1 = the GEX embedding, z2 = the image embedding, z3 = a fused embedding, and the information
I(Y; z) approximated by the linear-probe score (macro-F1 for classification, R² for regression), exactly
as the reference does. The scores are averaged over all folds and seeds FIRST, then the ratio is taken
(reference ``compute_sis``). Negative SIS = the fused embedding is worse than the best unimodal one.
The ratio is undefined when the best unimodal mean is ≤ 0 (possible for R²); the reference leaves that
unhandled, here the table writes NaN with a note.

Output columns (:data:`SIS_COLUMNS`): ``dataset, method, task, metric, mean, sd, n, gex_mean, gex_sd,
img_mean, img_sd, best_unimodal, best_unimodal_mean, sis, note``; ``sd`` is ``np.std`` (ddof 0) over all
fold × seed values, ``n`` their count.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..io import setup_logging, json_arg

log = logging.getLogger(__name__)

SIS_COLUMNS = [
    "dataset", "method", "task", "metric", "mean", "sd", "n",
    "gex_mean", "gex_sd", "img_mean", "img_sd", "best_unimodal", "best_unimodal_mean", "sis", "note",
]
PROBE_KEYS = ["dataset", "embedding", "task", "metric", "value"]


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


def sis_table(
    probes: pd.DataFrame,
    methods: Sequence[str],
    gex_name: str = "unimodal_gex",
    img_name: str = "unimodal_img",
) -> pd.DataFrame:
    """SIS per dataset × method × task × metric from the collected probe table.

    ``probes``: long table of :mod:`workflow_scripts.evaluation.probes` (columns ``dataset, embedding, task, metric,
    value``, plus fold/seed), one row per fold × seed. ``methods``: embedding names to score (any names,
    e.g. the fused methods plus ``random`` as a sanity floor). The unimodal references are the embeddings
    ``gex_name`` and ``img_name``. Means are taken over all fold × seed values first, then the ratio
    (as in the reference, docs/reference.md#sis). Rows whose fused or unimodal scores are missing, or whose best unimodal mean is ≤ 0,
    get ``sis = NaN`` and a ``note``.

    Raises ValueError naming the missing columns, or an embedding name (method, ``gex_name``,
    ``img_name``) that has no row at all in ``probes``.
    """
    missing = [c for c in PROBE_KEYS if c not in probes.columns]
    if missing:
        raise ValueError(f"probe table lacks columns {missing} (expected the output of workflow_scripts.evaluation.probes)")
    present = set(probes["embedding"].astype(str))
    absent = [m for m in [*methods, gex_name, img_name] if m not in present]
    if absent:
        raise ValueError(f"probe table has no rows for embeddings {absent}; it holds {sorted(present)}")
    df = probes.copy()
    df["embedding"] = df["embedding"].astype(str)
    rows = []
    for (dataset, task, metric), g in df.groupby(["dataset", "task", "metric"], sort=True):
        by = {name: gg["value"] for name, gg in g.groupby("embedding")}
        gm, gs, _ = _stats(by.get(gex_name, pd.Series(dtype=float)))
        im, is_, _ = _stats(by.get(img_name, pd.Series(dtype=float)))
        for m in methods:
            mean, sd, n = _stats(by.get(m, pd.Series(dtype=float)))
            note, value, best, best_mean = "", np.nan, "", np.nan
            if not (np.isfinite(gm) and np.isfinite(im)):
                note = "unimodal scores missing: " + ", ".join(
                    x for x, v in ((gex_name, gm), (img_name, im)) if not np.isfinite(v))
            else:
                best = "gex" if gm >= im else "img"
                best_mean = max(gm, im)
                if n == 0:
                    note = f"no probe scores for {m}"
                else:
                    try:
                        value = sis(mean, gm, im)
                    except ValueError as e:
                        note = str(e)
            if note:
                log.warning("%s %s %s %s: SIS not computed (%s)", dataset, m, task, metric, note)
            rows.append(dict(dataset=dataset, method=m, task=task, metric=metric, mean=mean, sd=sd, n=n,
                             gex_mean=gm, gex_sd=gs, img_mean=im, img_sd=is_, best_unimodal=best,
                             best_unimodal_mean=best_mean, sis=value, note=note))
    out = pd.DataFrame(rows, columns=SIS_COLUMNS)
    log.info("SIS table: %d rows (%d methods, %d dataset×task×metric groups)", len(out), len(methods),
             out.groupby(["dataset", "task", "metric"]).ngroups if len(out) else 0)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m workflow_scripts.evaluation.sis --probes PROBES.tsv --methods JSON_LIST [--gex-name N]
    [--img-name N] --out SIS.tsv --log LOG``; writes :func:`sis_table` as TSV."""
    p = argparse.ArgumentParser(prog="python -m workflow_scripts.evaluation.sis", description=__doc__.split("\n")[0])
    p.add_argument("--probes", required=True, help="collected probe table (TSV)")
    p.add_argument("--methods", required=True, help='JSON list of embedding names, e.g. ["cca", "comm"]')
    p.add_argument("--gex-name", default="unimodal_gex")
    p.add_argument("--img-name", default="unimodal_img")
    p.add_argument("--out", required=True)
    p.add_argument("--log", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log)
    methods = json_arg(args.methods, "--methods")
    if not isinstance(methods, list):
        raise SystemExit(f"--methods must be a JSON list, got {args.methods!r}")
    path = Path(args.probes)
    if not path.exists():
        raise FileNotFoundError(f"probe table not found: {path} (run the rule that collects the probes first)")
    probes = pd.read_csv(path, sep="\t")
    out = sis_table(probes, [str(m) for m in methods], args.gex_name, args.img_name)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, sep="\t", index=False)
    log.info("wrote %d rows to %s", len(out), args.out)


if __name__ == "__main__":
    main()
