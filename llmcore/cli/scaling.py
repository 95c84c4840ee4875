"""``llmcore scaling fit|sweep|plan``: the Chinchilla law fitted to runs (Epoch AI's
digitised Chinchilla runs by default), our own sweep of small models, and a compute
planner."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmcore.cli._common import CLIError, float_in, int_at_least

# Epoch AI's digitised Chinchilla runs, kept with the tests of a source checkout.
CHINCHILLA_COMPUTE = 5.76e23  # Chinchilla / Gopher training FLOPs

positive = float_in(0.0, math.inf, lo_open=True)


def add_parser(subparsers):
    p = subparsers.add_parser("scaling", help="scaling laws: fit, sweep, compute plan")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    f = sub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to runs in a CSV")
    f.add_argument("csv", nargs="?", help="runs: N (`Model Size`/N/params), loss, and D "
                   "(tokens) or `Training FLOP` (default: Epoch AI's Chinchilla runs)")
    f.add_argument("--exclude-highest", type=int_at_least(0), default=None, metavar="K",
                   help="drop the K runs of highest loss (default 5 for the Chinchilla "
                   "data, as the replication does; 0 otherwise)")
    f.add_argument("--bootstrap", type=int_at_least(0), default=0, metavar="B",
                   help="percentile 95%% intervals from B resamples (0: none)")
    f.add_argument("--compute", type=positive, default=CHINCHILLA_COMPUTE,
                   help="report the compute-optimal N, D at this many FLOPs (default 5.76e23)")
    f.add_argument("--json", metavar="FILE", help="write the fit as JSON "
                   "(default: scaling_fit.json in the current directory)")

    s = sub.add_parser("sweep", help="train a grid of small models and fit the law to them")
    s.add_argument("--out", required=True, help="sweep folder (finished runs are skipped)")
    s.add_argument("--quick", action="store_true", help="4 sizes x 3 budgets, ~20 minutes "
                   "on a 2-core CPU (default: 7 sizes x 5 budgets, for a GPU)")
    s.add_argument("--budgets", type=_float_list, metavar="C1,C2,...",
                   help="compute budgets in FLOPs (replaces the grid's)")
    s.add_argument("--sizes", type=_name_list, metavar="NAME,...",
                   help="keep only these model shapes (d32, d48, d64, d96, d128, d192, d256)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training config value shared by every run (e.g. batch_size=32)")

    pl = sub.add_parser("plan", help="compute-optimal size and tokens for a budget")
    pl.add_argument("--compute", type=positive, help="training FLOPs")
    pl.add_argument("--gpus", type=int_at_least(1), help="with --hours and --tokens-per-s")
    pl.add_argument("--hours", type=positive)
    pl.add_argument("--tokens-per-s", type=positive, help="training tokens/s of one GPU")
    pl.add_argument("--at-params", type=positive, help="the model size (parameters) at "
                    "which --tokens-per-s was measured: FLOP/s = 6 x params x tokens/s")
    pl.add_argument("--law", metavar="FILE.json", help="a fit written by `scaling fit` or "
                    "`scaling sweep` (default: Epoch AI's published Chinchilla replication)")
    pl.add_argument("--tokens-per-param", type=_float_list, default=[150.0], metavar="R,...",
                    help="over-training ratios to price (default 150)")
    pl.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    return p


def _float_list(text: str) -> list[float]:
    import argparse

    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}"
                                         ) from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run(args) -> int:
    return {"fit": _fit, "sweep": _sweep, "plan": _plan}[args.action](args)


def _law_table(fit, ci: dict | None = None) -> str:
    rows = []
    for k in ("E", "A", "B", "alpha", "beta"):
        v = getattr(fit, k)
        line = f"  {k:<6} {v:>12.4g}"
        if ci:
            line += f"   95% CI [{ci[k][0]:.4g}, {ci[k][1]:.4g}]"
        rows.append(line)
    return "\n".join(rows)


def _fit(args) -> int:
    from llmcore.scaling.chinchilla import EPOCH_CSV, fit_chinchilla, read_runs

    path = Path(args.csv) if args.csv else EPOCH_CSV
    if not path.is_file():
        raise CLIError(f"{path}: no such CSV" + ("" if args.csv else
                       " (the bundled data lives in a source checkout: pass a CSV)"))
    exclude = args.exclude_highest
    if exclude is None:
        exclude = 5 if path.name == EPOCH_CSV.name else 0
    N, D, L = read_runs(path, exclude_highest=exclude)
    fit = fit_chinchilla(N, D, L)
    ci = fit.bootstrap(N, D, L, n_boot=args.bootstrap) if args.bootstrap else None
    n_opt, d_opt = fit.compute_optimal(args.compute)
    print(f"{path.name}: {len(N)} runs ({exclude} of highest loss excluded)")
    print("L(N, D) = E + A / N^alpha + B / D^beta  (Huber delta "
          f"{fit.delta:g} on log L, objective {fit.objective:.6g})")
    print(_law_table(fit, ci))
    print(f"at C = {args.compute:.3g} FLOPs: N_opt = {n_opt:.3g}, D_opt = {d_opt:.3g}, "
          f"{d_opt / n_opt:.1f} tokens/parameter, predicted loss {fit.predict(n_opt, d_opt):.4f}")
    out = {"csv": str(path), "runs": len(N), "excluded_highest": exclude, "fit": fit.to_dict(),
           "compute": args.compute, "N_opt": n_opt, "D_opt": d_opt,
           "tokens_per_param": d_opt / n_opt, "bootstrap": ci, "n_boot": args.bootstrap}
    dest = Path(args.json or "scaling_fit.json")
    dest.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {dest}")
    return 0


def _sweep(args) -> int:
    from llmcore.scaling.sweep import SweepSpec, run_sweep
    from llmcore.training.config import parse_set

    base = dict(parse_set(item) for item in args.set)
    spec = SweepSpec.quick(**base) if args.quick else SweepSpec.full(**base)
    if args.budgets:
        spec.budgets = tuple(args.budgets)
    if args.sizes:
        unknown = [n for n in args.sizes if n not in spec.sizes]
        if unknown:
            raise CLIError(f"--sizes: unknown {', '.join(unknown)} (known: "
                           f"{', '.join(spec.sizes)})")
        spec.sizes = {n: spec.sizes[n] for n in args.sizes}
    result = run_sweep(spec, args.out)
    print(f"{'run':<14} {'N':>10} {'D':>12} {'C':>10} {'val loss':>9}")
    for r in result["runs"]:
        print(f"{r['name']:<14} {r['N']:>10,} {r['D']:>12,} {r['C']:>10.3g} {r['loss']:>9.4f}")
    if result["fit"]:
        from llmcore.scaling import ChinchillaFit

        fit = ChinchillaFit(**result["fit"])
        print(_law_table(fit))
        for f in result["frontier"]:
            print(f"  C = {f['C']:.3g}: N_opt = {f['N_opt']:.3g}, D_opt = {f['D_opt']:.3g} "
                  f"({f['D_opt'] / f['N_opt']:.1f} tokens/parameter)")
    print(f"wrote {Path(args.out) / 'sweep.json'}" +
          (f" and {result['plot']}" if result.get("plot") else " (no plot: matplotlib is "
                                                                  "not installed)"))
    return 0


def _plan(args) -> int:
    from llmcore.scaling import EPOCH_2024, ChinchillaFit, plan

    throughput = (args.gpus, args.hours, args.tokens_per_s, args.at_params)
    if args.compute is not None:
        if any(v is not None for v in throughput):
            raise CLIError("give --compute or --gpus/--hours/--tokens-per-s/--at-params, "
                           "not both")
        compute = args.compute
    elif all(v is not None for v in throughput):
        compute = 6.0 * args.at_params * args.tokens_per_s * args.gpus * args.hours * 3600.0
    else:
        raise CLIError("give --compute FLOPs, or all of --gpus, --hours, --tokens-per-s and "
                       "--at-params")
    law = EPOCH_2024
    if args.law:
        data = json.loads(Path(args.law).read_text(encoding="utf-8"))
        params = data.get("fit") or data
        try:
            law = ChinchillaFit(**{k: float(params[k]) for k in ("E", "A", "B", "alpha",
                                                                 "beta")})
        except (KeyError, TypeError):
            raise CLIError(f"{args.law}: no fit in it (keys E, A, B, alpha, beta)") from None
    p = plan(law, compute, args.tokens_per_param)
    print(f"compute {compute:.3g} FLOPs (C = 6 N D), law E={law.E:.4g} A={law.A:.4g} "
          f"B={law.B:.4g} alpha={law.alpha:.4g} beta={law.beta:.4g}")
    print(f"compute-optimal: N = {p['N_opt']:.3g} parameters, D = {p['D_opt']:.3g} tokens "
          f"({p['tokens_per_param']:.1f} tokens/parameter), predicted loss {p['loss']:.4f}")
    for o in p["over_training"]:
        print(f"at {o['tokens_per_param']:g} tokens/parameter: N = {o['N']:.3g} "
              f"({o['params_ratio']:.2f}x the parameters), D = {o['D']:.3g}, loss "
              f"{o['loss']:.4f} (+{o['loss_increase']:.4f}); matching the optimal loss takes "
              f"{o['compute_ratio']:.2f}x the compute ({o['compute_to_match']:.3g} FLOPs)")
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
