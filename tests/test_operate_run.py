"""Operating a built run: HTML report, Hub upload (autospec HfApi), token hygiene, Ray vs local bytes.

One tiny run is built once through the real flow (Prefect test server, tiny local CLIP, scoring and
mixing on, upload on with an autospec ``HfApi`` and a planted ``HF_TOKEN``); the tests read it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

PLANTED = "hf_PLANTEDtokenMUSTneverLEAK0123456789abcdef"
REPO = "alive-test/tiny-run"


def _recipe(tmp: Path, model: Path, **extra) -> Path:
    r = {
        "name": "operate-tiny",
        "seed": 3,
        "image_size": 64,
        "sources": [
            {"name": "op-leaves", "kind": "synthetic", "domain": "crops", "size": 64, "per_class": 5,
             "classes": ["tomato late blight", "corn common rust", "apple scab"], "licence": "CC0-1.0",
             "citation": "Synthetic <b>leaves</b> & co"},
            {"name": "op-fish", "kind": "synthetic", "domain": "fishery", "size": 64, "per_class": 5,
             "classes": ["atlantic salmon", "tilapia"], "licence": "CC-BY-4.0"},
            {"name": "op-general", "kind": "synthetic", "domain": "general", "size": 64, "per_class": 4,
             "captioned": True, "classes": ["red car", "blue house"], "licence": "CC0-1.0"},
        ],
        "ingest": {"part_size": 32, "processes": 1},
        "describe": {"backend": "template"},
        "score": {"model": str(model), "batch_size": 32, "min_score": None,
                  "dedup": {"exact": True, "near_cosine": 0.999}, "decontaminate": False},
        "mix": {"shares": {"crops": 0.5, "fishery": 0.3, "general": 0.2}, "max_repeats": 2},
        "write": {"samples_per_shard": 12, "formats": ["webdataset", "hf"]},
        **extra,
    }
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.args!r}")


@pytest.fixture(scope="module")
def built(tmp_path_factory, prefect_harness, tiny_clip_dir):
    """The tiny run, built with upload enabled through an autospec HfApi and a planted token."""
    import huggingface_hub
    from huggingface_hub import HfApi

    from flows.build_alive import build_alive
    from pipeline import upload

    tmp = tmp_path_factory.mktemp("operate")
    recipe = _recipe(tmp, tiny_clip_dir, upload={"enabled": True, "repo_id": REPO})
    out = tmp / "run"
    factory = mock.create_autospec(HfApi)
    api = factory.return_value
    api.repo_exists.return_value = False  # a new repo: data, then the card, straight to main
    api.create_repo.return_value = mock.Mock(url=f"https://huggingface.co/datasets/{REPO}")
    api.upload_folder.return_value = mock.Mock(commit_url=f"https://huggingface.co/datasets/{REPO}/commit/0abc")
    api.upload_file.return_value = mock.Mock(commit_url=f"https://huggingface.co/datasets/{REPO}/commit/0abd")
    cap = _Capture()
    # every record at INFO and above, Prefect's own loggers (which do not propagate) included; Prefect
    # also ships them to its API, whose database the token test scans
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(cap)
        lg.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", PLANTED)
        mp.setenv("HF_HUB_OFFLINE", "0")  # the upload step refuses offline mode; HfApi is a mock here
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        mp.setattr(upload, "HfApi", factory)
        try:
            result = build_alive(str(recipe), str(out), None, False)
        finally:
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # ship the queued run logs to the API before the scan
            for lg, lvl in zip(loggers, old_levels):
                lg.removeHandler(cap)
                lg.setLevel(lvl)
    return {"out": out, "recipe": recipe, "result": result, "factory": factory, "api": api, "tmp": tmp,
            "log_lines": cap.lines}


# ----------------------------------------------------------------------------- report
def test_report_renders_and_every_image_exists(built):
    index = built["out"] / "report" / "index.html"
    doc = index.read_text()
    imgs = re.findall(r"<img src='([^']+)'", doc)
    assert {"stage_timings.png", "domain_counts.png", "class_counts.png", "clip_scores.png", "samples.png"} <= set(imgs)
    for name in imgs:
        png = index.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in index.parent.glob("*.png")) == sorted(set(imgs))  # nothing stale or unreferenced
    for section in ("Stages", "Class counts", "CLIP scores", "Mix: target vs realised", "Samples"):
        assert f"<h2>{section}" in doc
    assert "could not be rendered" not in doc
    assert "Synthetic data" in doc  # synthetic sources are labelled


def test_report_counts_match_the_run(built):
    from pipeline.report import class_counts, run_recipe
    from pipeline.store import RunStore

    store = RunStore(built["out"])
    counts = class_counts(run_recipe(store), store)
    assert list(counts) == ["before filtering", "after filtering", "after mixing"]
    assert sum(counts["before filtering"].values()) == 5 * 3 + 5 * 2 + 4 * 2
    assert sum(counts["after mixing"].values()) == built["result"]["samples"]
    assert all(label.split(" / ")[0] in {"crops", "fishery", "general"} for label in counts["before filtering"])


def test_report_tolerates_missing_stages_and_escapes_text(built, tmp_path):
    """A run folder with only ingest + stats still gets a report; captions/citations are escaped."""
    from pipeline.report import build, run_recipe
    from pipeline.store import RunStore

    part = tmp_path / "partial"
    for sub in ("ingest", "stats", "done"):
        shutil.copytree(built["out"] / sub, part / sub)
    shutil.copy(built["out"] / "recipe.resolved.yaml", part)
    store = RunStore(part)
    recipe = run_recipe(store)
    recipe.name = "<script>alert(1)</script>"
    index = build(recipe, store)
    doc = index.read_text()
    assert "<script>" not in doc and "&lt;script&gt;" in doc
    assert "Not scored" in doc and "Not mixed" in doc and "No shards written yet" in doc
    for name in re.findall(r"<img src='([^']+)'", doc):
        assert (index.parent / name).is_file()


# ----------------------------------------------------------------------------- upload
def _calls(api) -> list[str]:
    return [name for name, _, _ in api.mock_calls if "." not in name]


def test_flow_upload_step_calls_the_hub_with_the_checked_folder(built):
    """A new repo: the data files first (resumable upload_folder), then the card in one commit, on main."""
    factory, api = built["factory"], built["api"]
    assert factory.call_count == 1 and factory.call_args.kwargs == {"token": PLANTED}
    assert _calls(api) == ["repo_exists", "create_repo", "upload_folder", "upload_file"]
    api.create_repo.assert_called_once_with(REPO, repo_type="dataset", private=True, exist_ok=True)
    kw = api.upload_folder.call_args.kwargs
    folder = Path(kw["folder_path"])
    assert folder == built["out"] / "upload" / "dataset"
    assert kw["repo_id"] == REPO and kw["repo_type"] == "dataset" and kw["revision"] is None
    assert kw["allow_patterns"] == ["data/*.parquet"]  # the data only: the card comes last
    assert kw["delete_patterns"] == ["data/*.parquet"]  # stale shards on the Hub are removed in the same commits
    card = api.upload_file.call_args.kwargs
    assert card["path_in_repo"] == "README.md" and card["path_or_fileobj"] == str(folder / "README.md")
    assert card["repo_id"] == REPO and card["repo_type"] == "dataset" and card["revision"] is None
    api.merge_pull_request.assert_not_called()
    rec = json.loads((built["out"] / "upload" / "upload.json").read_text())
    assert rec["repo_id"] == REPO and rec["rows"] == built["result"]["samples"] and rec["pr"] is None
    assert rec["commit"].endswith("/commit/0abd")  # the card's commit: the last one


def _hub_online(mp: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_existing_repo_gets_a_pull_request_merged_after_the_card(built, tmp_path):
    from huggingface_hub import HfApi

    from pipeline.store import RunStore
    from pipeline.upload import upload_run

    run = tmp_path / "run"
    shutil.copytree(built["out"], run)
    api = mock.create_autospec(HfApi, instance=True)
    api.repo_exists.return_value = True
    api.get_repo_discussions.return_value = iter([])
    api.upload_folder.return_value = mock.Mock(pr_revision="refs/pr/7", pr_num=7, commit_url="c1")
    with pytest.MonkeyPatch.context() as mp:
        _hub_online(mp)
        res = upload_run(RunStore(run), REPO, api=api)
    assert _calls(api) == ["repo_exists", "create_repo", "get_repo_discussions", "upload_folder", "upload_file",
                           "merge_pull_request"]
    data = api.upload_folder.call_args.kwargs
    assert data["create_pr"] is True and "revision" not in data and data["commit_message"].startswith("ALive")
    assert api.upload_file.call_args.kwargs["revision"] == "refs/pr/7"  # the card joins the data on the PR
    assert api.merge_pull_request.call_args.args == (REPO, 7) and res["pr"] == 7
    # Interrupted after the data: the re-run finds the open PR by its title and finishes it.
    title = data["commit_message"]
    api2 = mock.create_autospec(HfApi, instance=True)
    api2.repo_exists.return_value = True
    api2.get_repo_discussions.return_value = iter([mock.Mock(title="someone else's PR", git_reference="refs/pr/6", num=6),
                                                   mock.Mock(title=title, git_reference="refs/pr/7", num=7)])
    with pytest.MonkeyPatch.context() as mp:
        _hub_online(mp)
        upload_run(RunStore(run), REPO, api=api2)
    again = api2.upload_folder.call_args.kwargs
    assert again["revision"] == "refs/pr/7" and "create_pr" not in again
    assert api2.upload_file.call_args.kwargs["revision"] == "refs/pr/7"
    assert api2.merge_pull_request.call_args.args == (REPO, 7)


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def test_upload_against_a_local_hub_server(built, tmp_path, monkeypatch):
    """The real HfApi against a local server answering the Hub API calls used: a new repo gets data then
    card on main; a second upload to the now existing repo goes through a pull request; a failure before
    the merge leaves main with the previous data + card, and the re-run finishes the same pull request."""
    import huggingface_hub
    from huggingface_hub import HfApi
    from hub_server import LocalHub

    from pipeline.store import RunStore
    from pipeline.upload import UploadError, upload_run

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # xet needs a CAS server
    _hub_online(monkeypatch)
    run = tmp_path / "run"
    shutil.copytree(built["out"], run)
    store = RunStore(run)
    with LocalHub() as hub:
        api = HfApi(endpoint=hub.url, token=PLANTED)
        res = upload_run(store, REPO, api=api)
        assert [k for k, _ in hub.calls] == ["repo_info", "create_repo", "list_tree", "preupload", "commit",
                                             "validate_yaml", "preupload", "commit"]
        assert {r for _, r in hub.calls if r} == {"main"} and res["pr"] is None
        first = _local_files(run / "upload" / "dataset")
        on_hub = hub.files(REPO)
        assert on_hub.pop(".gitattributes") and on_hub == first  # the card and data files, byte for byte
        assert hub.tokens == {f"Bearer {PLANTED}"}

        # The repo exists now: the next upload (webdataset added, so new files and a new card) uses a PR.
        hub.calls.clear()
        hub.fail_merges = 1
        with pytest.raises(UploadError, match="HTTP 500"):
            upload_run(store, REPO, include_webdataset=True, api=api)
        assert ("commit_new_pr", "main") in hub.calls and ("commit", "refs/pr/1") in hub.calls
        on_hub = hub.files(REPO)
        on_hub.pop(".gitattributes")
        assert on_hub == first  # main untouched: the old card still describes the old data
        second = _local_files(run / "upload" / "dataset")
        assert any(k.startswith("webdataset/") for k in second) and second["README.md"] != first["README.md"]

        hub.calls.clear()
        res = upload_run(store, REPO, include_webdataset=True, api=api)
        kinds = [k for k, _ in hub.calls]
        assert "commit_new_pr" not in kinds and kinds[-1] == "merge" and res["pr"] == 1  # the same PR, finished
        on_hub = hub.files(REPO)
        on_hub.pop(".gitattributes")
        assert on_hub == second
        assert [p["status"] for p in hub.prs[REPO]] == ["merged"]


def test_token_from_hf_auth_login_when_hf_token_is_unset(built, tmp_path, monkeypatch):
    import huggingface_hub

    from pipeline import upload
    from pipeline.store import RunStore

    saved = tmp_path / "token"
    saved.write_text(PLANTED + "\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(saved))
    _hub_online(monkeypatch)
    factory = mock.create_autospec(huggingface_hub.HfApi)
    factory.return_value.repo_exists.return_value = False
    monkeypatch.setattr(upload, "HfApi", factory)
    run = tmp_path / "run"
    shutil.copytree(built["out"], run)
    upload.upload_run(RunStore(run), REPO)
    assert factory.call_args.kwargs == {"token": PLANTED}
    assert PLANTED.encode() not in (run / "upload" / "upload.json").read_bytes()


def test_uploaded_folder_loads_with_datasets(built):
    """``datasets.load_dataset`` on exactly the folder handed to upload_folder."""
    import datasets
    import pyarrow.parquet as pq

    folder = Path(built["api"].upload_folder.call_args.kwargs["folder_path"])
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    hf = built["out"] / "shards" / "hf"
    assert files == ["README.md"] + sorted(f"data/{p.name}" for p in (hf / "data").glob("*.parquet"))
    for p in (hf / "data").glob("*.parquet"):  # hard links / copies of the very same bytes
        assert (folder / "data" / p.name).read_bytes() == p.read_bytes()
    ds = datasets.load_dataset(str(folder), split="train")
    assert ds.num_rows == built["result"]["samples"] == sum(pq.ParquetFile(p).metadata.num_rows for p in (hf / "data").glob("*.parquet"))
    assert type(ds.features["image"]).__name__ == "Image"
    card = (folder / "README.md").read_text()
    assert "CC-BY-4.0" in card and "CuPL" in card and "MetaCLIP" in card  # licences and methods cited


def test_upload_with_webdataset_then_without_leaves_no_stale_files(built, tmp_path):
    from huggingface_hub import HfApi

    from pipeline.store import RunStore
    from pipeline.upload import prepare, upload_run

    run = tmp_path / "run"
    shutil.copytree(built["out"], run)
    api = mock.create_autospec(HfApi, instance=True)
    api.repo_exists.return_value = False
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "0")
        import huggingface_hub

        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        upload_run(RunStore(run), REPO, private=False, include_webdataset=True, api=api)
    folder = run / "upload" / "dataset"
    tars = sorted(p.name for p in (run / "shards" / "wds").glob("*.tar"))
    assert sorted(p.name for p in (folder / "webdataset").glob("*.tar")) == tars
    assert (folder / "webdataset" / "sizes.json").is_file()
    card = (folder / "README.md").read_text()
    # the uploaded card's open_clip command downloads the shards, then trains from the local copy
    assert "## Train with open_clip" in card and f"hf download {REPO} --repo-type dataset" in card
    assert "--train-data 'alive-data/webdataset/{" in card and "--train-num-samples" in card
    assert api.upload_folder.call_args.kwargs["delete_patterns"] == ["data/*.parquet", "webdataset/*"]
    api.create_repo.assert_called_once_with(REPO, repo_type="dataset", private=False, exist_ok=True)
    prepare(RunStore(run), include_webdataset=False)
    assert not (folder / "webdataset").exists()
    assert "## Train with open_clip" not in (folder / "README.md").read_text()  # no shards in that repo


def test_upload_refuses_offline_missing_token_bad_repo_and_unfinished_runs(built, tmp_path, monkeypatch):
    from pipeline.store import RunStore
    from pipeline.upload import UploadError, upload_run

    store = RunStore(built["out"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UploadError, match="HF_HUB_OFFLINE"):
        upload_run(store, REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no saved login
    with pytest.raises(UploadError, match="no Hugging Face token: run `hf auth login`"):
        upload_run(store, REPO)
    for bad in ("no-slash", "a/b/c", "../x", "", None):
        with pytest.raises(UploadError, match="ORG/NAME"):
            upload_run(store, bad)
    half = tmp_path / "half"
    shutil.copytree(built["out"] / "ingest", half / "ingest")
    shutil.copy(built["out"] / "recipe.resolved.yaml", half)
    with pytest.raises(UploadError, match="not finished"):
        upload_run(RunStore(half), REPO)


def test_card_that_disagrees_with_the_data_is_refused(built, tmp_path):
    from pipeline.upload import UploadError, check_hf_layout

    hf = tmp_path / "hf"
    shutil.copytree(built["out"] / "shards" / "hf", hf)
    check_hf_layout(hf)
    card = (hf / "README.md").read_text()
    (hf / "README.md").write_text(re.sub(r"num_examples: \d+", "num_examples: 999999", card))
    with pytest.raises(UploadError, match="999999"):
        check_hf_layout(hf)
    (hf / "README.md").write_text(card)
    victim = sorted((hf / "data").glob("*.parquet"))[-1]
    victim.rename(hf / "data" / "extra.parquet")
    with pytest.raises(UploadError, match="extra.parquet"):
        check_hf_layout(hf)


# ----------------------------------------------------------------------------- secrets
def test_planted_token_never_written_logged_or_stored(built):
    """The token was in the environment for the whole flow run (upload step included)."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    assert len(built["log_lines"]) > 10 and not [x for x in built["log_lines"] if PLANTED in x]
    needle = PLANTED.encode()
    for p in built["tmp"].rglob("*"):
        if p.is_file():
            assert needle not in p.read_bytes(), p
    # Prefect's database holds the flow's logs, parameters, task inputs and artifacts.
    db = Path(PREFECT_API_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        n_logs = con.execute("select count(*) from log").fetchone()[0]
        n_art = con.execute("select count(*) from artifact").fetchone()[0]
        for t in tables:
            for row in con.execute(f'select * from "{t}"'):
                assert PLANTED not in repr(row), t
    finally:
        con.close()
    assert n_logs > 0 and n_art > 0  # the scan covered real logs and artifacts
    for p in db.parent.glob(db.name + "*"):
        assert needle not in p.read_bytes(), p


def test_markdown_and_table_artifacts(built):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["build-report", "mix-report"])))
    # Other builds of the test session report to the same server: find this run's artifact.
    uri = (built["out"] / "report" / "index.html").as_uri()
    assert any(uri in a.data and REPO in a.data for a in arts if a.key == "build-report")
    assert any(a.type == "table" for a in arts if a.key == "mix-report")


# ----------------------------------------------------------------------------- ray
def _tree(root: Path, skip: tuple[str, ...]) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).as_posix().startswith(skip)}


def test_ray_runner_writes_the_same_bytes(built, tmp_path):
    """Local Ray cluster (2 CPUs) vs the default runner: every data file identical."""
    import ray

    from flows.build_alive import build_alive

    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, namespace="alive-test", log_to_driver=False)
    try:
        res = build_alive(str(built["recipe"]), str(out), {"runner.kind": "ray", "upload.enabled": False}, False)
    finally:
        ray.shutdown()
    assert res["samples"] == built["result"]["samples"]
    # timings (stats, markers, summary, report) and the run's own bookkeeping differ by nature; data must not
    skip = ("stats/", "done/", "summary.json", "report/", "upload/", "recipe.resolved.yaml")
    local, remote = _tree(built["out"], skip), _tree(out, skip)
    assert sorted(local) == sorted(remote)
    differ = [k for k in local if local[k] != remote[k]]
    assert not differ, differ
    assert any(k.startswith("shards/wds/") and k.endswith(".tar") for k in local)
    assert any(k.startswith("shards/hf/data/") for k in local)


@pytest.mark.slow  # two `ray start` processes and a full build on them: about a minute
def test_two_node_ray_cluster_writes_the_same_bytes(built, tmp_path, monkeypatch):
    """`ray start --head` plus a second `ray start --address` on this machine: a two-node cluster."""
    import shutil
    import socket
    import subprocess

    from flows.build_alive import build_alive

    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray_bin, "the ray CLI is part of ray[default]"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Clusters started with `ray start` use token authentication: every node and the driver share it.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
    try:
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                        "--node-ip-address=127.0.0.1"], check=True, env=env, capture_output=True, timeout=180)
        import ray

        ray.init(address=f"127.0.0.1:{port}", namespace="alive-test", log_to_driver=False)
        try:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        finally:
            ray.shutdown()
        out = tmp_path / "ray2"
        res = build_alive(str(built["recipe"]), str(out), {"runner.kind": "ray", "runner.address": f"127.0.0.1:{port}",
                                                           "upload.enabled": False}, False)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=180)
    assert res["samples"] == built["result"]["samples"]
    skip = ("stats/", "done/", "summary.json", "report/", "upload/", "recipe.resolved.yaml")
    local, remote = _tree(built["out"], skip), _tree(out, skip)
    assert sorted(local) == sorted(remote)
    assert not [k for k in local if local[k] != remote[k]]
