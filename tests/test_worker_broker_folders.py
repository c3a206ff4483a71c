"""The filesystem broker keeps every folder it writes under the app home, none in the cwd."""

from __future__ import annotations

from worker.celery_app import make_celery

from runstore.settings import Settings


def test_filesystem_broker_writes_nothing_in_the_working_directory(tmp_path, monkeypatch):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SPEC_HOME", str(home))
    monkeypatch.setenv("SPEC_BROKER_URL", "filesystem://")
    monkeypatch.delenv("SPEC_RESULT_BACKEND", raising=False)
    app = make_celery(Settings.from_env())
    app.send_task("worker.tasks.run_stage", args=["r1", 1], queue="gpu")
    assert list(cwd.iterdir()) == []  # kombu's default control folder would be ./control
    control = home / "broker" / "control"
    assert any(control.glob("*.exchange"))
    assert len(list((home / "broker" / "queue").iterdir())) == 1
