"""Task runner selection: where the shard tasks of the ``build-alive`` flow execute.

The recipe's ``runner`` block picks it:

- ``{kind: local}`` (default): the flow's own thread pool; CPU-heavy stages use a local process pool.
- ``{kind: ray, address: ...}``: prefect-ray's ``RayTaskRunner``. Without an address a local Ray
  instance is started (or the one already initialised in this process is used); ``ray://host:10001``
  or ``auto`` joins an existing cluster.

Every task writes its output through the run store with deterministic names and content, so the
shards are byte-identical whichever runner executed them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .recipe import RunnerConfig

log = logging.getLogger(__name__)


def make_task_runner(cfg: RunnerConfig) -> Any:
    """Build the Prefect task runner ``cfg`` asks for.

    Args:
        cfg: the recipe's ``runner`` block.

    Returns:
        A ``prefect.task_runners.ThreadPoolTaskRunner`` (local) or a ``prefect_ray.RayTaskRunner`` (ray).

    Raises:
        RuntimeError: ``kind: ray`` without prefect-ray / ray installed (names the package to install).
    """
    if cfg.kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:  # pragma: no cover - both are project dependencies
        raise RuntimeError("runner.kind: ray needs the prefect-ray and ray packages (pip install prefect-ray "
                           f"'ray[default]'): {e}") from None
    init_kwargs: dict[str, Any] = {"namespace": "alive", "log_to_driver": True}
    if not cfg.address or cfg.address == "local":
        # A local instance sized by the recipe; no dashboard: nothing should listen beyond what is needed.
        init_kwargs.update(num_cpus=cfg.workers, include_dashboard=False)
    return RayTaskRunner(address=None if cfg.address in (None, "local") else cfg.address, init_kwargs=init_kwargs)


def _api_url_for_remote_workers() -> Optional[str]:
    """API URL that Ray workers must report task runs to.

    Without ``PREFECT_API_URL`` the flow talks to an ephemeral server started by this process; Ray
    workers would otherwise each start their own. Returns None when an API URL is already configured.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


@contextmanager
def task_runner_scope(cfg: RunnerConfig) -> Iterator[Any]:
    """Inside a flow run: send every ``task.submit()`` made in this block to the runner ``cfg`` names.

    For ``kind: local`` the flow's own task runner is kept. For ``kind: ray`` a ``RayTaskRunner`` is
    started for the block and shut down after (a Ray instance it did not start is left running).

    Args:
        cfg: the recipe's ``runner`` block.

    Yields:
        The task runner in use (None outside a flow run).
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or cfg.kind == "local":
        yield ctx.task_runner if ctx is not None else None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runner = make_task_runner(cfg)
    url = _api_url_for_remote_workers()
    settings = temporary_settings({PREFECT_API_URL: url}) if url else _null()
    from prefect_ray.context import remote_options

    with settings, runner, remote_options(runtime_env={"env_vars": worker_env()}):
        log.info("shard tasks run on Ray (%s)", cfg.address or "local instance")
        with ctx.model_copy(update={"task_runner": runner}):
            yield runner


def worker_env() -> dict[str, str]:
    """Environment of the Ray workers that run shard tasks.

    CPU matmul results depend on the number of intra-op threads (the reduction is split differently),
    and Ray starts workers with ``OMP_NUM_THREADS=1``. Workers get this process's torch thread count
    instead, so scores and embeddings are the bits a local run computes.
    """
    import torch

    n = str(torch.get_num_threads())
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}


@contextmanager
def _null() -> Iterator[None]:
    yield None


@contextmanager
def stage_resources(recipe: Any, stage: Any) -> Iterator[dict[str, float]]:
    """On Ray, make the tasks submitted in this block ask for ``stage.resources(...)``; elsewhere a no-op.

    Args:
        recipe: the build's recipe (its ``runner`` block says whether Ray is in use).
        stage: the stage whose units are submitted (None: scratch work, one CPU).

    Yields:
        The Ray remote options in force ({} outside Ray).
    """
    if recipe.runner.kind != "ray":
        yield {}
        return
    import ray
    import torch
    from prefect_ray.context import remote_options

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    gpus = any(r.get("GPU", 0) > 0 for r in nodes)
    opts = stage.resources(recipe, torch.get_num_threads(), gpus) if stage is not None else {"num_cpus": 1}
    if nodes:  # a request no single node can meet would wait forever: ask at most the largest node's CPUs
        opts["num_cpus"] = min(opts.get("num_cpus", 1), max(r.get("CPU", 1) for r in nodes))
    with remote_options(**opts):
        yield opts
