"""One command for a local Prefect server + ``process`` worker for this project, and a clean stop.

    scripts/prefect_local.sh start      # server on 127.0.0.1:4200 (SQLite), work pool, deployments, worker
    prefect deployment run build-alive/demo --watch
    scripts/prefect_local.sh status
    scripts/prefect_local.sh stop       # worker (and its flow runs), then server; profile restored

What ``start`` does, in order:

1. starts ``prefect server start`` bound to 127.0.0.1 with a SQLite database in the state folder
   (default ``.prefect/`` in the project), analytics off, short scheduler loops, log to ``logs/server.log``;
2. creates the ``alive-process`` work pool (type ``process``) and deploys every deployment of
   ``prefect.yaml`` (``prefect deploy --all``) from the project folder;
3. starts ``prefect worker start --pool alive-process`` polling every 2 s, log to ``logs/worker.log``;
4. points the Prefect CLI at the server: a profile ``alive-local`` with ``PREFECT_API_URL`` becomes the
   active one (the previous active profile is restored by ``stop``; ``--no-profile`` skips this and
   prints the ``export`` line instead).

Server and worker run in their own process sessions with their own ``PREFECT_HOME`` inside the
state folder, so they never read or change the user's profiles. Their process ids live in
``state.json``; ``stop`` signals exactly those process groups (SIGTERM, then SIGKILL after a grace
period).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE = PROJECT_ROOT / ".prefect"
DEFAULT_PORT = 4200
POOL = "alive-process"
FULL_QUEUE = "alive-full"
PROFILE = "alive-local"
HOST = "127.0.0.1"


class LocalPrefectError(RuntimeError):
    """The local server or worker could not be started/stopped; the message says why and what to do."""


# ----------------------------------------------------------------------------- helpers
def _prefect_exe() -> list[str]:
    """The prefect CLI of this interpreter's environment."""
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def service_env(state: Path, port: int, ui: bool = True) -> dict[str, str]:
    """Environment of the server, the worker and the flow runs the worker starts.

    Everything is explicit so a user's own profile (another API URL, Cloud) cannot leak in.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    bin_dir = str(Path(sys.executable).parent)
    env.update({
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
        "PREFECT_HOME": str(state / "home"),
        "PREFECT_PROFILES_PATH": str(state / "home" / "profiles.toml"),
        "PREFECT_API_URL": f"http://{HOST}:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state / 'prefect.db'}",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        "PREFECT_UI_URL": f"http://{HOST}:{port}",
        # short loops: a deployment run starts within seconds, schedules show up quickly
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "10",
        "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "10",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
    })
    return env


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests and parallel servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/api/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        # own session: stop() signals the whole group (the worker's flow-run subprocesses included)
        return subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _run(cmd: list[str], env: dict[str, str], log: Path, what: str, timeout: float = 300) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        r = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=timeout)
    if r.returncode != 0:
        raise LocalPrefectError(f"{what} failed (exit {r.returncode}); last lines of {log}:\n{_tail(log)}")


def _state_file(state: Path) -> Path:
    return state / "state.json"


def read_state(state: Path) -> dict[str, Any]:
    p = _state_file(state)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(state: Path, info: dict[str, Any]) -> None:
    tmp = _state_file(state).with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, _state_file(state))


# ----------------------------------------------------------------------------- profile
def _use_profile(api_url: str) -> Optional[str]:
    """Make a profile with ``PREFECT_API_URL`` the active one in the caller's PREFECT_HOME.

    Returns:
        The name of the profile that was active before (restored by :func:`_restore_profile`).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.settings.profiles import load_profiles, save_profiles

    profiles = load_profiles()
    previous = profiles.active_name
    profiles.update_profile(PROFILE, {PREFECT_API_URL: api_url})
    profiles.set_active(PROFILE)
    save_profiles(profiles)
    return previous if previous != PROFILE else None


def _restore_profile(previous: Optional[str]) -> None:
    from prefect.settings.profiles import load_profiles, save_profiles

    profiles = load_profiles()
    if profiles.active_name == PROFILE:
        profiles.set_active(previous if previous in profiles.names else None)
        save_profiles(profiles)


# ----------------------------------------------------------------------------- commands
def start(state: Path = DEFAULT_STATE, port: int = DEFAULT_PORT, ui: bool = True, deploy: bool = True,
          profile: bool = True, timeout: float = 180.0) -> dict[str, Any]:
    """Start the server, create the pool, deploy prefect.yaml, start the worker (see module docstring).

    Returns:
        The state recorded in ``state.json`` (pids, port, api_url, log paths).

    Raises:
        LocalPrefectError: port taken, server not healthy in time, or deploy/pool creation failed
        (with the log lines that say why). Anything started is stopped again before raising.
    """
    state = state.resolve()
    old = read_state(state)
    if old and (_alive(old.get("server_pid")) or _alive(old.get("worker_pid"))):
        if _healthy(old["port"]):
            return {**old, "already_running": True}
        stop(state)
    if not _port_free(port):
        raise LocalPrefectError(f"port {HOST}:{port} is in use: stop what runs there or pass --port")
    (state / "home").mkdir(parents=True, exist_ok=True)
    logs = state / "logs"
    env = service_env(state, port, ui)
    info: dict[str, Any] = {"port": port, "api_url": env["PREFECT_API_URL"], "ui_url": env["PREFECT_UI_URL"],
                            "pool": POOL, "state_dir": str(state), "project": str(PROJECT_ROOT),
                            "server_log": str(logs / "server.log"), "worker_log": str(logs / "worker.log"),
                            "setup_log": str(logs / "setup.log")}
    prefect = _prefect_exe()
    server = _spawn(prefect + ["server", "start", "--host", HOST, "--port", str(port), "--analytics-off"],
                    env, logs / "server.log")
    info["server_pid"] = server.pid
    _write_state(state, info)
    try:
        t0 = time.monotonic()
        while not _healthy(port):
            if server.poll() is not None:
                raise LocalPrefectError(f"the Prefect server exited (code {server.returncode}); last lines of "
                                        f"{logs / 'server.log'}:\n{_tail(logs / 'server.log')}")
            if time.monotonic() - t0 > timeout:
                raise LocalPrefectError(f"the Prefect server did not answer on {env['PREFECT_API_URL']} within "
                                        f"{timeout:.0f} s; see {logs / 'server.log'}")
            time.sleep(0.5)
        _run(prefect + ["--no-prompt", "work-pool", "create", POOL, "--type", "process", "--overwrite"], env,
             logs / "setup.log", f"creating work pool {POOL}")
        if deploy:
            _run(prefect + ["--no-prompt", "deploy", "--all", "--prefect-file", str(PROJECT_ROOT / "prefect.yaml")],
                 env, logs / "setup.log", "prefect deploy --all")
            # alive and nightly share runs/alive: one run at a time on their queue
            _run(prefect + ["--no-prompt", "work-queue", "set-concurrency-limit", FULL_QUEUE, "1", "--pool", POOL],
                 env, logs / "setup.log", f"limiting work queue {FULL_QUEUE}")
        worker = _spawn(prefect + ["worker", "start", "--pool", POOL, "--type", "process", "--name",
                                   f"alive-local-{port}", "--install-policy", "never"], env, logs / "worker.log")
        info["worker_pid"] = worker.pid
        _write_state(state, info)
        time.sleep(1.0)
        if worker.poll() is not None:
            raise LocalPrefectError(f"the worker exited (code {worker.returncode}); last lines of "
                                    f"{logs / 'worker.log'}:\n{_tail(logs / 'worker.log')}")
        if profile:
            info["previous_profile"] = _use_profile(env["PREFECT_API_URL"])
            info["profile"] = PROFILE
        _write_state(state, info)
    except BaseException:
        stop(state)
        raise
    return info


def _stop_group(pid: Optional[int], grace: float) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace`` seconds. True if it was running."""
    if not _alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace:
        if not _alive(pid):
            break
        time.sleep(0.2)
    try:  # whatever is left of the group (flow-run subprocesses, uvicorn workers)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    t0 = time.monotonic()
    while _alive(pid) and time.monotonic() - t0 < 5:
        time.sleep(0.1)
    return True


def stop(state: Path = DEFAULT_STATE, grace: float = 20.0) -> dict[str, Any]:
    """Stop the worker (and its flow runs), then the server; restore the previous profile.

    The database and the logs stay in the state folder (history survives a restart).
    """
    state = state.resolve()
    info = read_state(state)
    if not info:
        return {"stopped": []}
    stopped = []
    if _stop_group(info.get("worker_pid"), grace):
        stopped.append("worker")
    if _stop_group(info.get("server_pid"), grace):
        stopped.append("server")
    if info.get("profile"):
        _restore_profile(info.get("previous_profile"))
    _state_file(state).unlink(missing_ok=True)
    return {"stopped": stopped, **{k: info[k] for k in ("server_log", "worker_log") if k in info}}


def status(state: Path = DEFAULT_STATE) -> dict[str, Any]:
    info = read_state(state.resolve())
    if not info:
        return {"running": False}
    return {**info, "server_running": _alive(info.get("server_pid")), "worker_running": _alive(info.get("worker_pid")),
            "healthy": _healthy(info["port"]), "running": True}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="prefect_local", description="Local Prefect server + worker for ALive.")
    ap.add_argument("command", choices=["start", "stop", "status"])
    ap.add_argument("--state-dir", type=Path, default=Path(os.environ.get("ALIVE_PREFECT_STATE", DEFAULT_STATE)),
                    help="Database, logs and pids (default: .prefect/ in the project).")
    ap.add_argument("--port", type=int, default=int(os.environ.get("ALIVE_PREFECT_PORT", DEFAULT_PORT)))
    ap.add_argument("--no-ui", action="store_true", help="Serve the API only.")
    ap.add_argument("--no-deploy", action="store_true", help="Do not run prefect deploy --all.")
    ap.add_argument("--no-profile", action="store_true",
                    help="Leave the Prefect profiles alone (export PREFECT_API_URL yourself).")
    args = ap.parse_args(argv)
    try:
        if args.command == "start":
            info = start(args.state_dir, args.port, ui=not args.no_ui, deploy=not args.no_deploy,
                         profile=not args.no_profile)
            word = "already running" if info.get("already_running") else "started"
            print(f"Prefect server {word}: {info['api_url']}" + ("" if args.no_ui else f" (UI {info['ui_url']})"))
            print(f"worker: pool {info['pool']}, pid {info.get('worker_pid')}; logs in {Path(info['server_log']).parent}")
            if info.get("profile"):
                print(f"active Prefect profile: {info['profile']} (restored on stop)")
                if os.environ.get("PREFECT_API_URL", info["api_url"]) != info["api_url"]:
                    print(f"note: PREFECT_API_URL is set in this shell and wins over the profile; "
                          f"export PREFECT_API_URL={info['api_url']} (or unset it)")
            else:
                print(f"export PREFECT_API_URL={info['api_url']}")
            print("run:  prefect deployment run build-alive/demo --watch")
            print("stop: scripts/prefect_local.sh stop")
        elif args.command == "stop":
            res = stop(args.state_dir)
            print(f"stopped: {', '.join(res['stopped']) or 'nothing was running'}")
        else:
            print(json.dumps(status(args.state_dir), indent=2, sort_keys=True))
    except LocalPrefectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
