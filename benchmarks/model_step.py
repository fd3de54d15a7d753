"""Model-level benchmark: one forward+backward training step, repeated-prompt batch vs grouped batch.

    python benchmarks/model_step.py [--quick] [--out DIR]

A ~0.5B-parameter decoder (Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 query / 2 kv heads,
vocab 151,936), randomly initialised, bf16, on P in {1024, 4096}, S = 512, G in {4, 8, 16} (one
prompt per step). The repeated batch runs transformers' SDPA attention; the grouped batch runs
"pyfastrl_prefix" (Triton). Both compute the same completion log-probs (LM head only on completion
positions) and backpropagate the same loss. Reports median step ms, speedup, the token-ratio bound
G(P+S)/(P+GS), and peak memory. Needs a CUDA GPU: on a CPU-only machine it says so and exits 0.
"""
from __future__ import annotations

import json
import sys

import torch

from common import parse_args_or_skip, write_report
from pyfastrl.integrations import transformers as pft

MODEL_SHAPE = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                   tie_word_embeddings=True)
FULL_GRID = [(p, 512, g) for p in (1024, 4096) for g in (4, 8, 16)]
QUICK_GRID = [(1024, 512, 4), (4096, 512, 16)]


def token_ratio_bound(prefix: int, suffix: int, group: int) -> float:
    """Speedup bound from tokens alone: G(P+S) repeated tokens over P+GS grouped tokens."""
    return group * (prefix + suffix) / (prefix + group * suffix)


def _step_ms_and_peak(model, batch, implementation: str) -> tuple[float, float]:
    from triton.testing import do_bench

    model.set_attn_implementation(implementation)
    advantages = torch.randn(batch.completion_lens.numel(), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        logprobs, mask = pft.completion_logprobs(model, batch)
        (-(advantages[:, None] * logprobs * mask).sum() / mask.sum()).backward()

    ms = do_bench(step, warmup=3, rep=20, return_mode="median")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    args = parse_args_or_skip(argv, __doc__, "model_step.py", "two cases: (P, G) = (1024, 4) and (4096, 16)")
    if args is None:
        return 0
    import transformers

    pft.register()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**MODEL_SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                          attn_implementation=pft.ATTN_IMPLEMENTATION).cuda()
    model.train()
    cases = []
    grid = QUICK_GRID if args.quick else FULL_GRID
    for i, (p, s, g) in enumerate(grid):
        print(f"[{i + 1}/{len(grid)}] P={p} S={s} G={g} ...", flush=True)
        prompts = [torch.randint(0, config.vocab_size, (p,))]
        completions = [[torch.randint(0, config.vocab_size, (s,)) for _ in range(g)]]
        case = {"P": p, "S": s, "G": g, "token_ratio_bound": token_ratio_bound(p, s, g)}
        for label, batch, implementation in (
            ("repeated", pft.build_repeated_batch(prompts, completions, device="cuda"), "sdpa"),
            ("grouped", pft.build_grouped_batch(prompts, completions, device="cuda"), pft.ATTN_IMPLEMENTATION),
        ):
            try:
                ms, peak = _step_ms_and_peak(model, batch, implementation)
                case[label] = {"step_ms": ms, "peak_extra_mib": peak, "tokens": batch.input_ids.numel()}
            except torch.cuda.OutOfMemoryError:
                case[label] = {"error": "out of memory"}
            torch.cuda.empty_cache()
        if "step_ms" in case["repeated"] and "step_ms" in case["grouped"]:
            case["speedup"] = case["repeated"]["step_ms"] / case["grouped"]["step_ms"]
            case["memory_ratio"] = case["grouped"]["peak_extra_mib"] / case["repeated"]["peak_extra_mib"]
        cases.append(case)
        print(json.dumps(case), flush=True)

    print(f"\n{'P':>5} {'G':>3} | {'repeated ms':>11} {'grouped ms':>10} {'speedup':>8} {'bound':>6} | "
          f"{'peak MiB rep':>12} {'grp':>7}")
    for c in cases:
        if "speedup" not in c:
            print(f"{c['P']:>5} {c['G']:>3} | {c['repeated'].get('error', '')} {c['grouped'].get('error', '')}")
            continue
        print(f"{c['P']:>5} {c['G']:>3} | {c['repeated']['step_ms']:>11.1f} {c['grouped']['step_ms']:>10.1f} "
              f"{c['speedup']:>7.2f}x {c['token_ratio_bound']:>5.2f}x | {c['repeated']['peak_extra_mib']:>12.0f} "
              f"{c['grouped']['peak_extra_mib']:>7.0f}")
    write_report(args.out, "model_step", MODEL_SHAPE, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
