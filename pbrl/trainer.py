"""The PB-RLSVR training loop: PPO with GAE on target-language prompts, rewarded against an English pivot.

One iteration, each phase named and timed (verl's layout):
  sample     the step's problems (a seeded function of the step: no data-loader state to save)
  rollout    n samples per problem with the KV-cached sampler, parameters gathered once
  reward     the configured reward, against the pivot's English reference of the same problem id
  old/ref/values   actor, reference and critic forward passes over prompt + response (fused log-probs)
  advantages per-token rewards (score on the last token, -beta KL on every token), GAE, whitening
  update     PPO epochs over minibatches of micro-batches, actor then critic; AdamW, clipping, LR schedule
  metrics    one line on stdout, one JSON line in {out_dir}/metrics.jsonl (rank 0)

Sampling noise is seeded per sequence by (seed, step, problem id, sample index), so a run gives the same rollouts
whatever the number of ranks or the batch layout, and a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
import zlib
from pathlib import Path

import torch

from pbrl import distributed as dist
from pbrl import ppo
from pbrl.checkpoint import check_pretrained, claim_run_dir, load_pretrained, load_state, save_model
from pbrl.config import TOY, Config, validate
from pbrl.data import Problem, load_mgsm, prompt
from pbrl.files import read_text
from pbrl.evaluate import accuracy_by_language, evaluate
from pbrl.model import Transformer
from pbrl.pivot import match_references, write_references
from pbrl.rewards import (AnswerAgreement, Embedder, EmbeddingReward, ExactMatch, FormatReward, HybridReward,
                          LanguageConsistency, MTReward, Sample, Translator)
from pbrl.sampler import generate


def sequence_seed(seed: int, step: int, problem_id: str, sample: int) -> int:
    return zlib.crc32(f"{seed}/{step}/{problem_id}/{sample}".encode())


class Trainer:
    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        self.rank, self.world, device = dist.init()
        validate(cfg, self.world)
        self.device = device if cfg.run.device == "auto" else torch.device(cfg.run.device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.out = Path(cfg.run.out_dir)
        self.pivot_cache = Path(cfg.data.pivot_cache or self.out / "pivot.jsonl")
        # The output directory is claimed first: an earlier run's files are refused (unless resuming) and a live
        # run's lock is respected before anything is built, loaded or written.
        claimed = None
        if self.rank == 0:
            try:
                self.lock = claim_run_dir(self.out, cfg.run.resume, allowed=(self.pivot_cache,))
            except FileExistsError as e:
                claimed = str(e)
        refusal = dist.all_gather_objects(claimed)[0]
        if refusal:
            raise FileExistsError(refusal)
        m, d, w = cfg.models, cfg.data, cfg.reward
        self.toy = None
        wanted = [m.policy, m.critic, m.reference, m.pivot, d.path, d.eval_path,
                  m.embedder if w.uses_embedder() else "", m.translator if w.uses_translator() else ""]
        if TOY in wanted:
            from pbrl import toy
            if self.rank == 0:
                toy.build_world(cfg.run.seed, log=self.log)
            dist.barrier()
            self.toy = toy.build_world(cfg.run.seed, log=lambda *a: None)  # cached by now
        self.dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                      "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.models.dtype]

        # Data and pivot references come before any model: a missing id is a config error, found in seconds.
        self.train = self._problems(cfg.data.path, cfg.data.langs, split="train")
        self.eval_problems = self._problems(cfg.data.eval_path, cfg.data.eval_langs, split="eval",
                                            limit=cfg.data.eval_limit) if cfg.data.eval_path else []
        english = self._problems(cfg.data.path, ["en"], split="train")
        if self.pivot_cache.is_file():
            self.references = match_references(self.pivot_cache, english)
        else:
            self.references = None  # generated once the pivot model is loaded

        policy = self._path(cfg.models.policy, "policy")
        critic = self._path(cfg.models.critic or policy, "critic")
        reference = self._path(cfg.models.reference or policy, "reference")
        _, self.tokenizer = check_pretrained(policy)
        for path in (critic, reference):  # they read the policy's token ids
            check_pretrained(path, self.tokenizer)
        self.actor = self._load(policy)
        if self.references is None:
            self._write_pivot_cache(english)
            self.references = match_references(self.pivot_cache, english)
        self.critic = self._load(critic, value_head=True)
        self.reference = self._load(reference)
        self.reference.requires_grad_(False).eval()
        for m in (self.actor, self.critic, self.reference):
            dist.shard(m, self.device)
        self.reward_fn = self._reward()
        p = cfg.ppo
        self.actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        self.critic_opt = torch.optim.AdamW([q for q in self.critic.parameters() if q.requires_grad],
                                            lr=p.critic_lr, weight_decay=p.weight_decay)
        self.kl = ppo.AdaptiveKLController(p.kl_beta, p.kl_target or None, p.kl_horizon)
        self.step = 0
        if cfg.run.resume:
            self._resume()

    # ------------------------------------------------------------------------------------------------- set-up
    def _path(self, value: str, role: str) -> str:
        if value != TOY:
            return value
        return str(self.toy.path_for(role))

    def _problems(self, path: str, langs: list[str], split: str, limit: int = 0) -> list[Problem]:
        source = self.toy.data_dir(split) if path == TOY else path
        by_lang = load_mgsm(source, langs)
        return [p for lang in langs for p in (by_lang[lang][:limit] if limit else by_lang[lang])]

    def _load(self, path: str, value_head: bool = False) -> Transformer:
        return Transformer.from_pretrained(path, dtype=self.dtype, device=self.device, value_head=value_head).train()

    def _write_pivot_cache(self, english: list[Problem]) -> None:
        """The pivot (the policy when models.pivot is empty) answers the English problems; rank 0 writes the
        cache, which is then read by every rank."""
        if self.rank == 0:
            pivot_path = self._path(self.cfg.models.pivot, "pivot") if self.cfg.models.pivot else None
            model, tokenizer = load_pretrained(pivot_path, dtype=self.dtype, device=self.device) \
                if pivot_path else (self.actor, self.tokenizer)
            write_references(model, tokenizer, english, self.pivot_cache, batch_size=64,
                             max_new_tokens=self.cfg.rollout.max_new_tokens, log=self.log)
        dist.barrier()

    def _reward(self):
        w, m = self.cfg.reward, self.cfg.models

        def embedder():
            path = self._path(m.embedder, "embedder")
            return Embedder.from_pretrained(path, device=self.device, pooling=w.pooling if m.embedder != TOY else
                                            "mean", append_eos=m.embedder != TOY)

        def translator():
            if m.translator == TOY:
                return self.toy.translator()
            path = self._path(m.translator, "translator")
            return Translator(*load_pretrained(path, dtype=self.dtype, device=self.device),
                              max_new_tokens=w.translate_max_new_tokens)

        if w.kind == "exact_match":
            return ExactMatch()
        if w.kind == "agreement":
            return AnswerAgreement()
        if w.kind == "embedding":
            return EmbeddingReward(embedder())
        if w.kind == "mt":
            return MTReward(translator(), embedder())
        parts = []
        shared = embedder() if w.embedding_weight or w.mt_weight else None
        for weight, make in [(w.embedding_weight, lambda: EmbeddingReward(shared)),
                             (w.agreement_weight, AnswerAgreement),
                             (w.mt_weight, lambda: MTReward(translator(), shared)),
                             (w.format_weight, FormatReward), (w.language_weight, LanguageConsistency)]:
            if weight > 0:
                parts.append((weight, make()))
        return HybridReward(parts)

    # ------------------------------------------------------------------------------------------------- one step
    def problems_for(self, step: int) -> list[Problem]:
        """This rank's slice of the step's problems: a seeded permutation per pass over the training set."""
        n = self.cfg.rollout.prompts_per_step
        order: list[int] = []
        epoch = (step * n) // len(self.train)
        while len(order) < (step * n) % len(self.train) + n:
            g = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + epoch)
            order += torch.randperm(len(self.train), generator=g).tolist()
            epoch += 1
        start = (step * n) % len(self.train)
        chosen = [self.train[i] for i in order[start:start + n]]
        per_rank = n // self.world
        return chosen[self.rank * per_rank:(self.rank + 1) * per_rank]

    def rollout(self, problems: list[Problem]):
        r = self.cfg.rollout
        prompts = [self.tokenizer.encode_chat([{"role": "user", "content": prompt(p)}]) for p in problems]
        generators = [torch.Generator(device=self.device).manual_seed(
            sequence_seed(self.cfg.run.seed, self.step, p.id + p.lang, j)) for p in problems
            for j in range(r.samples_per_prompt)]
        self.actor.eval()
        with dist.gathered(self.actor):
            out = generate(self.actor, prompts, r.max_new_tokens, temperature=r.temperature, top_k=r.top_k or None,
                           top_p=r.top_p if r.top_p < 1 else None, n=r.samples_per_prompt,
                           stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id or 0,
                           generator=generators, return_logprobs=True)
        self.actor.train()
        rows = [prompt_ids for prompt_ids in prompts for _ in range(r.samples_per_prompt)]
        return rows, out

    def batch(self, prompt_rows: list[list[int]], out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Sequences = left-padded prompt then right-padded response: input_ids, attention_mask [B, P + T],
        response_mask [B, T], and P."""
        p_len = max(len(p) for p in prompt_rows)
        b, t = out.tokens.shape
        ids = torch.zeros(b, p_len + t, dtype=torch.long)
        mask = torch.zeros(b, p_len + t, dtype=torch.bool)
        for i, p in enumerate(prompt_rows):
            ids[i, p_len - len(p):p_len] = torch.tensor(p)
            mask[i, p_len - len(p):p_len] = True
        response_mask = torch.arange(t)[None, :] < out.lengths[:, None]
        ids[:, p_len:] = torch.where(response_mask, out.tokens, 0)
        mask[:, p_len:] = response_mask
        return ids.to(self.device), mask.to(self.device), response_mask.to(self.device), p_len

    def forward_response(self, model, ids, mask, response_mask, p_len, what: str):
        """Log-probs and entropy ('logprobs') or values ('values') at the response positions, [B, T] each. The
        prediction of response token t is made at position p_len + t - 1."""
        t = response_mask.shape[1]
        inputs, att = ids[:, :-1], mask[:, :-1]
        label_mask = torch.zeros_like(inputs, dtype=torch.bool)
        label_mask[:, p_len - 1:] = response_mask[:, :t]
        if what == "values":
            return model(inputs, attention_mask=att, output="values")[:, p_len - 1:]
        logp, entropy = model(inputs, attention_mask=att, output="logprobs", labels=ids[:, 1:], label_mask=label_mask,
                              temperature=self.cfg.rollout.temperature)
        return logp[:, p_len - 1:], entropy[:, p_len - 1:]

    def micro_batches(self, rows: torch.Tensor):
        size = self.cfg.ppo.micro_batch_size
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    @torch.no_grad()
    def score_and_prepare(self, problems, prompt_rows, out, timings):
        t0 = time.perf_counter()
        n = self.cfg.rollout.samples_per_prompt
        texts = [self.tokenizer.decode(row) for row in out.as_lists()]
        samples = [Sample(p.lang, text, self.references[p.id], p.answer)
                   for p, text in zip([p for p in problems for _ in range(n)], texts)]
        rewards = self.reward_fn(samples)
        scores = rewards["reward"].to(self.device)
        timings["reward"] = time.perf_counter() - t0

        ids, mask, response_mask, p_len = self.batch(prompt_rows, out)
        b, t = response_mask.shape
        old, ref, values = (torch.zeros(b, t, device=self.device) for _ in range(3))
        for name, model, target, what in (("old_logprobs", self.actor, old, "logprobs"),
                                          ("ref_logprobs", self.reference, ref, "logprobs"),
                                          ("values", self.critic, values, "values")):
            t0 = time.perf_counter()
            for rows in self.micro_batches(torch.arange(b, device=self.device)):
                result = self.forward_response(model, ids[rows], mask[rows], response_mask[rows], p_len, what)
                target[rows] = result if what == "values" else result[0]  # log-probs, not entropy
            timings[name] = time.perf_counter() - t0

        t0 = time.perf_counter()
        kl = ppo.kl_estimate(old, ref, self.cfg.ppo.kl_estimator)
        token_rewards = ppo.per_token_rewards(scores, kl, response_mask, self.kl.beta)
        advantages, returns = ppo.gae(token_rewards, values, response_mask, self.cfg.ppo.gamma, self.cfg.ppo.lam)
        if self.cfg.ppo.whiten_advantages:
            advantages = self.global_whiten(advantages, response_mask)
        timings["advantages"] = time.perf_counter() - t0
        batch = ppo.RolloutBatch(ids, mask, response_mask, old, ref, values, scores)
        return batch, advantages, returns, kl, rewards, samples, out.logprobs.to(self.device)

    def global_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Whiten over the response tokens of every rank (the same result as one process on the whole batch)."""
        m = mask.bool()
        stats = dist.all_reduce_sum(torch.stack([ppo.masked_sum(x, m), ppo.masked_sum(x * x, m),
                                                 m.sum().to(x.dtype)]))
        mean = stats[0] / stats[2]
        var = (stats[1] / stats[2] - mean ** 2) * stats[2] / (stats[2] - 1).clamp(min=1)
        return torch.where(m, (x - mean) * torch.rsqrt(var + 1e-8), 0.0)

    def update(self, batch: ppo.RolloutBatch, advantages, returns, p_len: int) -> dict[str, float]:
        """PPO epochs over minibatches; each minibatch's loss is normalised by its token count over all ranks."""
        p = self.cfg.ppo
        b = batch.input_ids.shape[0]
        sums = {k: torch.zeros((), device=self.device) for k in
                ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "value_clipfrac", "tokens")}
        grad_norms = []
        for _ in range(p.epochs):
            for rows in torch.arange(b, device=self.device).chunk(p.minibatches):
                num_tokens = dist.all_reduce_sum(batch.response_mask[rows].sum().float())
                for model, opt in ((self.actor, self.actor_opt), (self.critic, self.critic_opt)):
                    opt.zero_grad(set_to_none=True)
                    for micro in self.micro_batches(rows):
                        m = batch.response_mask[micro]
                        args = (batch.input_ids[micro], batch.attention_mask[micro], m, p_len)
                        if model is self.actor:
                            logp, entropy = self.forward_response(model, *args, "logprobs")
                            out = ppo.policy_loss(logp, batch.old_logprobs[micro], advantages[micro], m, num_tokens,
                                                  p.eps_low, p.eps_high, p.dual_clip or None)
                            entropy_sum = ppo.masked_sum(entropy, m)
                            loss = out.loss - p.entropy_coef * entropy_sum / num_tokens
                            tokens = m.sum()
                            sums["policy_loss"] += out.loss.detach()
                            sums["entropy"] += entropy_sum.detach()
                            sums["clipfrac"] += out.clipfrac * tokens
                            sums["approx_kl"] += out.approx_kl * tokens
                            sums["tokens"] += tokens
                        else:
                            values = self.forward_response(model, *args, "values")
                            out = ppo.value_loss(values, batch.values[micro], returns[micro], m, num_tokens,
                                                 p.value_clip or None)
                            loss = out.loss
                            sums["value_loss"] += out.loss.detach()
                            sums["value_clipfrac"] += out.clipfrac * m.sum()
                        loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad],
                                                          p.grad_clip)
                    if model is self.actor:
                        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
                    opt.step()
        total = dist.all_reduce_sum(torch.stack(list(sums.values())))
        s = dict(zip(sums, total.tolist()))
        passes = p.epochs * p.minibatches
        tokens = max(s["tokens"], 1.0)
        return {"policy_loss": s["policy_loss"] / passes, "value_loss": s["value_loss"] / passes,
                "entropy": s["entropy"] / tokens, "clipfrac": s["clipfrac"] / tokens,
                "approx_kl": s["approx_kl"] / tokens, "value_clipfrac": s["value_clipfrac"] / tokens,
                "grad_norm": sum(grad_norms) / len(grad_norms)}

    def lr_factor(self, step: int) -> float:
        """Linear warmup over ppo.warmup_steps iterations, then constant or cosine down to 10% at run.steps."""
        p, total = self.cfg.ppo, self.cfg.run.steps
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        if p.schedule == "constant":
            return 1.0
        progress = (step - p.warmup_steps) / max(1, total - p.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def set_lr(self, step: int) -> None:
        """The LR is a pure function of the step, so nothing about it needs checkpointing."""
        factor = self.lr_factor(step)
        for opt, lr in ((self.actor_opt, self.cfg.ppo.lr), (self.critic_opt, self.cfg.ppo.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    def train_step(self) -> dict:
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        self.set_lr(self.step)
        problems = self.problems_for(self.step)
        t0 = time.perf_counter()
        prompt_rows, out = self.rollout(problems)
        timings["rollout"] = time.perf_counter() - t0
        batch, advantages, returns, kl, rewards, samples, sampler_logp = self.score_and_prepare(
            problems, prompt_rows, out, timings)
        p_len = batch.input_ids.shape[1] - batch.response_mask.shape[1]
        t0 = time.perf_counter()
        stats = self.update(batch, advantages, returns, p_len)
        timings["update"] = time.perf_counter() - t0
        kl_sum, tokens = dist.all_reduce_sum(torch.stack([ppo.masked_sum(kl, batch.response_mask),
                                                          batch.response_mask.sum().float()])).tolist()
        kl_mean = kl_sum / max(tokens, 1.0)
        self.kl.update(kl_mean, self.cfg.rollout.prompts_per_step * self.cfg.rollout.samples_per_prompt)
        metrics = self.gather_metrics(samples, rewards, batch, returns, sampler_logp, kl_mean)
        metrics.update(stats)
        elapsed = time.perf_counter() - t_start
        metrics["seconds"] = elapsed
        metrics["tokens_per_s"] = metrics["response_tokens"] / elapsed
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics["peak_memory_mb"] = (torch.cuda.max_memory_allocated() if self.device.type == "cuda" else
                                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        metrics["lr"] = self.actor_opt.param_groups[0]["lr"]
        metrics["kl_beta"] = self.kl.beta
        return metrics

    def gather_metrics(self, samples, rewards, batch, returns, sampler_logp, kl_mean) -> dict:
        m = batch.response_mask
        per_sample = [{"lang": s.lang, **{k: float(v[i]) for k, v in rewards.items()}} for i, s in enumerate(samples)]
        everything = [x for part in dist.all_gather_objects(per_sample) for x in part]
        local = torch.stack([
            ppo.masked_sum((sampler_logp - batch.old_logprobs).abs(), m), m.sum().float(),
            ppo.masked_sum(returns, m), ppo.masked_sum(returns ** 2, m),
            ppo.masked_sum((returns - batch.values), m), ppo.masked_sum((returns - batch.values) ** 2, m)])
        g = dist.all_reduce_sum(local).tolist()
        tokens = max(g[1], 1.0)
        var_r = g[3] / tokens - (g[2] / tokens) ** 2
        var_err = g[5] / tokens - (g[4] / tokens) ** 2
        metrics = {"step": self.step + 1, "kl": kl_mean, "logprob_mismatch": g[0] / tokens,
                   "response_tokens": g[1], "response_length": g[1] / len(everything),
                   "explained_variance": 1 - var_err / var_r if var_r > 1e-8 else 0.0}
        for key in rewards:
            metrics[key] = sum(x[key] for x in everything) / len(everything)
        for lang in sorted({x["lang"] for x in everything}):
            rows = [x for x in everything if x["lang"] == lang]
            metrics[f"reward/{lang}"] = sum(x["reward"] for x in rows) / len(rows)
        return metrics

    # ------------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy per language on the held-out problems; each rank takes every world-th problem."""
        mine = self.eval_problems[self.rank::self.world]
        self.actor.eval()
        with dist.gathered(self.actor):
            records = evaluate(self.actor, self.tokenizer, mine, batch_size=64,
                               max_new_tokens=self.cfg.rollout.max_new_tokens, progress=False)
        self.actor.train()
        return accuracy_by_language([r for part in dist.all_gather_objects(records) for r in part])

    # ------------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoints/step_N: actor/ and critic/ as HF directories (safetensors), optimizer states and the
        trainer state through torch.save of tensors and plain containers (loaded with weights_only=True).
        Written to step_N.tmp and renamed once complete: a crash never leaves a directory that looks done."""
        final = self.out / "checkpoints" / f"step_{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        actor_state, critic_state = dist.full_state_dict(self.actor), dist.full_state_dict(self.critic)
        optim = [self.optimizer_state(self.actor, self.actor_opt), self.optimizer_state(self.critic, self.critic_opt)]
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            source = self._path(self.cfg.models.policy, "policy")
            save_model(self.actor, tmp / "actor", source_dir=source, state=actor_state)
            save_model(self.critic, tmp / "critic", state=critic_state)
            torch.save({"actor": optim[0], "critic": optim[1]}, tmp / "optimizer.pt")
            torch.save({"step": self.step, "kl_beta": self.kl.beta, "torch_rng": torch.get_rng_state()},
                       tmp / "trainer.pt")
            os.replace(tmp, final)
        dist.barrier()
        return final

    @staticmethod
    def optimizer_state(model, opt) -> dict:
        if not dist.is_distributed():
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in (self.out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def _resume(self) -> None:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            self.log(f"resume: no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
            return
        state = load_state(ckpt / "trainer.pt")
        if state["step"] > self.cfg.run.steps:
            raise ValueError(f"run.steps = {self.cfg.run.steps} is below the step of the checkpoint to resume, "
                             f"{ckpt} (step {state['step']}); raise run.steps to continue the run")
        optim = load_state(ckpt / "optimizer.pt")
        from pbrl.checkpoint import load_model
        for model, sub in ((self.actor, "actor"), (self.critic, "critic")):
            self.load_model_state(model, load_model(ckpt / sub, dtype=self.dtype, value_head=sub == "critic")
                                  .state_dict())
        for model, opt, key in ((self.actor, self.actor_opt, "actor"), (self.critic, self.critic_opt, "critic")):
            if dist.is_distributed():
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(model, opt, optim[key], options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(optim[key])
        self.step, self.kl.beta = state["step"], state["kl_beta"]
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {ckpt} at step {self.step}" + (" (the run is complete: nothing to train)"
                                                               if self.step == self.cfg.run.steps else ""))

    @staticmethod
    def load_model_state(model, state: dict) -> None:
        if dist.is_distributed():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)

    # ------------------------------------------------------------------------------------------------- run
    def run(self, steps: int | None = None) -> list[dict]:
        """Train until run.steps (or `steps` more iterations); returns this call's metrics. The run directory's
        lock is released when it returns or fails."""
        try:
            return self._run(steps)
        finally:
            if self.rank == 0:
                self.lock.close()

    def _run(self, steps: int | None) -> list[dict]:
        cfg = self.cfg
        end = min(cfg.run.steps, self.step + steps) if steps else cfg.run.steps
        metrics_file = self.out / "metrics.jsonl"
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            if metrics_file.is_file():  # only when resuming: the steps after the checkpoint are redone
                kept = [line for line in read_text(metrics_file).splitlines() if json.loads(line)["step"] <= self.step]
                metrics_file.write_text("".join(line + "\n" for line in kept))
        history = []
        if self.step == 0 and self.eval_problems:
            history.append(self.log_metrics({"step": 0, **{f"acc/{k}": v for k, v in self.evaluate().items()}}))
        while self.step < end:
            metrics = self.train_step()
            self.step += 1
            last = self.step == cfg.run.steps
            if self.eval_problems and (last or (cfg.run.eval_every and self.step % cfg.run.eval_every == 0)):
                metrics.update({f"acc/{k}": v for k, v in self.evaluate().items()})
            history.append(self.log_metrics(metrics))
            if last or (cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0):
                self.save_checkpoint()
        if self.step == cfg.run.steps:
            final = self.out / "final"
            state = dist.full_state_dict(self.actor)
            if self.rank == 0:
                save_model(self.actor, final, source_dir=self._path(cfg.models.policy, "policy"), state=state)
                self.log(f"final policy: {final}")
        return history

    def log_metrics(self, metrics: dict) -> dict:
        if self.rank == 0:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            shown = [f"step {metrics['step']:>4}/{self.cfg.run.steps}"]
            for key, fmt in (("reward", ".3f"), ("kl", ".4f"), ("clipfrac", ".3f"), ("entropy", ".3f"),
                             ("value_loss", ".4f"), ("response_length", ".1f"), ("seconds", ".2f")):
                if key in metrics:
                    shown.append(f"{key} {metrics[key]:{fmt}}")
            shown += [f"{k.removeprefix('acc/')} {v:.1f}%" for k, v in metrics.items() if k.startswith("acc/")]
            self.log(" | ".join(shown))
        return metrics
