"""Evaluation of embeddings: linear probes (macro-F1, R²), spatial-ring probes, spatial consistency, the
Synergistic Information Score and the collected result tables.

Stage 4 of the workflow (after ``data`` → ``encoders`` → ``methods``); reads embedding tables and the spots
AnnData, writes per-embedding result tables (:func:`workflow_scripts.io.write_result_table`).
"""
