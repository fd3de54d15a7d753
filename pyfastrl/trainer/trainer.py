"""``GRPOTrainer``: rollout, rewards, advantages, and the GRPO update through pyfastrl's ops.

One optimizer step:
1. (every ``num_iterations`` steps) a rollout: ``model.generate`` samples ``num_generations``
   completions per prompt (cut after the first EOS); the reward functions score them; advantages are
   normalised per group (``grpo_advantages``); old log-probs (when the rollout is reused) and
   reference log-probs (when ``beta > 0``) are taken with ``selective_logprobs``.
2. ``gradient_accumulation_steps`` micro-batches of whole groups, in rollout order: the policy runs
   on the prefix-grouped batch (each prompt once, ``"pyfastrl_prefix"`` attention; a prefix tree when
   the micro-batch's prompts share earlier turns, see ``batches``; a model with local linear
   attention keeps it, on repeated-prompt batches: ``attention.py``) and
   ``fused_linear_grpo_loss`` takes its final hidden states and the LM head, so no logits are
   materialised; the loss is normalised by the step's total completion tokens (all processes), so
   the accumulated gradient is the full batch's.
3. gradient clipping, AdamW, the learning-rate schedule.

Under ``torchrun`` (``torch.distributed`` initialised) each process rolls out its own prompts (whole
groups, so advantages need no communication), the token normaliser and the logged metrics are
reduced over processes, and the policy is wrapped by ``config.distributed``: DistributedDataParallel
(a full replica per process, gradients all-reduced) or FSDP2 (``fully_shard``: parameters, gradients
and optimizer state sharded, each decoder layer gathered only while it runs; the reference model is
sharded the same way). Checkpoints hold full (unsharded) state either way, so a run may resume with
the other wrapper, but not with another number of processes (each process's rollout and RNG are
part of the state).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch

from pyfastrl import grpo_advantages, selective_logprobs
from pyfastrl.integrations import transformers as pft
from pyfastrl.ops.fused_linear_grpo_loss import fused_linear_grpo_loss
from pyfastrl.trainer import batches
from pyfastrl.trainer.attention import batch_layout, policy_attention
from pyfastrl.trainer.config import GRPOConfig
from pyfastrl.trainer.plot import write_plot
from pyfastrl.trainer.prompts import check_prompt, encode_prompt, reward_completions

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
CHECKPOINT_PREFIX = "checkpoint-"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class Rollout:
    """Sampled completions of one rollout, their rewards and what the loss needs besides the policy."""

    rows: list  # the dataset rows, one per prompt
    prompt_ids: list  # 1-D LongTensor per prompt
    completion_ids: list  # per prompt, num_generations 1-D LongTensors (EOS included when sampled)
    completions: list  # decoded completion texts, prompt-major
    rewards: torch.Tensor  # (N,) weighted sum over reward functions
    rewards_per_function: torch.Tensor  # (N, F)
    advantages: torch.Tensor  # (N,)
    old_logprobs: list | None  # per micro-batch, packed (K_mb,) completion-token log-probs
    ref_logprobs: list | None

    def to(self, device) -> "Rollout":
        """A copy with the per-micro-batch log-probs on ``device`` (the rest lives on the CPU)."""
        def move(tensors):
            return None if tensors is None else [t.to(device) for t in tensors]

        return dataclasses.replace(self, old_logprobs=move(self.old_logprobs), ref_logprobs=move(self.ref_logprobs))


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _distributed()[1] > 1:
        torch.distributed.all_reduce(values)
    return values


def _gather_to_rank0(value) -> list | None:
    """Every process's ``value`` on rank 0 (in rank order), None elsewhere."""
    rank, world_size = _distributed()
    if world_size == 1:
        return [value]
    gathered = [None] * world_size if rank == 0 else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered


class _Policy(torch.nn.Module):
    """A causal LM and the three things the trainer does with it, as methods of one module: the
    loss (``forward``), log-probs and sampling. DistributedDataParallel wraps ``forward``; FSDP2
    gathers the parameters it shards around all three (``_shard``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, loss_options: dict):
        hidden = pft.completion_hidden_states(self.model, batch)
        head = self.model.get_output_embeddings()
        cu_seqlens = torch.nn.functional.pad(batch.completion_lens.cumsum(0), (1, 0)).to(torch.int32)
        return fused_linear_grpo_loss(hidden, head.weight, batch.target_ids, None, bias=head.bias,
                                      cu_seqlens=cu_seqlens, **loss_options)

    @torch.no_grad()
    def logprobs(self, batch, temperature: float) -> torch.Tensor:
        hidden = pft.completion_hidden_states(self.model, batch)
        head = self.model.get_output_embeddings()
        return selective_logprobs(hidden, head.weight, batch.target_ids, bias=head.bias, temperature=temperature)

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        return self.model.generate(**kwargs)


def _shard(policy: _Policy, device: torch.device) -> None:
    """FSDP2 over all processes: each decoder layer (the model's ``_no_split_modules``) is its own
    unit, the rest (embeddings, final norm, LM head) the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (_distributed()[1],))
    layer_types = set(getattr(policy.model, "_no_split_modules", None) or ())
    for module in policy.model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    for method in ("logprobs", "generate"):
        register_fsdp_forward_method(policy, method)


class GRPOTrainer:
    """Thin GRPO trainer over pyfastrl's ops.

    Args:
        model: a transformers causal LM (its attention is switched to ``"pyfastrl_prefix"``, which
            is transformers' SDPA for generation and anything else without a grouped layout), or one
            switched to local linear attention (``enable_local_linear_attention``), which keeps it
            everywhere and trains on left-padded repeated-prompt batches (``attention.py``).
        reward_funcs: a callable or a list of them, ``f(prompts, completions, **columns) ->
            list[float]`` with one number per completion; ``columns`` are the dataset's other fields,
            repeated per completion (TRL's convention). Summed with ``config.reward_weights``.
        train_dataset: a list of dict rows, each with a ``"prompt"``: a string or a conversation
            (TRL's list of ``{"role", "content"}`` messages, see ``prompts``). Micro-batches take the
            rollout's rows in order; which rows share one: ``batches``.
        config: ``GRPOConfig``.
        tokenizer: the model's tokenizer (needs ``eos_token_id``; ``pad_token_id`` defaults to it).
        ref_model: the reference policy for ``beta > 0`` (default: a frozen copy of ``model``), with
            ``model``'s kind of attention.
    """

    def __init__(self, model, reward_funcs, train_dataset, config: GRPOConfig, tokenizer, *, ref_model=None):
        self.config = config
        config.validate()
        self.rank, self.world_size = _distributed()
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not self.reward_funcs or not all(callable(f) for f in self.reward_funcs):
            raise ValueError("reward_funcs must be a callable or a non-empty list of callables")
        weights = config.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float64)
        self.dataset = self._checked_dataset(train_dataset)
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("the tokenizer has no eos_token_id: completions could never end")
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        # Each process samples its own completions: the sampling stream is seeded per rank (the
        # weights are the same everywhere: DistributedDataParallel broadcasts rank 0's).
        torch.manual_seed(config.seed + self.rank)
        random.seed(config.seed + self.rank)
        pft.register()
        self.attention = policy_attention(model, ref_model)  # the model's own: softmax or local linear attention
        self.grouped, self.padding_side = batch_layout(self.attention, config.use_prefix_grouping,
                                                       announce=self.rank == 0)
        self.model = model.to(_DTYPES[config.dtype])
        self.model.set_attn_implementation(self.attention)
        self.device = next(self.model.parameters()).device
        self.ref_policy = None
        if config.beta > 0:
            ref_model = copy.deepcopy(self.model) if ref_model is None else ref_model.to(_DTYPES[config.dtype])
            ref_model.set_attn_implementation(self.attention)
            self.ref_policy = _Policy(ref_model.requires_grad_(False).eval())
        self.policy = _Policy(self.model)
        self.policy_loss = self.policy  # what the loss is called through
        self.sharded = self.world_size > 1 and config.distributed == "fsdp"
        if self.sharded:
            for policy in (self.policy, self.ref_policy):
                if policy is not None:
                    _shard(policy, self.device)
        elif self.world_size > 1:
            self.policy_loss = torch.nn.parallel.DistributedDataParallel(self.policy)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.rollout: Rollout | None = None
        self._batches_of, self._batches = None, []  # see _built_batches
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------ set-up

    def _checked_dataset(self, dataset) -> list:
        if not isinstance(dataset, (list, tuple)) or not dataset:
            raise ValueError("train_dataset must be a non-empty list of dict rows")
        for i, row in enumerate(dataset):
            if not isinstance(row, dict):
                raise ValueError(f"train_dataset[{i}] must be a dict, got {type(row).__name__}")
            check_prompt(row.get("prompt"), f"train_dataset[{i}]")
        needed = self.config.prompts_per_step * self.world_size
        if len(dataset) < needed:
            raise ValueError(f"train_dataset has {len(dataset)} rows but one step needs {needed} prompts")
        return list(dataset)

    def _lr_factor(self, step: int) -> float:
        config = self.config
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # ------------------------------------------------------------------------------------ rollout

    def _rows_for_rollout(self, index: int) -> list:
        """This process's prompts for rollout ``index``: a seeded permutation per pass over the data
        (the rows in order without ``shuffle_dataset``)."""
        per_rollout = self.config.prompts_per_step * self.world_size
        per_epoch = len(self.dataset) // per_rollout
        epoch, position = divmod(index, per_epoch)
        order = (torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed + epoch))
                 if self.config.shuffle_dataset else torch.arange(len(self.dataset)))
        start = position * per_rollout + self.rank * self.config.prompts_per_step
        return [self.dataset[i] for i in order[start:start + self.config.prompts_per_step].tolist()]

    def _encode_prompt(self, prompt, index: int) -> torch.Tensor:
        ids = encode_prompt(self.tokenizer, prompt)
        if not ids:
            raise ValueError(f"prompt {index} encodes to no tokens: {prompt!r}")
        if self.config.max_prompt_length is not None:
            ids = ids[-self.config.max_prompt_length:]  # keep the end, where the question is
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def _sample(self, prompt_ids: list) -> list:
        """``num_generations`` completions per prompt, each cut after its first EOS."""
        config = self.config
        width = max(p.numel() for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):
            input_ids[i, width - p.numel():] = p
            attention_mask[i, width - p.numel():] = 1
        was_training = self.model.training
        self.model.eval()
        sequences = self.policy.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), do_sample=True,
            temperature=config.temperature, top_p=config.top_p, top_k=0, max_new_tokens=config.max_completion_length,
            num_return_sequences=config.num_generations, pad_token_id=self.pad_token_id, use_cache=True,
            eos_token_id=self.tokenizer.eos_token_id,
            # Sharded layers are gathered collectively at every decoding step, so a process whose
            # completions all ended keeps stepping until every process's have.
            synced_gpus=self.sharded,
        )[:, width:].cpu()
        self.model.train(was_training)
        completions = []
        for row in sequences:
            eos = (row == self.tokenizer.eos_token_id).nonzero()
            completions.append(row[: int(eos[0]) + 1] if eos.numel() else row)
        g = config.num_generations
        return [completions[i * g:(i + 1) * g] for i in range(len(prompt_ids))]

    def _rewards(self, rows: list, completions: list) -> torch.Tensor:
        """``(N, F)`` rewards of every function, checked (raises naming the function)."""
        g = self.config.num_generations
        prompts = [row["prompt"] for row in rows for _ in range(g)]
        given = reward_completions(prompts, completions)  # TRL's form: messages for conversational prompts
        columns = {key: [row.get(key) for row in rows for _ in range(g)]
                   for key in sorted({k for row in rows for k in row}) if key != "prompt"}
        scores = []
        for f in self.reward_funcs:
            name = getattr(f, "__name__", repr(f))
            try:
                values = f(prompts, given, **columns)
            except Exception as error:
                raise RuntimeError(f"reward function {name} raised {type(error).__name__}: {error}") from error
            if values is None or len(values) != len(completions):
                got = "None" if values is None else f"{len(values)} values"
                raise ValueError(f"reward function {name} returned {got} for {len(completions)} completions")
            try:
                values = torch.tensor([float(v) for v in values], dtype=torch.float64)
            except (TypeError, ValueError) as error:
                raise ValueError(f"reward function {name} returned a non-number: {error}") from None
            if not torch.isfinite(values).all():
                bad = int((~torch.isfinite(values)).nonzero()[0])
                raise ValueError(f"reward function {name} returned {values[bad].item()} for completion {bad} "
                                 f"({completions[bad]!r})")
            scores.append(values)
        return torch.stack(scores, 1)

    def _micro_batches(self, rollout: Rollout):
        """(prompt slice, completion slice) of each micro-batch."""
        per = self.config.per_device_train_batch_size // self.config.num_generations
        for start in range(0, len(rollout.prompt_ids), per):
            yield slice(start, start + per), slice(start * self.config.num_generations,
                                                   (start + per) * self.config.num_generations)

    def _build_batch(self, prompt_ids, completion_ids):
        return batches.build_micro_batch(prompt_ids, completion_ids, grouped=self.grouped,
                                         use_prefix_tree=self.config.use_prefix_tree,
                                         padding_side=self.padding_side, pad_token_id=self.pad_token_id,
                                         device=self.device)

    def _built_batches(self, rollout: Rollout) -> list:
        """``rollout``'s micro-batches, built once and kept while it is the rollout in use (its old and
        reference log-probs and its ``num_iterations`` updates share them: a tree batch's trie and
        kernel tables are worth not rebuilding)."""
        if self._batches_of is not rollout:
            self._batches_of, self._batches = rollout, [
                self._build_batch(rollout.prompt_ids[prompts], rollout.completion_ids[prompts])
                for prompts, _ in self._micro_batches(rollout)]
        return self._batches

    def _logprobs(self, policies: list, rollout: Rollout) -> list:
        """Per policy, its packed completion-token log-probs of each micro-batch."""
        out = [[] for _ in policies]
        for batch in self._built_batches(rollout):
            for policy, per_batch in zip(policies, out):
                per_batch.append(policy.logprobs(batch, self.config.temperature))
        return out

    def generate_rollout(self, rows: list) -> Rollout:
        """Sample, score and prepare one rollout of ``rows`` (this process's prompts)."""
        prompt_ids = [self._encode_prompt(row["prompt"], i) for i, row in enumerate(rows)]
        completion_ids = self._sample(prompt_ids)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for group in completion_ids for c in group]
        per_function = self._rewards(rows, texts)
        rewards = per_function @ self.reward_weights
        advantages = grpo_advantages(rewards, group_size=self.config.num_generations,
                                     scale_rewards=self.config.scale_rewards).to(torch.float32)
        rollout = Rollout(rows, prompt_ids, completion_ids, texts, rewards, per_function, advantages, None, None)
        wanted = {"old_logprobs": self.policy if self.config.num_iterations > 1 else None,
                  "ref_logprobs": self.ref_policy}
        wanted = {field: policy for field, policy in wanted.items() if policy is not None}
        for field, logprobs in zip(wanted, self._logprobs(list(wanted.values()), rollout)):
            setattr(rollout, field, logprobs)
        return rollout

    # ------------------------------------------------------------------------------------ update

    def optimize(self, rollout: Rollout) -> dict:
        """One optimizer step on ``rollout``; returns this step's metrics (reduced over processes)."""
        config = self.config
        completion_tokens = sum(c.numel() for group in rollout.completion_ids for c in group)
        global_tokens = float(_all_reduce_sum(torch.tensor([completion_tokens], dtype=torch.float64))[0])
        options = dict(
            temperature=config.temperature, loss_type=config.loss_type,
            importance_sampling_level=config.importance_sampling_level, epsilon=config.epsilon,
            epsilon_high=config.epsilon_high, delta=config.delta, beta=config.beta,
            use_bias_correction_kl=config.use_bias_correction_kl, max_completion_length=config.max_completion_length,
            num_items_in_batch=global_tokens, backend=config.backend,
        )
        # DistributedDataParallel and FSDP2 average gradients over processes. dapo/cispo/vespo losses are
        # normalised by the global token count already, so they are scaled to make that average their
        # sum; the other loss types' per-micro-batch means are averaged over micro-batches and
        # processes (as TRL does).
        globally_normalised = config.loss_type in ("dapo", "cispo", "vespo")
        scale = self.world_size if globally_normalised else 1.0 / config.gradient_accumulation_steps
        self.model.train()
        sums = torch.zeros(6, dtype=torch.float64)  # loss, kl, clip_ratio, entropy (token-weighted), tokens x2
        for index, ((_, completions), batch) in enumerate(zip(self._micro_batches(rollout),
                                                             self._built_batches(rollout))):
            extra = {}
            if rollout.old_logprobs is not None:
                extra["old_per_token_logps"] = rollout.old_logprobs[index]
            if rollout.ref_logprobs is not None:
                extra["ref_per_token_logps"] = rollout.ref_logprobs[index]
            loss, metrics = self.policy_loss(batch, {**options, **extra,
                                                     "advantages": rollout.advantages[completions].to(self.device)})
            (loss * scale).backward()
            tokens = float(batch.completion_lens.sum())
            sums += torch.tensor([loss.item() * scale, float(metrics["kl"]) * tokens,
                                  float(metrics["clip_ratio/region_mean"]) * tokens, float(metrics["entropy"]) * tokens,
                                  tokens, batches.stored_tokens(batch)], dtype=torch.float64)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        sums = _all_reduce_sum(sums)
        tokens = max(sums[4].item(), 1.0)
        # The gradient is that of the process average of the scaled losses: report the same number.
        return {"loss": sums[0].item() / self.world_size, "kl": sums[1].item() / tokens,
                "clip_ratio": sums[2].item() / tokens, "entropy": sums[3].item() / tokens,
                "completion_tokens": int(sums[4]), "model_tokens": int(sums[5]), "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0]}

    # ------------------------------------------------------------------------------------ loop

    def _rollout_metrics(self, rollout: Rollout) -> dict:
        g = self.config.num_generations
        prompt_lens = [p.numel() for p in rollout.prompt_ids]
        completion_lens = [c.numel() for group in rollout.completion_ids for c in group]
        local = torch.tensor([rollout.rewards.sum().item(), (rollout.rewards ** 2).sum().item(), len(completion_lens),
                              sum(completion_lens), sum(p * g for p in prompt_lens) + sum(completion_lens),
                              sum(prompt_lens) + sum(completion_lens),
                              sum(batches.tree_tokens(rollout.prompt_ids[p], rollout.completion_ids[p])
                                  for p, _ in self._micro_batches(rollout)),
                              *rollout.rewards_per_function.sum(0).tolist()], dtype=torch.float64)
        total = _all_reduce_sum(local)
        n = total[2].item()
        mean = total[0].item() / n
        metrics = {"reward": mean, "reward_std": math.sqrt(max(total[1].item() / n - mean**2, 0.0)),
                   "completion_length": total[3].item() / n, "tokens_repeated": int(total[4]),
                   "tokens_grouped": int(total[5]), "tokens_tree": int(total[6])}
        for f, value in zip(self.reward_funcs, total[7:].tolist()):
            metrics[f"rewards/{getattr(f, '__name__', 'reward')}"] = value / n
        return metrics

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Run to ``config.max_steps``; returns the summary (also printed by the command line)."""
        config = self.config
        main = self.rank == 0
        metrics_path = os.path.join(config.output_dir, METRICS_FILE)
        if resume_from_checkpoint:
            self.resume(resume_from_checkpoint)
        elif main:
            _refuse_existing_run(config.output_dir)
        if main:
            os.makedirs(config.output_dir, exist_ok=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=self.step, disable=not (main and config.progress),
                   desc="GRPO", unit="step", dynamic_ncols=True)
        while self.step < config.max_steps:
            start = time.perf_counter()
            if self.step % config.num_iterations == 0 or self.rollout is None:
                self.rollout = self.generate_rollout(self._rows_for_rollout(self.step // config.num_iterations))
            record = {"step": self.step + 1, **self._rollout_metrics(self.rollout), **self.optimize(self.rollout)}
            record["step_time"] = time.perf_counter() - start
            record["tokens_per_s"] = record["model_tokens"] / record["step_time"]
            self.history.append(record)
            if main:
                if self.step % config.logging_steps == 0 or self.step == config.max_steps:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}",
                                clip=f"{record['clip_ratio']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            if (config.save_steps and self.step % config.save_steps == 0) or self.step == config.max_steps:
                self.save_checkpoint()
        bar.close()
        summary = self.summary()
        if main and config.plot:
            summary["plot"] = write_plot(self.history, os.path.join(config.output_dir, PLOT_FILE))
        return summary

    def summary(self) -> dict:
        """First and final mean rewards (mean of the first / last 5 steps) and the tokens each layout holds."""
        if not self.history:
            return {}
        window = max(1, min(5, len(self.history) // 4))
        first = sum(r["reward"] for r in self.history[:window]) / window
        final = sum(r["reward"] for r in self.history[-window:]) / window
        tokens = {key: sum(r.get(key, 0) for r in self.history)  # tokens_tree: 0 in records of older runs
                  for key in ("tokens_repeated", "tokens_grouped", "tokens_tree")}
        return {"steps": self.step, "first_reward": first, "final_reward": final, "window": window, **tokens,
                "seconds": sum(r["step_time"] for r in self.history)}

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str | None:
        """``output_dir/checkpoint-<step>/``: model (``save_pretrained``) and tokenizer, plus
        ``trainer_state.pt`` (full model and optimizer state, scheduler, step, config, and each
        process's RNG and rollout) for an exact resume. Every process takes part (FSDP2 gathers the
        shards); rank 0 writes. Returns the path on rank 0, None elsewhere."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        path = os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{self.step}")
        # Checked on every process before any collective, so a refusal stops them all alike.
        if os.path.exists(path):
            raise FileExistsError(f"checkpoint {path} exists already; refusing to overwrite it")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        # CUDA's generators only where this process uses CUDA: reading them would otherwise create a
        # CUDA context on every process of a CPU run (torchrun --device cpu on a GPU machine).
        processes = _gather_to_rank0({
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None},
            "rollout": None if self.rollout is None else self.rollout.to("cpu"),
        })
        if self.rank != 0:
            return None
        os.makedirs(path)
        self.model.save_pretrained(path, state_dict=dict(model_state))  # a copy: it empties the dict it gets
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)
        state = {"step": self.step, "config": self.config.to_dict(), "world_size": self.world_size,
                 "model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "processes": processes, "history": self.history, "attention": self.attention}
        torch.save(state, os.path.join(path, "trainer_state.pt"))
        return path

    def resume(self, checkpoint: str | bool) -> None:
        """Restore a checkpoint (``True``: the latest in ``output_dir``) on every process. Refuses a
        checkpoint of another config or another number of processes, and one whose later checkpoints
        would be overwritten."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        directory = self.config.output_dir
        if checkpoint is True:
            found = _checkpoints(directory)
            if not found:
                raise ValueError(f"resume: no {CHECKPOINT_PREFIX}<step> folder in {directory}")
            checkpoint = found[-1][1]
        state_path = os.path.join(checkpoint, "trainer_state.pt")
        if not os.path.isfile(state_path):
            raise ValueError(f"resume: {checkpoint} is not a pyfastrl checkpoint (no trainer_state.pt)")
        state = torch.load(state_path, weights_only=False)
        # The attention first: a run with the other attention also differs in use_prefix_grouping
        # (pyfastrl train sets it off for LLA), which would otherwise hide the real cause.
        saved_attention = state.get("attention", pft.ATTN_IMPLEMENTATION)  # written before LLA policies: softmax
        if saved_attention != self.attention:
            raise ValueError(f"resume: the checkpoint's policy ran {saved_attention!r} attention, this model runs "
                             f"{self.attention!r} (pyfastrl train: the same --attention as the run)")
        different = self.config.differences(state["config"])
        if different:
            raise ValueError("resume: the checkpoint was written with another config: " + "; ".join(different))
        if state["world_size"] != self.world_size:
            raise ValueError(f"resume: the checkpoint was written by {state['world_size']} process(es), this run "
                             f"has {self.world_size}; each process's rollout and RNG are part of the state")
        later = [path for step, path in _checkpoints(directory) if step > state["step"]]
        if later:
            raise ValueError(f"resume: resuming from step {state['step']} would overwrite the later checkpoints "
                             f"{', '.join(later)}; resume from the latest or move them away")
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        mine = state["processes"][self.rank]
        torch.set_rng_state(mine["rng"]["torch"])
        random.setstate(mine["rng"]["python"])
        if mine["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
        self.rollout = None if mine["rollout"] is None else mine["rollout"].to(self.device)
        self.step, self.history = state["step"], state["history"]
        metrics = os.path.join(directory, METRICS_FILE)
        if self.rank == 0 and os.path.isfile(metrics):
            # Lines logged after the checkpoint are kept aside, not lost.
            with open(metrics) as f:
                lines = f.readlines()
            kept = [line for line in lines if json.loads(line)["step"] <= self.step]
            if len(kept) < len(lines):
                aside = os.path.join(directory, f"metrics.before-resume-{self.step}.jsonl")
                os.replace(metrics, aside)
                with open(metrics, "w") as f:
                    f.writelines(kept)
                print(f"resume: metrics logged after step {self.step} moved to {aside}")


def _checkpoints(directory: str) -> list:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
            found.append((int(name[len(CHECKPOINT_PREFIX):]), os.path.join(directory, name)))
    return sorted(found)


def _refuse_existing_run(directory: str) -> None:
    existing = [os.path.join(directory, METRICS_FILE)] if os.path.exists(os.path.join(directory, METRICS_FILE)) else []
    existing += [path for _, path in _checkpoints(directory)]
    if existing:
        raise FileExistsError(f"{directory} already holds a run ({', '.join(existing[:3])}); resume it "
                              "(--resume / resume_from_checkpoint=True) or choose another output directory")
