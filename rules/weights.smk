# Pretrained weights of the foundation-model encoders (workflow_scripts/encoders/weights.py).
# Never part of `all`: the embed rule reads weights.<model>.path through its params, not as an input, so a
# machine without the files fails in the encoder with a message that says where to get them. Fetch them
# explicitly on a machine with internet access, e.g.
#   HF_TOKEN=hf_... snakemake --cores 1 resources/weights/uni2h/pytorch_model.bin
#   HF_TOKEN=hf_... snakemake --cores 1 download_all_weights --configfile config/paper.yaml
# The token is read by the Python code (HF_TOKEN, or a saved `hf auth login`), not declared with `envvars:`,
# so that parsing the workflow never requires it.
from workflow_scripts.encoders.weights import WEIGHT_SOURCES, weights_config


localrules:
    download_weights,
    download_all_weights,


rule download_weights:
    """Download one model's weights from Hugging Face into resources/weights/{model}/ (HF_TOKEN for UNI2-h)."""
    output:
        "resources/weights/{model}/{filename}",
    log:
        "logs/weights/download_{model}_{filename}.log",
    wildcard_constraints:
        model="uni2h|nicheformer",
        filename=r"[^/]+",
    conda:
        "../envs/cellsynergy.yaml"
    params:
        repo_id=lambda wc: weights_config(config, wc.model)["repo_id"],
        repo_file=lambda wc: weights_config(config, wc.model)["filename"],
        revision=lambda wc: weights_config(config, wc.model)["revision"] or "main",
    shell:
        "python -m workflow_scripts.encoders.weights download --model {wildcards.model} --dest {output}"
        " --repo-id {params.repo_id:q} --filename {params.repo_file:q} --revision {params.revision:q} --log {log}"


rule download_all_weights:
    """Fetch the weights of every foundation-model encoder that the configured datasets use (target rule)."""
    input:
        [
            weights_config(config, m)["path"]
            for m in sorted(
                {encoder_of(d, mod) for d in DATASETS for mod in MODALITIES} & set(WEIGHT_SOURCES)
            )
        ],
