"""Hugging Face Hub upload of a finished run: the parquet layout + dataset card (+ webdataset shards).

The folder that goes to the Hub is assembled at ``OUT/upload/dataset/`` (hard links, so no copy of
the data): ``README.md`` (the dataset card, regenerated from the run and checked against the data
files), ``data/train-*.parquet`` and, on request, ``webdataset/*.tar`` with their sidecars and
``sizes.json``. ``datasets.load_dataset("OUT/upload/dataset")`` loads exactly what is uploaded.

The data go first, the card last, so the Hub never shows a card that describes other data:

1. a new repo: the data files are committed to ``main`` by ``HfApi.upload_folder`` (with hf_xet, which
   huggingface_hub installs, it is the resumable large-folder upload: streamed, committed in batches,
   an interrupted run resumes where it stopped; huggingface_hub 2 folded ``upload_large_folder`` into it).
   Data files the run no longer has are deleted in the same commits.
2. then one commit with ``README.md``.
3. a repo that already exists gets both on a pull request instead (found again by its title when a run
   resumes), merged at the end; until then ``main`` keeps the previous card and data together.

The token comes from ``HF_TOKEN`` or the login saved by ``hf auth login`` (``huggingface_hub.get_token``),
read at upload time. It is never a parameter (Prefect would store parameters), never logged and never
written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq
from huggingface_hub import HfApi, get_token

from . import layout
from .store import RunStore, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

UPLOAD_DIR = (layout.UPLOAD_STAGING,)
WDS_IN_REPO = "webdataset"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_DATA_FILE = re.compile(r"^train-(\d{5})-of-(\d{5})\.parquet$")
_TRUTHY = {"1", "true", "yes", "on"}


class UploadError(RuntimeError):
    """An upload that cannot go ahead; the message says why and what to do."""


def _offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY or bool(constants.HF_HUB_OFFLINE)


def check_repo_id(repo_id: Optional[str]) -> str:
    """Validate ``ORG/NAME``; raises UploadError with the expected form."""
    if not repo_id or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise UploadError(f"repo id {repo_id!r} is not of the form ORG/NAME (letters, digits, '-', '_', '.'), "
                          "e.g. --repo-id my-org/alive-v1")
    return repo_id


# ----------------------------------------------------------------------------- card + checks
def refresh_card(store: RunStore) -> tuple[Any, dict[str, str]]:
    """Regenerate ``shards/hf/README.md`` from the run (recipe, write plan, models in summary.json).

    Returns:
        (the run's recipe, its models), for the card of the upload folder.

    Raises:
        UploadError: the run is not finished (no resolved recipe, summary or write plan).
    """
    from .recipe import RecipeError
    from .report import run_recipe
    from .write.card import write_card

    summary_p = store.path(layout.SUMMARY)
    for need in (summary_p, store.path(layout.WRITE_ORDER), store.path(layout.WRITE_SELECTION)):
        if not need.is_file():
            raise UploadError(f"{need} is missing: the run in {store.root} is not finished; run "
                              f"`alive build --recipe RECIPE --out {store.root}` to completion first")
    try:
        recipe = run_recipe(store)
    except RecipeError as e:
        raise UploadError(str(e)) from None
    if "hf" not in recipe.write.formats:
        raise UploadError(f"{store.root} has no Hugging Face layout (write.formats is {recipe.write.formats}); "
                          "add 'hf' to write.formats and re-run the build (finished stages are skipped)")
    models = json.loads(summary_p.read_text(encoding="utf-8")).get("models") or {}
    write_card(recipe, store, models)
    return recipe, models


def card_header(card: Path) -> dict[str, Any]:
    """The metadata (YAML header) of a dataset card, parsed by huggingface_hub."""
    from .write.card import read_card

    try:
        return read_card(card).data.to_dict()
    except (ValueError, OSError) as e:
        raise UploadError(f"{card}: not a readable dataset card ({e}); regenerate it (alive upload does)") from None


def check_hf_layout(hf_dir: Path) -> dict[str, Any]:
    """Check that the card and the data files agree: names, shard count, row count, licence.

    Returns:
        {"files": [...], "rows": n} of the data files.

    Raises:
        UploadError: naming the file and the mismatch.
    """
    data = hf_dir / "data"
    files = sorted(p.name for p in data.glob("*.parquet")) if data.is_dir() else []
    if not files:
        raise UploadError(f"{data}: no parquet files; the write stage has not produced the Hugging Face layout")
    totals = set()
    for name in files:
        m = _DATA_FILE.match(name)
        if not m:
            raise UploadError(f"{data / name}: unexpected file name (expected train-XXXXX-of-YYYYY.parquet); "
                              "remove it or re-run the write stage")
        totals.add(int(m.group(2)))
    if len(totals) != 1 or len(files) != totals.pop():
        raise UploadError(f"{data}: {len(files)} files whose names disagree on the shard count; re-run the build")
    rows = sum(pq.ParquetFile(data / f).metadata.num_rows for f in files)
    header = card_header(hf_dir / "README.md")
    splits = (header.get("dataset_info") or {}).get("splits") or []
    declared = sum(int(s.get("num_examples", 0)) for s in splits)
    if declared != rows:
        raise UploadError(f"{hf_dir / 'README.md'}: card declares {declared} examples, the data files hold {rows}; "
                          "regenerate the card (alive upload does) or re-run the build")
    if not header.get("license"):
        raise UploadError(f"{hf_dir / 'README.md'}: card has no license; set `licence:` on every source of the recipe")
    return {"files": files, "rows": rows}


# ----------------------------------------------------------------------------- staging
def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        if dst.is_file() and os.path.samefile(src, dst):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: copy instead (same bytes)
        shutil.copy2(src, dst)


def prepare(store: RunStore, include_webdataset: bool = False, repo_id: Optional[str] = None) -> dict[str, Any]:
    """Assemble and check the folder that would be uploaded (no network).

    Args:
        store: the finished run.
        include_webdataset: also add ``shards/wds`` under ``webdataset/`` (and the open_clip section to the card).
        repo_id: the target repo, named in the card's download command (``ORG/NAME`` when not known yet).

    Returns:
        {"folder": path, "files": data file names, "rows": n, "webdataset": n tar shards, "digest": content id}.

    Raises:
        UploadError: unfinished run, missing layout, or a card that disagrees with the data.
    """
    from .write.card import card_text

    recipe, models = refresh_card(store)
    hf_dir = store.path(layout.HF)
    info = check_hf_layout(hf_dir)
    dest = store.path(*UPLOAD_DIR)
    wanted: dict[Path, Path] = {dest / "data" / f: hf_dir / "data" / f for f in info["files"]}
    n_tars = 0
    if include_webdataset:
        wds = store.path(layout.WDS)
        tars = sorted(wds.glob("*.tar")) if wds.is_dir() else []
        if not tars:
            raise UploadError(f"{wds}: no webdataset shards (write.formats lacks webdataset?); "
                              "upload without --include-webdataset or re-run the build with it")
        for p in sorted(wds.iterdir()):
            if p.is_file() and (p.suffix in (".tar", ".parquet") or p.name.endswith("_stats.json") or p.name == "sizes.json"):
                wanted[dest / WDS_IN_REPO / p.name] = p
        n_tars = len(tars)
        local = "alive-data"
        card = card_text(recipe, store, models, shard_dir=f"{local}/{WDS_IN_REPO}", fetch=[
            f"hf download {repo_id or 'ORG/NAME'} --repo-type dataset --include '{WDS_IN_REPO}/*' --local-dir {local}"])
    else:
        card = card_text(recipe, store, models, shard_dir=None)
    # Drop whatever an earlier, different upload left (other shards, webdataset no longer requested).
    if dest.exists():
        for p in sorted(dest.rglob("*"), reverse=True):
            if p.is_file() and p not in wanted and p != dest / "README.md" and ".cache" not in p.parts:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for dst, src in wanted.items():
        _link(src, dst)
    write_text_atomic(dest / "README.md", card)
    h = hashlib.sha256()
    for dst in sorted(wanted):
        h.update(f"{dst.relative_to(dest).as_posix()}\0{dst.stat().st_size}\0".encode())
    h.update(card.encode())
    return {"folder": str(dest), "files": info["files"], "rows": info["rows"], "webdataset": n_tars,
            "digest": h.hexdigest()[:12]}


# ----------------------------------------------------------------------------- upload
def _find_pr(api: HfApi, repo_id: str, title: str) -> Optional[Any]:
    """The open pull request an interrupted upload of the same content left (matched by title), or None."""
    for d in api.get_repo_discussions(repo_id=repo_id, repo_type="dataset", discussion_type="pull_request",
                                      discussion_status="open"):
        if d.title == title:
            return d
    return None


def upload_run(store: RunStore, repo_id: Optional[str], private: bool = True, include_webdataset: bool = False,
               *, api: Optional[HfApi] = None) -> dict[str, Any]:
    """Upload a finished run to the Hub as a dataset repo (the optional last step of the flow).

    Data first (resumable, in batches), then the card in one commit; to a pull request merged at the end
    when the repo already exists (see the module docstring).

    Args:
        store: the finished run.
        repo_id: ``ORG/NAME`` of the dataset repo (created if missing).
        private: visibility when the repo is created (an existing repo keeps its visibility).
        include_webdataset: also upload the tar shards under ``webdataset/``.
        api: a ``HfApi`` to use (tests); by default one is built with the token of ``HF_TOKEN`` or ``hf auth login``.

    Returns:
        {"repo_id", "url", "commit", "pr", "folder", "rows", "files", "webdataset"}; also written (without any
        secret) to ``OUT/upload/upload.json``.

    Raises:
        UploadError: bad repo id, unfinished run, offline mode, no token, or a Hub error (with its reason).
    """
    if not isinstance(store, RunStore):
        store = RunStore(store)
    repo_id = check_repo_id(repo_id)
    prep = prepare(store, include_webdataset, repo_id=repo_id)
    if _offline():
        raise UploadError("HF_HUB_OFFLINE is set: the Hub cannot be reached in offline mode. Unset HF_HUB_OFFLINE "
                          f"and re-run the upload; the checked folder is ready at {prep['folder']}")
    if api is None:
        token = get_token()  # HF_TOKEN, else the token `hf auth login` saved
        if not token:
            raise UploadError("no Hugging Face token: run `hf auth login`, or create a token with write access at "
                              "https://huggingface.co/settings/tokens and export HF_TOKEN, then re-run the upload")
        api = HfApi(token=token)
        del token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    data = ["data/*.parquet"] + ([f"{WDS_IN_REPO}/*"] if include_webdataset else [])
    title = f"ALive dataset factory: {prep['rows']} pairs in {len(prep['files'])} files ({prep['digest']})"
    folder = Path(prep["folder"])
    log.info("uploading %d rows (%d data files%s) to dataset repo %s", prep["rows"], len(prep["files"]),
             f", {prep['webdataset']} tar shards" if include_webdataset else "", repo_id)
    pr_num: Optional[int] = None
    try:
        existed = api.repo_exists(repo_id, repo_type="dataset")
        repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        revision = None
        if existed:
            pr = _find_pr(api, repo_id, title)
            if pr is not None:
                revision, pr_num = pr.git_reference, pr.num
                log.info("resuming the upload into the open pull request #%d of %s", pr_num, repo_id)
        kw: dict[str, Any] = dict(repo_id=repo_id, repo_type="dataset", folder_path=str(folder), allow_patterns=data,
                                  ignore_patterns=[".cache/**"], delete_patterns=data)
        if existed and revision is None:
            commit = api.upload_folder(**kw, commit_message=title, create_pr=True)  # the PR's title
            revision, pr_num = commit.pr_revision, commit.pr_num
        else:
            commit = api.upload_folder(**kw, commit_message=f"{title}: data", revision=revision)
        commit = api.upload_file(path_or_fileobj=str(folder / "README.md"), path_in_repo="README.md", repo_id=repo_id,
                                 repo_type="dataset", revision=revision, commit_message=f"{title}: dataset card")
        if pr_num is not None:
            api.merge_pull_request(repo_id, pr_num, repo_type="dataset",
                                   comment="Data and dataset card of one build, merged together.")
    except OfflineModeIsEnabled as e:
        raise UploadError(f"offline mode is enabled ({e}); unset HF_HUB_OFFLINE to upload") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "the token was refused: check HF_TOKEN / `hf auth login`",
                403: f"the token has no write access to {repo_id}",
                404: f"{repo_id} not found and could not be created"}.get(status, "re-run to resume the upload")
        raise UploadError(f"upload to {repo_id} failed (HTTP {status}): {hint}") from None
    url = str(getattr(repo, "url", None) or f"https://huggingface.co/datasets/{repo_id}")
    result = {"repo_id": repo_id, "url": url, "commit": str(getattr(commit, "commit_url", "") or commit),
              "pr": pr_num, "folder": prep["folder"], "rows": prep["rows"], "files": len(prep["files"]),
              "webdataset": prep["webdataset"], "private_if_created": private}
    write_json_atomic(store.path(layout.UPLOAD_RECORD), result)
    log.info("uploaded to %s%s", url, f" (pull request #{pr_num}, merged)" if pr_num is not None else "")
    return result


# ----------------------------------------------------------------------------- CLI
def register_cli(app: Any) -> None:
    """Mount ``alive upload OUT --repo-id ORG/NAME`` on the project's typer app."""
    import typer

    @app.command("upload")
    def upload_cmd(
        out: Path = typer.Argument(..., help="Run folder (the --out of alive build)."),
        repo_id: str = typer.Option(..., "--repo-id", help="Dataset repo ORG/NAME (created if missing)."),
        private: Optional[bool] = typer.Option(None, "--private/--public",
                                               help="Visibility of a new repo; default: the recipe's upload.private (private)."),
        include_webdataset: bool = typer.Option(False, "--include-webdataset", help="Also upload the tar shards."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Assemble and check the folder only (no network)."),
    ) -> None:
        """Upload a finished run to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)."""
        from .recipe import RecipeError

        store = RunStore(out)
        try:
            check_repo_id(repo_id)
            if dry_run:
                prep = prepare(store, include_webdataset, repo_id=repo_id)
                typer.echo(f"ready: {prep['folder']} ({prep['rows']} rows, {len(prep['files'])} data files, "
                           f"{prep['webdataset']} tar shards)")
                return
            if private is None:
                from .report import run_recipe

                private = run_recipe(store).upload.private
            res = upload_run(store, repo_id, private=private, include_webdataset=include_webdataset)
        except (UploadError, RecipeError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)
        typer.echo(f"uploaded {res['rows']} rows to {res['url']}")
