"""Helpers shared by the Xenium and Visium readers: configured input files, label mapping, region
polygons and the gene join across samples.

The dataset keys used here (``raw_dir``, ``files``, ``sample_files``, ``splits``, ``annotation_classes``,
``label_aliases``, ``gene_join``, ``regions_units``, ``region_property``) are described in ``docs/datasets.md``
("Dataset keys").
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import lazy_module

ad = lazy_module("anndata")  # imported on first use: readers are imported while the DAG is planned
log = logging.getLogger(__name__)

REGION_LABEL_KEYS = ("classification.name", "classification", "name", "label", "annotation", "class")


# --------------------------------------------------------------------------------------------------
# configured files


def file_template(params: Mapping, sample: str, key: str) -> str | None:
    """Path of input ``key`` for ``sample`` (``files`` / ``sample_files`` template under ``raw_dir``), or None.

    ``{sample}`` is replaced; the result may still hold glob characters.
    """
    per = (params.get("sample_files") or {}).get(sample) or {}
    tmpl = per.get(key, (params.get("files") or {}).get(key))
    if tmpl in (None, ""):
        return None
    return str(Path(params.get("raw_dir", ".")) / str(tmpl).format(sample=sample))


def resolve_file(params: Mapping, sample: str, key: str, required: bool = False) -> Path | None:
    """The file (or folder) configured as ``files.<key>`` for ``sample``; None when not configured.

    Every configured path must exist (a glob must match exactly one path): FileNotFoundError names the path and
    the fix. ``required`` raises ValueError when the key is not configured at all.
    """
    pattern = file_template(params, sample, key)
    if pattern is None:
        if required:
            raise ValueError(f"dataset config: files.{key} is required (sample {sample!r})")
        return None
    if any(ch in pattern for ch in "*?["):
        hits = sorted(glob.glob(pattern))
        if len(hits) != 1:
            raise FileNotFoundError(
                f"sample {sample!r}: files.{key} pattern {pattern} matches {len(hits)} files {hits[:5]}; "
                "it must match exactly one (run the download rule, or fix the pattern in the config)"
            )
        return Path(hits[0])
    p = Path(pattern)
    if not p.exists():
        raise FileNotFoundError(
            f"sample {sample!r}: files.{key} not found at {p}. Run `snakemake download_<dataset>` or place the "
            "file there (see docs/datasets.md); set files." + key + " to null if this input is not used."
        )
    return p


def expand_glob(pattern: str) -> str:
    """A glob template's single match, else the pattern itself (Snakemake then reports it missing)."""
    if any(ch in pattern for ch in "*?["):
        hits = sorted(glob.glob(pattern))
        return hits[0] if len(hits) == 1 else pattern
    return pattern


def per_sample(value, sample: str):
    """``value[sample]`` when ``value`` is a mapping (per-sample setting), else ``value``."""
    return value.get(sample) if isinstance(value, Mapping) else value


def sample_split(params: Mapping, sample: str) -> str:
    """Name of the split (``params['splits']``) that lists ``sample``; ValueError if none does."""
    for split, members in (params.get("splits") or {}).items():
        if sample in [str(m) for m in members]:
            return str(split)
    raise ValueError(f"sample {sample!r} is in no split of {list((params.get('splits') or {}))}")


# --------------------------------------------------------------------------------------------------
# labels


def normalise_label(s: str) -> str:
    """Canonical form for matching label spellings: case-folded, ``_``/``-`` → space, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(s))).strip().casefold()


def map_labels(raw: np.ndarray, classes: Sequence[str], default: str, aliases: Mapping[str, str] | None,
               what: str) -> np.ndarray:
    """Map raw label strings onto ``classes`` (spelling-insensitive, plus ``aliases`` raw → class).

    Parameters
    ----------
    raw : (n,) labels (str or missing).
    classes : the class list; the returned codes index into it.
    default : class given to missing and unknown labels; must be one of ``classes``.
    aliases : extra spellings, raw label → class.
    what : name used in the log lines and errors.

    Returns
    -------
    (n,) int codes into ``classes``. Unknown labels become ``default`` and are counted in a warning (never
    silently). Raises ValueError when ``default`` or an alias target is not a class.
    """
    lookup = {normalise_label(c): i for i, c in enumerate(classes)}
    if normalise_label(default) not in lookup:
        raise ValueError(f"{what}: default class {default!r} is not in the class list {list(classes)}")
    for k, v in (aliases or {}).items():
        if normalise_label(v) not in lookup:
            raise ValueError(f"{what}: alias {k!r} -> {v!r} names no class of {list(classes)}")
        lookup[normalise_label(k)] = lookup[normalise_label(v)]
    raw_s = pd.Series(raw, dtype=object).fillna(default).astype(str)
    codes = raw_s.map(normalise_label).map(lookup)
    unknown = codes.isna()
    if unknown.any():
        log.warning("%s: %d cells carry labels that match no class and are set to %r: %s", what,
                    int(unknown.sum()), default, raw_s[unknown].value_counts().head(20).to_dict())
        codes[unknown] = lookup[normalise_label(default)]
    return codes.to_numpy(int)


def _dotted(props, key: str):
    cur = props
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def read_region_polygons(path: str | Path, label_property: str | None = None):
    """Labelled polygons of a GeoJSON annotation file (QuPath / napari / shapely exports), read with geopandas.

    The label is ``properties[label_property]`` (dotted path, e.g. ``classification.name``) or, by default, the
    first of :data:`REGION_LABEL_KEYS` that holds a non-empty string. Polygon and MultiPolygon features are kept;
    features without a label or with another geometry type are skipped and counted in the log.

    Returns
    -------
    geopandas.GeoDataFrame with columns ``label`` (str) and ``geometry``, in the file's own units.
    Raises FileNotFoundError naming the path.
    """
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"region annotation file not found: {path}")
    gdf = gpd.read_file(path)
    keys = [label_property] if label_property else list(REGION_LABEL_KEYS)
    props = gdf.drop(columns="geometry").to_dict("records")

    def label_of(rec):
        for k in keys:
            head, _, rest = k.partition(".")
            v = rec.get(head)
            v = _dotted(v, rest) if rest else v
            if isinstance(v, str) and v.strip():
                return v.strip()
        return None

    labels = pd.Series([label_of(r) for r in props], index=gdf.index, dtype=object)
    is_poly = gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"]).to_numpy()
    n_nolabel = int(labels.isna().sum())
    n_geom = int((labels.notna() & ~is_poly).sum())
    if n_nolabel or n_geom:
        log.warning("%s: skipped %d features without a label (tried %s) and %d non-polygon features",
                    path.name, n_nolabel, keys, n_geom)
    keep = labels.notna().to_numpy() & is_poly
    out = gpd.GeoDataFrame({"label": labels[keep].astype(str).to_numpy()}, geometry=gdf.geometry[keep].to_numpy())
    log.info("%s: %d labelled polygons, labels %s", path.name, len(out), sorted(set(out["label"])))
    return out


def label_points(xy: np.ndarray, polygons, default: str) -> np.ndarray:
    """Region label of each point: the smallest polygon containing it, else ``default``.

    Parameters
    ----------
    xy : (n, 2) points (x, y) in the polygons' units.
    polygons : GeoDataFrame of :func:`read_region_polygons` (``label``, ``geometry``; holes are respected).
    default : label of points outside every polygon.

    Nested annotations (e.g. a TLS inside a fibrotic area) thus give the more specific label. Points on a
    polygon's boundary count as outside (``geopandas.sjoin(predicate="within")``).

    Returns
    -------
    (n,) object array of labels.
    """
    import geopandas as gpd

    xy = np.asarray(xy, dtype=float)
    labels = np.full(len(xy), default, dtype=object)
    if len(polygons) == 0 or len(xy) == 0:
        return labels
    pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]))
    polys = polygons[["label", "geometry"]].assign(area=polygons.geometry.area)
    hits = gpd.sjoin(pts, polys, how="inner", predicate="within")
    smallest = hits.sort_values("area", kind="stable").groupby(level=0)["label"].first()
    labels[smallest.index.to_numpy()] = smallest.to_numpy()
    return labels


# --------------------------------------------------------------------------------------------------
# genes


def common_genes(parts: Sequence[ad.AnnData], samples: Sequence[str], how: str) -> list[str]:
    """Genes kept across samples: the intersection (``how='inner'``) or union (``'outer'``) of their var names.

    The genes each sample loses are counted in the log. Raises ValueError for another ``how`` or an empty result.
    """
    if how not in ("inner", "outer"):
        raise ValueError(f"gene_join must be inner or outer, got {how!r}")
    genes = list(parts[0].var_names)
    for p in parts[1:]:
        names = set(p.var_names)
        if how == "inner":
            genes = [g for g in genes if g in names]
        else:
            genes += [g for g in p.var_names if g not in set(genes)]
    for s, p in zip(samples, parts):
        n_drop = len(set(p.var_names) - set(genes))
        if n_drop:
            log.info("%s: %d of %d genes are not shared by all samples and are dropped", s, n_drop, p.n_vars)
    if not genes:
        raise ValueError(f"samples {list(samples)} share no gene")
    return genes


def align_genes(a: ad.AnnData, genes: Sequence[str]) -> ad.AnnData:
    """``a`` restricted and reordered to ``genes`` (CSR); genes absent from ``a`` become zero columns."""
    idx = a.var_names.get_indexer(genes)
    X = sp.csr_matrix(a.X)
    if (idx < 0).any():  # outer join: zero columns for absent genes
        X = sp.hstack([X, sp.csr_matrix((a.n_obs, 1), dtype=np.float32)]).tocsr()
        idx = np.where(idx < 0, X.shape[1] - 1, idx)
    var = a.var.reindex(genes)
    return ad.AnnData(X=X[:, idx], obs=a.obs[[]].copy(), var=var)
