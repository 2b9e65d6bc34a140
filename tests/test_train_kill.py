"""Kill -9 drill: a training process killed at a random point resumes to the same model.

Slow (a subprocess imports torch and transformers): run with ``pytest -m slow tests/test_train_kill.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import RunStore

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
from pathlib import Path
import torch
from pipeline.recipe import Recipe
from pipeline.store import RunStore
from pipeline.train import train
torch.set_num_threads(1)
real = train.train_step
def slow_step(*a, **k):  # slow enough to be killed mid-run
    time.sleep(0.25)
    return real(*a, **k)
train.train_step = slow_step
train.run(Recipe.model_validate_json(Path(sys.argv[1]).read_text()), RunStore(sys.argv[2]))
"""


# DALIP heads + DINO teacher, EMA and centre: the state a resume must bring back besides the model's.
OBJECTIVES = {"clip": {}, "dalip+dino": dict(loss="dalip", dalip={"mbdc_dim": 6}, ssl="dino",
                                            dino={"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 32,
                                                  "local_crops": 2})}


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_kill_9_mid_training_then_resume(tmp_path, objective):
    sys.path.insert(0, str(Path(__file__).parent))
    import test_train as T

    with T.one_torch_thread():
        _drill(T, tmp_path, OBJECTIVES[objective])


def _drill(T, tmp_path: Path, objective: dict) -> None:
    import shutil

    from safetensors.numpy import load_file

    from pipeline.train import train

    recipe = T.make_recipe(T.tiny_clip(tmp_path), batch_size=16, max_steps=14, save_every=2, log_every=1,
                           warmup_steps=2, **objective)
    base = T.build_run(tmp_path / "base", recipe)
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = RunStore(tmp_path / name)
        shutil.copytree(base.path("shards"), runs[name].path("shards"))
    ref = train.run(recipe, runs["straight"])

    killed = runs["killed"]
    (tmp_path / "recipe.json").write_text(recipe.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "recipe.json"), str(killed.root)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE)
    ckpts = killed.path("train", "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
            time.sleep(0.4)  # somewhere between two checkpoints, or inside one
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.path("train", "final").exists()

    res = train.run(recipe, killed)
    assert res["resumed_from"] is not None and 2 <= res["resumed_from"] < 14 and res["steps"] == 14
    assert [r["step"] for r in train.read_metrics(killed)] == list(range(1, 15))
    a = load_file(str(Path(ref["final_dir"]) / "model.safetensors"))
    b = load_file(str(Path(res["final_dir"]) / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
