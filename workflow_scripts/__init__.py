"""cellsynergy-workflow: the importable code behind the Snakemake rules, one package per stage of the DAG.

==============  ==========================================================================================
package         holds
==============  ==========================================================================================
``data``        readers (HER2ST, Xenium, Visium), the spot data model, tiling, patches, downloads, ``prepare``
``encoders``    frozen unimodal encoders (pca, morphology, UNI2-h, Nicheformer), their weights, ``embed``
``methods``     the ten fusion methods, the training loop, baselines, ``align``
``evaluation``  probes, spatial-ring probes, spatial consistency, SIS, result tables
``analysis``    spectral analysis, data scaling, Nicheformer MLM post-training, UMAP coordinates
``figures``     plots drawn from result tables only
==============  ==========================================================================================

Imports point down the stages only (``figures`` may import ``evaluation``, never the reverse); the shared
table and logging helpers live in :mod:`workflow_scripts.io`. Each CLI is ``python -m workflow_scripts.<stage>.<module>``.
"""
