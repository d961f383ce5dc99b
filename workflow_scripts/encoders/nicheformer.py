"""``nicheformer`` — the paper's expression encoder: Nicheformer (Schaar, Tejada-Lapuerta et al., theislab).

Model (docs/reference.md#nicheformer, re-implemented from that description so that the state-dict keys
and shapes equal the published checkpoint's): 12 post-norm ``nn.TransformerEncoderLayer`` (d = 512, 16
heads, FFN 1024, ReLU, dropout 0, ``layer_norm_eps`` 1e-12, batch first); token embedding
``nn.Embedding(n_tokens + 5 = 20,345, 512, padding_idx=1)``; learnable positions ``nn.Embedding(1500, 512)``;
the pretraining heads ``classifier_head`` (512 → 20,340, separate bias), ``pooler_head`` (512 → 512) and
``cls_head`` (512 → 164), unused for embeddings; and the template layer ``encoder_layer.*`` that
``nn.TransformerEncoder`` copies (registered in the original module, so it is in every checkpoint, but never
run). Parameters: 47,199,256 in the computation (the reference's count), 49,302,040 in the state dict
(+ 2,102,784 of the unused template); 164 state-dict tensors.

Tokenisation (docs/reference.md#nicheformer, the official ``NicheformerDataset`` path), per cell:

1. counts are aligned to the vocabulary (``model.h5ad`` var_names, Ensembl ids, in vocabulary order;
   absent genes = 0). Gene symbols are mapped to Ensembl ids offline with the 10x GRCh38 feature table
   (``resources/gene_maps``), or taken from ``var[gene_id_column]`` where that holds ids; symbols mapping
   to the same id are summed. How many genes map is logged;
2. library-size normalisation to 10,000: divide by the row **sum** (over vocabulary genes) × 1e4;
3. divide by the technology mean vector (``{xenium,dissociated,cosmx,merfish,iss}_mean_script.npy``) after
   NaN → 0 and then 0 → 1 (genes without a mean are therefore divided by 1);
4. keep the non-zero genes, rank them by descending value (ties: lower vocabulary index first — the
   reference's unstable sort leaves ties arbitrary), token = vocabulary index + 30 (30 reserved ids);
5. prepend the context tokens ``[specie, assay, modality]`` and truncate to ``max_seq_len`` (1500 = the
   model's context length): at most 1497 gene tokens. Padding id 0 → PAD (1), as ``complete_masking``.

Embedding (``Nicheformer.get_embeddings(layer=-1, with_context=False)``, theislab/nicheformer
``src/nicheformer/models/_nicheformer.py``): token + learnable positional embedding, encoder layers 0 … ``layer``
with the padding mask, drop the 3 context positions, mean over the remaining positions → 512-d per cell. The
official code, and the reference with it, **includes the padding positions** in that mean (every sequence padded
to the context length, 1500). That is the default here (``exclude_padding: false``): every sequence is padded to
``max_seq_len`` (1500 = the context length) and the mean is taken over all 1497 positions, which reproduces
``get_embeddings`` exactly (tests/test_nicheformer.py). ``exclude_padding: true`` is an option: the mean over
gene tokens only, each batch padded only to its longest sequence (cells sorted by length). Its gene-token outputs
are the same (padding keys are masked), it does not depend on how far a cell is padded, and it is far cheaper for
sparse panels (~100 genes per Xenium cell), but it is a different embedding from the published one.

Spot / patch embedding = mean over the spot's cells (as in the reference, docs/reference.md#nicheformer): ``ctx.extra["cells"]`` is a cells
AnnData with ``obs['spot_id']``; without it each spot is one cell. Cells with zero counts (or none in
vocabulary genes) are dropped and counted in the log; spots left without a cell get a NaN row (logged).

Parameters (``params``; defaults in :data:`DEFAULTS`)::

    weights: PATH | null        # nicheformer.ckpt (Lightning) | model.safetensors (HF) | folder holding one
    allow_random_weights: false # only with weights: null (tests, benchmarks)
    vocabulary: resources/nicheformer/model.h5ad
    technology_mean: dissociated  # xenium | dissociated | cosmx | merfish | iss (file next to the vocabulary) or a path
    gene_map: resources/gene_maps/10x_GRCh38_features.tsv.gz
    gene_id_column: gene_ids    # var column with Ensembl ids, used where present
    specie: human               # human (5) | mouse (6) | an id
    assay: "10x 3' transcription profiling"   # name (see ASSAY_TOKENS) or id
    modality: spatial           # spatial (4) | dissociated (3) | an id
    max_seq_len: 1500           # tokens per cell including the 3 context tokens (<= context length)
    exclude_padding: false      # false = official get_embeddings (mean includes padding); true = gene tokens only
    layer: -1                   # encoder layer whose output is averaged (-1 = last)
    precision: auto             # auto (bf16/fp16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    tiny: false / arch: {}      # tests: small architecture through the same code path

Assay choice for legacy ST / Visium (HER2ST, thymus): Nicheformer has no ST or Visium assay id. The
default here is ``"10x 3' transcription profiling"`` (15, the generic 3'-end polyA-capture sequencing
term; ST and Visium are 3' polyA-capture sequencing), with the ``dissociated`` technology mean (the only
whole-transcriptome mean; ``resources/nicheformer/PROVENANCE.md``). cell_synergy used assay 9 (Xenium) and the
Xenium mean for all three of its datasets, Visium thymus included (docs/reference.md#nicheformer); set ``assay: Xenium``,
``technology_mean: xenium`` to reproduce that.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn
from tqdm import tqdm

from ..io import embedding_frame
from .weights import WeightsError, how_to_get, missing_weights_error
from . import EncodeContext, register, register_weights_check
from .torch_utils import (
    merge_arch,
    autocast,
    autocast_dtype,
    compare_state_dicts,
    load_checkpoint_file,
    make_loader,
    resolve_device,
    resolve_resource,
    seed_everything,
)

log = logging.getLogger(__name__)

AUX_TOKENS = 30  # reserved ids below the first gene token
RAW_PAD = 0  # padding in tokenised data (converted to PAD_TOKEN before the model, as complete_masking)
PAD_TOKEN = 1
CLS_TOKEN = 2
N_CONTEXT = 3  # [specie, assay, modality]
MODALITY_TOKENS = {"dissociated": 3, "spatial": 4}
SPECIE_TOKENS = {"human": 5, "homo sapiens": 5, "mouse": 6, "mus musculus": 6}
ASSAY_TOKENS = {
    "merfish": 7,
    "cosmx": 8,
    "nanostring digital spatial profiling": 8,
    "xenium": 9,
    "10x 5' v2": 10,
    "10x 3' v3": 11,
    "10x 3' v2": 12,
    "10x 5' v1": 13,
    "10x 3' v1": 14,
    "10x 3' transcription profiling": 15,
    "10x transcription profiling": 15,
    "10x 5' transcription profiling": 16,
    "cite-seq": 17,
    "smart-seq v4": 18,
}
TECHNOLOGY_MEANS = ("xenium", "dissociated", "cosmx", "merfish", "iss")
TARGET_SUM = 1e4

ARCH = {
    "dim_model": 512,
    "nheads": 16,
    "dim_feedforward": 1024,
    "nlayers": 12,
    "dropout": 0.0,
    "n_tokens": 20340,
    "context_length": 1500,
    "cls_classes": 164,
}
TINY_ARCH = {"dim_model": 32, "nheads": 2, "dim_feedforward": 64, "nlayers": 2}
N_PARAMS = 47_199_256  # parameters used by the computation (reference count)
N_PARAMS_STATE_DICT = 49_302_040  # + the unused template layer ``encoder_layer.*``
HEAD_PREFIXES = ("encoder_layer.", "classifier_head.", "pooler_head.", "cls_head.")  # not needed for embeddings

DEFAULTS = {
    "weights": None,
    "allow_random_weights": False,
    "vocabulary": "resources/nicheformer/model.h5ad",
    "technology_mean": "dissociated",
    "gene_map": "resources/gene_maps/10x_GRCh38_features.tsv.gz",
    "gene_id_column": "gene_ids",
    "specie": "human",
    "assay": "10x 3' transcription profiling",
    "modality": "spatial",
    "max_seq_len": 1500,
    "exclude_padding": False,
    "layer": -1,
    "precision": "auto",
    "tiny": False,
    "arch": None,
}


# ============================================================================================== model


class Nicheformer(nn.Module):
    """Nicheformer encoder with the attribute names of the original LightningModule (state-dict compatible).

    ``forward(tokens)`` takes ``(B, L)`` int64 token ids (context tokens first; ``RAW_PAD``/``PAD_TOKEN``
    as padding, L <= ``context_length``) and returns the ``(B, dim_model)`` float32 cell embeddings of
    :meth:`embed`.
    """

    def __init__(
        self,
        dim_model: int = 512,
        nheads: int = 16,
        dim_feedforward: int = 1024,
        nlayers: int = 12,
        dropout: float = 0.0,
        n_tokens: int = 20340,
        context_length: int = 1500,
        cls_classes: int = 164,
    ):
        super().__init__()
        self.hparams = dict(
            dim_model=dim_model, nheads=nheads, dim_feedforward=dim_feedforward, nlayers=nlayers, dropout=dropout,
            n_tokens=n_tokens, context_length=context_length, cls_classes=cls_classes,
        )
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=dim_model, nhead=nheads, dim_feedforward=dim_feedforward, dropout=dropout,
            batch_first=True, layer_norm_eps=1e-12,
        )
        self.encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=nlayers, enable_nested_tensor=False)
        self.embeddings = nn.Embedding(n_tokens + 5, dim_model, padding_idx=PAD_TOKEN)
        self.positional_embedding = nn.Embedding(context_length, dim_model)
        self.dropout = nn.Dropout(p=dropout)
        self.classifier_head = nn.Linear(dim_model, n_tokens, bias=False)
        self.classifier_head.bias = nn.Parameter(torch.zeros(n_tokens))
        self.pooler_head = nn.Linear(dim_model, dim_model)
        self.cls_head = nn.Linear(dim_model, cls_classes)
        for m in self.modules():  # the original's initialize_weights: Xavier-normal linear layers, zero bias
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def dim(self) -> int:
        return self.hparams["dim_model"]

    def embed(self, tokens: torch.Tensor, layer: int = -1, exclude_padding: bool = False) -> torch.Tensor:
        """Cell embeddings ``(B, dim_model)`` float32 of token ids ``(B, L)``.

        Source: ``Nicheformer.get_embeddings`` (docs/reference.md#nicheformer): ids 0 → PAD (1); token + positional embedding
        (positions 0 … L-1); encoder layers 0 … ``layer`` with ``src_key_padding_mask = (id == PAD)``; drop
        the first 3 (context) positions; mean over the rest — over non-padding positions only when
        ``exclude_padding`` (a cell without gene tokens gives NaN), over all positions otherwise (official,
        the default: pass sequences padded to the context length to reproduce ``get_embeddings``).
        Raises ValueError when L exceeds the context length or ``layer`` is out of range.
        """
        n_layers = len(self.encoder.layers)
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer must be in [-{n_layers}, {n_layers - 1}], got {layer}")
        layer = layer % n_layers
        length = tokens.shape[1]
        if length > self.positional_embedding.num_embeddings:
            raise ValueError(f"sequence length {length} exceeds the context length {self.positional_embedding.num_embeddings}")
        tokens = torch.where(tokens == RAW_PAD, torch.full_like(tokens, PAD_TOKEN), tokens)
        pad = tokens == PAD_TOKEN
        pos = torch.arange(length, device=tokens.device)
        h = self.dropout(self.embeddings(tokens) + self.positional_embedding(pos).unsqueeze(0))
        for i in range(layer + 1):
            h = self.encoder.layers[i](h, src_key_padding_mask=pad, is_causal=False)
        h = h[:, N_CONTEXT:, :].float()
        if not exclude_padding:
            return h.mean(dim=1)
        keep = (~pad[:, N_CONTEXT:]).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(dim=1) / keep.sum(dim=1)

    def forward(self, tokens: torch.Tensor, layer: int = -1, exclude_padding: bool = False) -> torch.Tensor:
        return self.embed(tokens, layer, exclude_padding)


def n_parameters(model: nn.Module, include_template: bool = False) -> int:
    """Number of parameters of a :class:`Nicheformer`; without ``include_template`` the unused template layer
    ``encoder_layer.*`` is left out (that is the reference's 47,199,256 for the full architecture)."""
    return sum(p.numel() for n, p in model.named_parameters() if include_template or not n.startswith("encoder_layer."))


def nicheformer_arch(arch: dict | None = None, tiny: bool = False) -> dict:
    """:data:`ARCH` with :data:`TINY_ARCH` (if ``tiny``) and ``arch`` overrides; ValueError on unknown keys."""
    return merge_arch(ARCH, TINY_ARCH, arch, tiny, "encoders.nicheformer.arch")


def build_nicheformer(arch: dict | None = None, tiny: bool = False, device: str | torch.device = "cpu") -> Nicheformer:
    """Build a randomly initialised :class:`Nicheformer` (``device="meta"``: shapes only, no memory)."""
    with torch.device(device):
        return Nicheformer(**nicheformer_arch(arch, tiny))


# ============================================================================================== weights


def _find_weights_file(path: Path) -> Path:
    if path.is_dir():
        for pattern in ("model.safetensors", "*.safetensors", "*.ckpt", "pytorch_model.bin"):
            hits = sorted(path.glob(pattern))
            if hits:
                return hits[0]
        raise missing_weights_error("nicheformer", f"{path} (folder without *.safetensors / *.ckpt)")
    if not path.is_file():
        raise missing_weights_error("nicheformer", path)
    return path


def _arch_from_state_dict(sd: dict) -> dict:
    """Architecture sizes implied by tensor shapes (all but the number of heads)."""
    out = {}
    if "embeddings.weight" in sd:
        out["n_tokens"] = int(sd["embeddings.weight"].shape[0]) - 5
        out["dim_model"] = int(sd["embeddings.weight"].shape[1])
    if "positional_embedding.weight" in sd:
        out["context_length"] = int(sd["positional_embedding.weight"].shape[0])
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    if layers:
        out["nlayers"] = max(layers) + 1
    if "encoder.layers.0.linear1.weight" in sd:
        out["dim_feedforward"] = int(sd["encoder.layers.0.linear1.weight"].shape[0])
    if "cls_head.weight" in sd:
        out["cls_classes"] = int(sd["cls_head.weight"].shape[0])
    return out


def read_nicheformer_weights(path: str | Path) -> tuple[dict, dict, dict]:
    """Read a Nicheformer checkpoint; return ``(state_dict, hyper_parameters, info)``.

    Formats: the Lightning ``.ckpt`` (``{"state_dict", "hyper_parameters", ...}``; keys without prefix), the
    Hugging Face safetensors release (keys prefixed ``nicheformer.``; ``config.json`` next to it gives the
    hyper-parameters), or a bare state dict. The ``pos`` position-index buffer of older checkpoints / the HF
    release is dropped (it is ``arange(context_length)``; checked). Raises :class:`WeightsError`.
    """
    path = _find_weights_file(Path(path))
    try:
        obj = load_checkpoint_file(path)
    except ValueError as e:
        raise WeightsError(f"nicheformer: {e}. {how_to_get('nicheformer')}") from e
    hp: dict = {}
    fmt = "state_dict"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        fmt = "lightning_ckpt"
        hp = dict(obj.get("hyper_parameters") or {})
        obj = obj["state_dict"]
    elif path.suffix == ".safetensors":
        fmt = "safetensors"
        cfg = path.parent / "config.json"
        if cfg.is_file():
            hp = json.loads(cfg.read_text())
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"nicheformer: {path} holds no state dict of tensors. {how_to_get('nicheformer')}")
    sd = {}
    for k, v in obj.items():
        k2 = k[len("nicheformer."):] if k.startswith("nicheformer.") else k
        sd[k2] = v.float() if v.is_floating_point() else v
    ignored = []
    if "pos" in sd:
        pos = sd.pop("pos")
        if not torch.equal(pos.long().flatten(), torch.arange(pos.numel())):
            raise WeightsError(f"nicheformer: {path} buffer 'pos' is not 0..{pos.numel() - 1}; unknown checkpoint variant")
        ignored.append("pos")
    info = {"path": str(path), "format": fmt, "ignored": ignored, "n_tensors": len(obj)}
    return sd, hp, info


def _arch_from_hparams(hp: dict) -> dict:
    out = {k: hp[k] for k in ARCH if k in hp and hp[k] is not None}
    for k in out:
        out[k] = float(out[k]) if k == "dropout" else int(out[k])
    return out


def load_nicheformer(
    weights: str | Path | None,
    arch: dict | None = None,
    tiny: bool = False,
    device: str | torch.device = "cpu",
    allow_random_weights: bool = False,
    seed: int = 0,
) -> tuple[Nicheformer, dict]:
    """Nicheformer in eval mode on ``device`` with the weights at ``weights``; returns ``(model, report)``.

    The architecture comes from the checkpoint (``hyper_parameters`` / ``config.json``, cross-checked with
    the tensor shapes); ``arch``/``tiny`` apply when the file carries none and must agree otherwise.
    ``report``: ``missing`` (model keys absent from the file), ``unexpected`` (file keys the model lacks),
    ``mismatched`` shapes, ``ignored`` (``pos``), ``format``, ``arch``. Missing keys are allowed only for the
    parts not used by embeddings (:data:`HEAD_PREFIXES`: the HF release has no pooler/cls heads); any
    other missing key or shape mismatch raises :class:`WeightsError`. ``device="meta"`` only checks.
    ``weights=None`` requires ``allow_random_weights`` (random init seeded with ``seed``; logged loudly).
    """
    if weights in (None, ""):
        if not allow_random_weights:
            raise missing_weights_error("nicheformer", weights)
        log.warning("nicheformer: RANDOM WEIGHTS (weights: null, allow_random_weights: true) - for tests/benchmarks only")
        seed_everything(seed)
        model = build_nicheformer(arch, tiny, device="cpu" if str(device) != "meta" else "meta")
        report = {"format": "random", "missing": [], "unexpected": [], "mismatched": [], "ignored": [], "arch": model.hparams}
        return model.to(device).eval(), report
    t0 = time.perf_counter()
    sd, hp, info = read_nicheformer_weights(weights)
    from_file = _arch_from_state_dict(sd)
    hp_arch = _arch_from_hparams(hp)
    for k in set(from_file) & set(hp_arch):
        if from_file[k] != hp_arch[k]:
            raise WeightsError(f"nicheformer: {info['path']}: hyper-parameter {k}={hp_arch[k]} but tensors imply {from_file[k]}")
    requested = nicheformer_arch(arch, tiny)
    file_arch = {**hp_arch, **from_file}
    if arch or tiny:
        clash = {k: (requested[k], v) for k, v in file_arch.items() if requested.get(k) != v}
        if clash:
            raise WeightsError(
                f"nicheformer: {info['path']} was trained with {clash} (requested, in file); drop the arch/tiny "
                "params or use matching weights"
            )
    final = {**requested, **file_arch}
    if hp:
        if hp.get("learnable_pe") is False:
            raise WeightsError(f"nicheformer: {info['path']} uses sinusoidal positions (learnable_pe False); not supported")
        flags = {k: hp.get(k) for k in ("specie", "assay", "modality") if k in hp}
        if flags and not all(flags.values()):
            log.warning("nicheformer: checkpoint trained without some context tokens %s; 3 context tokens are prepended anyway", flags)
    meta_model = build_nicheformer(final, device="meta")
    cmp = compare_state_dicts(meta_model.state_dict(), sd)
    required_missing = [k for k in cmp["missing"] if not k.startswith(HEAD_PREFIXES)]
    report = {**info, **cmp, "arch": final, "hyper_parameters": {k: v for k, v in hp.items() if isinstance(v, (int, float, str, bool))}}
    log.info(
        "nicheformer: %s (%s): %d tensors; missing %d %s; unexpected %d %s; shape mismatches %d; ignored %s; arch %s",
        info["path"], info["format"], len(sd), len(cmp["missing"]), cmp["missing"][:6], len(cmp["unexpected"]),
        cmp["unexpected"][:6], len(cmp["mismatched"]), info["ignored"], final,
    )
    if required_missing or cmp["mismatched"]:
        raise WeightsError(
            f"nicheformer: {info['path']} does not fit the Nicheformer architecture {final}: missing {required_missing[:6]} "
            f"({len(required_missing)}), shape mismatches {cmp['mismatched'][:3]}. {how_to_get('nicheformer')}"
        )
    if cmp["unexpected"]:
        log.warning("nicheformer: %d unexpected tensors in %s ignored: %s", len(cmp["unexpected"]), info["path"], cmp["unexpected"][:10])
    if str(device) == "meta":
        return meta_model, report
    model = build_nicheformer(final, device="cpu")
    model.load_state_dict({k: v for k, v in sd.items() if k not in cmp["unexpected"]}, strict=False)
    log.info("nicheformer: loaded in %.1f s; %d parameters (%d with the unused template layer)",
             time.perf_counter() - t0, n_parameters(model), n_parameters(model, True))
    return model.to(device).eval(), report


# ============================================================================================== tokens


def load_vocabulary(path: str | Path) -> pd.Index:
    """Gene vocabulary (Ensembl ids in vocabulary order) from ``model.h5ad`` (var_names) or a text file
    with one id per line. Raises FileNotFoundError / ValueError (duplicates) naming the file."""
    path = resolve_resource(path, "Nicheformer vocabulary (model.h5ad)", "encoders.nicheformer.vocabulary")
    if path.suffix == ".h5ad":
        import anndata as ad

        vocab = pd.Index(ad.read_h5ad(path).var_names.astype(str))
    else:
        vocab = pd.Index([ln.strip() for ln in path.read_text().splitlines() if ln.strip()])
    if not vocab.is_unique:
        raise ValueError(f"{path}: vocabulary has duplicated gene ids")
    return vocab


def clean_technology_mean(mean: np.ndarray) -> np.ndarray:
    """NaN → 0, then 0 → 1 (reference tokenisation); float64 copy."""
    m = np.nan_to_num(np.asarray(mean, dtype=np.float64), nan=0.0)
    m[m == 0] = 1.0
    return m


def load_technology_mean(spec: str | Path, n_genes: int, resource_dir: str | Path) -> np.ndarray:
    """Technology mean vector, cleaned (:func:`clean_technology_mean`), of length ``n_genes``.

    ``spec`` is a name in :data:`TECHNOLOGY_MEANS` (file ``{resource_dir}/{name}_mean_script.npy``) or a
    path to a ``.npy`` file. Raises FileNotFoundError / ValueError (wrong length) naming the file.
    """
    spec = str(spec)
    if spec.lower() in TECHNOLOGY_MEANS:
        path = Path(resource_dir) / f"{spec.lower()}_mean_script.npy"
    else:
        path = Path(spec)
    path = resolve_resource(path, "Nicheformer technology mean", "encoders.nicheformer.technology_mean")
    mean = np.load(path)
    if mean.ndim != 1 or mean.shape[0] != n_genes:
        raise ValueError(f"{path}: technology mean has shape {mean.shape}, the vocabulary has {n_genes} genes")
    n_nan = int(np.isnan(mean).sum())
    log.info("nicheformer: technology mean %s: %d of %d genes without a mean (NaN -> divided by 1)", path.name, n_nan, n_genes)
    return clean_technology_mean(mean)


def load_gene_map(path: str | Path) -> pd.Series:
    """Symbol → Ensembl id from a 10x ``features.tsv(.gz)`` (columns id, symbol, type); the first row wins
    for a symbol listed more than once (count logged)."""
    path = resolve_resource(path, "gene symbol -> Ensembl table", "encoders.nicheformer.gene_map")
    t = pd.read_csv(path, sep="\t", header=None, usecols=[0, 1], names=["id", "symbol"], dtype=str)
    n_dup = int(t["symbol"].duplicated().sum())
    if n_dup:
        log.info("nicheformer: gene map %s: %d symbols listed more than once, first id kept", path.name, n_dup)
    t = t.drop_duplicates("symbol")
    return pd.Series(t["id"].to_numpy(), index=t["symbol"].to_numpy())


_ENSEMBL = r"^ENS[A-Z]*G\d{6,}(?:\.\d+)?$"  # ENSG…, ENSMUSG…, optional version suffix


def _ensembl_or_empty(values: np.ndarray) -> np.ndarray:
    s = pd.Series(np.asarray(values, dtype=object)).astype(str)
    ok = s.str.match(_ENSEMBL).to_numpy()
    return np.where(ok, s.str.replace(r"\.\d+$", "", regex=True).to_numpy(), "")


def map_gene_ids(var_names, var: pd.DataFrame | None, gene_map: pd.Series | None, id_column: str = "gene_ids") -> tuple[np.ndarray, dict]:
    """Ensembl id (version suffix removed) of every gene (``""`` where unknown) and counts of how each was found.

    Order of preference: ``var[id_column]`` where it holds an Ensembl gene id (``ENSG…``/``ENSMUSG…``); the
    gene name itself where it is one; the symbol looked up in ``gene_map``. (Symbols such as ``ENSA`` are
    not mistaken for ids.)
    """
    names = pd.Index(var_names).astype(str)
    ids = np.full(len(names), "", dtype=object)
    stats = {"n_genes": len(names), "from_var_column": 0, "already_ensembl": 0, "from_gene_map": 0}
    if var is not None and id_column in var.columns:
        col = _ensembl_or_empty(var[id_column].to_numpy())
        ok = col != ""
        ids[ok] = col[ok]
        stats["from_var_column"] = int(ok.sum())
    todo = ids == ""
    own = _ensembl_or_empty(names.to_numpy())
    is_ens = (own != "") & todo
    ids[is_ens] = own[is_ens]
    stats["already_ensembl"] = int(is_ens.sum())
    todo = ids == ""
    if gene_map is not None and todo.any():
        looked = gene_map.reindex(names[todo]).to_numpy()
        hit = pd.notna(looked)
        sub = ids[todo]
        sub[hit] = looked[hit]
        ids[todo] = sub
        stats["from_gene_map"] = int(hit.sum())
    stats["unmapped"] = int((ids == "").sum())
    return ids.astype(str), stats


def align_to_vocabulary(X, gene_ids: np.ndarray, vocab: pd.Index) -> tuple[sp.csr_matrix, dict]:
    """Counts ``(n_cells, n_genes)`` → ``(n_cells, len(vocab))`` CSR float32 in vocabulary order.

    Genes whose id is not in the vocabulary are dropped; several genes with one id are summed (counts of
    both logged by the caller from the returned stats). NaN counts → 0 (reference ``nan_to_num``).
    Raises ValueError on negative counts (``X`` must hold raw counts).
    """
    X = sp.csr_matrix(X, dtype=np.float64) if not sp.issparse(X) else X.tocsr().astype(np.float64)
    if X.nnz and np.isnan(X.data).any():
        n = int(np.isnan(X.data).sum())
        log.warning("nicheformer: %d NaN counts set to 0", n)
        X.data = np.nan_to_num(X.data, nan=0.0)
    if X.nnz and X.data.min() < 0:
        raise ValueError("nicheformer: X holds negative values; the encoder needs raw counts (AnnData.X)")
    pos = vocab.get_indexer(pd.Index(gene_ids))
    inv = pos >= 0
    rows = np.flatnonzero(inv)
    M = sp.csr_matrix((np.ones(len(rows)), (rows, pos[inv])), shape=(len(gene_ids), len(vocab)))
    Xv = (X @ M).tocsr().astype(np.float32)
    Xv.eliminate_zeros()
    Xv.sort_indices()
    n_dup = int(inv.sum() - len(np.unique(pos[inv])))
    return Xv, {"in_vocabulary": int(inv.sum()), "distinct_in_vocabulary": int(len(np.unique(pos[inv]))), "duplicates_summed": n_dup}


def _token_id(value, table: dict, what: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) < AUX_TOKENS:
            raise ValueError(f"encoders.nicheformer.{what}: id {value} outside the reserved range 0..{AUX_TOKENS - 1}")
        return int(value)
    key = str(value).strip().lower()
    if key not in table:
        raise ValueError(f"encoders.nicheformer.{what}: unknown {what} {value!r}; use one of {sorted(table)} or an id")
    return table[key]


def context_tokens(specie="human", assay="10x 3' transcription profiling", modality="spatial") -> np.ndarray:
    """The 3 context token ids ``[specie, assay, modality]`` (names or ids; tables from docs/reference.md#nicheformer / PROVENANCE.md)."""
    return np.array(
        [_token_id(specie, SPECIE_TOKENS, "specie"), _token_id(assay, ASSAY_TOKENS, "assay"),
         _token_id(modality, MODALITY_TOKENS, "modality")],
        dtype=np.int64,
    )


def tokenize_row(indices: np.ndarray, counts: np.ndarray, tech_mean: np.ndarray, context: np.ndarray,
                 max_seq_len: int = 1500, aux_tokens: int = AUX_TOKENS) -> np.ndarray:
    """Token ids of one cell (variable length, at most ``max_seq_len``), context tokens first.

    ``indices``/``counts``: vocabulary positions and counts of the cell's non-zero genes (sorted positions);
    ``tech_mean``: cleaned technology mean (:func:`clean_technology_mean`). Value of gene g =
    counts_g / sum(counts) × 1e4 / tech_mean_g; non-zero values ranked descending (stable: ties keep
    vocabulary order); token = position + ``aux_tokens``. A cell with zero counts gives the context only.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    n_genes = max(0, int(max_seq_len) - len(context))
    if total <= 0 or n_genes == 0:
        return context.astype(np.int64)[: int(max_seq_len)]
    values = counts * (TARGET_SUM / total) / tech_mean[indices]
    nz = values != 0
    idx, values = np.asarray(indices)[nz], values[nz]
    order = np.argsort(-values, kind="stable")[:n_genes]
    return np.concatenate([context.astype(np.int64), idx[order].astype(np.int64) + aux_tokens])


def tokenize(Xv, tech_mean: np.ndarray, context: np.ndarray, max_seq_len: int = 1500, aux_tokens: int = AUX_TOKENS) -> np.ndarray:
    """Tokenise cells ``(n_cells, n_vocab)`` (vocabulary-aligned counts) into ``(n_cells, max_seq_len)`` int64,
    right-padded with ``RAW_PAD`` (0) as the reference's tokenised data (see :func:`tokenize_row`)."""
    Xv = sp.csr_matrix(Xv)
    Xv.eliminate_zeros()
    Xv.sort_indices()
    out = np.full((Xv.shape[0], max_seq_len), RAW_PAD, dtype=np.int64)
    for i in range(Xv.shape[0]):
        a, b = Xv.indptr[i], Xv.indptr[i + 1]
        t = tokenize_row(Xv.indices[a:b], Xv.data[a:b], tech_mean, context, max_seq_len, aux_tokens)
        out[i, : len(t)] = t
    return out


class CellTokenDataset(torch.utils.data.Dataset):
    """Cells as token sequences, tokenised on demand (in DataLoader workers when ``num_workers`` > 0).

    Item ``i`` (a row of ``Xv``) is ``(tokens, i)``: a 1-D int64 tensor from :func:`tokenize_row`.
    """

    def __init__(self, Xv: sp.csr_matrix, tech_mean: np.ndarray, context: np.ndarray, max_seq_len: int = 1500,
                 aux_tokens: int = AUX_TOKENS):
        self.Xv = sp.csr_matrix(Xv)
        self.Xv.sort_indices()
        self.tech_mean = tech_mean
        self.context = context
        self.max_seq_len = int(max_seq_len)
        self.aux_tokens = aux_tokens

    def __len__(self) -> int:
        return self.Xv.shape[0]

    def lengths(self) -> np.ndarray:
        """Token count of every cell (context included) without tokenising."""
        nnz = np.diff(self.Xv.indptr)
        return np.minimum(nnz + len(self.context), self.max_seq_len)

    def __getitem__(self, i: int):
        a, b = self.Xv.indptr[i], self.Xv.indptr[i + 1]
        t = tokenize_row(self.Xv.indices[a:b], self.Xv.data[a:b], self.tech_mean, self.context, self.max_seq_len, self.aux_tokens)
        return torch.from_numpy(t), i


def collate_tokens(items, pad_to: int | None = None):
    """Stack variable-length token tensors into ``(B, L)`` int64 padded with PAD (1); L = ``pad_to`` or the
    longest sequence. Returns ``(tokens, indices)``."""
    length = pad_to or max(len(t) for t, _ in items)
    out = torch.full((len(items), length), PAD_TOKEN, dtype=torch.long)
    for r, (t, _) in enumerate(items):
        out[r, : len(t)] = t[:length]
    return out, torch.tensor([i for _, i in items], dtype=torch.long)


def iter_cell_embeddings(model: Nicheformer, dataset: CellTokenDataset, cells: np.ndarray, device, batch_size: int,
                         num_workers: int = 0, layer: int = -1, exclude_padding: bool = False, precision: str = "auto"):
    """Yield ``(cell_rows, embeddings)`` (int64 ``(b,)``, float32 ``(b, dim)``) for the rows ``cells``.

    ``exclude_padding``: cells sorted by token count (longest first) and each batch padded to its longest
    sequence; otherwise (default) every sequence is padded to ``max_seq_len`` (official ``get_embeddings``).
    """
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    cells = np.asarray(cells, dtype=np.int64)
    if exclude_padding:
        cells = cells[np.argsort(-dataset.lengths()[cells], kind="stable")]
        pad_to = None
    else:
        pad_to = dataset.max_seq_len
    batches = [cells[i : i + batch_size].tolist() for i in range(0, len(cells), batch_size)]
    loader = make_loader(dataset, batch_size, num_workers, device, collate_fn=functools.partial(collate_tokens, pad_to=pad_to),
                         batch_sampler=batches)
    with torch.no_grad():
        for tokens, idx in tqdm(loader, desc="nicheformer", unit="batch", mininterval=5):
            with autocast(device, dtype):
                emb = model.embed(tokens.to(device, non_blocking=True), layer, exclude_padding)
            yield idx.numpy(), emb.float().cpu().numpy()


def embed_cells(model: Nicheformer, dataset: CellTokenDataset, device="cpu", batch_size: int = 64, num_workers: int = 0,
                layer: int = -1, exclude_padding: bool = False, precision: str = "auto") -> np.ndarray:
    """``(n_cells, dim)`` float32 embeddings of every cell of ``dataset`` (row order)."""
    out = np.full((len(dataset), model.dim), np.nan, dtype=np.float32)
    for idx, emb in iter_cell_embeddings(model, dataset, np.arange(len(dataset)), device, batch_size, num_workers, layer,
                                         exclude_padding, precision):
        out[idx] = emb
    return out


# ============================================================================================== encoder


def check_params(params: dict | None) -> dict:
    """Merge ``params`` over :data:`DEFAULTS`; raise ValueError naming unknown or invalid keys."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"encoders.nicheformer: unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    if int(p["max_seq_len"]) <= N_CONTEXT:
        raise ValueError(f"encoders.nicheformer.max_seq_len must be > {N_CONTEXT}, got {p['max_seq_len']}")
    return p


def prepare_cells(adata, cells, p: dict, vocab: pd.Index):
    """Cells to embed and the spot of each: returns ``(Xv, spot_index, keep_rows)`` after logging every drop.

    ``cells`` None / empty → one cell per spot of ``adata``.
    """
    if cells is None or cells.n_obs == 0:
        if cells is not None:
            log.info("nicheformer: cells AnnData is empty; using each spot as one cell")
        cells = adata
        spot_idx = np.arange(adata.n_obs)
        log.info("nicheformer: no cells AnnData; each of the %d spots is embedded as one cell", adata.n_obs)
    else:
        if "spot_id" not in cells.obs.columns:
            raise ValueError("nicheformer: the cells AnnData needs obs['spot_id'] (the spot/patch of each cell)")
        spot_idx = adata.obs_names.astype(str).get_indexer(cells.obs["spot_id"].astype(str))
        n_unknown = int((spot_idx < 0).sum())
        if n_unknown:
            log.warning("nicheformer: %d of %d cells name a spot_id not in the spots table; dropped", n_unknown, cells.n_obs)
    gene_map = load_gene_map(p["gene_map"]) if p["gene_map"] else None
    ids, stats = map_gene_ids(cells.var_names, cells.var, gene_map, p["gene_id_column"])
    Xv, vstats = align_to_vocabulary(cells.X, ids, vocab)
    unmapped = list(cells.var_names[ids == ""][:8])
    log.info(
        "nicheformer: %d genes in the data; Ensembl id from var['%s'] %d, already Ensembl %d, via gene map %d, "
        "unmapped %d (e.g. %s); %d genes (%d distinct ids) in the vocabulary of %d; %d duplicate ids summed",
        stats["n_genes"], p["gene_id_column"], stats["from_var_column"], stats["already_ensembl"], stats["from_gene_map"],
        stats["unmapped"], unmapped, vstats["in_vocabulary"], vstats["distinct_in_vocabulary"], len(vocab),
        vstats["duplicates_summed"],
    )
    if vstats["in_vocabulary"] == 0:
        raise ValueError(
            "nicheformer: no gene of the data is in the Nicheformer vocabulary; var_names must be gene symbols "
            f"(mapped with {p['gene_map']}) or Ensembl ids, or set encoders.nicheformer.gene_id_column"
        )
    X = cells.X
    total = np.asarray(X.sum(axis=1)).ravel()
    total = np.nan_to_num(total, nan=0.0)
    vocab_total = np.asarray(Xv.sum(axis=1)).ravel()
    zero = total <= 0
    no_vocab = (~zero) & (vocab_total <= 0)
    if zero.any():
        log.warning("nicheformer: %d of %d cells have zero counts; dropped", int(zero.sum()), len(total))
    if no_vocab.any():
        log.warning("nicheformer: %d cells have counts only in genes outside the vocabulary; dropped", int(no_vocab.sum()))
    keep = np.flatnonzero((spot_idx >= 0) & ~zero & ~no_vocab)
    return Xv, spot_idx, keep


def shared_cells(cells, keep: np.ndarray):
    """Embed each physical cell once when it belongs to several (overlapping) patches.

    Cell-level datasets list one row per (cell, patch) pair (``obs['cell_id']`` repeats across patches with the
    same counts). Returns ``(embed_rows, members)``: the rows of ``keep`` to run through the model (the first row
    of each ``cell_id``) and a function ``members(rows, emb) -> (all_rows, emb_per_row)`` that hands each
    representative's embedding to every kept row of the same cell. Without ``cell_id`` every kept row is embedded.
    """
    keep = np.asarray(keep, dtype=np.int64)
    if cells is None or "cell_id" not in getattr(cells, "obs", {}) or len(keep) == 0:
        return keep, lambda rows, emb: (rows, emb)
    codes = pd.factorize(cells.obs["cell_id"].astype(str).to_numpy()[keep])[0]
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    _, first = np.unique(codes, return_index=True)
    embed_rows = keep[np.sort(first)]
    code_of_row = dict(zip(keep.tolist(), codes.tolist()))
    if len(embed_rows) < len(keep):
        log.info("nicheformer: %d (cell, patch) rows share %d distinct cells; each cell is embedded once",
                 len(keep), len(embed_rows))

    def members(rows, emb):
        c = np.fromiter((code_of_row[int(r)] for r in rows), dtype=np.int64, count=len(rows))
        lo = np.searchsorted(sorted_codes, c, "left")
        hi = np.searchsorted(sorted_codes, c, "right")
        idx = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
        return keep[order[idx]], np.repeat(emb, hi - lo, axis=0)

    return embed_rows, members


@register_weights_check("nicheformer")
def check_nicheformer_weights(path: str | Path, arch: dict | None = None) -> dict:
    """Key report of a Nicheformer weights file (.ckpt or safetensors) against the exact architecture, built on
    the meta device; raises :class:`WeightsError` on any mismatch (see :func:`load_nicheformer`)."""
    _, report = load_nicheformer(path, arch=arch, device="meta")
    return report


@register("nicheformer", "gex", needs_gpu=True, description="Nicheformer mean of last-layer token outputs per cell, averaged per spot (512-d)")
def encode_nicheformer(adata, params: dict, ctx: EncodeContext) -> pd.DataFrame:
    """Nicheformer embedding of every spot: mean over its cells of the per-cell embedding (module docstring).

    Parameters
    ----------
    adata : spots AnnData, ``X`` raw counts (n_spots, n_genes), var_names gene symbols (or Ensembl ids).
    params : see :data:`DEFAULTS`.
    ctx : ``device``, ``batch_size`` (cells per forward pass), ``num_workers`` (tokenising processes), ``seed``
        (random weights only); ``ctx.extra["cells"]`` an optional cells AnnData (``obs['spot_id']``, raw
        counts ``X``, gene-symbol var_names).

    Returns
    -------
    DataFrame (n_spots, 512) float32 indexed by spot id; NaN rows for spots without an embeddable cell.

    Raises
    ------
    WeightsError (weights missing / not matching), ValueError (bad params, no vocabulary gene, negative
    counts), FileNotFoundError (vocabulary, technology mean or gene map missing).
    """
    p = check_params(params)
    device = resolve_device(ctx.device)
    model, _ = load_nicheformer(p["weights"], p["arch"], bool(p["tiny"]), device, bool(p["allow_random_weights"]), ctx.seed)
    n_tokens = model.hparams["n_tokens"]
    context_length = model.hparams["context_length"]
    max_seq_len = int(p["max_seq_len"])
    if max_seq_len > context_length:
        raise ValueError(f"encoders.nicheformer.max_seq_len {max_seq_len} exceeds the model's context length {context_length}")
    if not p["exclude_padding"] and max_seq_len < context_length:
        log.warning("nicheformer: max_seq_len %d < context length %d: the mean over padded positions is not the official "
                    "get_embeddings, which pads every cell to the context length", max_seq_len, context_length)
    vocab_path = resolve_resource(p["vocabulary"], "Nicheformer vocabulary (model.h5ad)", "encoders.nicheformer.vocabulary")
    vocab = load_vocabulary(vocab_path)
    if len(vocab) + AUX_TOKENS > n_tokens:
        raise ValueError(f"vocabulary {vocab_path} has {len(vocab)} genes, the model only {n_tokens - AUX_TOKENS} gene tokens")
    mean = load_technology_mean(p["technology_mean"], len(vocab), vocab_path.parent)
    context = context_tokens(p["specie"], p["assay"], p["modality"])
    log.info("nicheformer: context tokens [specie, assay, modality] = %s; max_seq_len %d; exclude_padding %s; layer %d",
             context.tolist(), max_seq_len, p["exclude_padding"], p["layer"])
    Xv, spot_idx, keep = prepare_cells(adata, ctx.extra.get("cells") if ctx.extra else None, p, vocab)
    ds = CellTokenDataset(Xv, mean, context, max_seq_len)
    lengths = ds.lengths()[keep]
    if len(keep):
        log.info("nicheformer: %d cells; tokens per cell median %d, max %d; %d truncated at %d",
                 len(keep), int(np.median(lengths)), int(lengths.max()), int((np.diff(Xv.indptr)[keep] + N_CONTEXT > max_seq_len).sum()), max_seq_len)
    sums = np.zeros((adata.n_obs, model.dim), dtype=np.float64)
    counts = np.zeros(adata.n_obs, dtype=np.int64)
    embed_rows, members = shared_cells(ctx.extra.get("cells") if ctx.extra else None, keep)
    t0 = time.perf_counter()
    for rows, emb in iter_cell_embeddings(model, ds, embed_rows, device, ctx.batch_size, ctx.num_workers,
                                          int(p["layer"]), bool(p["exclude_padding"]), p["precision"]):
        rows, emb = members(rows, emb)
        s = spot_idx[rows]
        np.add.at(sums, s, emb.astype(np.float64))
        np.add.at(counts, s, 1)
    dt = time.perf_counter() - t0
    log.info("nicheformer: %d cells in %.1f s (%.1f cells/s) on %s, batch %d",
             len(embed_rows), dt, len(embed_rows) / max(dt, 1e-9), device, ctx.batch_size)
    emb = np.full((adata.n_obs, model.dim), np.nan, dtype=np.float32)
    has = counts > 0
    emb[has] = (sums[has] / counts[has, None]).astype(np.float32)
    if (~has).any():
        log.warning("nicheformer: %d of %d spots have no embeddable cell; their rows are NaN", int((~has).sum()), adata.n_obs)
    log.info("nicheformer: cells per spot median %.0f (spots with cells)", float(np.median(counts[has])) if has.any() else 0.0)
    return embedding_frame(emb, adata.obs_names)
