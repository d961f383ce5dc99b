"""Train one fusion method (or make the random baseline) and write Z3, the model state and the training history.

Usage::

    python -m workflow_scripts.methods.align --method M --gex GEX.parquet --img IMG.parquet --seed S \
        --params '{"batch_size": 32, ...}' --out Z3.parquet --model MODEL.pt --history HIST.tsv \
        [--views VIEWS.npz] [--fit-spots SPOTS.tsv] [--device auto] [--threads N] [--no-progress] --log LOG

    # inductive protocol: one interface per outer fold of an interface fold table, all in this one process
    python -m workflow_scripts.methods.align --method M --gex ... --img ... --seed S --params ... \
        --interface-folds FOLDS.interface.tsv --n-outer K --out-dir DIR [--device ...] --log LOG

The second form writes, for every outer fold k, ``DIR/outer{k}.parquet``, ``.pt``, ``.history.tsv``, ``.views.npz``
and ``.fit_spots.tsv`` (the spots that interface was fit on), the same files the first form writes for one fit.
Training the K interfaces of a method and seed in one process pays the start-up (Python, torch, lightly: about
8 s of CPU) once instead of K times.

Inputs are embedding tables (:mod:`workflow_scripts.io`). Rows with NaN/inf are dropped (logged), then both tables
are restricted to their shared spot ids (logged; GEX order). ``--params`` is the config's ``training`` block merged
with ``training.method_params[M]`` (see :func:`workflow_scripts.methods.fit_method`).

Outputs: ``--out`` Z3 table (index spot_id, columns f0..; metadata: method, seed, dims, best_epoch, n_epochs);
``--model`` ``torch.save`` of the state dict + metadata (loadable with ``torch.load(path, weights_only=True)``; the
random baseline writes metadata only); ``--history`` TSV with columns epoch, train_loss, val_loss, val_loss_smooth,
lr (one row for cca, header only for concat/random); optional ``--views`` npz with ``spot_id``, ``view_img``,
``view_gex`` (absent arrays for concat/random).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from workflow_scripts.io import (
    drop_invalid_rows,
    embedding_frame,
    intersect_tables,
    read_embedding,
    setup_logging,
    write_embedding,
)
from workflow_scripts.methods import BASELINES, CONTROLS, METHODS, fit_method

log = logging.getLogger(__name__)


def parse_params(text: str) -> dict:
    """Parse the ``--params`` JSON string into a dict; raises ValueError with the offending text otherwise."""
    try:
        params = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--params is not valid JSON ({err}): {text!r}") from err
    if not isinstance(params, dict):
        raise ValueError(f"--params must be a JSON object (a dict of training parameters), got {text!r}")
    return params


def read_fit_mask(path: str | Path, ids: list[str]) -> np.ndarray:
    """Boolean mask over ``ids`` (n,) of the spots listed in ``path`` (a TSV with a ``spot_id`` column, or one id per
    line). Listed ids absent from the embeddings are counted in the log. Raises FileNotFoundError naming the path,
    ValueError when no listed spot is among ``ids``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--fit-spots file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and "spot_id" in lines[0].split("\t"):
        listed = pd.read_csv(path, sep="\t", dtype={"spot_id": str})["spot_id"].tolist()
    else:
        listed = lines
    return fit_mask_of(listed, ids, f"--fit-spots {path}")


def fit_mask_of(listed, ids: list[str], source: str) -> np.ndarray:
    """Boolean mask over ``ids`` (n,) of the spot ids in ``listed``; listed ids absent from ``ids`` are counted in
    the log. Raises ValueError naming ``source`` when none of them is among ``ids``."""
    wanted = set(map(str, listed))
    mask = np.fromiter((i in wanted for i in ids), dtype=bool, count=len(ids))
    n_absent = len(wanted - set(ids))
    if n_absent:
        log.warning("%s: %d listed spots are not in the paired embeddings and are ignored", source, n_absent)
    if not mask.any():
        raise ValueError(f"{source}: none of its {len(wanted)} spot ids is in the paired embeddings")
    log.info("fitting on %d of %d paired spots listed in %s", int(mask.sum()), len(ids), source)
    return mask


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.methods.align", description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=list(METHODS + BASELINES + CONTROLS))
    ap.add_argument("--gex", required=True, help="GEX embedding table (parquet)")
    ap.add_argument("--img", required=True, help="IMG embedding table (parquet)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--params", default="{}", help="training parameters as one JSON object string")
    ap.add_argument("--out", default=None, help="output Z3 table (parquet)")
    ap.add_argument("--model", default=None, help="output model state (torch.save)")
    ap.add_argument("--history", default=None, help="output training history (TSV)")
    ap.add_argument("--views", default=None, help="optional output npz of the two per-modality views")
    ap.add_argument("--fit-spots", default=None,
                    help="optional TSV with a spot_id column (or one id per line): fit the method on these spots only "
                         "and write Z3 for all spots (inductive protocol)")
    ap.add_argument("--interface-folds", default=None,
                    help="interface fold table (workflow_scripts.evaluation.folds make --interface-only): train one "
                         "interface per outer fold, each on that fold's training spots, into --out-dir")
    ap.add_argument("--n-outer", type=int, default=None,
                    help="with --interface-folds: the number of outer folds the workflow planned (checked)")
    ap.add_argument("--out-dir", default=None, help="with --interface-folds: folder of the outer{k}.* files")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:0, ...")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: the models are small, so extra intra-op threads cost "
                         "more in synchronisation than they gain, worst when jobs share the cores)")
    ap.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")
    ap.add_argument("--log", default=None, help="log file")
    return ap


def write_fit(res, ids: list[str], fit_mask: np.ndarray | None, out: str | Path, model: str | Path,
              history: str | Path, views: str | Path | None, meta_extra: dict) -> None:
    """Write one fit of :func:`fit_method`: Z3 table ``out`` (metadata from the state plus ``meta_extra``), state
    ``model`` (``torch.save``), ``history`` TSV and, when ``views`` is given, the npz of the two views with
    ``spot_id`` and ``fit_mask`` (all True without a mask)."""
    st = res.state
    meta = {k: st[k] for k in ("method", "seed", "d_gex", "d_img", "d_z3", "best_epoch", "n_epochs",
                               "stopped_early", "n_spots")}
    meta.update(meta_extra, params=st["params"])
    write_embedding(embedding_frame(res.z3, ids), out, meta)
    for path in (model, history):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(st, model)
    res.history.to_csv(history, sep="\t", index=False)
    if views:
        Path(views).parent.mkdir(parents=True, exist_ok=True)
        arrays = {"spot_id": np.asarray(ids, dtype=str),
                  "fit_mask": np.ones(len(ids), dtype=bool) if fit_mask is None else fit_mask}
        if res.views is not None:
            arrays.update(view_img=res.views[0], view_gex=res.views[1])
        np.savez_compressed(views, **arrays)
    log.info("%s: wrote Z3 %s (%d × %d), model %s, history %s (%d epochs, best %d)", st["method"], out,
             res.z3.shape[0], res.z3.shape[1], model, history, st["n_epochs"], st["best_epoch"])


def interface_fold_ids(path: str | Path, n_outer: int | None) -> dict[int, np.ndarray]:
    """``{outer fold: spot ids its interface is fit on}`` from an interface fold table
    (:func:`workflow_scripts.evaluation.folds.fit_spot_ids`). Raises ValueError naming the file when its number of
    outer folds differs from ``n_outer`` (the folds the workflow planned its file lists for)."""
    from workflow_scripts.evaluation.folds import INTERFACE_TASK, fit_spot_ids, read_folds

    table, _ = read_folds(path)
    outer = sorted(set(table.loc[table["task"] == INTERFACE_TASK, "fold"].astype(int)))
    if n_outer is not None and len(outer) != int(n_outer):
        raise ValueError(f"{path}: {len(outer)} outer folds, but the workflow planned {n_outer} (rerun the "
                         f"interface_folds rule: the donors or probe.n_folds changed)")
    return {k: fit_spot_ids(table, k) for k in outer}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    per_fold = args.interface_folds is not None
    if per_fold and (args.out_dir is None or args.fit_spots or args.out or args.model or args.history or args.views):
        ap.error("--interface-folds writes into --out-dir; it takes none of --fit-spots, --out, --model, --history, "
                 "--views")
    if not per_fold and (args.out is None or args.model is None or args.history is None):
        ap.error("--out, --model and --history are required (or --interface-folds with --out-dir)")
    setup_logging(args.log)
    params = parse_params(args.params)
    threads = args.threads or 1
    torch.set_num_threads(int(threads))
    log.info("torch CPU threads: %d", threads)

    gex = drop_invalid_rows(read_embedding(args.gex), f"GEX embedding {args.gex}", log)
    img = drop_invalid_rows(read_embedding(args.img), f"IMG embedding {args.img}", log)
    tables = intersect_tables({f"GEX embedding {args.gex}": gex, f"IMG embedding {args.img}": img}, log)
    gex, img = tables.values()
    ids = gex.index.to_list()
    log.info("%s (seed %d): %d paired spots, d_gex=%d, d_img=%d", args.method, args.seed, len(ids), gex.shape[1],
             img.shape[1])
    z_gex, z_img = gex.to_numpy(np.float32), img.to_numpy(np.float32)
    meta_extra = {"gex": str(args.gex), "img": str(args.img)}

    if not per_fold:
        fit_mask = read_fit_mask(args.fit_spots, ids) if args.fit_spots else None
        res = fit_method(args.method, z_gex, z_img, params, args.seed, device=args.device,
                         progress=not args.no_progress, fit_mask=fit_mask)
        write_fit(res, ids, fit_mask, args.out, args.model, args.history, args.views, meta_extra)
        return 0

    folds = interface_fold_ids(args.interface_folds, args.n_outer)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, fit_ids in folds.items():
        stem = out_dir / f"outer{k}"
        pd.DataFrame({"spot_id": fit_ids}).to_csv(f"{stem}.fit_spots.tsv", sep="\t", index=False)
        log.info("outer fold %d (%d of %d): interface fit on %d spots", k, k + 1, len(folds), len(fit_ids))
        fit_mask = fit_mask_of(fit_ids, ids, f"{args.interface_folds} outer fold {k}")
        res = fit_method(args.method, z_gex, z_img, params, args.seed, device=args.device,
                         progress=not args.no_progress, fit_mask=fit_mask)
        write_fit(res, ids, fit_mask, f"{stem}.parquet", f"{stem}.pt", f"{stem}.history.tsv", f"{stem}.views.npz",
                  {**meta_extra, "outer": int(k), "interface_folds": str(args.interface_folds)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
