"""Checks of the configured probe tasks against the prepared spots.

A task names an ``obs`` column (classification, ``label``) or an ``obsm`` key (regression, ``obsm``) of
``results/<dataset>/spots.h5ad``. The column exists only once the spots are prepared, so the first job that reads
them for a task (the probe) checks every task and fails, rather than skipping a task whose column is absent: a
misspelled label would otherwise vanish from the SIS table with a warning in one log.
"""

from __future__ import annotations

from typing import Mapping


class TaskError(ValueError):
    """A configured task that the prepared spots cannot serve; the message names the task and the fix."""


def task_problems(obs_columns, obsm_keys, tasks: Mapping[str, Mapping]) -> list[str]:
    """Problems of ``tasks`` (``{task: {type, label | obsm, ...}}``) given the spots' columns and obsm keys.

    Parameters
    ----------
    obs_columns : names of the ``obs`` columns of the spots AnnData.
    obsm_keys : keys of its ``obsm``.
    tasks : the dataset's ``tasks`` config block.

    Returns
    -------
    One message per problem (empty when every task can be served), each naming the task, its config key, the
    missing column or key, and the columns or keys that exist.
    """
    obs_columns, obsm_keys = [str(c) for c in obs_columns], [str(k) for k in obsm_keys]
    out = []
    for task, spec in tasks.items():
        ttype = spec.get("type")
        if ttype == "classification":
            col = spec.get("label")
            if col not in obs_columns:
                out.append(f"task {task!r} (tasks.{task}.label): the spots have no obs column {col!r}; "
                           f"obs columns: {obs_columns}")
        elif ttype == "regression":
            key = spec.get("obsm")
            if key not in obsm_keys:
                out.append(f"task {task!r} (tasks.{task}.obsm): the spots have no obsm key {key!r}; "
                           f"obsm keys: {obsm_keys}")
        else:
            out.append(f"task {task!r} (tasks.{task}.type): unknown type {ttype!r}; use classification or regression")
    return out


def check_tasks(adata, tasks: Mapping[str, Mapping], source: str = "spots") -> None:
    """Raise :class:`TaskError` listing every task of ``tasks`` whose label column or obsm key ``adata`` lacks.

    ``source`` names the spots file in the message (e.g. ``results/her2st/spots.h5ad``).
    """
    problems = task_problems(adata.obs.columns, adata.obsm.keys(), tasks)
    if problems:
        raise TaskError(
            f"{source}: {len(problems)} configured task(s) cannot be evaluated:\n  - " + "\n  - ".join(problems)
            + "\nFix the task's label/obsm under datasets.<name>.tasks in the config (or remove the task)."
        )
