"""Train: contrastive fine-tune of a transformers CLIP on the run's webdataset shards.

Streams ``shards/wds/*.tar`` (counts from ``sizes.json``), AdamW with warmup + cosine, gradient
accumulation over a shared feature cache (every micro-batch sees the negatives of the whole step, as
open_clip's ``accum_freq``), autocast on GPU, an optional locked tower (LiT), safetensors checkpoints
that a killed run resumes from (model + optimizer + step + stream position, and with the objectives
below their heads and DINO's teacher), ``train/metrics.jsonl`` and the final model saved with
``save_pretrained`` in ``train/final``.

The objective (:mod:`pipeline.train.losses`): ``train.loss: clip`` (InfoNCE) or ``dalip`` (DALIP's
token-mean and MBDC terms on top), and ``train.ssl: dino`` (a DINO branch on the image tower with
AgriCLIP's alignment term). Plain CLIP runs the original step unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .. import layout
from ..executor import Stage, Unit, UnitContext, torch_resources
from ..recipe import Recipe, TrainConfig
from ..stats import StageStats
from ..store import RunStore, write_json_atomic, write_text_atomic
from . import data as D
from .losses import Objective, clip_loss
from .model import Loaded, autocast, autocast_dtype, load_clip, resolve_device, tokenize

log = logging.getLogger(__name__)
STAGE = "train"
CODE_VERSION = "train-v1"  # bump when the same inputs would train a different model
AGRICLIP_LR, AGRICLIP_BATCH = 1e-3, 128
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature at 100


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Step counts and the learning-rate schedule, derived from the recipe and the shard sizes."""

    samples: int
    batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr`` then cosine to 0 (open_clip's ``cosine_lr``); ``step`` is 0-based."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return 0.5 * self.lr * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))


def make_plan(cfg: TrainConfig, samples: int) -> Plan:
    """Plan a run over ``samples`` shard samples.

    Raises:
        ValueError: fewer samples than one optimizer step needs.
    """
    per_step = cfg.batch_size * cfg.grad_accum
    if samples < per_step:
        raise ValueError(
            f"the shards hold {samples} samples but one optimizer step needs batch_size * grad_accum = {per_step}; "
            "lower train.batch_size / train.grad_accum or write more data"
        )
    spe = samples // per_step
    total = max(1, int(round(cfg.epochs * spe)))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total))
    if warm >= total:
        log.warning("warmup_steps=%d >= total steps %d: the lr never reaches its peak", warm, total)
    lr = cfg.lr if cfg.lr is not None else AGRICLIP_LR * per_step / AGRICLIP_BATCH
    return Plan(samples, cfg.batch_size, cfg.grad_accum, spe, total, warm, lr)


# ----------------------------------------------------------------------------- model pieces


def freeze_tower(model: Any, tower: Optional[str]) -> int:
    """Lock the vision or text tower (and its projection); returns the number of trainable parameters."""
    parts = {"vision": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}
    if tower is not None:
        for name in parts[tower]:
            for p in getattr(model, name).parameters():
                p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no weight decay on gains, biases, embeddings or the temperature."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "norm" in n or "bias" in n or "embedding" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _embed(model: Any, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
    out = model(**batch)
    return out.image_embeds.float(), out.text_embeds.float()


def train_step(model: Any, micro: list[dict[str, Any]], device: "torch.device",  # noqa: F821
               dtype: Optional["torch.dtype"], scaler: Any,  # noqa: F821
               objective: Optional[Objective] = None) -> float:
    """Forward/backward of one optimizer step over ``micro`` batches; returns the step's loss.

    With several micro-batches, embeddings of all of them are computed without gradients first; each
    micro-batch is then re-embedded with gradients and the loss taken over the whole step, so the
    gradient equals that of one big batch (the temperature's gradient is counted once). With an
    ``objective`` other than plain CLIP (DALIP terms, the DINO branch) see :func:`_objective_step`.
    """
    import torch

    if objective is not None and not objective.plain:
        return _objective_step(model, micro, device, dtype, scaler, objective)

    def backward(loss: "torch.Tensor") -> None:  # noqa: F821
        (scaler.scale(loss) if scaler is not None else loss).backward()

    micro = [{k: v for k, v in m.items() if k != "views"} for m in micro]
    if len(micro) == 1:
        with autocast(device, dtype):
            img, txt = _embed(model, micro[0])
        loss = clip_loss(img, txt, model.logit_scale.exp())
        backward(loss)
        return float(loss.detach())
    with torch.no_grad(), autocast(device, dtype):
        cache = [_embed(model, m) for m in micro]
    imgs, txts = [c[0] for c in cache], [c[1] for c in cache]
    loss_val = 0.0
    for j, m in enumerate(micro):
        with autocast(device, dtype):
            img_j, txt_j = _embed(model, m)
        scale = model.logit_scale.exp()
        if j > 0:
            scale = scale.detach()
        loss = clip_loss(torch.cat(imgs[:j] + [img_j] + imgs[j + 1:]), torch.cat(txts[:j] + [txt_j] + txts[j + 1:]), scale)
        backward(loss)
        loss_val = float(loss.detach())
    return loss_val


def _objective_step(model: Any, micro: list[dict[str, Any]], device: "torch.device",  # noqa: F821
                    dtype: Optional["torch.dtype"], scaler: Any, objective: Objective) -> float:  # noqa: F821
    """:func:`train_step` for DALIP and/or DINO: the same feature cache, over every contrastive term.

    Each micro-batch's random draws (MBDC dropout) are seeded by (seed, step, micro-batch), so the
    cached pass and the gradient pass see the same masks and a resumed run repeats them. The DINO
    loss is per sample: each micro-batch adds its share (1 / micro-batches) once; the teacher's centre
    moves once per optimizer step, over all of the step's teacher outputs.
    """
    import torch

    def backward(loss: "torch.Tensor") -> None:  # noqa: F821
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def embed(j: int) -> dict[str, Any]:
        torch.manual_seed(objective.seed_for(j))
        with autocast(device, dtype):
            return objective.embed(model, micro[j])

    def ssl(j: int, img: "torch.Tensor") -> tuple[Any, dict[str, float]]:  # noqa: F821
        if objective.teacher is None:
            return 0.0, {}
        with autocast(device, dtype):
            return objective.ssl(model, micro[j]["views"], img)

    n = len(micro)
    terms: dict[str, float] = {}
    total = 0.0
    if n == 1:
        pairs = embed(0)
        loss, terms = objective.contrastive(pairs, model.logit_scale.exp())
        extra, t = ssl(0, pairs["clip"][0])
        terms.update(t)
        loss = loss + extra
        backward(loss)
        total = float(loss.detach())
    else:
        with torch.no_grad():
            cache = [embed(j) for j in range(n)]
        ssl_sum: dict[str, float] = {}
        contrast, ssl_total = 0.0, 0.0
        for j in range(n):
            pairs_j = embed(j)
            joined = {k: (torch.cat([c[k][0] for c in cache[:j]] + [pairs_j[k][0]] + [c[k][0] for c in cache[j + 1:]]),
                          torch.cat([c[k][1] for c in cache[:j]] + [pairs_j[k][1]] + [c[k][1] for c in cache[j + 1:]]))
                      for k in pairs_j}
            scale = model.logit_scale.exp()
            if j > 0:
                scale = scale.detach()
            loss, terms = objective.contrastive(joined, scale)
            extra, t = ssl(j, pairs_j["clip"][0])
            for k, v in t.items():
                ssl_sum[k] = ssl_sum.get(k, 0.0) + v / n
            backward(loss + extra / n)
            contrast = float(loss.detach())  # the same value for every j: the loss of the whole step
            if not isinstance(extra, float):
                ssl_total += float(extra.detach()) / n
        terms.update(ssl_sum)
        total = contrast + ssl_total
    objective.end_of_step()
    objective.last_terms = terms
    return total


# ----------------------------------------------------------------------------- checkpoints


def _ckpt_root(store: RunStore) -> Path:
    return store.path(layout.TRAIN_CHECKPOINTS)


def save_checkpoint(store: RunStore, model: Any, optimizer: Any, scaler: Any, state: dict[str, Any],
                    keep: int, objective: Optional[Objective] = None) -> Path:
    """Write ``checkpoints/step-NNNNNNN/`` (model.safetensors, optimizer.safetensors, state.json) atomically.

    With DALIP or DINO also ``heads.safetensors`` (MBDC heads, DINO head, aligner) and, with DINO,
    ``teacher.safetensors`` (the EMA tower and head, and the centre). The folder is built under a
    temporary name and renamed, so a kill leaves no half checkpoint.
    """
    from safetensors.torch import save_file, save_model

    root = _ckpt_root(store)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:07d}"
    tmp = root / f".tmp-step-{state['step']:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    if objective is not None and len(objective.heads):
        save_model(objective.heads, str(tmp / "heads.safetensors"))
    if objective is not None and objective.teacher is not None:
        save_model(objective.teacher, str(tmp / "teacher.safetensors"))
    osd = optimizer.state_dict()
    tensors = {f"state.{pid}.{k}": v.contiguous() for pid, st in osd["state"].items() for k, v in st.items()}
    if tensors:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    full = {**state, "param_groups": groups, "scaler": scaler.state_dict() if scaler is not None else None}
    write_json_atomic(tmp / "state.json", full)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(store: RunStore, fp: str) -> Optional[Path]:
    """Newest complete checkpoint made with the same inputs + config (fingerprint ``fp``), or None."""
    root = _ckpt_root(store)
    if not root.exists():
        return None
    for d in sorted(root.glob("step-*"), reverse=True):
        try:
            st = json.loads((d / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if st.get("fingerprint") == fp and (d / "model.safetensors").is_file():
            return d
        log.warning("checkpoint %s was made with other inputs or settings; not resuming from it", d)
    return None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scaler: Any,
                    objective: Optional[Objective] = None) -> dict[str, Any]:
    """Restore model, optimizer, loss-scaler (and extra heads / teacher) state in place; returns the state dict.

    Raises:
        FileNotFoundError: the objective has heads or a teacher but the checkpoint lacks their file.
    """
    from safetensors.torch import load_file, load_model

    load_model(model, str(path / "model.safetensors"))
    if objective is not None:
        for name, module in (("heads", objective.heads if len(objective.heads) else None),
                             ("teacher", objective.teacher)):
            if module is None:
                continue
            f = path / f"{name}.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"{f}: checkpoint without the {name} state its settings need")
            load_model(module, str(f))
    st = json.loads((path / "state.json").read_text())
    opt_file = path / "optimizer.safetensors"
    state: dict[int, dict[str, Any]] = {}
    if opt_file.is_file():
        for k, v in load_file(str(opt_file)).items():
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": st["param_groups"]})
    if scaler is not None and st.get("scaler"):
        scaler.load_state_dict(st["scaler"])
    return st


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Append-only ``metrics.jsonl``; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists() and resume_step > 0:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
        write_text_atomic(path, "".join(k + "\n" for k in kept))
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(store: RunStore) -> list[dict[str, Any]]:
    p = store.path(layout.TRAIN_METRICS)
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]


# ----------------------------------------------------------------------------- data feed


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (decode overlaps the step)."""
    import queue

    q: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for x in it:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


def _take(stats: StageStats) -> StageStats:
    """Move the counts out of ``stats`` (kept in place: the stream stages hold a reference to it)."""
    delta = StageStats.from_dict(stats.to_dict())
    stats.total, stats.kept, stats.seconds = 0, 0, 0.0
    stats.dropped.clear()
    stats.counters.clear()
    return delta


Micro = tuple[Any, list[str], Optional[list[Any]]]  # pixels, captions, DINO views (or None)


def step_batches(shard_dir: Path, shards: list[str], cfg: TrainConfig, spec: D.ImageSpec, epoch: int, skip: int,
                 pool: ThreadPoolExecutor, crops: Optional[D.CropSpec] = None
                 ) -> Iterator[tuple[list[Micro], int, StageStats]]:
    """Yield (micro-batches as (pixels, captions, views), stream position after them, their stats) for one epoch.

    Stats travel with the batches so a checkpoint counts exactly the samples before its position,
    not the ones the prefetch thread has read ahead. ``crops`` adds DINO's views cut from the same
    shard images (None: no views).
    """
    warn = D.RateLimitedLog(log)
    stats = StageStats(STAGE)
    raw = D.raw_stream(shard_dir, shards, cfg.seed, epoch, stats, cfg.shuffle_buffer, skip)
    micro: list[Micro] = []
    for b in D.batches(raw, cfg.batch_size):
        pix, caps, views = D.preprocess_batch_views(b, spec, cfg.seed, epoch, stats, warn, pool, augment=cfg.augment,
                                                    crops=crops)
        if len(caps) < 2:  # a batch of bad images has no negatives left
            stats.drop("batch_too_small", n=len(caps))
            stats.kept -= len(caps)
            continue
        micro.append((pix, caps, views))
        if len(micro) == cfg.grad_accum:
            yield micro, b[-1].pos, _take(stats)
            micro = []


# ----------------------------------------------------------------------------- run


def train_config(recipe: Recipe) -> dict[str, Any]:
    """The train block without where and how often it runs (those do not change what is trained)."""
    cfg = recipe.train.model_dump(mode="json")
    for k in ("enabled", "device", "workers", "log_every", "save_every", "keep_checkpoints"):
        cfg.pop(k)  # where and how often: not what is trained
    # Settings of an objective that is off do not shape the model.
    if cfg["loss"] != "dalip":
        cfg.pop("dalip")
    if cfg["ssl"] != "dino":
        cfg.pop("dino")
    for k, default in (("loss", "clip"), ("ssl", "none")):
        if cfg[k] == default:
            cfg.pop(k)
    return cfg


def _save_final(store: RunStore, loaded: Loaded, summary: dict[str, Any]) -> Path:
    """save_pretrained model + tokenizer + preprocessor config into train/final (swapped in whole)."""
    final = store.path(layout.TRAIN_FINAL)
    tmp = store.path(STAGE, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "preprocessor_config.json", _processor_config(loaded.spec))
    write_json_atomic(tmp / "train_summary.json", summary)
    old = store.path(STAGE, ".old-final")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_base(store: RunStore, recipe: Recipe, loaded: Loaded) -> Path:
    """The random initialisation of ``train.from_config`` saved as ``train/base`` (eval's comparison).

    Written before any step, so it is the exact starting point; re-written when from_config or seed change.
    """
    cfg = recipe.train
    base = store.path(layout.TRAIN_BASE)
    ident = {"from_config": cfg.from_config, "seed": cfg.seed, "model": cfg.model}
    marker = base / "alive_base.json"
    try:
        if json.loads(marker.read_text()) == json.loads(json.dumps(ident)):
            return base
    except (OSError, json.JSONDecodeError):
        pass
    marker.unlink(missing_ok=True)  # the marker goes last: a kill in between leaves no valid base
    loaded.model.save_pretrained(base, safe_serialization=True)
    loaded.tokenizer.save_pretrained(base)
    write_json_atomic(base / "preprocessor_config.json", _processor_config(loaded.spec))
    write_json_atomic(marker, ident)
    return base


def _processor_config(spec: D.ImageSpec) -> dict[str, Any]:
    """A CLIPImageProcessor config equivalent to our own preprocessing (shorter side, centre crop)."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": spec.size},
        "do_center_crop": True, "crop_size": {"height": spec.size, "width": spec.size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(spec.mean), "image_std": list(spec.std),
        "do_convert_rgb": True, "resample": 3,
    }


def configuration_name(cfg: TrainConfig) -> str:
    """Short name of the training objective: ``clip``, ``dalip``, ``clip+dino``, ``dalip+dino``."""
    return cfg.loss + ("+dino" if cfg.ssl == "dino" else "")


def run(recipe: Recipe, store: RunStore) -> dict[str, Any]:
    """Run the train stage on ``<run>/shards/wds`` (resumed, or skipped when done); returns its summary.

    Returns:
        Summary: steps, samples, first/last logged loss, paths of the final model and metrics, the
        plan, the step it resumed from and whether it was skipped (already done with these inputs).
    """
    from ..executor import run_stages

    rep = run_stages(recipe, store, [STAGE])[STAGE]
    return {**json.loads(store.path(layout.TRAIN_SUMMARY).read_text()), "skipped": not rep.plan.pending}


class TrainStage(Stage):
    """One unit: the webdataset shards (sizes.json and every tar it lists) -> train/final."""

    name = STAGE

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.train.enabled

    def resources(self, recipe: Recipe, threads: int, gpus_available: bool) -> dict[str, float]:
        return torch_resources(recipe.train.device, threads, gpus_available)

    def units(self, recipe: Recipe, store: RunStore) -> list[Unit]:
        sizes = D.read_sizes(store.path(layout.WDS))
        inputs = (layout.SIZES,) + tuple(f"{layout.WDS}/{name}" for name in sorted(sizes))
        return [Unit("final", inputs=inputs, config={"train": [CODE_VERSION, train_config(recipe)]})]

    def process(self, unit: Unit, ctx: UnitContext) -> None:
        summary, ctx.stats = _train(ctx.recipe, ctx.store, ctx.fingerprint, ctx.stats)
        ctx.record_tree(layout.TRAIN_FINAL)
        if ctx.recipe.train.from_config is not None:
            ctx.record_tree(layout.TRAIN_BASE)
        ctx.record(layout.TRAIN_METRICS)
        ctx.record(layout.TRAIN_SUMMARY)
        ctx.info["steps"] = summary["steps"]


def _train(recipe: Recipe, store: RunStore, fp: str, stats: StageStats) -> tuple[dict[str, Any], StageStats]:
    """Fine-tune ``recipe.train.model``; resumes from the newest checkpoint made with fingerprint ``fp``.

    Returns:
        (summary, the stage's stats: samples read and dropped, optimizer steps).
    """
    import numpy as np
    import torch

    cfg = recipe.train
    shard_dir = store.path(layout.WDS)
    sizes = D.read_sizes(shard_dir)
    final = store.path(layout.TRAIN_FINAL)
    summary_path = store.path(layout.TRAIN_SUMMARY)
    plan = make_plan(cfg, sum(sizes.values()))
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    loaded = load_clip(cfg.model, cfg.from_config, cfg.seed)
    if cfg.from_config is not None:
        save_base(store, recipe, loaded)
    model = loaded.model.to(device)
    model.train()
    trainable = freeze_tower(model, cfg.freeze)
    torch.manual_seed(cfg.seed + 1)  # the extra heads' init: fixed by the seed, apart from the model's
    objective = Objective(cfg, model, plan.total_steps).to(device)
    objective.train()
    trainable += sum(p.numel() for p in objective.heads.parameters())
    groups = param_groups(model, cfg.weight_decay)
    for g, extra in zip(groups, param_groups(objective.heads, cfg.weight_decay)):
        g["params"] = g["params"] + extra["params"]
    crops = (D.CropSpec(cfg.dino.local_crops, objective.local_size, tuple(cfg.dino.global_scale),
                        tuple(cfg.dino.local_scale)) if cfg.ssl == "dino" else None)
    use_fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=plan.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, **({"fused": True} if use_fused else {}))
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    step, epoch, pos, resumed_from = 0, 0, 0, None
    ckpt = latest_checkpoint(store, fp)
    if ckpt is not None:
        st = load_checkpoint(ckpt, model, optimizer, scaler, objective)
        step, epoch, pos = st["step"], st["epoch"], st["pos"]
        restored = StageStats.from_dict(st["stats"])
        stats.total, stats.kept, stats.dropped, stats.counters = (restored.total, restored.kept, restored.dropped,
                                                                  restored.counters)
        resumed_from = step
        log.info("train: resuming from %s (step %d, epoch %d, stream position %d)", ckpt, step, epoch, pos)
    else:
        # Checkpoints of other inputs/settings must not outnumber (and so prune) this run's own.
        shutil.rmtree(_ckpt_root(store), ignore_errors=True)
    metrics = Metrics(store.path(layout.TRAIN_METRICS), step)
    log.info("train: %d samples, %d steps (%d/epoch), batch %dx%d, lr %.3g, warmup %d, %s %s, loss %s, ssl %s, "
             "%d trainable params", plan.samples, plan.total_steps, plan.steps_per_epoch, cfg.batch_size,
             cfg.grad_accum, plan.lr, plan.warmup_steps, device, dtype or "fp32", cfg.loss, cfg.ssl, trainable)
    all_params = list(model.parameters()) + list(objective.heads.parameters())
    freeze_last = cfg.dino.freeze_last_layer_steps
    if freeze_last is None:
        freeze_last = plan.steps_per_epoch

    def optimizer_step(micro: list[Micro], lr: float) -> float:
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = []
        for pix, caps, views in micro:
            enc = tokenize(loaded.tokenizer, caps, model)
            m = {"pixel_values": torch.from_numpy(pix).to(device, non_blocking=True),
                 **{k: v.to(device, non_blocking=True) for k, v in enc.items()}}
            if views is not None:
                m["views"] = [torch.from_numpy(v).to(device, non_blocking=True) for v in views]
            batch.append(m)
        objective.step = step
        loss = train_step(model, batch, device, dtype, scaler, objective)
        if not math.isfinite(loss):
            raise FloatingPointError(f"train: loss is {loss} at step {step}; lower train.lr or use precision fp32/bf16")
        objective.cancel_last_layer_grad(freeze_last)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(all_params, cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        objective.after_optimizer_step(model)
        return loss

    shards = list(sizes)
    window: list[float] = []
    term_window: dict[str, list[float]] = {}
    t_window, n_window = time.perf_counter(), 0
    last_saved = step
    try:
        with ThreadPoolExecutor(cfg.workers) as pool:
            while step < plan.total_steps:
                exhausted = True
                feed = _prefetch(step_batches(shard_dir, shards, cfg, loaded.spec, epoch, pos, pool, crops))
                with contextlib.closing(feed):  # stops the prefetch thread on every way out
                    for micro, new_pos, delta in feed:
                        stats = stats.merge(delta)
                        lr = plan.lr_at(step)
                        window.append(optimizer_step(micro, lr))
                        for k, v in objective.last_terms.items():
                            term_window.setdefault(k, []).append(v)
                        step, pos = step + 1, new_pos
                        n = sum(len(c) for _, c, _ in micro)
                        stats.add("samples_trained", n)
                        n_window += n
                        if step % cfg.log_every == 0 or step == plan.total_steps:
                            dt = time.perf_counter() - t_window
                            metrics.write({"step": step, "epoch": epoch, "loss": float(np.mean(window)), "lr": lr,
                                           "logit_scale": float(model.logit_scale.detach().exp()),
                                           "samples_per_s": n_window / max(dt, 1e-9),
                                           "samples": int(stats.counters["samples_trained"]),
                                           **{k: float(np.mean(v)) for k, v in term_window.items()}})
                            window, t_window, n_window = [], time.perf_counter(), 0
                            term_window = {}
                        if step % cfg.save_every == 0 and step < plan.total_steps:
                            stats.add("optimizer_steps", step - last_saved)
                            last_saved = step
                            save_checkpoint(store, model, optimizer, scaler,
                                            {"step": step, "epoch": epoch, "pos": pos, "fingerprint": fp,
                                             "stats": stats.to_dict()}, cfg.keep_checkpoints, objective)
                        if step >= plan.total_steps:
                            exhausted = False
                            break
                if exhausted:  # the epoch's stream ran out
                    if pos == 0:
                        raise RuntimeError(f"train: epoch {epoch} gave no full batch from {shard_dir} "
                                           f"(dropped so far: {dict(stats.dropped)})")
                    epoch, pos = epoch + 1, 0
    finally:
        metrics.close()
    stats.add("optimizer_steps", step - last_saved)
    rows = read_metrics(store)
    summary = {
        "steps": step, "epochs_done": epoch, "samples_trained": int(stats.counters["samples_trained"]),
        "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None,
        "final_dir": str(final), "metrics": str(store.path(layout.TRAIN_METRICS)),
        "plan": plan.__dict__, "resumed_from": resumed_from, "device": str(device),
        "precision": str(dtype or "fp32"), "freeze": cfg.freeze, "trainable_params": trainable,
        "model": cfg.model, "from_config": cfg.from_config is not None, "fingerprint": fp, "skipped": False,
        "loss": cfg.loss, "ssl": cfg.ssl, "configuration": configuration_name(cfg),
    }
    model.eval()
    _save_final(store, loaded, summary)
    write_json_atomic(summary_path, summary)
    shutil.rmtree(_ckpt_root(store), ignore_errors=True)  # the final model supersedes them
    return summary, stats
