"""Dry runs of the paper configuration: the downloads are part of the DAG before anything is on disk."""

from workflow_utils import REPO, job_counts, snakemake, workdir

PAPER = REPO / "config/paper.yaml"


def dry(tmp_path, *targets):
    wd = workdir(tmp_path)
    r = snakemake(wd, *targets, "-n", "--quiet", "rules", configfile=PAPER)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return job_counts(r.stdout)


def test_paper_all_plans_downloads_and_every_prepare(tmp_path):
    assert not (REPO / "resources/lung/raw").exists()  # nothing of the paper's raw data is on disk
    c = dry(tmp_path, "all")
    assert c["prepare"] == 3
    # lung: 7 test donors x 3 hand-placed files, the Seurat cell table, the public annotations archive
    assert c["manual_lung_transcripts_csv_gz"] == c["manual_lung_registered_he_tif"] == 7
    assert c["manual_lung_regions_geojson"] == 7 and c["manual_lung_cell_metadata_csv_gz"] == 1
    assert c["fetch_lung_gse250346_he_annotations_tar_gz"] == 1  # made into the regions by hand: fetched first
    # breast: the three outs.zip members, the H&E and its alignment are public; the regions are not
    for rule in ("fetch_breast_outs_zip", "fetch_breast_he_image_ome_tif", "fetch_breast_he_imagealignment_csv",
                 "manual_breast_regions_geojson"):
        assert c[rule] == 1, rule
    assert c["manual_thymus_h5ad"] == c["manual_thymus_he_ome_tif"] == 4
    assert c["sis"] == 3 and c["embed"] == 6


def test_prepare_depends_on_the_download_jobs(tmp_path):
    c = dry(tmp_path, "results/breast/spots.h5ad")
    assert c == {"fetch_breast_outs_zip": 1, "fetch_breast_he_image_ome_tif": 1,
                 "fetch_breast_he_imagealignment_csv": 1, "manual_breast_regions_geojson": 1, "prepare": 1}


def test_download_target_per_dataset(tmp_path):
    c = dry(tmp_path, "download_thymus")
    assert c == {"manual_thymus_h5ad": 4, "manual_thymus_he_ome_tif": 4, "download_thymus": 1}
