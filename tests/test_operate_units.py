"""Operate: runner selection, prefect.yaml, local server helpers, docker/compose hygiene, CLI mounts (fast)."""

from __future__ import annotations

import inspect
import re
import socket
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


def _recipe(**extra):
    from pipeline.recipe import parse_recipe

    return parse_recipe({"name": "u", "sources": [{"name": "s", "kind": "synthetic", "domain": "crops",
                                                    "classes": ["a"]}], **extra})


# ----------------------------------------------------------------------------- runner
def test_recipe_hash_ignores_where_it_runs_but_not_what_it_writes():
    base = _recipe()
    assert _recipe(runner={"kind": "ray", "address": "ray://head:10001"}).sha == base.sha
    assert _recipe(upload={"enabled": True, "repo_id": "o/n"}).sha == base.sha
    assert _recipe(seed=1).sha != base.sha


def test_make_task_runner_kinds():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_ray import RayTaskRunner

    from pipeline.recipe import RunnerConfig
    from pipeline.runner import make_task_runner

    local = make_task_runner(RunnerConfig(kind="local", workers=3))
    assert isinstance(local, ThreadPoolTaskRunner) and local._max_workers == 3
    ray_local = make_task_runner(RunnerConfig(kind="ray", workers=2))
    assert isinstance(ray_local, RayTaskRunner) and ray_local.address is None
    assert ray_local.init_kwargs["num_cpus"] == 2 and ray_local.init_kwargs["include_dashboard"] is False
    remote = make_task_runner(RunnerConfig(kind="ray", address="ray://head:10001"))
    assert remote.address == "ray://head:10001" and "num_cpus" not in remote.init_kwargs


def test_scope_outside_a_flow_and_worker_env():
    import torch

    from pipeline.recipe import RunnerConfig
    from pipeline.runner import task_runner_scope, worker_env

    with task_runner_scope(RunnerConfig(kind="ray")) as r:
        assert r is None  # plain library use: nothing is started
    env = worker_env()
    assert env["OMP_NUM_THREADS"] == str(torch.get_num_threads()) == env["MKL_NUM_THREADS"]


# ----------------------------------------------------------------------------- prefect.yaml
def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_prefect_yaml_deployments_match_the_flow():
    from flows.build_alive import build_alive

    cfg = _prefect_yaml()
    deps = {d["name"]: d for d in cfg["deployments"]}
    assert set(deps) == {"demo", "alive", "nightly"}
    flow_params = set(inspect.signature(build_alive.fn).parameters)
    assert build_alive.name == "build-alive"
    for name, d in deps.items():
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file() and func == "build_alive"
        assert {"recipe", "out"} <= set(d["parameters"]) <= flow_params, name
        assert d["work_pool"]["name"] == "alive-process"
    assert (ROOT / deps["demo"]["parameters"]["recipe"]).is_file()
    assert deps["demo"]["work_pool"]["job_variables"]["env"]["HF_HUB_OFFLINE"] == "1"
    # nightly: cron schedule, incremental into the same run folder as the full build, one run at a time
    assert deps["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert deps["nightly"]["parameters"]["out"] == deps["alive"]["parameters"]["out"]
    assert deps["nightly"]["work_pool"]["work_queue_name"] == deps["alive"]["work_pool"]["work_queue_name"]
    # flow runs start in the project folder recorded at deploy time
    assert cfg["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ project-dir.stdout }}"


def test_demo_pull_step_prepares_the_demo_models():
    from pipeline.ops.demo_models import tiny_model_paths
    from pipeline.recipe import load_recipe

    demo = {d["name"]: d for d in _prefect_yaml()["deployments"]}["demo"]
    script = demo["pull"][1]["prefect.deployments.steps.run_shell_script"]["script"]
    assert script.split() == ["python", "-m", "pipeline.ops.demo_models", demo["parameters"]["recipe"]]
    assert Path("runs/models/tiny-random-clip") in tiny_model_paths(load_recipe(ROOT / "recipes" / "demo.yaml"))


# ----------------------------------------------------------------------------- secrets, ports, images
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|(?i:(token|api_key|password|secret)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{12,})")


def _operate_files() -> list[Path]:
    return [ROOT / "prefect.yaml", ROOT / "scripts" / "prefect_local.sh"] + sorted((ROOT / "docker").iterdir())


def test_no_secret_is_baked_anywhere():
    for p in _operate_files():
        text = p.read_text()
        assert not SECRET_VALUE.search(text), (p, SECRET_VALUE.search(text))
    for df in (ROOT / "docker").glob("Dockerfile.*"):
        if df.suffix == ".dockerignore":
            continue
        text = df.read_text()
        assert not re.search(r"^\s*(ARG|ENV)\s+[^\n]*(HF_TOKEN|VLLM_API_KEY|API_KEY)", text, re.M), df
        # the lock is installed, and the environment check `alive build` makes runs at build time
        assert "requirements.lock" in text and "check_environment()" in text, df
        if df.name == "Dockerfile.gpu":  # it installs img2dataset (urls extra), so the backport comes along
            assert "pip uninstall -y dataclasses" in text, df
        else:
            assert "--no-deps -r requirements.lock" in text, df


def test_compose_publishes_only_localhost_ports_and_uses_secrets():
    docker = ROOT / "docker"
    compose = yaml.safe_load((docker / "compose.yaml").read_text())
    services = dict(compose["services"])
    for inc in compose.get("include", []):
        services.update(yaml.safe_load((docker / inc["path"]).read_text())["services"])
    assert {"prefect-server", "worker", "vllm"} <= set(services)
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
    assert compose["secrets"]["hf_token"] == {"environment": "HF_TOKEN"}
    assert compose["secrets"]["vllm_api_key"] == {"environment": "VLLM_API_KEY"}
    assert set(services["worker"]["secrets"]) == {"hf_token", "vllm_api_key"}
    for s in services.values():
        env = s.get("environment", {})
        for k, v in (env.items() if isinstance(env, dict) else []):
            if any(w in k for w in ("TOKEN", "KEY")):
                assert str(v).startswith("${"), (k, v)  # taken from the caller's environment, never a value
    entry = (docker / "entrypoint.sh").read_text()
    assert "/run/secrets/hf_token" in entry and "set -x" not in entry


# ----------------------------------------------------------------------------- local server helpers
def test_service_env_binds_localhost_and_drops_the_callers_prefect_settings(tmp_path, monkeypatch):
    from pipeline.ops.local_prefect import service_env

    monkeypatch.setenv("PREFECT_API_KEY", "pnu_callers_cloud_key")
    monkeypatch.setenv("PREFECT_API_URL", "https://api.prefect.cloud/api/accounts/x")
    env = service_env(tmp_path, 4321)
    assert "PREFECT_API_KEY" not in env
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(str(tmp_path / "prefect.db"))
    assert float(env["PREFECT_WORKER_QUERY_SECONDS"]) <= 5
    assert env["PREFECT_HOME"].startswith(str(tmp_path))


def test_start_refuses_a_busy_port_and_leaves_nothing_behind(tmp_path):
    from pipeline.ops.local_prefect import LocalPrefectError, start, status, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(LocalPrefectError, match=f"port 127.0.0.1:{port} is in use"):
            start(tmp_path / "state", port, profile=False)
    assert status(tmp_path / "state") == {"running": False}
    assert stop(tmp_path / "state") == {"stopped": []}


def test_prefect_local_script_runs_the_python_module():
    text = (ROOT / "scripts" / "prefect_local.sh").read_text()
    assert "-m pipeline.ops.local_prefect" in text and (ROOT / "scripts" / "prefect_local.sh").stat().st_mode & 0o111


# ----------------------------------------------------------------------------- CLI mounts
def test_report_and_upload_commands_mount_on_a_typer_app(tmp_path):
    import typer
    from typer.testing import CliRunner

    from pipeline import report, upload

    app = typer.Typer()
    report.register_cli(app)
    upload.register_cli(app)
    runner = CliRunner()
    r = runner.invoke(app, ["upload", str(tmp_path), "--repo-id", "not-a-repo-id"])
    assert r.exit_code == 1 and "ORG/NAME" in r.output
    r = runner.invoke(app, ["upload", str(tmp_path), "--repo-id", "org/name", "--dry-run"])
    assert r.exit_code == 1 and "not finished" in r.output
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "recipe.resolved.yaml" in r.output
