"""``precomputed`` — bring your own embeddings: read a modality's spot embeddings from a file or the spots AnnData.

For either modality (``datasets.<d>.encoders: {gex: precomputed, img: precomputed}``). Parameters, per modality,
in ``datasets.<d>.encoder_params.precomputed``::

    precomputed:
      gex: {path: data/gex.parquet}                 # a table or an h5ad (workflow_scripts.io.read_embedding_file)
      img: {path: data/img.h5ad, key: X_uni}        # h5ad: obsm[key] (or X)
    # or, for embeddings stored in the spots AnnData itself (reader `synthetic`, or a `precomputed` h5ad):
      gex: {obsm: gex_embedding}

Spot ids are matched to the spots AnnData: rows of the file for spots not in the dataset are dropped and spots
without a row get none (both counted in the log; downstream stages drop spots missing from either modality, logged
again). No parameter is guessed: a missing modality entry, or neither ``path`` nor ``obsm``, fails naming the key.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..io import embedding_frame, match_to_spots, read_embedding_file
from . import EncodeContext, register

log = logging.getLogger(__name__)

KEYS = ("path", "key", "obsm")


def modality_params(params: dict, modality: str | None) -> dict:
    """The parameters of ``modality`` (``params[modality]``, or ``params`` itself when it has ``path``/``obsm``).

    Raises ValueError naming ``datasets.<d>.encoder_params.precomputed.<modality>`` when they are missing or hold
    unknown keys.
    """
    where = f"datasets.<d>.encoder_params.precomputed.{modality or '<modality>'}"
    if modality and isinstance(params.get(modality), dict):
        p = dict(params[modality])
    elif "path" in params or "obsm" in params:
        p = {k: v for k, v in params.items() if k in KEYS}
    else:
        raise ValueError(f"precomputed encoder: no parameters for modality {modality!r}; set {where}: "
                         "{path: FILE} or {obsm: KEY}")
    unknown = sorted(set(p) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(KEYS)}")
    if ("path" in p) == ("obsm" in p):
        raise ValueError(f"{where}: give exactly one of `path` (a file) or `obsm` (a key of the spots AnnData)")
    return p


def input_path(params: dict, modality: str) -> str | None:
    """The file the encoder reads for ``modality`` (None when it reads the spots AnnData); for the DAG."""
    try:
        return modality_params(params, modality).get("path")
    except ValueError:
        return None


@register("precomputed", "any", description="spot embeddings read from a file or from obsm of the spots AnnData")
def encode_precomputed(adata, params: dict, ctx: EncodeContext) -> pd.DataFrame:
    """Embedding table of ``adata``'s spots read from the configured source (module docstring).

    Parameters
    ----------
    adata : spots AnnData (n_spots spots).
    params : ``{gex: {...}, img: {...}}`` or one modality's ``{path, key}`` / ``{obsm}``.
    ctx : ``ctx.extra['modality']`` ("gex" or "img", set by the embed CLI) selects the entry.

    Returns a float32 table (n_found, d) indexed by spot id, in ``adata``'s spot order; ``attrs`` carries
    ``feature_names``, ``source``, ``n_spots_missing`` and ``n_rows_unused``. Raises ValueError (naming the key or
    file) for bad parameters, a missing obsm key, a source sharing no spot id with the dataset, or non-finite
    values in every row.
    """
    modality = (ctx.extra or {}).get("modality")
    p = modality_params(params, modality)
    ids = pd.Index(adata.obs_names.astype(str))
    if "obsm" in p:
        key = p["obsm"]
        if key not in adata.obsm:
            raise ValueError(f"precomputed encoder ({modality}): the spots AnnData has no obsm[{key!r}]; "
                             f"it has {sorted(adata.obsm.keys())}")
        df = embedding_frame(np.asarray(adata.obsm[key], dtype=np.float32), ids)
        source = f"obsm[{key!r}]"
        df.attrs["feature_names"] = [f"{key}_{i}" for i in range(df.shape[1])]
    else:
        df = read_embedding_file(p["path"], key=p.get("key"), what=f"precomputed {modality} embedding")
        source = str(p["path"])
    names = df.attrs.get("feature_names", [])
    out = match_to_spots(df, ids, f"precomputed {modality} embedding ({source})", log)
    out.attrs.update(feature_names=list(names), source=source)
    return out
