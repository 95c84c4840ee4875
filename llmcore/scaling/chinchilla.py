"""Chinchilla scaling law, Approach 3: L(N, D) = E + A / N^alpha + B / D^beta.

The fit follows Hoffmann et al. (2022, appendix D.2) and Epoch AI's replication
(Besiroglu et al., 2024). With a = log A, b = log B, e = log E the prediction of log L is

    log L_hat(N, D) = LSE(a - alpha log N, b - beta log D, e)      (LSE = log-sum-exp)

and the parameters minimise sum_i Huber_delta(log L_hat(N_i, D_i) - log L_i), delta = 1e-3,
by L-BFGS from every point of a grid of starts (Epoch's grid: alpha, beta in {0, 0.5, ..., 2},
e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}: 4500 starts); the best end point wins.
The log-sum-exp form keeps A, B, E positive without constraints and is exact in float64.

The starts are independent problems, so they run together: one batched L-BFGS in which
every start keeps its own history, step and stopping test (a start never sees another's
numbers). The same machinery refits bootstrap resamples as row weights, all at once.

Compute-optimal allocation under C = 6 N D (closed form, Chinchilla eq. 4):
G = (alpha A / (beta B))^(1 / (alpha + beta)), N_opt = G (C/6)^(beta / (alpha + beta)),
D_opt = (C/6)^(alpha / (alpha + beta)) / G.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HUBER_DELTA = 1e-3
# Epoch AI's grid of starting points (a = log A, b = log B, e = log E, alpha, beta).
# Epoch AI's digitisation of the Chinchilla runs (2024), kept with the tests' data: the
# default input of `llmcore scaling fit` and of the demo (a source checkout has it).
EPOCH_CSV = Path(__file__).resolve().parents[2] / "tests" / "data" / "chinchilla_epoch_2024.csv"

GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}
PARAMS = ("a", "b", "e", "alpha", "beta")


def _as_1d(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: the fit needs at least 5 runs")
    if not torch.isfinite(t).all():
        bad = torch.nonzero(~torch.isfinite(t)).reshape(-1)[:5].tolist()
        raise ValueError(f"{name} holds non-finite values (at index {bad})")
    if (t <= 0).any():
        bad = torch.nonzero(t <= 0).reshape(-1)[:5].tolist()
        raise ValueError(f"{name} must be positive; values <= 0 at index {bad} "
                         f"(first: {t[bad[0]].item():g})")
    return t


def check_runs(N, D, L) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D, L) as float64 vectors after the checks every fit needs: same length, at
    least 5 runs (one per parameter), all finite and positive."""
    n, d, l = _as_1d("N (parameters)", N), _as_1d("D (tokens)", D), _as_1d("L (loss)", L)
    if not n.numel() == d.numel() == l.numel():
        raise ValueError(f"N, D and L must have the same length, got {n.numel()}, "
                         f"{d.numel()} and {l.numel()}")
    if n.numel() < len(PARAMS):
        raise ValueError(f"the fit needs at least {len(PARAMS)} runs, got {n.numel()}")
    return n, d, l


def log_predict(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """log L_hat for parameters ``theta`` [..., 5] = (a, b, e, alpha, beta) at runs
    (log_n, log_d) [n] -> [..., n]."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    terms = torch.stack(torch.broadcast_tensors(a - alpha * log_n, b - beta * log_d, e))
    return torch.logsumexp(terms, dim=0)


def huber_objective(theta, log_n, log_d, log_l, weights=None, delta: float = HUBER_DELTA,
                    grad: bool = False):
    """sum_i w_i Huber_delta(log L_hat_i - log L_i) per parameter vector: theta [..., 5]
    -> [...] (and its gradient [..., 5] with ``grad=True``, in closed form).
    Huber_delta(r) = r^2 / 2 if |r| <= delta else delta (|r| - delta / 2)."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    u = torch.stack(torch.broadcast_tensors(a - alpha * log_n, b - beta * log_d, e))
    lse = torch.logsumexp(u, dim=0)  # log L_hat: [..., n]
    r = lse - log_l
    h = torch.where(r.abs() <= delta, 0.5 * r * r, delta * (r.abs() - 0.5 * delta))
    if weights is not None:
        h = h * weights
    value = h.sum(-1)
    if not grad:
        return value
    dr = r.clamp(-delta, delta)  # Huber'(r)
    if weights is not None:
        dr = dr * weights
    p = torch.exp(u - lse)  # d lse / d u_k: the softmax over the three terms
    g1, g2 = dr * p[0], dr * p[1]
    g = torch.stack([g1.sum(-1), g2.sum(-1), (dr * p[2]).sum(-1),
                     -(g1 * log_n).sum(-1), -(g2 * log_d).sum(-1)], dim=-1)
    return value, g


def batched_lbfgs(fg, x0: torch.Tensor, max_iter: int = 500, history: int = 10,
                  ftol: float = 1e-10, gtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise S independent problems at once: ``fg(x [..., k, P], rows [k]) -> (f
    [..., k], grad [..., k, P])`` for the problems ``rows`` (row s depends on x[s] only).
    L-BFGS with a two-loop recursion per row and an Armijo line search: step 1, and for
    the rows it does not decrease enough the largest of 0.3, 0.09, ..., 0.3^12 that does
    (evaluated together). A row stops when its
    gradient's max-norm is under ``gtol``, its relative decrease under ``ftol``, or no
    step decreases it. Returns (x [S, P], f(x) [S])."""
    x = x0.detach().clone()
    S, P = x.shape
    fx, g = fg(x, torch.arange(S))
    s_hist = x.new_zeros(history, S, P)
    y_hist = x.new_zeros(history, S, P)
    rho = x.new_zeros(history, S)
    gamma = 1.0 / g.norm(dim=-1).clamp_min(1.0)  # first step: a gradient step of length <= 1
    active = torch.isfinite(fx)
    for it in range(max_iter):
        idx = torch.nonzero(active).reshape(-1)
        if idx.numel() == 0:
            break
        gi = g[idx]
        order = [(it - 1 - k) % history for k in range(min(it, history))]  # newest first
        q, alphas = gi.clone(), []
        for j in order:
            a_j = rho[j, idx] * (s_hist[j, idx] * q).sum(-1)
            q -= a_j[:, None] * y_hist[j, idx]
            alphas.append(a_j)
        r = gamma[idx, None] * q
        for j, a_j in zip(reversed(order), reversed(alphas), strict=True):
            b_j = rho[j, idx] * (y_hist[j, idx] * r).sum(-1)
            r += s_hist[j, idx] * (a_j - b_j)[:, None]
        d = -r
        uphill = ~((gi * d).sum(-1) < 0)
        d[uphill] = -gamma[idx][uphill, None] * gi[uphill]
        gd = (gi * d).sum(-1)

        xi, fi = x[idx], fx[idx]
        f_new, g_new = fg(xi + d, idx)  # the full step, accepted by most rows
        accepted = torch.isfinite(f_new) & (f_new <= fi + 1e-4 * gd)
        t = torch.ones_like(fi)
        back = torch.nonzero(~accepted).reshape(-1)
        if back.numel():  # the others try 0.3^k, k = 1..12, in one call
            ts = 0.3 ** torch.arange(1, 13, dtype=x.dtype)[:, None]  # [K, 1]
            fb, gb = fg(xi[back] + ts[..., None] * d[back], idx[back])  # [K, m], [K, m, P]
            ok = torch.isfinite(fb) & (fb <= fi[back] + 1e-4 * ts * gd[back])
            first = ok.to(torch.int8).argmax(0)
            found = ok.any(0)
            hit, k = back[found], first[found]
            cols = torch.nonzero(found).reshape(-1)
            accepted[hit] = True
            t[hit] = ts[k, 0]
            f_new[hit], g_new[hit] = fb[k, cols], gb[k, cols]
        t = torch.where(accepted, t, torch.zeros_like(t))
        x_new = xi + t[:, None] * d
        s_new, y_new = x_new - xi, g_new - gi
        sy = (s_new * y_new).sum(-1)
        good = sy > 1e-300
        slot = it % history
        s_hist[slot, idx] = torch.where(good[:, None], s_new, 0.0)
        y_hist[slot, idx] = torch.where(good[:, None], y_new, 0.0)
        rho[slot, idx] = torch.where(good, 1.0 / sy.clamp_min(1e-300), 0.0)
        yy = (y_new * y_new).sum(-1)
        gamma[idx] = torch.where(good, sy / yy.clamp_min(1e-300), gamma[idx])
        scale = torch.maximum(fi.abs(), f_new.abs()).clamp_min(1e-300)
        done = ~accepted | (g_new.abs().amax(-1) < gtol) | (fi - f_new <= ftol * scale)
        x[idx], fx[idx], g[idx] = x_new, f_new, g_new
        active[idx[done]] = False
    return x, fx


def _grid_starts(grid: dict | None) -> torch.Tensor:
    grid = GRID if grid is None else {**GRID, **grid}
    return torch.tensor(list(itertools.product(*(grid[k] for k in PARAMS))),
                        dtype=torch.float64)


@dataclass(frozen=True)
class ChinchillaFit:
    """A fitted L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D tokens)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")  # the Huber objective at the optimum
    num_runs: int = 0
    delta: float = HUBER_DELTA

    @property
    def theta(self) -> torch.Tensor:
        return torch.tensor([math.log(self.A), math.log(self.B), math.log(self.E),
                             self.alpha, self.beta], dtype=torch.float64)

    def predict(self, N, D):
        """The predicted loss at N parameters and D tokens (floats or arrays; a float
        back for floats, a float64 tensor otherwise)."""
        n = torch.as_tensor(N, dtype=torch.float64)
        d = torch.as_tensor(D, dtype=torch.float64)
        out = self.E + self.A / n ** self.alpha + self.B / d ** self.beta
        return out.item() if out.dim() == 0 else out

    def compute_optimal(self, C: float) -> tuple[float, float]:
        """(N_opt, D_opt) that minimise the predicted loss at compute C = 6 N D FLOPs."""
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"compute C must be a positive FLOP count, got {C!r}")
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        n = G * (C / 6.0) ** (self.beta / s)
        return n, C / (6.0 * n)

    def tokens_per_param(self, C: float) -> float:
        """D_opt / N_opt at compute C."""
        n, d = self.compute_optimal(C)
        return d / n

    def at_ratio(self, C: float, tokens_per_param: float) -> tuple[float, float, float]:
        """(N, D, predicted loss) at compute C when D = tokens_per_param * N (C = 6 N D):
        e.g. over-training a smaller model for cheaper inference."""
        if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
            raise ValueError(f"tokens per parameter must be positive, got {tokens_per_param!r}")
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"compute C must be a positive FLOP count, got {C!r}")
        n = math.sqrt(C / (6.0 * tokens_per_param))
        return n, tokens_per_param * n, self.predict(n, tokens_per_param * n)

    def to_dict(self) -> dict:
        return asdict(self)

    def bootstrap(self, N, D, L, n_boot: int = 200, seed: int = 0,
                  level: float = 0.95) -> dict:
        """Percentile confidence intervals by refitting ``n_boot`` resamples of the runs
        (drawn with replacement) from this fit's optimum: {"E": (lo, hi), ...,
        "tokens_per_param_at": ...}. All resamples are fitted in one batched L-BFGS (each
        as multinomial row counts)."""
        if n_boot < 2:
            raise ValueError(f"n_boot must be >= 2, got {n_boot}")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        n, d, l = check_runs(N, D, L)
        g = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, n.numel(), (n_boot, n.numel()), generator=g)
        weights = torch.zeros(n_boot, n.numel(), dtype=torch.float64)
        weights.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))
        x, _ = _fit_theta(n, d, l, self.theta[None].repeat(n_boot, 1), weights, self.delta)
        ps = {"A": x[:, 0].exp(), "B": x[:, 1].exp(), "E": x[:, 2].exp(),
              "alpha": x[:, 3], "beta": x[:, 4]}
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        return {k: tuple(torch.quantile(v, q).tolist()) for k, v in ps.items()}


def _fit_theta(n, d, l, starts, weights, delta):
    log_n, log_d, log_l = n.log(), d.log(), l.log()

    def fg(theta, rows):
        w = None if weights is None else weights[rows]
        return huber_objective(theta, log_n, log_d, log_l, w, delta, grad=True)

    return batched_lbfgs(fg, starts)


def fit_chinchilla(N, D, L, grid: dict | None = None, delta: float = HUBER_DELTA,
                   starts=None) -> ChinchillaFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta to runs of N parameters trained on D
    tokens reaching loss L (Chinchilla Approach 3; see the module docstring).

    ``grid`` overrides axes of the default grid of starts ({"alpha": (0.5,), ...}) and
    ``starts`` [S, 5] = (log A, log B, log E, alpha, beta) replaces it. Raises ValueError
    for empty, mismatched, non-finite or non-positive inputs."""
    n, d, l = check_runs(N, D, L)
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be positive, got {delta!r}")
    x0 = _grid_starts(grid) if starts is None else torch.as_tensor(
        starts, dtype=torch.float64).reshape(-1, len(PARAMS))
    x, fx = _fit_theta(n, d, l, x0, None, delta)
    fx = torch.where(torch.isfinite(fx), fx, torch.full_like(fx, math.inf))
    best = int(torch.argmin(fx))
    if not math.isfinite(fx[best].item()):
        raise ValueError("the fit diverged from every start")
    a, b, e, alpha, beta = x[best].tolist()
    return ChinchillaFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                         objective=fx[best].item(), num_runs=n.numel(), delta=delta)


# Epoch AI's published replication on the digitised runs minus the 5 of highest loss
# (Besiroglu et al., 2024): the default law of ``llmcore scaling plan``.
EPOCH_2024 = ChinchillaFit(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def plan(fit: ChinchillaFit, C: float, tokens_per_param=(150.0,)) -> dict:
    """The compute-optimal run at C FLOPs and, for each over-training ratio r (tokens per
    parameter), the run of the same compute at that ratio: its size, tokens and predicted
    loss, the loss it gives up, and the compute it would need to reach the optimal loss
    at that ratio (``compute_to_match``, found by bisection on log C)."""
    n_opt, d_opt = fit.compute_optimal(C)
    best = fit.predict(n_opt, d_opt)
    out = {"compute": C, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt,
           "loss": best, "law": fit.to_dict(), "over_training": []}
    for r in tokens_per_param:
        n, d, loss = fit.at_ratio(C, r)
        lo, hi = math.log(C) - 60.0, math.log(C) + 60.0  # loss(C') falls monotonically
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if fit.at_ratio(math.exp(mid), r)[2] > best:
                lo = mid
            else:
                hi = mid
        match = math.exp(hi)
        out["over_training"].append({
            "tokens_per_param": r, "N": n, "D": d, "loss": loss, "loss_increase": loss - best,
            "params_ratio": n / n_opt, "compute_to_match": match, "compute_ratio": match / C})
    return out


# Column names read by :func:`read_runs`: Epoch AI's digitised Chinchilla table, or plain
# N / D / loss columns (a sweep's own table).
_N_COLUMNS = ("Model Size", "N", "params", "parameters")
_D_COLUMNS = ("D", "tokens", "Training Tokens")
_C_COLUMNS = ("Training FLOP", "C", "flops", "FLOPs")
_L_COLUMNS = ("loss", "L", "val_loss")


def read_runs(path, exclude_highest: int = 0) -> tuple[list, list, list]:
    """(N, D, L) lists from a CSV with a parameter column (``Model Size``/``N``/
    ``params``), a loss column (``loss``/``L``/``val_loss``) and either a token column
    (``D``/``tokens``) or a FLOP column (``Training FLOP``/``C``; D = C / (6 N)). The
    ``exclude_highest`` runs of highest loss are dropped (the Chinchilla replication drops
    5: the digitised points of diverged or barely trained runs)."""
    import csv
    from pathlib import Path

    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no runs (an empty CSV)")
    cols = rows[0].keys()

    def pick(names, what):
        for c in names:
            if c in cols:
                return c
        if what is None:
            return None
        raise ValueError(f"{path}: no {what} column (one of {', '.join(names)}); "
                         f"columns: {', '.join(cols)}")

    def num(row, col, i):
        try:
            return float(row[col])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: row {i + 2}, column {col!r}: not a number: "
                             f"{row[col]!r}") from None

    nc, lc = pick(_N_COLUMNS, "parameter count"), pick(_L_COLUMNS, "loss")
    dc = pick(_D_COLUMNS, None)
    cc = None if dc else pick(_C_COLUMNS, "token (or training FLOP)")
    N = [num(r, nc, i) for i, r in enumerate(rows)]
    L = [num(r, lc, i) for i, r in enumerate(rows)]
    D = ([num(r, dc, i) for i, r in enumerate(rows)] if dc else
         [num(r, cc, i) / (6.0 * n) if n > 0 else float("nan") for i, (r, n) in
          enumerate(zip(rows, N, strict=True))])
    if exclude_highest < 0 or exclude_highest >= len(rows):
        raise ValueError(f"exclude_highest must be in [0, {len(rows) - 1}], got "
                         f"{exclude_highest}")
    if exclude_highest:
        keep = sorted(range(len(L)), key=lambda i: L[i])[:len(L) - exclude_highest]
        keep.sort()
        N, D, L = [N[i] for i in keep], [D[i] for i in keep], [L[i] for i in keep]
    return N, D, L
