"""``celery -A app langfuse experiment``: a Langfuse dataset run as Celery tasks, from a shell.

::

    celery -A myservice langfuse experiment --dataset qa-set --task tasks.answer \\
        --evaluator evals:exact_match [--evaluator ...] [--run-evaluator evals:accuracy] \\
        [--name NAME] [--run-name NAME] [--description TEXT] [--max-concurrency N] \\
        [--resend-unfinished]

Fetches the dataset with the Langfuse SDK (``Langfuse.get_dataset``, with the keys from the
app's settings or ``LANGFUSE_*``), runs ``tracing.run_experiment`` with the app given by
``-A`` (its broker and result backend), shows a progress bar while items settle, then a
summary table: items
succeeded and failed, each evaluation's count, mean, min and max, the run evaluations, the
experiment id and its URL. Calling it again with the same ``--run-name`` resumes the run.

Exit status: 0 when every item succeeded, 1 when some failed (the table says which), 2 for
bad usage (no app, an evaluator that cannot be imported, no keys, no such dataset).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import click

__all__ = ["experiment"]


def _function(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{spec!r}: expected module:function")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"{spec!r} cannot be imported: {exc}") from None
    if not callable(function):
        raise click.BadParameter(f"{spec!r} is not callable")
    return function


@click.command("experiment")
@click.option("--dataset", required=True, help="Name of the Langfuse dataset to run over.")
@click.option("--task", "task_name", required=True, help="Name of the Celery task to send.")
@click.option("--evaluator", "evaluators", multiple=True, metavar="MODULE:FUNC",
              help="An item evaluator (repeatable).")
@click.option("--run-evaluator", "run_evaluators", multiple=True, metavar="MODULE:FUNC",
              help="A run evaluator (repeatable).")
@click.option("--name", help="Experiment name (default: the dataset's name).")
@click.option("--run-name", help="Run name; the same name again resumes the run.")
@click.option("--description", help="Description of the experiment.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=50, show_default=True,
              help="Items in flight at most.")
@click.option("--resend-unfinished", is_flag=True,
              help="Resume: send again the items published before that never finished.")
@click.pass_context
def experiment(ctx: click.Context, dataset: str, task_name: str, evaluators: Sequence[str],
               run_evaluators: Sequence[str], name: str | None, run_name: str | None,
               description: str | None, max_concurrency: int, resend_unfinished: bool) -> None:
    """Run a Langfuse dataset as Celery tasks on the workers, with evaluators."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("run it as a Celery sub-command with the app: "
                               "celery -A <app> langfuse experiment ...")
    item_evaluators = [_function(spec) for spec in evaluators]
    run_level = [_function(spec) for spec in run_evaluators]
    data = _dataset(dataset, app)
    from tracing.experiments._experiments import run_experiment

    with click.progressbar(length=len(data.items), label=f"{dataset}: items",
                           show_pos=True) as bar:
        result = run_experiment(
            name=name or dataset, data=data, task=task_name, evaluators=item_evaluators,
            run_evaluators=run_level, run_name=run_name, description=description,
            max_concurrency=max_concurrency, app=app, resend_unfinished=resend_unfinished,
            on_progress=lambda done, total, item: bar.update(1))
    for line in summary_table(result):
        click.echo(line)
    raise SystemExit(1 if result.failed else 0)


def _dataset(name: str, app: Any) -> Any:
    """The dataset, fetched with the keys the app's settings or the environment give."""
    from langfuse import Langfuse

    from tracing._config import ConfigError, load_config

    try:
        config = load_config(app_config=app.conf)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not config.has_keys:
        raise click.UsageError("set LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY (and "
                               "LANGFUSE_BASE_URL) to fetch the dataset")
    client = Langfuse(public_key=config.public_key, secret_key=config.secret_key,
                      base_url=config.base_url, tracing_enabled=False)
    try:
        return client.get_dataset(name)
    except Exception as exc:
        raise click.UsageError(f"could not fetch dataset {name!r} from {config.base_url}: "
                               f"{exc}") from None


def summary_table(result: Any) -> list[str]:
    """The summary printed at the end: items, evaluations, run evaluations, where to look."""
    items = result.item_results
    failed = result.failed
    rows = [("items", str(len(items)), "", "", ""),
            ("  succeeded", str(len(items) - len(failed)), "", "", ""),
            ("  failed", str(len(failed)), "", "", "")]
    values: dict[str, list[float]] = {}
    for item in items:
        for evaluation in item.evaluations:
            if isinstance(evaluation.value, (int, float)):
                values.setdefault(str(evaluation.name), []).append(float(evaluation.value))
    for metric, numbers in sorted(values.items()):
        rows.append((metric, str(len(numbers)), f"{sum(numbers) / len(numbers):.3f}",
                     f"{min(numbers):.3f}", f"{max(numbers):.3f}"))
    for evaluation in result.run_evaluations:
        value = evaluation.value
        text = f"{value:.3f}" if isinstance(value, (int, float)) else str(value)
        rows.append((f"run: {evaluation.name}", "", text, "", ""))
    header = ("", "count", "mean", "min", "max")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-" * len(max(lines, key=len)))
    lines += [f"run {result.run_name!r}, experiment {result.experiment_id}"]
    if result.experiment_url:
        lines.append(result.experiment_url)
    lines += [f"failed: task {item.task_id}: {item.error}" for item in failed[:10]]
    return lines
