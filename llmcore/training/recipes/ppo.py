"""PPO-RLHF: the policy samples answers to prompts, a judge scores them, and the policy
is updated with the clipped PPO objective against a KL-penalised reward.

One cycle, as TRL's last PPO trainer (1.0 ``trl/experimental/ppo``) runs it:

1. **Rollout** (no gradients): ``rollout_batch`` prompts (a seeded permutation of the
   prompt set, epoch after epoch) are answered with :func:`llmcore.generation.generate`
   (KV cache, sampling at ``temperature``, stopping at EOS, ``max_new_tokens``). One
   packed forward gives the policy's log-probs of the answer tokens (logits divided by
   the temperature, as TRL) and the value head's values; the frozen reference (a copy of
   the starting model) gives its log-probs. The score of each answer is
   ``rm_weight`` × the reward model's score (``reward_model``) + ``parse_weight`` × (the
   code parses) + ``doctest_weight`` × (share of the prompt's doctests that pass)
   (:mod:`llmcore.evaluation.verify`), minus ``missing_eos_penalty`` when the answer
   never ended. Per-token rewards are −kl_coef·KL (``kl_estimator`` k1 or k3) with the
   score added on the last answer token (:func:`ppo_rewards`); advantages and returns by
   :func:`gae` (γ, λ), advantages whitened over the answer tokens (0 at padding).
2. **Updates**: ``ppo_epochs`` passes over the rollout in minibatches of ``batch_size``
   answers, each one step of the one training loop: :func:`ppo_policy_loss` (clipped
   ratio, ``cliprange``) + ``vf_coef`` × :func:`ppo_value_loss` (clipped values,
   ``cliprange_value``).
3. With ``kl_target`` set, the KL coefficient adapts after each rollout (Ziegler et al.:
   multiplied by 1 + clip(KL/target − 1, ±0.2)·rollout_batch/``kl_horizon``).

The value head is a linear layer on the policy's final hidden states (TRL 0.x's
``AutoModelForCausalLMWithValueHead``; TRL 1.0 trains a separate critic). The run's
``final/`` is the policy as a plain model directory (the value head beside it in
``value_head.safetensors``). Logged with TRL's names: objective/kl, objective/entropy,
objective/non_score_reward, objective/rlhf_reward, objective/scores, policy/approxkl,
policy/clipfrac, loss/policy, loss/value, val/clipfrac, val/ratio; plus rollout/parse_rate,
rollout/rm_score, rollout/length, rollout/eos_rate and the KL coefficient. Held out: the
same figures for answers sampled (fixed seed) to held-out prompts.

Runs in one process (rollouts are generated where they are used; ``grad_accum`` 1).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from llmcore.training.config import TrainConfig
from llmcore.training.losses import (
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    whiten,
)


@dataclass
class PPOSettings:
    """The ``ppo`` table of the config (``--set ppo.kl_coef=0.1``); TRL 1.0's defaults."""

    reward_model: str | None = None  # a RewardModel directory (None: verifiable rewards only)
    rollout_batch: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 53
    temperature: float = 0.7
    top_k: int | None = None
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float | None = None  # adaptive KL coefficient when set
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    rm_weight: float = 1.0
    parse_weight: float = 0.0
    doctest_weight: float = 0.0
    missing_eos_penalty: float | None = None
    eval_prompts: int = 32

    @classmethod
    def from_table(cls, table: dict) -> PPOSettings:
        known = {f.name: f for f in fields(cls)}
        bad = sorted(set(table) - set(known))
        if bad:
            raise ValueError(f"unknown ppo setting(s) {bad}; known: {sorted(known)}")
        s = cls(**table)
        s.validate()
        return s

    def validate(self) -> None:
        def need(ok, key, what):
            if not ok:
                raise ValueError(f"config key 'ppo.{key}' {what}, got {getattr(self, key)!r}")

        for k in ("rollout_batch", "ppo_epochs", "max_new_tokens", "kl_horizon",
                  "eval_prompts"):
            v = getattr(self, k)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, k,
                 "must be an int >= 1")
        for k in ("temperature", "kl_coef", "cliprange", "cliprange_value", "vf_coef",
                  "rm_weight", "parse_weight", "doctest_weight"):
            v = getattr(self, k)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 and v >= 0, k, "must be a finite number >= 0")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma",
             "and ppo.lam must be in [0, 1]")
        need(self.kl_estimator in ("k1", "k3"), "kl_estimator", "must be 'k1' or 'k3'")
        need(self.kl_target is None or (isinstance(self.kl_target, (int, float))
                                        and self.kl_target > 0), "kl_target",
             "must be a number > 0 (or absent: a fixed coefficient)")
        need(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1), "top_k",
             "must be an int >= 1")

    def check_reward(self, custom: bool) -> None:
        if not (self.reward_model is not None or self.parse_weight or self.doctest_weight
                or custom):
            raise ValueError("config key 'ppo.reward_model' is needed unless ppo.parse_weight "
                             "or ppo.doctest_weight (or a reward_fn) gives a reward")


NAMED_CONFIGS: dict[str, dict] = {
    # From the stdlib SFT model and reward model: 40 rollouts of 16 answers, ~3 minutes on
    # 2 cores. Set ppo.reward_model (and init_from) to your runs' final/ folders. At
    # kl_coef 0.05 the policy drifts (KL 17) and its parse rate falls back; 0.2 holds it.
    "stdlib": {"steps": 640, "batch_size": 4, "seq_len": 512, "lr": 3e-5, "min_lr": 3e-5,
               "warmup": 0, "weight_decay": 0.0, "schedule": "constant", "eval_every": 160,
               "eval_before": True, "skip_bad_rows": True,
               "ppo": {"rollout_batch": 16, "ppo_epochs": 4, "max_new_tokens": 48,
                       "parse_weight": 1.0, "rm_weight": 1.0, "kl_coef": 0.2}},
    "tiny": {"steps": 16, "batch_size": 4, "seq_len": 128, "lr": 1e-4, "min_lr": 1e-4,
             "warmup": 0, "schedule": "constant", "eval_every": 8, "eval_before": True,
             "ppo": {"rollout_batch": 8, "ppo_epochs": 2, "max_new_tokens": 12}},
}


class ActorCritic(nn.Module):
    """The policy (a :class:`~llmcore.models.Transformer`) with a value head on its final
    hidden states: ``forward(ids, cu_seqlens)`` -> (logits, values)."""

    VALUE_FILE = "value_head.safetensors"

    def __init__(self, policy: nn.Module, init_std: float | None = None):
        super().__init__()
        self.policy = policy
        d = policy.config.dim
        self.value_head = nn.Linear(d, 1, device=policy.device, dtype=policy.dtype)
        with torch.no_grad():
            self.value_head.weight.normal_(0.0, init_std or 1.0 / math.sqrt(d + 1))
            self.value_head.bias.zero_()

    @property
    def config(self):
        return self.policy.config

    @property
    def layers(self):  # FSDP wraps the blocks
        return self.policy.layers

    def forward(self, input_ids, cu_seqlens=None):
        h = self.policy.hidden_states(input_ids, cu_seqlens=cu_seqlens)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()

    def export_pretrained(self, path: Path, state: dict) -> None:
        from safetensors.torch import save_file

        from llmcore.training.checkpoint import export_model

        pol = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
        export_model(self.policy, path, state=pol)
        save_file({k[len("value_head."):]: v.contiguous() for k, v in state.items()
                   if k.startswith("value_head.")}, str(path / self.VALUE_FILE))

    def load_pretrained_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        from llmcore.training.checkpoint import load_model_weights

        load_model_weights(self.policy, path)
        f = path / self.VALUE_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {path} holds no value head")
        self.value_head.load_state_dict(load_file(str(f)))


def _seed_of(*parts) -> int:
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _pad(rows: list[torch.Tensor], width: int, value=0.0) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype if rows else torch.float32)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
    return out


class Scorer:
    """The score of each (prompt, answer): reward model and verifiable checks, weighted."""

    def __init__(self, s: PPOSettings, device, reward_fn=None):
        from llmcore.evaluation.judges import CodeJudge, RewardModelJudge

        self.s, self.reward_fn = s, reward_fn
        self.rm = (RewardModelJudge.from_pretrained(s.reward_model, device=device)
                   if s.reward_model and s.rm_weight else None)
        self.run_doctests = bool(s.doctest_weight)
        self.code = CodeJudge(1.0, 1.0, run_doctests=self.run_doctests)

    def __call__(self, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        from llmcore.evaluation.verify import check_code

        n = len(answers)
        rm = torch.tensor(self.rm.score_many(prompts, answers)) if self.rm else torch.zeros(n)
        checks = [check_code(p, a, self.run_doctests) for p, a in zip(prompts, answers,
                                                                       strict=True)]
        parse = torch.tensor([float(c.parses) for c in checks])
        doct = torch.tensor([c.doctest_rate or 0.0 for c in checks])
        total = self.s.rm_weight * rm + self.s.parse_weight * parse + self.s.doctest_weight * doct
        custom = torch.zeros(n)
        if self.reward_fn is not None:
            custom = torch.tensor([float(x) for x in self.reward_fn(prompts, answers)])
            if custom.shape != (n,) or not torch.isfinite(custom).all():
                raise ValueError(f"reward_fn must return {n} finite numbers, got "
                                 f"{custom.tolist()[:8]}")
        return {"score": total + custom, "rm": rm, "parse": parse, "doctest": doct,
                "custom": custom}


class Rollouts:
    """The batch source of PPO: generates a rollout when a cycle starts and serves its
    minibatches (``steps_per_rollout`` = ppo_epochs × minibatches per rollout)."""

    def __init__(self, model: ActorCritic, ref: nn.Module, prompts: list[tuple[list[int], str]],
                 tok, cfg: TrainConfig, s: PPOSettings, scorer: Scorer):
        self.model, self.ref, self.prompts, self.tok = model, ref, prompts, tok
        self.cfg, self.s, self.scorer = cfg, s, scorer
        self.minibatches = math.ceil(s.rollout_batch / cfg.batch_size)
        self.steps_per_rollout = s.ppo_epochs * self.minibatches
        self.kl_coef = float(s.kl_coef)
        self.cycle = -1
        self.data: dict | None = None
        self.stats: dict[str, float] = {}

    def prompt_indices(self, cycle: int) -> list[int]:
        n, r = len(self.prompts), self.s.rollout_batch
        out = []
        for pos in range(cycle * r, (cycle + 1) * r):
            epoch, i = divmod(pos, n)
            g = torch.Generator().manual_seed(_seed_of(self.cfg.seed, "prompts", epoch))
            out.append(int(torch.randperm(n, generator=g)[i]))
        return out

    @torch.no_grad()
    def sample(self, model: ActorCritic, prompts: list[tuple[list[int], str]], seed: int
               ) -> dict:
        """Answers to ``prompts`` with their old log-probs, values, reference log-probs,
        scores and per-token tensors (padded [n, T] with a mask)."""
        from llmcore.generation import generate

        s, tok = self.s, self.tok
        policy = model.policy
        was = model.training
        model.eval()
        device = policy.device
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
        width = max(len(p) for p, _ in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        room = policy.config.max_seq_len - width
        out = generate(policy, ids.to(device), min(s.max_new_tokens, max(room, 1)),
                       temperature=s.temperature, top_k=s.top_k, eos_token_id=eos,
                       pad_token_id=pad, attention_mask=mask.to(device), seed=seed).cpu()
        answers, ended = [], []
        for row in out[:, width:].tolist():
            cut = row.index(eos) + 1 if eos is not None and eos in row else len(row)
            answers.append(row[:cut] or [eos if eos is not None else pad])
            ended.append(eos is not None and eos in row[:cut])
        seqs = [p + a for (p, _), a in zip(prompts, answers, strict=True)]
        lens = [len(a) for a in answers]
        cu = torch.tensor([0, *torch.tensor([len(x) for x in seqs]).cumsum(0).tolist()],
                          dtype=torch.int32)
        flat = torch.tensor([t for x in seqs for t in x])[None]
        # the logits that predict answer token t of sequence i sit one position earlier
        pos = [torch.arange(cu[i] + len(p) - 1, cu[i] + len(p) - 1 + n)
               for i, ((p, _), n) in enumerate(zip(prompts, lens, strict=True))]
        tokens = [torch.tensor(a) for a in answers]
        logits, values = model(flat.to(device), cu_seqlens=cu.to(device))
        ref_logits = self.ref(flat.to(device), cu_seqlens=cu.to(device))
        T = max(lens)
        pos_p = _pad(pos, T, 0).long()
        tok_p = _pad(tokens, T, 0).long()
        m = _pad([torch.ones(n) for n in lens], T, 0.0).bool()
        lp = token_logprobs(logits[0], pos_p.to(device), tok_p.to(device), s.temperature).cpu()
        rlp = token_logprobs(ref_logits[0], pos_p.to(device), tok_p.to(device),
                             s.temperature).cpu()
        vals = values[0][pos_p.to(device)].float().cpu()
        texts = [tok.decode([t for t in a if t != eos]) for a in answers]
        sc = self.scorer([t for _, t in prompts], texts)
        score = sc["score"].clone()
        if s.missing_eos_penalty is not None:
            score -= s.missing_eos_penalty * (~torch.tensor(ended)).float()
        kl = kl_penalty(lp, rlp, s.kl_estimator)
        kl = torch.where(m, kl, torch.zeros_like(kl))
        rewards = ppo_rewards(score, kl, m, self.kl_coef)
        if s.whiten_rewards:
            rewards = whiten(rewards, m, shift_mean=False)
        adv, ret = gae(rewards, vals, m, s.gamma, s.lam)
        adv = whiten(adv, m)
        model.train(was)
        kl_sum = kl.sum(1)
        non_score = (-self.kl_coef * kl).sum(1)
        stats = {"objective/kl": float(kl_sum.mean()),
                 "objective/scores": float(score.mean()),
                 "objective/non_score_reward": float(non_score.mean()),
                 "objective/rlhf_reward": float((score + non_score).mean()),
                 "rollout/rm_score": float(sc["rm"].mean()),
                 "rollout/parse_rate": float(sc["parse"].mean()),
                 "rollout/doctest_rate": float(sc["doctest"].mean()),
                 "rollout/length": float(sum(lens) / len(lens)),
                 "rollout/eos_rate": float(sum(ended) / len(ended)),
                 "objective/kl_coef": self.kl_coef}
        return {"seqs": seqs, "prompt_lens": [len(p) for p, _ in prompts], "lens": lens,
                "tokens": tok_p, "mask": m, "logprobs": lp, "values": vals,
                "advantages": adv, "returns": ret, "stats": stats, "texts": texts}

    def rollout(self, cycle: int) -> None:
        idx = self.prompt_indices(cycle)
        self.data = self.sample(self.model, [self.prompts[i] for i in idx],
                                _seed_of(self.cfg.seed, "rollout", cycle))
        self.stats = self.data["stats"]
        self.cycle = cycle
        s = self.s
        if s.kl_target is not None:  # adaptive KL (Ziegler et al., 2019)
            err = max(-0.2, min(0.2, self.stats["objective/kl"] / s.kl_target - 1))
            self.kl_coef *= 1 + err * s.rollout_batch / s.kl_horizon

    def batch(self, step: int, index: int) -> dict:
        cycle, k = divmod(step, self.steps_per_rollout)
        if cycle != self.cycle:
            self.rollout(cycle)
        epoch, j = divmod(k, self.minibatches)
        g = torch.Generator().manual_seed(_seed_of(self.cfg.seed, "minibatch", cycle, epoch))
        order = torch.randperm(self.s.rollout_batch, generator=g).tolist()
        idx = order[j * self.cfg.batch_size:(j + 1) * self.cfg.batch_size]
        return self.minibatch(idx)

    def minibatch(self, idx: list[int]) -> dict:
        d = self.data
        seqs = [d["seqs"][i] for i in idx]
        cu = [0]
        for x in seqs:
            cu.append(cu[-1] + len(x))
        T = max(d["lens"][i] for i in idx)
        pos = _pad([torch.arange(cu[j] + d["prompt_lens"][i] - 1,
                                 cu[j] + d["prompt_lens"][i] - 1 + d["lens"][i])
                    for j, i in enumerate(idx)], T, 0).long()
        out = {"input_ids": torch.tensor([t for x in seqs for t in x])[None],
               "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "positions": pos,
               "num_tokens": cu[-1]}
        for k in ("tokens", "mask", "logprobs", "values", "advantages", "returns"):
            out[k] = d[k][idx][:, :T]
        out.update({k: torch.tensor(v) for k, v in self.stats.items()})
        return out


def token_logprobs(logits: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """log softmax(logits[positions] / temperature)[tokens] -> [n, T] (fp32)."""
    sel = logits[positions].float() / temperature  # [n, T, V]
    return torch.log_softmax(sel, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def make_step_fn(s: PPOSettings):
    def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss + vf_coef × clipped value loss of one minibatch."""
        logits, values = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
        m = batch["mask"].bool()
        pos = batch["positions"]
        sel = logits[0][pos].float() / s.temperature
        logp_all = torch.log_softmax(sel, -1)
        new_lp = logp_all.gather(-1, batch["tokens"].unsqueeze(-1)).squeeze(-1)
        vpred = values[0][pos]
        pg, clipfrac, approxkl = ppo_policy_loss(new_lp, batch["logprobs"],
                                                 batch["advantages"], m, s.cliprange)
        vf, vf_clipfrac = ppo_value_loss(vpred, batch["values"], batch["returns"], m,
                                         s.cliprange_value)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            ratio = torch.exp(new_lp - batch["logprobs"])
        metrics = {"policy/approxkl": approxkl, "policy/clipfrac": clipfrac,
                   "loss/policy": pg.detach(), "loss/value": vf.detach(),
                   "val/clipfrac": vf_clipfrac, "objective/entropy": masked_mean(entropy, m),
                   "val/ratio": masked_mean(ratio, m)}
        metrics.update({k: v for k, v in batch.items() if "/" in k})
        return pg + s.vf_coef * vf, metrics
    return step_fn


def load_prompts(cfg: TrainConfig, renderer, stats: Counter, room: int, info
                 ) -> tuple[list, list]:
    """(train, val) prompts as (ids, text) from the SFT-format rows of ``data``; prompts
    longer than ``room`` tokens are skipped (counted)."""
    from llmcore.training.recipes import posttrain as P

    def prompts_of(rows):
        out = []
        for r in rows:
            d = r.data
            if "messages" in d:
                msgs = d["messages"]
                last = max(i for i, x in enumerate(msgs) if x["role"] == "assistant")
                text = next((x["content"] for x in reversed(msgs[:last])
                             if x["role"] == "user"), "")
                ids = renderer.tok.apply_chat_template(msgs[:last], add_generation_prompt=True,
                                                       tokenize=True) if renderer.template \
                    else renderer.prompt_ids(text)
            else:
                text, ids = d["prompt"], renderer.prompt_ids(d["prompt"])
            if len(ids) > room or not ids:
                stats["prompt_too_long"] += 1
                continue
            out.append((ids, text))
        return out

    from llmcore.data.examples import read_rows, row_split

    if info is not None and info.enabled:
        raise ValueError("the ppo recipe runs in one process (rollouts are generated where "
                         "they are used); run it without torchrun")
    train_paths, val_paths = P.data_paths(cfg, "sft")
    rows = read_rows(train_paths, "sft", cfg.skip_bad_rows, stats)
    if val_paths is None:
        val_rows = [r for r in rows if row_split(r.data, cfg.val_fraction) == "val"]
        rows = [r for r in rows if row_split(r.data, cfg.val_fraction) != "val"]
    else:
        val_rows = read_rows(val_paths, "sft", cfg.skip_bad_rows, stats)
    train, val = prompts_of(rows), prompts_of(val_rows)
    if not train:
        raise ValueError(f"no usable prompts in {train_paths}")
    return train, val


def run(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
        stop_at: int | None = None, reward_fn=None) -> dict:
    """PPO from ``init_from`` (the SFT model) on the prompts of ``data`` into ``out``.

    ``reward_fn(prompts, answers) -> list of floats`` (Python API) adds a reward of your
    own to the configured ones (weight 1), e.g. a unit test or any verifier."""
    from llmcore.data.examples import Renderer
    from llmcore.tokenizer import load_tokenizer
    from llmcore.training.recipes import posttrain as P

    s = PPOSettings.from_table(cfg.ppo)
    s.check_reward(reward_fn is not None)
    if cfg.grad_accum != 1:
        raise ValueError("config key 'grad_accum' must be 1 for ppo (a step is one minibatch "
                         "of the rollout)")
    info = P.start(cfg, out, resume)
    tok_dir = P.tokenizer_dir(cfg, "ppo")
    tok = load_tokenizer(tok_dir)
    stats: Counter = Counter()
    room = cfg.seq_len - s.max_new_tokens
    if room < 1:
        raise ValueError(f"seq_len {cfg.seq_len} leaves no room for prompts with "
                         f"ppo.max_new_tokens {s.max_new_tokens}")
    train, val = load_prompts(cfg, Renderer(tok, cfg.seq_len), stats, room, info)
    policy = P.load_policy(cfg, "ppo")
    ref = copy.deepcopy(policy).eval().requires_grad_(False).to(info.device)
    torch.manual_seed(cfg.seed)
    model = ActorCritic(policy)
    scorer = Scorer(s, info.device, reward_fn)
    source = Rollouts(model, ref, train, tok, cfg, s, scorer)
    if cfg.save_every and cfg.save_every % source.steps_per_rollout:
        raise ValueError(f"config key 'save_every' must be a multiple of the steps per rollout "
                         f"({source.steps_per_rollout} = ppo_epochs × minibatches), so a "
                         "resumed run starts on a fresh rollout")
    held = P.eval_subset(val, s.eval_prompts, cfg.seed, False)

    def eval_fn(m, final: bool) -> dict:
        if not held:
            return {}
        d = source.sample(m, held, _seed_of(cfg.seed, "eval"))
        return {"val_" + k.replace("objective/", "").replace("rollout/", ""): v
                for k, v in d["stats"].items() if k != "objective/kl_coef"}

    extra = {"data": {k: int(v) for k, v in stats.items()}, "ppo": asdict(s),
             "prompts": {"train": len(train), "val": len(val)}}
    return P.train(cfg, out, model, make_step_fn(s), source, eval_fn, tok_dir, info, resume,
                   stop_at, extra=extra)
