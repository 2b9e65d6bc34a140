"""Prompt sets: loading, placeholders, a/an, context, hashes and sampling overrides."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from pipeline.describe.prompts import PromptError, load_prompt_set, load_prompt_sets, resolve_sampling
from pipeline.describe.template import article
from pipeline.recipe import DescribeConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_domain_has_a_visual_only_prompt_set_with_cupl_questions():
    sets = load_prompt_sets(DescribeConfig())
    assert set(sets) == {"crops", "livestock", "fishery", "general"}
    for domain, ps in sets.items():
        assert ps.domain == domain
        assert "only traits a camera can see" in ps.spec.system
        ids = [q.id for q in ps.spec.questions]
        assert len([i for i in ids if i.startswith("cupl_")]) >= 5
        if domain != "general":
            assert len(ids) > 5, f"{domain} has no domain-specific questions"
        assert ps.sha == hashlib.sha256((ROOT / "prompts" / f"{domain}.yaml").read_bytes()).hexdigest()[:16]
        assert ps.sampling["n"] >= 1 and ps.sampling["max_tokens"] >= 1


@pytest.mark.parametrize("word,expected", [("apple scab", "an"), ("holstein", "a"), ("european eel", "a"),
                                           ("hour", "an"), ("onion", "an"), ("unicorn fish", "a"),
                                           ("ewe", "a"), ("urial", "a"), ("indian runner duck", "an")])
def test_article(word, expected):
    assert article(word) == expected


def test_prompts_fill_class_article_and_context():
    sets = load_prompt_sets(DescribeConfig())
    crops = sets["crops"]
    with_ctx = crops.prompts_for("apple scab", "apple leaf")
    by_id = {p.question_id: p for p in with_ctx}
    assert by_id["cupl_describe"].messages[1]["content"].startswith("Describe what an apple scab looks like.")
    assert "the photos of apple scab show an apple leaf" in by_id["cupl_describe"].prompt
    assert by_id["leaf_symptoms"].prompt.startswith("What does an apple leaf with apple scab look like?")
    assert by_id["cupl_describe"].messages[0] == {"role": "system", "content": crops.spec.system.strip()}
    no_ctx = {p.question_id: p for p in crops.prompts_for("tomato leaf mold", None)}
    assert no_ctx["leaf_symptoms"].prompt == "What does a leaf with tomato leaf mold look like?"
    assert "Context" not in no_ctx["cupl_describe"].prompt
    fish = {p.question_id: p for p in sets["fishery"].prompts_for("european eel", None)}
    assert fish["cupl_caption"].prompt == "A caption of an image of a european eel:"
    # livestock's in_context question needs a context and has no fallback: skipped without one
    assert "in_context" not in {p.question_id for p in sets["livestock"].prompts_for("angus", None)}
    assert "in_context" in {p.question_id for p in sets["livestock"].prompts_for("angus", "beef cattle breed")}


def test_recipe_overrides_prompt_sampling():
    ps = load_prompt_sets(DescribeConfig())["fishery"]
    s = resolve_sampling(ps.spec.sampling, DescribeConfig(n_per_question=3, temperature=0.5, stop=["."]))
    assert (s["n"], s["temperature"], s["stop"], s["max_tokens"]) == (3, 0.5, ["."], ps.spec.sampling.max_tokens)
    assert (s["top_k"], s["min_p"], s["repetition_penalty"]) == (-1, 0.0, 1.0)  # explicit "off" values
    s = resolve_sampling(ps.spec.sampling, DescribeConfig(top_k=40, min_p=0.05, repetition_penalty=1.1))
    assert (s["top_k"], s["min_p"], s["repetition_penalty"]) == (40, 0.05, 1.1)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bad_prompt_files_name_the_file_and_the_problem(tmp_path):
    bad_placeholder = _write(tmp_path, "crops.yaml", "domain: crops\nsystem: s\nquestions:\n"
                             "  - {id: q1, text: 'Describe {klass}.'}\n")
    with pytest.raises(PromptError, match=r"crops\.yaml.*\n.*unknown placeholder.*klass"):
        load_prompt_set(bad_placeholder, DescribeConfig())
    wrong_domain = _write(tmp_path, "fishery.yaml", "domain: crops\nsystem: s\nquestions:\n"
                          "  - {id: q1, text: 'Describe {a_class}.'}\n")
    with pytest.raises(PromptError, match="must match the file name"):
        load_prompt_set(wrong_domain, DescribeConfig())
    dup = _write(tmp_path, "general.yaml", "domain: general\nsystem: s\nquestions:\n"
                 "  - {id: q1, text: 'a {class}'}\n  - {id: q1, text: 'b {class}'}\n")
    with pytest.raises(PromptError, match="repeated"):
        load_prompt_set(dup, DescribeConfig())
    unknown_key = _write(tmp_path, "livestock.yaml", "domain: livestock\nsystem: s\ntemperature: 1\nquestions:\n"
                         "  - {id: q1, text: 'a {class}'}\n")
    with pytest.raises(PromptError, match="temperature"):
        load_prompt_set(unknown_key, DescribeConfig())


def test_missing_domain_falls_back_to_general_and_missing_general_is_an_error(tmp_path):
    _write(tmp_path, "general.yaml", "domain: general\nsystem: s\nquestions:\n  - {id: q1, text: 'Describe {a_class}.'}\n")
    sets = load_prompt_sets(DescribeConfig(prompts=str(tmp_path)), {"crops", "general"})
    assert sets["crops"].domain == "general"
    (tmp_path / "general.yaml").unlink()
    with pytest.raises(PromptError, match="no prompt set for domain"):
        load_prompt_sets(DescribeConfig(prompts=str(tmp_path)), {"crops"})


def test_vllm_compose_service_is_local_keyed_and_parametrised():
    import yaml

    spec = yaml.safe_load((ROOT / "docker" / "vllm.compose.yaml").read_text())
    svc = spec["services"]["vllm"]
    image, tag = svc["image"].split(":", 1)
    assert image == "vllm/vllm-openai" and "latest" not in tag and re.search(r"v\d+\.\d+\.\d+", tag), tag  # pinned
    cmd = svc["command"]
    assert "${VLLM_MODEL:-" in cmd[0] and "--model" not in cmd  # the model is `vllm serve`'s positional argument
    assert cmd[cmd.index("--generation-config") + 1] == "vllm"  # no sampling defaults from generation_config.json
    assert svc["profiles"] == ["gpu"]  # `docker compose up` on a CPU-only host does not try to start it
    assert any(v.endswith(":/root/.cache/huggingface") for v in svc["volumes"])  # the HF cache is mounted
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert "VLLM_API_KEY" in svc["environment"] and "?" in svc["environment"]["VLLM_API_KEY"]
    assert DescribeConfig().api_key_env == "VLLM_API_KEY" and DescribeConfig().base_url.endswith(":8000/v1")


def test_describe_prompts_command_shows_filled_prompts_and_hash():
    from typer.testing import CliRunner

    from pipeline.describe.cli import app

    res = CliRunner().invoke(app, ["describe-prompts", "apple scab", "--domain", "crops", "--context", "apple leaf"])
    assert res.exit_code == 0, res.output
    sha = load_prompt_sets(DescribeConfig(), {"crops"})["crops"].sha
    assert f"prompt_sha {sha}" in res.output
    assert "[cupl_describe] Describe what an apple scab looks like." in res.output
    assert "[leaf_symptoms] What does an apple leaf with apple scab look like?" in res.output
