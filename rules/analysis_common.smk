# Helpers, defaults and targets of the analysis rules (rules/spectral.smk, spatial_consistency.smk,
# training_curves.smk, umap.smk, scaling.smk), kept apart from the rules as snakemake --lint asks.

ANALYSIS_DEFAULTS = {
    "spectral": {
        "n_permutations": 100,
        "regularization": 1.0e-6,
        "rank_tol": 1.0e-8,
        "use_whitening": True,
        "n_eval_samples": None,
        "alpha": 0.05,
        "spectral_gap_threshold": 0.01,
        "null_permutation": "within_slide",
        "plot_max_rank": 20,
    },
    "spatial_consistency": {
        "k": 5,
        "far_percentile": 80.0,
        "n_folds": 5,
        "pair_features": ["absdiff", "product"],
        "standardize": True,
        "max_iter": 1000,
        "max_pairs_per_slide": None,
    },
    "umap": {
        "n_neighbors": 15,
        "min_dist": 0.3,
        "metric": "euclidean",
        "n_pca": 50,
        "random_state": 0,
        "max_spots": None,
        "label": None,
        "seed": None,
    },
    "scaling": {
        "enabled": False,
        "mode": "auto",
        "fractions": [0.01, 0.0316, 0.1, 0.316, 1.0],
        "seeds": [0, 1, 2],
        "offline": {"subsample": ["gex_encoder", "alignment"], "min_spots": 10},
        "posttrain": {
            "train_cells": "results/{dataset}/cells.h5ad",
            "configs": {
                "cfg1": {"lr": 1.0e-4, "weight_decay": 1.0e-5, "batch_size": 32},
                "cfg2": {"lr": 2.0e-5, "weight_decay": 5.0e-4, "batch_size": 32},
                "cfg3": {"lr": 5.0e-5, "weight_decay": 1.0e-4, "batch_size": 32},
            },
            "train": {},
            "device": "auto",
            "include_pretrained": True,
        },
    },
}


def acfg(section):
    """Config section ``section`` merged over ANALYSIS_DEFAULTS (one level deep for scaling.offline/posttrain)."""
    d = dict(ANALYSIS_DEFAULTS[section])
    user = config.get(section) or {}
    for k, v in user.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def fraction_str(f):
    """Fraction as used in paths: '0.01', '0.0316', '0.1', '0.316', '1'."""
    return format(float(f), "g")


SCALING = acfg("scaling")
SCALING_FRACTIONS = [fraction_str(f) for f in SCALING["fractions"]]
SCALING_SEEDS = [int(s) for s in SCALING["seeds"]]
POSTTRAIN_CONFIGS = list(SCALING["posttrain"]["configs"])
if SCALING["mode"] not in ("auto", "offline", "posttrain"):
    raise ValueError(f"config scaling.mode must be 'auto', 'offline' or 'posttrain', got {SCALING['mode']!r}")
# methods whose align job writes two projected views (concat and the random baseline have none)
VIEW_METHODS = [m for m in METHODS if m != "concat"]


wildcard_constraints:
    fraction=r"[0-9.eE-]+",
    ptcfg=r"[A-Za-z0-9_]+",
    colouring="label|slide",


def umap_label(dataset):
    """obs column for the label-coloured UMAP: config umap.label, else the first classification task's label."""
    lab = acfg("umap")["label"]
    if lab:
        return lab
    for spec in ds_cfg(dataset)["tasks"].values():
        if spec.get("type") == "classification" and spec.get("label"):
            return spec["label"]
    return "slide"


def umap_seed():
    s = acfg("umap")["seed"]
    return int(s) if s is not None else SEEDS[0]


def scaling_mode(dataset):
    """The scaling mode of ``dataset``: scaling.mode, where ``auto`` = posttrain for a Nicheformer GEX encoder and
    offline otherwise. Fails at parse time (naming the keys) when the mode does not fit the dataset's encoders.
    """
    gex = encoder_of(dataset, "gex")
    mode = SCALING["mode"]
    if mode == "auto":
        mode = "posttrain" if gex == "nicheformer" else "offline"
    if mode == "offline" and "gex_encoder" in SCALING["offline"]["subsample"] and gex != "pca":
        raise ValueError(
            f"scaling (offline mode) with scaling.offline.subsample containing gex_encoder refits the GEX encoder, "
            f"which only works for `pca`; dataset {dataset} uses {gex!r}. Use scaling.mode: posttrain (Nicheformer) "
            "or drop gex_encoder from scaling.offline.subsample"
        )
    if mode == "posttrain" and gex != "nicheformer":
        raise ValueError(
            f"scaling.mode posttrain post-trains Nicheformer, but dataset {dataset} uses GEX encoder {gex!r}; "
            "set datasets.<name>.encoders.gex: nicheformer or scaling.mode: auto / offline"
        )
    return mode


def scaling_tables(wildcards):
    d = wildcards.dataset
    if scaling_mode(d) == "offline":
        return expand(
            "results/{dataset}/scaling/offline/frac{fraction}/seed{seed}.tsv",
            dataset=d,
            fraction=SCALING_FRACTIONS,
            seed=SCALING_SEEDS,
        )
    out = expand(
        "results/{dataset}/scaling/posttrain/{ptcfg}/frac{fraction}/seed{seed}.tsv",
        dataset=d,
        ptcfg=POSTTRAIN_CONFIGS,
        fraction=SCALING_FRACTIONS,
        seed=SCALING_SEEDS,
    )
    if SCALING["posttrain"]["include_pretrained"]:
        out += expand(
            "results/{dataset}/scaling/posttrain/pretrained/seed{seed}.tsv", dataset=d, seed=SCALING_SEEDS
        )
    return out


def analysis_targets(dataset):
    """Everything the analyses add to `all` for ``dataset`` (call from final_targets())."""
    d = dataset
    out = [
        f"results/tables/{d}/spectral_summary.tsv",
        f"results/figures/{d}/spectral.png",
        f"results/tables/{d}/spatial_consistency_summary.tsv",
        f"results/figures/{d}/spatial_consistency.png",
        f"results/figures/{d}/training_curves.png",
        f"results/figures/{d}/umap_label.png",
        f"results/figures/{d}/umap_slide.png",
    ]
    if SCALING["enabled"]:
        scaling_mode(d)
        out += [f"results/tables/{d}/scaling_summary.tsv", f"results/figures/{d}/scaling.png"]
    return out


localrules:
    analysis,
    collect_spectral,
    figure_spectral,
    collect_spatial_consistency,
    figure_spatial_consistency,
    figure_training_curves,
    figure_umap,
    collect_scaling,
    figure_scaling,


def spectral_params():
    p = dict(acfg("spectral"))
    p.pop("plot_max_rank", None)
    return json.dumps(p)


def posttrain_params(wc):
    pt = SCALING["posttrain"]
    if wc.ptcfg not in pt["configs"]:
        raise ValueError(
            f"unknown post-training configuration {wc.ptcfg!r}; config scaling.posttrain.configs has {list(pt['configs'])}"
        )
    return json.dumps({**(pt["train"] or {}), **pt["configs"][wc.ptcfg]})
