"""Analyses beyond the probes: the spectral analysis of the cross-covariance, data scaling (offline encoders or
continued Nicheformer masked-language-model training) and UMAP coordinates.

Stage 5 of the workflow; may use every earlier stage (``data``, ``encoders``, ``methods``, ``evaluation``).
"""
