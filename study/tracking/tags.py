"""The tags a study's parent run carries: what `study report`, `ls`, `resume` and `import` read
back about the plan (counts, target, hash, claims, overrides, the paper's budget, provenance)."""

from __future__ import annotations

import json

from study import provenance
from study.claim_spec import Claim
from study.errors import ConfigError
from study.pack_layout import GpuModel
from study.space import Plan, gpu_from_record, gpu_record
from study.spec import AUTO_PACK
from study.tasks import TASKS
from study.tracking import StudySummary, Tags
from study.vocabulary import FAILED

# On the parent run of a study that `study import` made from result files (not `study run`).
IMPORTED_TAG = "study.imported"


# A random search that draws p_detach has a variant per trial: past this many, none are kept
# (MLflow tags hold 8,000 characters).
MAX_VARIANTS = 100


def parent_tags(plan: Plan) -> dict[str, str]:
    """Every tag of a new study's parent run (study run and study import write the same)."""
    spec = plan.spec
    target = spec.target if spec.target is not None else TASKS[spec.task].default_target
    tags = {
        "study.n_trials": str(plan.n_trials),
        "study.target": str(target),
        "study.spec_hash": spec.spec_hash(),
        "study.version": provenance.version(),
        "study.searcher": spec.search.searcher,
        "study.smoke": str(spec.smoke).lower(),
        "study.source": spec.source,
    }
    if spec.claims:
        # The claims as data (MLflow tags hold 8,000 characters; a paper space's few claims
        # need about 1,500), so the report tests them without the YAML file at hand.
        tags["study.claims"] = json.dumps([claim.to_dict() for claim in spec.claims])
    if spec.base_iterations is not None:
        tags["study.base_iterations"] = str(spec.base_iterations)
    if spec.overrides:
        tags["study.overrides"] = json.dumps([list(pair) for pair in spec.overrides])
    variants = sorted({(t.config.method, t.config.p_detach) for t in plan.trials})
    if variants and len(variants) <= MAX_VARIANTS:  # Optuna plans no trials: its report names
        # the methods of the trials it ran. Kept, a method with no run yet is named "not enough
        # data" by the report, not left out of every line.
        tags["study.variants"] = json.dumps([list(v) for v in variants])
    if spec.resources.pack == AUTO_PACK:
        # What auto resolved to, and for which GPU: `study resume` plans the same packs.
        tags["study.pack_auto"] = str(plan.pack_size)
        if plan.gpu is not None:
            tags["study.pack_gpu"] = json.dumps(gpu_record(plan.gpu))
    commit = provenance.git_commit()
    if commit:
        tags["study.git_commit"] = commit
    return tags


def claims_from_tags(tags: dict[str, str]) -> tuple[Claim, ...]:
    """The claims a parent run's tags hold (none for a study without claims)."""
    text = tags.get("study.claims")
    return tuple(Claim(**item) for item in json.loads(text)) if text else ()


def variants_from_tags(tags: dict[str, str]) -> tuple[tuple[str, float], ...]:
    """The (method, p_detach) pairs the study's plan trains (none for Optuna, or older studies)."""
    text = tags.get("study.variants")
    return tuple((str(method), float(p)) for method, p in json.loads(text)) if text else ()


def overrides_from_tags(tags: dict[str, str]) -> tuple[tuple[str, object], ...]:
    text = tags.get("study.overrides")
    return tuple((key, value) for key, value in json.loads(text)) if text else ()


def base_iterations_from_tags(tags: dict[str, str]) -> int | None:
    text = tags.get("study.base_iterations")
    return int(text) if text else None


def pack_gpu_from_tags(tags: dict[str, str]) -> GpuModel | None:
    """The GPU a study's packs were sized for (parent_tags), None where none was."""
    text = tags.get("study.pack_gpu")
    if not text:
        return None
    try:
        return gpu_from_record(json.loads(text))
    except ValueError as error:  # json's errors are ValueErrors too
        raise ConfigError(
            f"parent run tag study.pack_gpu: not a GPU record ({error}); set it to "
            '{"key": ..., "name": ..., "sms": N} or delete it (then packs are planned without '
            "a GPU)"
        ) from error


def pack_tags(pack_id: str, size: int) -> Tags:
    """A packed trial's tags, as study run and study import give them."""
    return {"study.pack": pack_id, "study.pack_size": str(size)}


def parent_status(summary: StudySummary) -> str:
    """How a study's parent run ends, as `study run` ends it: FAILED with a failed trial,
    KILLED with trials pending, else FINISHED."""
    if summary.count(FAILED):
        return "FAILED"
    return "KILLED" if summary.pending else "FINISHED"
