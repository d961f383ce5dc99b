"""Figures, drawn only from result tables (so redrawing a figure reruns no computation).

:mod:`workflow_scripts.figures.evaluation`: probe scores, SIS heatmap, spatial rings;
:mod:`workflow_scripts.figures.analysis`: spectra, spatial consistency, scaling, training curves, UMAPs.
"""
