"""What the MLflow UI shows first: experiments marked as model training (not GenAI), with a description, and saved
comparison views of a sweep or study — its runs filtered, grouped (by subset and phase) and charted per epoch.

A view is MLflow's own "shared view state": a JSON document in the experiment tag ``mlflow.sharedViewState.<key>``,
opened by the URL ``<ui>/#/experiments/<id>/runs?viewStateShareKey=<key>&compareRunsMode=CHART`` (plus
``workflowType=machine_learning``) (the UI's Share button
writes the same tag). The key is a hash of the document, so writing a view twice is harmless.
"""

from __future__ import annotations

import hashlib
import json

from mlflow import MlflowClient

EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description MLflow shows on run and experiment pages (Markdown)
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
DEFAULT_UI = "http://127.0.0.1:5000"  # where `python -m experiments ui` serves


def describe_experiment(client: MlflowClient, experiment_id: str, description: str) -> None:
    """Mark the experiment as model training (MLflow 3 otherwise opens it in GenAI mode) and give it a description,
    unless it has one (a user's own words win)."""
    tags = client.get_experiment(experiment_id).tags
    if tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    if not tags.get(NOTE_TAG):
        client.set_experiment_tag(experiment_id, NOTE_TAG, description)


def update_parent(client: MlflowClient, parent, note: str, metrics: dict[str, float], end_time: int) -> None:
    """Bring a sweep's or study's parent run (``parent``: its mlflow Run as read) to ``note``, ``metrics`` (step 0)
    and ``end_time`` (ms; 0 = unknown), writing only what differs: run twice, it logs no second metric point."""
    import time

    from mlflow.entities import Metric

    run_id = parent.info.run_id
    if parent.data.tags.get(NOTE_TAG) != note:
        client.set_tag(run_id, NOTE_TAG, note)
    now = int(time.time() * 1000)
    changed = [Metric(k, float(v), now, 0) for k, v in metrics.items() if parent.data.metrics.get(k) != float(v)]
    if changed:
        client.log_batch(run_id, metrics=changed)
    if end_time and parent.info.end_time != end_time:
        client.set_terminated(run_id, "FINISHED", end_time=end_time)


def comparison_view(search_filter: str, group_by_tags: list[str], order_by: str = "attributes.start_time") -> dict:
    """A runs view: the runs matching ``search_filter``, grouped by the tags ``group_by_tags`` (mean of each group in
    the charts; no groups when empty), all groups expanded."""
    return {
        "searchFilter": search_filter,
        "orderByKey": order_by,
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": tag} for tag in group_by_tags]}
        if group_by_tags else None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "runListHidden": False,
    }


def save_view(client: MlflowClient, experiment_id: str, view: dict) -> str:
    """Store ``view`` as a shared view of the experiment; its key."""
    text = json.dumps(view, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    tag = SHARED_VIEW_PREFIX + key
    if client.get_experiment(experiment_id).tags.get(tag) != text:
        client.set_experiment_tag(experiment_id, tag, text)
    return key


def view_url(ui_url: str, experiment_id: str, key: str | None = None) -> str:
    """The experiment's runs page in the model-training workflow (MLflow 3's UI otherwise remembers GenAI), showing
    the saved view ``key`` as charts."""
    return f"{ui_url.rstrip('/')}/{view_link(experiment_id, key)}"


def view_link(experiment_id: str, key: str | None = None) -> str:
    """``view_url`` relative to the UI (for Markdown descriptions shown inside it)."""
    view = f"viewStateShareKey={key}&compareRunsMode=CHART&" if key else ""
    return f"#/experiments/{experiment_id}/runs?{view}workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A Markdown link to a run that works inside the MLflow UI, whatever host serves it."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


__all__ = ["describe_experiment", "update_parent", "comparison_view", "save_view", "view_url", "view_link", "run_link", "NOTE_TAG",
           "DEFAULT_UI"]
