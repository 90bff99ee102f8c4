"""`hovle submit` without a cluster: the job's final status line, the exit code, the webhook (a local HTTP
server). tests/test_ray_jobs.py submits through it to a real Ray head."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.submit import final_status, main, outcome, report, retrain_entrypoint, runtime_env


class Webhook:
    """A local HTTP server that keeps the JSON bodies POSTed to it (`received`)."""

    def __init__(self, reply: int = 204) -> None:
        self.received: list[dict] = []
        received, code = self.received, reply

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/secret-path"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


LOGS = "\n".join(
    [
        "INFO prepare: read 12",
        '{"status": "promoted", "version": "1", "promoted": true}',
        "(RayTrainWorker pid=12) a worker's late line",
        '{"not a status": 1}',
        '{"status": broken json',
        "",
    ]
)


def test_the_last_json_line_with_a_status_wins_and_other_lines_are_ignored():
    assert final_status(LOGS) == {"status": "promoted", "version": "1", "promoted": True}
    earlier = '{"status": "locked", "reason": "x"}\n' + LOGS
    assert final_status(earlier)["status"] == "promoted"
    assert final_status(LOGS + '  {"status": "failed", "reason": "late"}  \n')["status"] == "failed"
    assert final_status('["status"]\n{"status": 3}\n') is None  # not an object; not a string status


def test_a_job_without_a_status_line_is_a_failure_that_says_how_the_job_ended():
    line = outcome("Traceback (most recent call last):\nKilled\n", "raysubmit_1", "FAILED")
    assert line == {
        "status": "failed",
        "reason": "the job ended FAILED without a final status line",
        "job_id": "raysubmit_1",
        "job_status": "FAILED",
    }
    assert outcome('{"status": "exploded"}', "j", "SUCCEEDED")["status"] == "failed"


def test_the_entrypoint_quotes_the_config_and_overrides():
    assert retrain_entrypoint("my config.yaml", ["train.seed=3", "registry.name=a b"]) == (
        "python -m jobs.retrain --config 'my config.yaml' --set train.seed=3 --set 'registry.name=a b'"
    )


@pytest.mark.parametrize(
    ("status", "job_status", "code"),
    [
        ("promoted", "SUCCEEDED", 0),
        ("not_promoted", "SUCCEEDED", 0),
        ("nothing_to_do", "SUCCEEDED", 0),
        ("bad_config", "FAILED", 2),
        ("locked", "FAILED", 3),
        ("failed", "FAILED", 1),
    ],
)
def test_each_status_has_its_exit_code_and_reaches_the_webhook(webhook, capsys, status, job_status, code):
    logs = f'noise\n{{"status": "{status}", "reason": "r"}}\n'
    assert report(outcome(logs, "raysubmit_1", job_status), webhook.url) == code
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1  # stdout is the one line; the job's logs go to stderr
    line = json.loads(printed[0])
    assert line == {"status": status, "reason": "r", "job_id": "raysubmit_1", "job_status": job_status}
    assert webhook.received == [line]


def test_the_runtime_env_layers_file_json_and_working_dir(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("env_vars: {A: '1'}\npip: [x]\n")
    env = runtime_env(str(path), '{"env_vars": {"B": "2"}}', ".")
    assert env == {"env_vars": {"B": "2"}, "pip": ["x"], "working_dir": "."}
    assert runtime_env(None, None, None) is None


def test_a_failing_webhook_is_a_warning_and_never_changes_the_exit_code(caplog):
    broken = Webhook(reply=500)
    try:
        assert report(outcome('{"status": "locked", "reason": "held"}', "j", "FAILED"), broken.url) == 3
        assert broken.received  # it was asked, and answered 500
    finally:
        broken.close()
    err = caplog.text
    assert "webhook http://127.0.0.1" in err and "failed" in err
    assert "secret-path" not in err  # a webhook's path can be its secret: never logged
    unreachable = "http://127.0.0.1:9/nobody-listens"
    assert report(outcome('{"status": "promoted"}', "j", "SUCCEEDED"), unreachable) == 0


def test_an_unreachable_cluster_is_still_one_failed_line(webhook, capsys):
    argv = ["--address", "http://127.0.0.1:9", "--config", "c", "--webhook", webhook.url, "--no-follow"]
    assert main(argv) == 1
    line = json.loads(capsys.readouterr().out.strip())
    assert line["status"] == "failed" and line["job_id"] is None and "could not run the job" in line["reason"]
    assert webhook.received == [line]


def test_retrain_ends_every_outcome_with_its_status_line(monkeypatch, capsys, tmp_path):
    """The other side of the contract: `hovle retrain`'s last stdout line, also when it fails."""
    import jobs.retrain
    from jobs.lock import LockHeld

    assert jobs.retrain.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    captured = capsys.readouterr()
    assert final_status(captured.out) == json.loads(captured.out.splitlines()[-1])
    assert final_status(captured.out)["status"] == "bad_config" and "missing.yaml" in captured.err

    def crash(config, overrides):
        raise RuntimeError("disk\nfull")

    monkeypatch.setattr(jobs.retrain, "retrain", crash)
    assert jobs.retrain.main(["--config", "tiny"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"status": "failed", "reason": "RuntimeError: disk full"}
    assert "Traceback" in captured.err  # for a person; the line is for the scheduler

    def held(config, overrides):
        raise LockHeld("another run holds the lock")

    monkeypatch.setattr(jobs.retrain, "retrain", held)
    assert jobs.retrain.main(["--config", "tiny"]) == 3
    assert json.loads(capsys.readouterr().out) == {"status": "locked", "reason": "another run holds the lock"}

    monkeypatch.setattr(
        jobs.retrain, "retrain", lambda c, o: {"status": "promoted", "scores": {"x": float("nan")}}
    )
    assert jobs.retrain.main(["--config", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "promoted", "scores": {"x": None}}  # strict JSON
