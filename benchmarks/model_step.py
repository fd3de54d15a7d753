"""Benchmark case ``model-step``: one training step of a decoder, repeated-prompt batch vs grouped batch.

    pyfastrl bench model-step [--quick] [--cpu]     (or python benchmarks/model_step.py)

A ~0.5B-parameter decoder (Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 query / 2 kv heads,
vocab 151,936), randomly initialised, bf16, one prompt of P in {1024, 4096} tokens with G in
{4, 8, 16} completions of S = 512. Forward + backward of the completion log-probs (LM head only on
completion positions) under a policy-gradient loss:
  repeated   the baseline: every completion with its own prompt copy, transformers' SDPA attention
  grouped    the prefix-grouped batch (each prompt once), "pyfastrl_prefix" attention (Triton)
  trl        stock ``trl.GRPOTrainer``'s loss step (its padded batch, its chunked LM head), dapo, beta 0
  trl+pyfastrl  the same step through ``pyfastrl.integrations.trl.GRPOTrainer`` (grouped batch, fused loss)
               (both GPU only, and only with trl installed; skipped with the reason otherwise)
with the token-ratio bound G(P+S)/(P+GS) on the speedup. Useful work, the same for both: 6 FLOPs
per non-embedding parameter per grouped token, the grouped rule's attention (4*D*Hq per pair and
layer, 3.5x with backward) and the LM head on completion positions (6*H*V per completion token);
bytes: every parameter read forward and backward and its gradient written.
With --cpu: a 2-layer model (hidden 64, vocab 512), fp32, P in {64, 256}, S = 16, G = 4.
"""
from __future__ import annotations

import sys

import torch

import harness
from pyfastrl import PrefixGroupLayout
from pyfastrl.integrations import transformers as pft

NAME = "model-step"
PLOT = {"x": "P", "series": "G", "baseline": "repeated", "ours": "grouped"}
CUDA_MODEL = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                  tie_word_embeddings=True)
CPU_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
FULL_GRID = [(p, 512, g) for p in (1024, 4096) for g in (4, 8, 16)]
QUICK_GRID = [(1024, 512, 4), (4096, 512, 16)]
CPU_GRID = [(64, 16, 4), (256, 16, 4)]


def token_ratio_bound(prefix: int, suffix: int, group: int) -> float:
    """Speedup bound from tokens alone: G(P+S) repeated tokens over P+GS grouped tokens."""
    return group * (prefix + suffix) / (prefix + group * suffix)


def step_flops(model_shape: dict, prefix: int, suffix: int, group: int) -> float:
    """Training FLOPs of the grouped computation (what any method must do at least)."""
    h, layers, heads = model_shape["hidden_size"], model_shape["num_hidden_layers"], model_shape["num_attention_heads"]
    kv, ffn, vocab = model_shape["num_key_value_heads"], model_shape["intermediate_size"], model_shape["vocab_size"]
    head_dim = h // heads
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * ffn  # q, o, k, v projections and the gated MLP
    layout = PrefixGroupLayout([prefix], [[suffix] * group])
    dense = 6.0 * layers * per_layer * layout.total_tokens
    attention = 3.5 * 4.0 * head_dim * heads * layout.attention_pairs * layers
    head = 6.0 * h * vocab * group * suffix
    return dense + attention + head


def step_bytes(model) -> float:
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3.0 * parameters


def build_model(runner: harness.Runner):
    import transformers

    pft.register()
    torch.manual_seed(0)
    shape = CPU_MODEL if runner.cpu else CUDA_MODEL
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2Config(**shape), dtype=torch.float32 if runner.cpu else torch.bfloat16,
        attn_implementation=pft.ATTN_IMPLEMENTATION)
    return model.to(runner.device).train(), shape


def trl_trainers(model, runner: harness.Runner, group: int, suffix: int) -> dict | str:
    """``{"trl": stock trainer, "trl+pyfastrl": drop-in}``, each around its own copy of ``model`` (TRL and the
    drop-in patch the model's forward), dapo with beta 0 (no reference model); or why they cannot run."""
    if runner.cpu:
        return "GPU only (a TRL trainer around the 0.5B model)"
    try:
        import copy
        import tempfile

        import trl
        from datasets import Dataset

        from pyfastrl.integrations import trl as pftrl
        from pyfastrl.trainer import default_task
    except ImportError as error:
        return f"needs trl (pip install -e '.[trl]'): {error}"
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", bf16=False,
                          per_device_train_batch_size=group, num_generations=group, max_completion_length=suffix,
                          loss_type="dapo", beta=0.0, gradient_checkpointing=False)
    trainers = {}
    for label, trainer_class in (("trl", trl.GRPOTrainer), ("trl+pyfastrl", pftrl.GRPOTrainer)):
        policy = copy.deepcopy(model)
        policy.set_attn_implementation("sdpa")  # stock TRL's; the drop-in switches its copy to pyfastrl_prefix
        trainer = trainer_class(model=policy, reward_funcs=_no_reward,
                                args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * group),
                                processing_class=default_task.build_tokenizer())
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
        trainers[label] = trainer
    return trainers


def _no_reward(completions, **_):  # the step is timed on given advantages; no rollout is scored
    return [0.0] * len(completions)


def trl_inputs(prompt, completions, advantages) -> dict:
    """The batch TRL's ``_generate_and_score_completions`` hands to its loss: one row per completion."""
    completion_ids = torch.stack(completions)
    return {"prompt_ids": prompt[None].expand(len(completions), -1).contiguous(),
            "prompt_mask": torch.ones(len(completions), prompt.numel(), dtype=torch.long, device=prompt.device),
            "completion_ids": completion_ids, "completion_mask": torch.ones_like(completion_ids),
            "advantages": advantages, "num_items_in_batch": torch.tensor(completion_ids.numel(), device=prompt.device)}


def run(runner: harness.Runner):
    model, shape = build_model(runner)
    vocab = shape["vocab_size"]
    grid = CPU_GRID if runner.cpu else (QUICK_GRID if runner.quick else FULL_GRID)
    cases = []
    for index, (prefix, suffix, group) in enumerate(grid):
        harness.progress(index, len(grid), f"P={prefix} S={suffix} G={group}")

        def make(seed):
            g = torch.Generator().manual_seed(seed)
            prompts = [torch.randint(0, vocab, (prefix,), generator=g)]
            completions = [[torch.randint(0, vocab, (suffix,), generator=g) for _ in range(group)]]
            advantages = torch.randn(group, generator=g).to(runner.device)
            return {"repeated": (pft.build_repeated_batch(prompts, completions, device=runner.device), advantages),
                    "grouped": (pft.build_grouped_batch(prompts, completions, device=runner.device), advantages),
                    "trl": trl_inputs(prompts[0].to(runner.device), [c.to(runner.device) for c in completions[0]],
                                      advantages)}

        sets = runner.input_sets(make)
        case = {"params": {"P": prefix, "S": suffix, "G": group},
                "work": {"token_ratio_bound": token_ratio_bound(prefix, suffix, group), "input_sets": len(sets),
                         "tokens": {label: sets[0][label][0].input_ids.numel() for label in ("repeated", "grouped")}},
                "methods": {}, "skipped": {}}
        flops, nbytes = step_flops(shape, prefix, suffix, group), step_bytes(model)
        for label, implementation in (("repeated", "sdpa"), ("grouped", pft.ATTN_IMPLEMENTATION)):
            model.set_attn_implementation(implementation)

            def step(batch_and_advantages, label=label):
                batch, advantages = batch_and_advantages[label]
                model.zero_grad(set_to_none=True)
                logprobs, mask = pft.completion_logprobs(model, batch)
                (-(advantages[:, None] * logprobs * mask).sum() / mask.sum()).backward()

            case["methods"][label] = {"fwd_bwd": runner.measure(step, [(s,) for s in sets], flops=flops, nbytes=nbytes)}
        model.zero_grad(set_to_none=True)
        trainers = harness.measure_or_record_failure(lambda: trl_trainers(model, runner, group, suffix))
        if not isinstance(trainers, dict) or "error" in trainers:
            reason = trainers if isinstance(trainers, str) else trainers["error"]
            case["skipped"].update({"trl": reason, "trl+pyfastrl": reason})
            trainers = {}
        for label, trainer in trainers.items():
            def trl_step(inputs, trainer=trainer):
                trainer.model.zero_grad(set_to_none=True)
                trainer.compute_loss(trainer.model, inputs["trl"]).backward()

            case["methods"][label] = {"fwd_bwd": runner.measure(trl_step, [(s,) for s in sets], flops=flops,
                                                                nbytes=nbytes)}
        del trainers
        cases.append(case)
    model.set_attn_implementation(pft.ATTN_IMPLEMENTATION)
    config = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **shape}
    return config, cases


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
