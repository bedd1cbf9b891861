"""The operator's command line: ``celery-langfuse`` / ``python -m tracing``.

``status``       the configuration in force (secrets masked), the spool, the last shipping result
``drain``        ship the spool now, bounded by ``--timeout``, with a progress bar
``dead-letter``  ``list`` / ``replay`` / ``purge`` the records Langfuse rejected
``check``        verify the Langfuse host and keys: health, then an authenticated call
``experiment``   (``celery -A app langfuse experiment`` only) a dataset run as Celery tasks,
                 see ``_cli_experiment``

The same commands run as a Celery sub-command, ``celery [-A app] langfuse status|drain|...``:
pyproject registers :data:`celery_command` under the ``celery.commands`` entry point group,
which Celery's own command line loads.

Every command reads the same configuration as the worker (``LANGFUSE_*``,
``CELERY_LANGFUSE_*``); ``--spool-dir`` overrides the spool. Exit status: 0 when all is well,
1 when the command worked but found a problem (records left, check failed), 2 for bad usage.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx

from tracing._config import Config, ConfigError, load_config, setting_sources
from tracing.experiments._cli import experiment
from tracing.shipping._delivery import cut
from tracing.shipping._shipper import STATUS_FILE, Shipper
from tracing.spool import (
    KIND_OPEN,
    KIND_SCORE,
    KIND_SPAN,
    SegmentWriter,
    encode_frame,
    list_segments,
    read_cursor,
    read_dead_letters,
    remove_dead_letter,
    scan_file,
)
from tracing.spool._drops import read_ledger, totals_by_cause
from tracing.spool._exporter import SpoolExporter


def _config(spool_dir: str | None) -> Config:
    """The worker's configuration; under ``celery -A app langfuse`` with the app's settings."""
    try:
        return load_config(**_sources(spool_dir))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _sources(spool_dir: str | None) -> dict[str, Any]:
    """``load_config`` arguments: ``--spool-dir`` as a keyword, and the app's configuration
    when run as ``celery -A app langfuse ...`` (Celery's ``CLIContext`` holds the app)."""
    context = click.get_current_context(silent=True)
    app = getattr(context.obj, "app", None) if context is not None else None
    return {"app_config": app.conf if app is not None else None,
            **({"spool_dir": spool_dir} if spool_dir else {})}


spool_option = click.option(
    "--spool-dir", help="Spool directory (default: CELERY_LANGFUSE_SPOOL_DIR)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Operate celery-langfuse: inspect and ship a trace spool, check Langfuse."""


@main.command()
@spool_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status(spool_dir: str | None, as_json: bool) -> None:
    """Show the configuration, the spool and the last shipping result."""
    config = _config(spool_dir)
    sections: dict[str, dict[str, Any]] = {
        "configuration": config.masked(),
        "set by": {name: where for name, where in setting_sources(**_sources(spool_dir)).items()
                   if where != "default"},  # the rest are defaults
        "spool": spool_report(config.spool_dir),
        "last shipping": _last_ship(config.spool_dir) or {"state": "never shipped from here"},
    }
    if as_json:
        click.echo(json.dumps(sections, indent=2, default=str))
        return
    for title, values in sections.items():
        click.echo(f"{title}:")
        for key, value in values.items():
            if key.endswith("_age_s") and key.removesuffix("_age_s") + "_at" in values:
                continue  # shown with its time
            if key.endswith("_at"):
                age = values.get(key.removesuffix("_at") + "_age_s")
                value = f"{value} ({age:.0f} s ago)" if value and age is not None else "-"
            click.echo(f"  {key:<24} {value}")


def _moment(epoch: float | None, now: float) -> tuple[str | None, float | None]:
    """An epoch time as ISO-8601 UTC text (to the second) and its age in seconds."""
    if epoch is None:
        return None, None
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z"), round(max(0.0, now - epoch), 1)


def spool_report(spool_dir: Path) -> dict[str, Any]:
    """Unshipped records and bytes, the oldest unshipped record's age, dead letters."""
    segments = list_segments(spool_dir) if spool_dir.is_dir() else []
    spans = opened = pending_bytes = 0
    oldest: float | None = None
    for path, _ in segments:
        cursor = read_cursor(path)
        result = scan_file(path, cursor)
        if result.records:
            oldest = min(oldest or time.time(), path.stat().st_mtime)
        spans += sum(1 for r in result.records if r.kind == KIND_SPAN)
        opened += sum(1 for r in result.records if r.kind == KIND_OPEN)
        pending_bytes += max(0, path.stat().st_size - cursor)
    letters = read_dead_letters(spool_dir) if spool_dir.is_dir() else []
    oldest_at, oldest_age = _moment(oldest, time.time())
    return {
        "directory": str(spool_dir),
        "segments": len(segments),
        "unshipped_spans": spans,
        "unshipped_bytes": pending_bytes,
        "oldest_unshipped_at": oldest_at,
        "oldest_unshipped_age_s": oldest_age or 0,
        "dead_letter_files": len(letters),
        "dead_letter_records": sum(len(letter.records) for letter in letters),
        # Running totals of spans writers could not store (read from the drop ledger, so
        # they show even when no shipper could write its status).
        "spans_dropped_by_writers": totals_by_cause(read_ledger(spool_dir)),
    }


def _last_ship(spool_dir: Path) -> dict[str, Any] | None:
    """The shipper's status file, its epoch times (``*_at``) as ISO-8601 UTC text, each with
    its age in seconds (``*_age_s``)."""
    try:
        data: dict[str, Any] = json.loads((spool_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    now = time.time()
    shown: dict[str, Any] = {}
    for key, value in data.items():
        if key.endswith("_at") and (value is None or isinstance(value, (int, float))):
            shown[key], shown[key.removesuffix("_at") + "_age_s"] = _moment(value, now)
        else:
            shown[key] = value
    return shown


@main.command()
@spool_option
@click.option("--timeout", default=60.0, show_default=True, help="Give up after this many seconds.")
def drain(spool_dir: str | None, timeout: float) -> None:
    """Ship the spool to Langfuse now; what cannot be shipped stays on disk."""
    config = _require_keys(_config(spool_dir))
    shipper = Shipper(config, SpoolExporter(SegmentWriter(config.spool_dir)), orphan_grace=0)
    total = max(1, shipper.pending_bytes())
    deadline = time.monotonic() + timeout
    try:
        with click.progressbar(length=total, label="shipping", show_eta=False) as bar:
            while True:  # at least once: that also closes dead workers' open attempts
                before = shipper.pending_bytes()
                shipper.drain(max(0.0, min(1.0, deadline - time.monotonic())))
                bar.update(max(0, before - shipper.pending_bytes()))
                if time.monotonic() >= deadline or not shipper.pending_bytes():
                    break
    except RuntimeError as exc:  # another shipper (a running worker) holds the spool
        raise click.ClickException(f"{exc}; that worker ships it already") from None
    stats = shipper.stats
    left = shipper.pending_bytes()
    click.echo(
        f"shipped {stats.shipped_spans} span(s) in {stats.requests} request(s); "
        f"dead-lettered {stats.dead_lettered}; dropped at cap {stats.dropped_at_cap}; "
        f"corrupt {stats.corrupt_records}; {left} byte(s) left"
        + (f"; last error: {stats.last_error}" if stats.last_error else "")
    )
    if stats.paused:
        click.echo(stats.paused, err=True)
    raise SystemExit(1 if left else 0)


def _require_keys(config: Config) -> Config:
    if not config.has_keys:
        raise click.UsageError("set LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY (and "
                               "LANGFUSE_BASE_URL) to reach Langfuse")
    return config


@main.group("dead-letter")
def dead_letter() -> None:
    """Records Langfuse rejected (400) or the spool found corrupt."""


@dead_letter.command("list")
@spool_option
def dead_letter_list(spool_dir: str | None) -> None:
    """List dead-letter files with their reasons."""
    letters = read_dead_letters(_config(spool_dir).spool_dir)
    for letter in letters:
        stamp, age = _moment(letter.time, time.time())
        click.echo(f"{letter.path.name}  {stamp} ({age or 0:.0f} s ago)  "
                   f"{len(letter.records)} record(s)  {letter.reason}")
    click.echo(f"{len(letters)} dead-letter file(s)")


@dead_letter.command("replay")
@spool_option
def dead_letter_replay(spool_dir: str | None) -> None:
    """Put dead-lettered span and score records back on the spool (after fixing the cause).

    Scores go to segments of their own, as ``score_task`` writes them, so a score's answer
    never moves a span segment's cursor.
    """
    config = _config(spool_dir)
    writers = {KIND_SPAN: SegmentWriter(config.spool_dir),
               KIND_SCORE: SegmentWriter(config.spool_dir)}
    replayed = 0
    for letter in read_dead_letters(config.spool_dir):
        for kind, writer in writers.items():
            payloads = [r.payload for r in letter.records if r.kind == kind]
            if payloads:
                writer.append(b"".join(encode_frame(kind, p) for p in payloads))
                replayed += len(payloads)
        remove_dead_letter(letter.path)
    for writer in writers.values():
        writer.close()
    click.echo(f"replayed {replayed} record(s); the next shipper sends them")


@dead_letter.command("purge")
@spool_option
@click.confirmation_option(prompt="Delete every dead-letter record?")
def dead_letter_purge(spool_dir: str | None) -> None:
    """Delete every dead-letter file."""
    letters = read_dead_letters(_config(spool_dir).spool_dir)
    for letter in letters:
        remove_dead_letter(letter.path)
    click.echo(f"purged {len(letters)} dead-letter file(s)")


@main.command()
@click.option("--timeout", default=10.0, show_default=True)
def check(timeout: float) -> None:
    """Verify LANGFUSE_BASE_URL answers and the keys are accepted."""
    config = _require_keys(_config(None))
    ok = True
    with httpx.Client(timeout=timeout) as client:
        for step, verdict in _check_steps(client, config):
            ok = ok and verdict.startswith("ok")
            click.echo(f"{step:<28} {verdict}")
            if not ok:
                break
    raise SystemExit(0 if ok else 1)


def _check_steps(client: httpx.Client, config: Config) -> Any:
    health = f"{config.base_url}/api/public/health"
    try:
        response = client.get(health)
        yield "health", (f"ok ({response.json().get('version', '?')})"
                         if response.status_code == 200
                         else f"FAILED: HTTP {response.status_code} from {health}")
    except (httpx.HTTPError, ValueError) as exc:
        yield "health", f"FAILED: {health} unreachable ({exc}); check LANGFUSE_BASE_URL"
        return
    response = client.get(f"{config.base_url}/api/public/projects",
                          auth=(config.public_key or "", config.secret_key or ""))
    if response.status_code == 200:
        yield "keys", f"ok (public key {config.public_key})"
    elif response.status_code in (401, 403):
        yield "keys", (f"FAILED: HTTP {response.status_code}: Langfuse rejects public key "
                       f"{config.public_key!r}; check LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY")
    else:
        yield "keys", f"FAILED: HTTP {response.status_code}: {cut(response.text, 200)}"


# `celery langfuse ...`: one group named after the sub-command, with main's commands and
# `experiment`, which needs the app given by `celery -A` (its broker and result backend).
celery_command = click.Group(
    "langfuse",
    commands={**main.commands, "experiment": experiment},
    help="Operate celery-langfuse: inspect and ship a trace spool, check Langfuse.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


if __name__ == "__main__":  # pragma: no cover
    main()
