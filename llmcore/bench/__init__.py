"""`llmcore bench`: the benchmark suites, their results files and plots.

Each suite module exposes ``run(device, quick, progress_factory) -> dict`` with keys
``rows`` (list of :class:`~llmcore.bench.common.Row`), ``baselines`` (method names the
ratios refer to), ``extra`` (stored in the JSON) and ``text`` (printed after the table);
optionally ``skipped`` (why nothing was measured: no files are written) and ``device``
(where it ran, when that is not the device asked for). A suite with options of its own
takes them as keyword arguments (``run_suites(..., options={suite: {...}})``).
"""

from __future__ import annotations

import importlib

import torch

from llmcore.bench.common import format_table, plot_ratios, write_results

# suite name -> module; a new suite registers here and gets a view in benchmarks/.
SUITES = {
    "bfp": "llmcore.bench.bfp",
    "attention": "llmcore.bench.attention",
    "decode": "llmcore.bench.decode",
    "generate": "llmcore.bench.generate",
    "assisted": "llmcore.bench.assisted",
    "train": "llmcore.bench.train",
    "vs-llamacpp": "llmcore.bench.llamacpp",
}
# Run only when named: they need a program from outside or take long.
OPT_IN = {"vs-llamacpp"}


def suite_names(names) -> list[str]:
    """The suites to run: ``names``, or all but the opt-in ones when empty; ValueError for
    an unknown one."""
    names = list(names) or [n for n in SUITES if n not in OPT_IN]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; available: {sorted(SUITES)}")
    return names


def run_suites(names, device: torch.device, quick: bool = False, out_dir: str | None = None,
               plot: bool = True, progress: bool = True, echo=print,
               options: dict | None = None) -> dict[str, dict]:
    """Run the named suites (all when empty); print a table each and, with ``out_dir``,
    write ``<out_dir>/<device>/<suite>.json`` (and ``.png`` with ``plot``). ``options``:
    {suite: {keyword: value}} passed to that suite's ``run``."""
    names = suite_names(names)
    factory = None
    if progress:
        from tqdm import tqdm

        factory = lambda **kw: tqdm(leave=False, dynamic_ncols=True, **kw)  # noqa: E731
    results = {}
    for name in names:
        mod = importlib.import_module(SUITES[name])
        res = mod.run(device, quick=quick, progress_factory=factory,
                      **(options or {}).get(name, {}))
        results[name] = res
        if res.get("skipped"):
            echo(f"\n== {name}: skipped ==\n{res['skipped']}")
            continue
        rows, base = res["rows"], res["baselines"]
        where = res.get("device", device)
        echo(f"\n== {name} on {where} ==")
        echo(format_table(rows, base))
        if res.get("text"):
            echo("\n" + res["text"])
        if out_dir:
            path = write_results(name, rows, where, out_dir,
                                 extra={"baselines": base, **res.get("extra", {}), "quick": quick})
            echo(f"\nresults: {path}")
            if plot:
                png = path[:-5] + ".png"
                if hasattr(mod, "plot"):  # a suite's own figure
                    png = mod.plot(res, png)
                else:
                    png = plot_ratios([r for r in rows if base[0] in r.ratios
                                       or r.method == base[0]], base[0], png,
                                      f"llmcore {name} on {where}: speed-up over {base[0]}")
                if png:
                    echo(f"plot:    {png}")
    return results
