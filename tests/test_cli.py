"""The operator surface: the CLI against a real spool and receiver, remote control against a
real worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider

from tests.support import ROOT
from tracing import _sdk
from tracing._cli import main
from tracing.spool import SegmentWriter, list_segments, read_dead_letters
from tracing.spool._exporter import SpoolExporter
from tracing.testing import LangfuseReceiver


def env_for(receiver: LangfuseReceiver, spool: Path, **extra: str) -> dict[str, str]:
    return {"LANGFUSE_PUBLIC_KEY": receiver.public_key,
            "LANGFUSE_SECRET_KEY": receiver.secret_key,
            "LANGFUSE_BASE_URL": receiver.base_url,
            "CELERY_LANGFUSE_SPOOL_DIR": str(spool), **extra}


def write_spans(spool: Path, n: int) -> list[str]:
    key = f"pk-lf-{uuid.uuid4().hex[:8]}"
    client = Langfuse(public_key=key, secret_key="sk", base_url="http://127.0.0.1:9",
                      span_exporter=SpoolExporter(SegmentWriter(spool)),
                      tracer_provider=TracerProvider())
    ids = []
    for i in range(n):
        obs = client.start_observation(name=f"cli-{i}")
        obs.end()
        ids.append(obs.id)
    client.flush()
    client.shutdown()
    _sdk.forget_client(key)
    return ids


def test_drain_ships_and_reports_counts(receiver, tmp_path):
    """`drain` ships every record once and says how many."""
    spool = tmp_path / "spool"
    ids = write_spans(spool, 12)
    result = CliRunner().invoke(main, ["drain", "--timeout", "10"], env=env_for(receiver, spool))
    assert result.exit_code == 0, result.output
    assert "shipped 12 span(s)" in result.output
    assert sorted(o.id for o in receiver.observations) == sorted(ids)


def test_drain_with_langfuse_down_keeps_records_and_exits_1(receiver, tmp_path):
    """With Langfuse down, `drain` stops at its timeout, keeps the records, exits 1."""
    spool = tmp_path / "spool"
    write_spans(spool, 3)
    receiver.down()
    result = CliRunner().invoke(main, ["drain", "--timeout", "1"], env=env_for(receiver, spool))
    assert result.exit_code == 1
    assert "byte(s) left" in result.output and "ConnectError" in result.output


def test_drain_with_bad_keys_says_which_key(receiver, tmp_path):
    """With keys Langfuse rejects, `drain` names the key and keeps the records."""
    spool = tmp_path / "spool"
    write_spans(spool, 2)
    env = env_for(receiver, spool, LANGFUSE_PUBLIC_KEY="pk-lf-wrong")
    result = CliRunner().invoke(main, ["drain", "--timeout", "1"], env=env)
    assert result.exit_code == 1
    assert "pk-lf-wrong" in result.output and "HTTP 401" in result.output


def test_status_reports_spool_and_masks_the_secret(receiver, tmp_path):
    """`status` shows unshipped records and never prints the secret key."""
    spool = tmp_path / "spool"
    write_spans(spool, 5)
    env = env_for(receiver, spool, LANGFUSE_SECRET_KEY="sk-lf-0123456789abcdef")
    result = CliRunner().invoke(main, ["status", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["spool"]["unshipped_spans"] == 5
    assert "0123456789abcdef" not in result.output


def test_status_survives_a_corrupt_segment(receiver, tmp_path):
    """`status` on a spool with a corrupt segment file still reports, without crashing."""
    spool = tmp_path / "spool"
    write_spans(spool, 3)
    [(segment, _)] = list_segments(spool)
    segment.write_bytes(b"\x00garbage" + segment.read_bytes()[40:])
    result = CliRunner().invoke(main, ["status"], env=env_for(receiver, spool))
    assert result.exit_code == 0, result.output
    assert "unshipped_spans" in result.output


def test_dead_letter_list_replay_purge(receiver, tmp_path):
    """Rejected records are listed with the reason, replayed after a fix, and purgeable."""
    spool = tmp_path / "spool"
    write_spans(spool, 4)
    receiver.set_poison(lambda span: span["name"] == "cli-2")
    env = env_for(receiver, spool)
    runner = CliRunner()
    assert runner.invoke(main, ["drain", "--timeout", "5"], env=env).exit_code == 0
    listing = runner.invoke(main, ["dead-letter", "list"], env=env)
    assert "HTTP 400" in listing.output and "1 dead-letter file" in listing.output
    receiver.set_poison(None)
    assert "replayed 1" in runner.invoke(main, ["dead-letter", "replay"], env=env).output
    assert runner.invoke(main, ["drain", "--timeout", "5"], env=env).exit_code == 0
    assert len({o.id for o in receiver.observations}) == 4
    assert read_dead_letters(spool) == []
    purge = runner.invoke(main, ["dead-letter", "purge", "--yes"], env=env)
    assert "purged 0" in purge.output


def test_check_verdicts(receiver, tmp_path):
    """`check` passes with good keys, names the key when rejected, the URL when down."""
    runner = CliRunner()
    good = runner.invoke(main, ["check"], env=env_for(receiver, tmp_path))
    assert good.exit_code == 0 and "keys" in good.output and "ok" in good.output
    bad = runner.invoke(main, ["check"], env=env_for(receiver, tmp_path,
                                                      LANGFUSE_SECRET_KEY="nope"))
    assert bad.exit_code == 1 and "HTTP 401" in bad.output
    receiver.down()
    down = runner.invoke(main, ["check"], env=env_for(receiver, tmp_path))
    assert down.exit_code == 1 and "LANGFUSE_BASE_URL" in down.output


def test_bad_config_value_is_a_usage_error(tmp_path):
    """A bad CELERY_LANGFUSE_* value makes the CLI exit 2 naming the variable."""
    result = CliRunner().invoke(main, ["status"], env={"CELERY_LANGFUSE_SHUTDOWN_TIMEOUT": "soon"})
    assert result.exit_code == 2 and "CELERY_LANGFUSE_SHUTDOWN_TIMEOUT" in result.output


def test_python_dash_m_tracing_runs(tmp_path):
    """`python -m tracing --help` lists the commands."""
    out = subprocess.run([sys.executable, "-m", "tracing", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0
    for command in ("status", "drain", "dead-letter", "check"):
        assert command in out.stdout


def test_celery_langfuse_subcommand_reports_the_spool(tmp_path):
    """`celery -A app langfuse status` (the celery.commands entry point) runs the same CLI."""
    spool = tmp_path / "spool"
    write_spans(spool, 3)
    env = {**os.environ, "CELERY_LANGFUSE_SPOOL_DIR": str(spool),
           "LANGFUSE_PUBLIC_KEY": "pk-lf-sub", "LANGFUSE_SECRET_KEY": "sk-lf-sub-secret-value"}
    base = [sys.executable, "-m", "celery", "-A", "tests.apps.traced_app", "langfuse"]
    listing = subprocess.run([*base, "--help"], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=60)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    for command in ("status", "drain", "dead-letter", "check"):
        assert command in listing.stdout
    out = subprocess.run([*base, "status", "--json"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["spool"]["unshipped_spans"] == 3
    assert report["spool"]["directory"] == str(spool)
    assert "sk-lf-sub-secret-value" not in out.stdout


def only_reply(output: str) -> dict[str, object]:
    """The one worker's answer in `celery inspect|control --json` output."""
    replies = json.loads(output)
    replies = replies if isinstance(replies, list) else [replies]
    [reply] = replies
    [answer] = reply.values()
    return answer  # type: ignore[no-any-return]


@pytest.mark.slow
def test_remote_control_status_and_flush(start_worker, worker_env, receiver):
    """`inspect langfuse_status` and `control langfuse_flush` answer from a running worker."""
    worker = start_worker()
    base = [sys.executable, "-m", "celery", "-A", "tests.apps.traced_app"]
    # naming the destination makes Celery return on its reply instead of at the timeout
    node = ["-d", worker.name.replace("%h", socket.gethostname())]
    full_env = {**os.environ, **worker_env}
    status = subprocess.run([*base, "inspect", "langfuse_status", "--json", "-t", "10", *node],
                            capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    answer = only_reply(status.stdout)
    assert answer["tracing"] == "on" and "spool" in answer
    flush = subprocess.run([*base, "control", "langfuse_flush", "--json", "-t", "10", *node],
                           capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=60)
    assert flush.returncode == 0, flush.stdout + flush.stderr
    answer = only_reply(flush.stdout)
    assert answer["ok"] is True
    assert worker.stop() == 0


def test_dead_letter_replay_keeps_scores(tmp_path):
    """A dead-lettered score is put back on the spool by replay (in a segment of its own),
    never deleted unreplayed."""
    from tracing.spool import KIND_SCORE, KIND_SPAN, scan_file, write_dead_letter

    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    write_dead_letter(spool, [b'{"id": "s1", "type": "score-create"}'], "HTTP 400",
                      kind=KIND_SCORE)
    env = {"CELERY_LANGFUSE_SPOOL_DIR": str(spool), "LANGFUSE_PUBLIC_KEY": "pk",
           "LANGFUSE_SECRET_KEY": "sk"}
    result = CliRunner().invoke(main, ["dead-letter", "replay"], env=env)
    assert "replayed 1" in result.output, result.output
    records = [r for path, _ in list_segments(spool) for r in scan_file(path).records]
    assert [r.kind for r in records if r.kind != 4] == [KIND_SCORE]
    assert KIND_SPAN not in {r.kind for r in records}
    assert read_dead_letters(spool) == []


def test_status_shows_times_as_iso_8601_with_their_age(tmp_path):
    """`status` shows the shipper's times as ISO-8601 UTC text with "N s ago" (not raw epoch
    seconds); `--json` gives the same ISO text plus the age in seconds."""
    import re
    import time

    from tracing.shipping._status import ShipperStats, write_status

    spool = tmp_path / "spool"
    write_spans(spool, 2)
    write_status(spool, ShipperStats(shipped_spans=3, last_success_at=time.time() - 42.4))
    env = {"CELERY_LANGFUSE_SPOOL_DIR": str(spool)}
    text = CliRunner().invoke(main, ["status"], env=env)
    assert text.exit_code == 0, text.output
    line = next(x for x in text.output.splitlines() if "last_success_at" in x)
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(4[2-4] s ago\)", line), line
    assert re.search(r"oldest_unshipped_at\s+\d{4}-\d\d-\d\dT.*Z \(\d+ s ago\)", text.output)
    assert not re.search(r"\b1[7-9]\d{8}(\.\d+)?\b", text.output)  # no raw epoch anywhere
    report = json.loads(CliRunner().invoke(main, ["status", "--json"], env=env).output)
    shipping = report["last shipping"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shipping["last_success_at"])
    assert 42 <= shipping["last_success_age_s"] < 45
    assert shipping["updated_age_s"] < 5 and shipping["shipped_spans"] == 3
    assert report["spool"]["oldest_unshipped_at"].endswith("Z")
