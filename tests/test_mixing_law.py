"""Mixing-law fit: parameter recovery, robustness, the recommendation rules, CSV reading, the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.mix import law
from pipeline.mix.cli import app

R = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6])
CROPS = (0.9, -0.1, 3.0)  # falls as general data grows
GENERAL = (0.7, -0.4, -5.0)  # rises towards 0.7


def noisy(params, r=R, sd=0.002, seed=0):
    return law.law(r, *params) + np.random.default_rng(seed).normal(0, sd, len(r))


@pytest.mark.parametrize("params", [CROPS, GENERAL, (2.5, 0.8, -3.0)])
def test_fit_recovers_known_parameters_from_noisy_points(params):
    f = law.fit_law(R, noisy(params), "d")
    c, k, t = params
    assert abs(f.t - t) < 0.35 and abs(f.c - c) < 0.03 and abs(f.k - k) < 0.03
    grid = np.linspace(0, 0.6, 50)
    assert np.abs(f.predict(grid) - law.law(grid, *params)).max() < 0.006
    assert f.rmse < 0.004 and f.n == len(R)
    assert math.isfinite(f.stderr_t) and f.stderr_t < 0.5  # the reported error is a real, small number


def test_huber_fit_shrugs_off_an_outlier():
    y = noisy(GENERAL, sd=0.001)
    y[4] += 0.15  # one broken run
    robust = law.fit_law(R, y, "general", delta=0.005)
    assert abs(robust.t - GENERAL[2]) < 0.6 and abs(robust.c - GENERAL[0]) < 0.02
    clean = np.delete(np.arange(len(R)), 4)
    assert np.abs(robust.predict(R[clean]) - y[clean]).max() < 0.01
    # a least-squares-like threshold follows the outlier much more
    loose = law.fit_law(R, y, "general", delta=10.0)
    assert np.abs(loose.predict(R[clean]) - y[clean]).max() > np.abs(robust.predict(R[clean]) - y[clean]).max()


def test_fit_needs_three_distinct_shares():
    with pytest.raises(ValueError, match="3 or more distinct shares"):
        law.fit_law([0.1, 0.1, 0.2, 0.2], [1, 2, 3, 4], "crops")


def exact_fits():
    return {"crops": law.fit_law(R, law.law(R, *CROPS), "crops"),
            "general": law.fit_law(R, law.law(R, *GENERAL), "general")}


def test_min_general_rule():
    fits = exact_fits()
    rec = law.recommend(fits, "min-general", base=0.7, tolerance=0.02)
    # 0.7 - 0.4 exp(-5 r) >= 0.68  <=>  r >= ln(20) / 5
    assert rec["share"] == pytest.approx(math.log(20) / 5, abs=0.0011)
    assert rec["predicted"]["general"] >= 0.68 - 1e-9
    assert rec["share"] - 0.001 < 0 or fits["general"].predict(rec["share"] - 0.001) < 0.68
    assert "within 0.02" in rec["reason"] and rec["base_from"] == "given" and not rec["extrapolated"]
    # the default base is the prediction at the largest share tried
    rec2 = law.recommend(fits, "min-general", tolerance=0.02, observed=(0.0, 0.6))
    assert rec2["base"] == pytest.approx(law.law(0.6, *GENERAL))
    # a base nothing reaches: no share, and the reason says what is reachable
    rec3 = law.recommend(fits, "min-general", base=0.9, tolerance=0.01)
    assert rec3["share"] is None and "no share" in rec3["reason"]
    # losses: lower is better
    loss = {"general": law.fit_law(R, law.law(R, 2.0, 1.0, -4.0), "general")}
    rec4 = law.recommend(loss, "min-general", base=2.0, tolerance=0.05, higher_is_better=False)
    assert rec4["share"] == pytest.approx(math.log(20) / 4, abs=0.0011)


def test_weighted_rule():
    fits = exact_fits()
    rec = law.recommend(fits, "weighted")
    # d/dr [0.9 - 0.1 e^{3r} + 0.7 - 0.4 e^{-5r}] = 0  <=>  e^{8r} = 2 / 0.3
    assert rec["share"] == pytest.approx(math.log(2 / 0.3) / 8, abs=0.0011)
    only_crops = law.recommend(fits, "weighted", weights={"crops": 1.0})
    assert only_crops["share"] == 0.0 and only_crops["weights"] == {"crops": 1.0, "general": 0.0}
    with pytest.raises(ValueError, match="no fit"):
        law.recommend(fits, "weighted", weights={"fishery": 1.0})
    with pytest.raises(ValueError, match="unknown rule"):
        law.recommend(fits, "best")


def write_wide(path, rows, base=None):
    lines = ["general_share,crops,general" + (",base_general" if base is not None else "")]
    for r, c, g in rows:
        lines.append(f"{r},{c},{g}" + (f",{base}" if base is not None else ""))
    path.write_text("\n".join(lines) + "\n")


def test_read_results_wide_long_and_errors(tmp_path):
    wide = tmp_path / "wide.csv"
    write_wide(wide, [(r, law.law(r, *CROPS), law.law(r, *GENERAL)) for r in R], base=0.69)
    res = law.read_results(wide)
    assert sorted(res.points) == ["crops", "general"] and res.base == {"general": 0.69}
    assert np.allclose(res.points["crops"][0], R)
    long = tmp_path / "long.csv"
    long.write_text("share,domain,metric\n" + "".join(
        f"{r},crops,{law.law(r, *CROPS)}\n{r},general,{law.law(r, *GENERAL)}\n" for r in R) + "0.1,base_general,0.5\n")
    res2 = law.read_results(long)
    assert np.allclose(res2.points["general"][1], res.points["general"][1]) and res2.base == {"general": 0.5}

    bad = tmp_path / "bad.csv"
    bad.write_text("crops,general\n0.5,0.6\n")
    with pytest.raises(law.ResultsError, match="no share column"):
        law.read_results(bad)
    bad.write_text("general_share,crops\n0.1,0.5\n23,0.6\n")
    with pytest.raises(law.ResultsError, match=r"bad.csv:3: .*percentage"):
        law.read_results(bad)
    bad.write_text("general_share,crops\n0.1,0.5\n0.2,oops\n")
    with pytest.raises(law.ResultsError, match=r"bad.csv:3: column 'crops' has 'oops'"):
        law.read_results(bad)


def test_cli_fit_prints_parameters_recommends_and_writes_the_png(tmp_path):
    csv_path = tmp_path / "results.csv"
    rng = np.random.default_rng(4)
    write_wide(csv_path, [(r, law.law(r, *CROPS) + rng.normal(0, 0.001), law.law(r, *GENERAL) + rng.normal(0, 0.001))
                          for r in R], base=0.69)
    out_json = tmp_path / "fit.json"
    res = CliRunner().invoke(app, ["fit", str(csv_path), "--tolerance", "0.02", "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    m = re.search(r"recommended general share \(min-general\): ([0-9.]+)", res.output)
    assert m and float(m.group(1)) == pytest.approx(math.log(0.4 / 0.03) / 5, abs=0.02)  # g(r) >= 0.69 - 0.02
    assert "base_general column of results.csv" in json.loads(out_json.read_text())["recommendation"]["base_from"]
    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "crops" in res.output and "rmse" in res.output
    doc = json.loads(out_json.read_text())
    assert doc["fits"]["general"]["t"] == pytest.approx(GENERAL[2], abs=0.5)

    res2 = CliRunner().invoke(app, ["fit", str(csv_path), "--rule", "weighted", "--weight", "crops=2",
                                    "--weight", "general=1", "--png", str(tmp_path / "w.png")])
    assert res2.exit_code == 0, res2.output
    assert "(weighted)" in res2.output and (tmp_path / "w.png").exists()

    res3 = CliRunner().invoke(app, ["fit", str(tmp_path / "missing.csv")])
    assert res3.exit_code == 2 and "not found" in res3.output
