"""Scaling laws: the Chinchilla Approach 3 fit on Epoch AI's digitised runs and on
synthetic data, the compute-optimal and over-training arithmetic, bad inputs, the CLI and
a micro sweep through the real training loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmcore.cli import main
from llmcore.scaling import EPOCH_2024, ChinchillaFit, chinchilla, fit_chinchilla, plan, read_runs
from llmcore.scaling.chinchilla import huber_objective

DATA = Path(__file__).resolve().parent / "data" / "chinchilla_epoch_2024.csv"
# A small grid of starts for the fast tests (the default is Epoch's 4500 starts).
SMALL_GRID = {"a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "e": (0.0, 0.5),
              "alpha": (0.5, 1.0), "beta": (0.5, 1.0)}
CHINCHILLA_C = 5.76e23


def _check_epoch_fit(fit: ChinchillaFit):
    # Epoch AI's published replication: E 1.82, A 482, B 2085, alpha 0.348, beta 0.366.
    # Our optimizer converges further (objective 0.0010183 vs 0.0010228 at their published
    # point): E 1.817, A 477.8, B 2143, alpha 0.3473, beta 0.3672. A and B trade off with
    # alpha and beta along a flat valley, hence the wider relative tolerance on them.
    assert fit.E == pytest.approx(1.82, abs=0.02)
    assert fit.A == pytest.approx(482, rel=0.05)
    assert fit.B == pytest.approx(2085, rel=0.05)
    assert fit.alpha == pytest.approx(0.348, abs=0.005)
    assert fit.beta == pytest.approx(0.366, abs=0.005)
    assert fit.num_runs == 240
    n_opt, d_opt = fit.compute_optimal(CHINCHILLA_C)
    assert 6 * n_opt * d_opt == pytest.approx(CHINCHILLA_C, rel=1e-12)
    assert 15 <= fit.tokens_per_param(CHINCHILLA_C) <= 25  # Chinchilla's ~20
    assert 5e10 <= n_opt <= 1e11  # Chinchilla itself: 70B parameters, 1.4T tokens


def test_fit_on_epoch_chinchilla_data():
    N, D, L = read_runs(DATA, exclude_highest=5)
    fit = fit_chinchilla(N, D, L, grid=SMALL_GRID)
    _check_epoch_fit(fit)
    # Our optimum is at least as good as Epoch's published parameters.
    ln, ld, ll = (torch.tensor(v, dtype=torch.float64).log() for v in (N, D, L))
    theirs = huber_objective(EPOCH_2024.theta, ln, ld, ll).item()
    assert fit.objective <= theirs


@pytest.mark.slow
def test_fit_on_epoch_chinchilla_data_full_grid():
    """Epoch's whole grid (4500 starts; ~30 s of one core) lands on the same optimum."""
    fit = fit_chinchilla(*read_runs(DATA, exclude_highest=5))
    _check_epoch_fit(fit)
    assert fit.A == pytest.approx(477.8, rel=1e-3) and fit.B == pytest.approx(2143, rel=1e-3)


def test_read_runs_derives_tokens_and_drops_the_highest_losses():
    N, D, L = read_runs(DATA)
    assert len(N) == 245
    assert D[0] == pytest.approx(9.993852799709755e18 / (6 * 6795600349.289497))
    N5, _, L5 = read_runs(DATA, exclude_highest=5)
    assert len(N5) == 240 and max(L5) <= sorted(L)[-6]


def _synthetic(truth: ChinchillaFit, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 10 ** (7 + 3 * torch.rand(200, generator=g, dtype=torch.float64))
    d = 10 ** (9 + 3 * torch.rand(200, generator=g, dtype=torch.float64))
    loss = truth.predict(n, d) * torch.exp(noise * torch.randn(200, generator=g,
                                                               dtype=torch.float64))
    return n, d, loss


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_recovers_known_parameters_from_synthetic_runs(noise):
    truth = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    fit = fit_chinchilla(*_synthetic(truth, noise), grid=SMALL_GRID)
    if noise == 0:
        for k in ("E", "A", "B", "alpha", "beta"):
            assert getattr(fit, k) == pytest.approx(getattr(truth, k), rel=1e-3), k
        assert fit.objective < 1e-10
    else:  # 1% noise: the law and its allocation are recovered, the constants loosely
        assert fit.E == pytest.approx(truth.E, abs=0.05)
        assert fit.alpha == pytest.approx(truth.alpha, abs=0.03)
        assert fit.beta == pytest.approx(truth.beta, abs=0.03)
        for c in (1e19, 1e21, 1e23):
            assert fit.tokens_per_param(c) == pytest.approx(truth.tokens_per_param(c), rel=0.3)


def test_bootstrap_intervals_cover_the_truth():
    truth = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    n, d, loss = _synthetic(truth, 0.01, seed=1)
    fit = fit_chinchilla(n, d, loss, grid=SMALL_GRID)
    ci = fit.bootstrap(n, d, loss, n_boot=50, seed=0)
    for k in ("E", "alpha", "beta"):
        lo, hi = ci[k]
        assert lo <= getattr(fit, k) <= hi, k
        assert hi - lo < 0.3, k
    assert ci == fit.bootstrap(n, d, loss, n_boot=50, seed=0)  # seeded


def test_compute_optimal_is_the_minimum_on_the_isoflop_curve():
    law = EPOCH_2024
    for c in (1e18, 1e21, 1e24):
        n_opt, d_opt = law.compute_optimal(c)
        best = law.predict(n_opt, d_opt)
        for f in (0.9, 1.1, 0.5, 2.0):
            assert law.predict(n_opt * f, c / (6 * n_opt * f)) > best
    # alpha = beta and A = B: N_opt = D_opt = sqrt(C / 6).
    sym = ChinchillaFit(E=1.0, A=100.0, B=100.0, alpha=0.3, beta=0.3)
    assert sym.compute_optimal(6e20) == pytest.approx((1e10, 1e10), rel=1e-12)


def test_plan_arithmetic():
    p = plan(EPOCH_2024, 1e21, tokens_per_param=[150.0, 20.0])
    assert 6 * p["N_opt"] * p["D_opt"] == pytest.approx(1e21)
    over = p["over_training"][0]
    assert over["D"] / over["N"] == pytest.approx(150.0)
    assert 6 * over["N"] * over["D"] == pytest.approx(1e21)
    assert over["N"] < p["N_opt"] and over["loss_increase"] > 0
    assert over["N"] / p["N_opt"] == pytest.approx(over["params_ratio"])
    # The compute that brings the over-trained shape to the optimal loss.
    n, d, loss = EPOCH_2024.at_ratio(over["compute_to_match"], 150.0)
    assert loss == pytest.approx(p["loss"], abs=1e-9)
    assert over["compute_ratio"] > 1
    assert p["over_training"][1]["loss_increase"] >= 0  # 20 is near, not at, the optimum


@pytest.mark.parametrize("args, match", [
    (([1e8, -1e9, 1e9, 1e9, 1e9], [1e9] * 5, [3.0] * 5), "N .*must be positive"),
    (([1e8] * 5, [1e9, 1e9, 0.0, 1e9, 1e9], [3.0] * 5), "D .*must be positive"),
    (([], [], []), "empty"),
    (([1e8] * 5, [1e9] * 5, [3.0, math.nan, 3.0, 3.0, 3.0]), "non-finite"),
    (([1e8] * 5, [1e9] * 5, [3.0, math.inf, 3.0, 3.0, 3.0]), "non-finite"),
    (([1e8] * 5, [1e9] * 4, [3.0] * 5), "same length"),
    (([1e8] * 3, [1e9] * 3, [3.0] * 3), "at least 5"),
])
def test_bad_inputs_are_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        fit_chinchilla(*args)


def test_bad_plan_and_csv_inputs(tmp_path):
    with pytest.raises(ValueError, match="compute"):
        EPOCH_2024.compute_optimal(-1.0)
    with pytest.raises(ValueError, match="tokens per parameter"):
        EPOCH_2024.at_ratio(1e21, 0.0)
    empty = tmp_path / "empty.csv"
    empty.write_text("N,D,loss\n")
    with pytest.raises(ValueError, match="no runs"):
        read_runs(empty)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("N,loss\n1e8,3.0\n")
    with pytest.raises(ValueError, match="token"):
        read_runs(nocol)
    text = tmp_path / "text.csv"
    text.write_text("N,D,loss\n1e8,1e9,abc\n")
    with pytest.raises(ValueError, match="row 2, column 'loss'"):
        read_runs(text)


def test_cli_fit_plan_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(chinchilla, "GRID", SMALL_GRID)  # the command's fit, on fewer starts
    truth = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    n, d, loss = _synthetic(truth, 0.0)
    csv = tmp_path / "runs.csv"
    csv.write_text("N,D,loss\n" + "".join(f"{a},{b},{c}\n" for a, b, c in
                                          zip(n[:40].tolist(), d[:40].tolist(),
                                              loss[:40].tolist(), strict=True)))
    assert main(["scaling", "fit", str(csv), "--json", "fit.json"]) == 0
    out = json.loads((tmp_path / "fit.json").read_text())
    assert out["fit"]["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert out["runs"] == 40 and out["excluded_highest"] == 0
    assert "alpha" in capsys.readouterr().out

    assert main(["scaling", "plan", "--law", "fit.json", "--compute", "1e21",
                 "--json", "plan.json"]) == 0
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["law"]["A"] == pytest.approx(406.4, rel=1e-3)
    assert main(["scaling", "plan", "--gpus", "8", "--hours", "24", "--tokens-per-s", "3000",
                 "--at-params", "1e9", "--json", "gpu.json"]) == 0
    assert json.loads((tmp_path / "gpu.json").read_text())["compute"] == pytest.approx(
        6 * 1e9 * 3000 * 8 * 24 * 3600)
    capsys.readouterr()
    assert main(["scaling", "plan", "--gpus", "8"]) == 2
    assert "--tokens-per-s" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path / "missing.csv")]) == 2
    assert "no such CSV" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("N,D,loss\n" + "1e8,-1e9,3.0\n" * 6)
    assert main(["scaling", "fit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "must be positive" in err and len(err.strip().splitlines()) == 1


# -- the sweep on the real loop: a micro grid (3 sizes x 2 budgets, 2 to 8 steps each) ----

def _micro_spec(corpus):
    from llmcore.scaling.sweep import SweepSpec

    base = {"data": [str(corpus)], "val_fraction": 0.2, "vocab_size": 512, "batch_size": 4,
            "seq_len": 64, "lr": 3e-3, "min_lr": 3e-4, "warmup": 1, "eval_every": 0,
            "eval_tokens": 2048, "sample_tokens": 0, "save_every": 0, "keep_last": 1,
            "progress": False, "tensorboard": False, "seed": 7,
            "model": {"max_seq_len": 64}}
    sizes = {"d16": {"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 32},
             "d24": {"dim": 24, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 48},
             "d32": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64}}
    return SweepSpec(sizes=sizes, budgets=(4e7, 1.2e8), base=base)


def test_micro_sweep_trains_fits_plots_and_resumes(corpus, cache, tmp_path, monkeypatch):
    from llmcore.scaling.sweep import plan_runs, run_sweep
    from llmcore.training.recipes import pretrain

    spec = _micro_spec(corpus)
    planned = plan_runs(spec)
    assert len(planned) == 6 and all(1 <= r["steps"] <= 12 for r in planned)
    for r in planned:
        assert r["C"] == pytest.approx(6 * r["N"] * r["D"])
        assert r["D"] == r["steps"] * 4 * 64
    res = run_sweep(spec, tmp_path, log=lambda *_: None,
                    fit_grid={"alpha": (0.5,), "beta": (0.5,), "e": (0.0,), "a": (2.0, 5.0),
                              "b": (2.0, 5.0)})
    assert len(res["runs"]) == 6
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in res["runs"])
    assert res["fit"] is not None and len(res["frontier"]) == 2
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["loss"] for r in saved["runs"]] == [r["loss"] for r in res["runs"]]
    assert (tmp_path / "runs.csv").read_text().count("\n") == 7
    pytest.importorskip("matplotlib")
    assert (tmp_path / "isoflops.png").stat().st_size > 1000

    # Resumable: finished runs are skipped; a run without its summary is completed from
    # its checkpoint (no new training steps), and the losses stay the same.
    calls = []
    real_run = pretrain.run

    def counting_run(cfg, out, resume=False, **kw):
        calls.append((Path(out).name, resume))
        return real_run(cfg, out, resume=resume, **kw)

    monkeypatch.setattr(pretrain, "run", counting_run)
    (tmp_path / "runs" / planned[0]["name"] / "summary.json").unlink()
    again = run_sweep(spec, tmp_path, log=lambda *_: None,
                      fit_grid={"alpha": (0.5,), "beta": (0.5,), "e": (0.0,), "a": (2.0,),
                                "b": (2.0,)})
    assert calls == [(planned[0]["name"], True)]
    assert [r["loss"] for r in again["runs"]] == [r["loss"] for r in res["runs"]]


def test_sweep_grid_errors(corpus):
    from llmcore.scaling.sweep import SweepSpec, plan_runs

    with pytest.raises(ValueError, match="at least one size"):
        plan_runs(SweepSpec(sizes={}, budgets=(1e9,)))
    with pytest.raises(ValueError, match="positive FLOP"):
        plan_runs(SweepSpec(budgets=(-1.0,)))
    assert main(["scaling", "sweep", "--out", "x", "--quick", "--sizes", "d999"]) == 2
