"""``pyfastrl train --compare-grouping``: the prefix-grouped and the repeated-prompt run side by side.

Two trainers from the same model, data, seed and options, one with prefix grouping and one without,
advance step by step in turn (which one goes first alternates), so both see the same machine load.
Each step is timed end to end: rollout generation (every ``num_iterations`` steps), rewards, the
old/reference log-prob passes and the policy update.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time


def _timed_step(trainer) -> tuple[float, dict]:
    """One optimizer step of ``trainer`` (a new rollout when due), its wall time and its metrics."""
    start = time.perf_counter()
    iterations = trainer.config.num_iterations
    if trainer.step % iterations == 0 or trainer.rollout is None:
        trainer.rollout = trainer.generate_rollout(trainer._rows_for_rollout(trainer.step // iterations))
    metrics = {**trainer._rollout_metrics(trainer.rollout), **trainer.optimize(trainer.rollout)}
    return time.perf_counter() - start, metrics


def compare_grouping(grouped, repeated, *, progress: bool = True) -> dict:
    """Run ``grouped`` (``use_prefix_grouping=True``) and ``repeated`` (False) to their ``max_steps``,
    interleaved. Returns the seconds of each, the median over steps of the per-step time ratio
    (repeated / grouped), the token counts of both layouts and the final mean rewards."""
    if not grouped.grouped or repeated.grouped:
        raise ValueError("compare_grouping: pass the grouped trainer first and the --no-grouping one second")
    from tqdm.auto import tqdm

    steps = grouped.config.max_steps
    times = {"grouped": [], "repeated": []}
    rewards = {"grouped": [], "repeated": []}
    tokens = {"repeated": 0, "grouped": 0}
    with tqdm(total=steps, disable=not progress, desc="grouped | repeated", unit="step", dynamic_ncols=True) as bar:
        for step in range(steps):
            order = [("grouped", grouped), ("repeated", repeated)]
            for name, trainer in order if step % 2 == 0 else order[::-1]:
                seconds, metrics = _timed_step(trainer)
                times[name].append(seconds)
                rewards[name].append(metrics["reward"])
                if name == "grouped":
                    tokens["repeated"] += metrics["tokens_repeated"]
                    tokens["grouped"] += metrics["tokens_grouped"]
            bar.set_postfix(ratio=f"{statistics.median(r / g for g, r in zip(times['grouped'], times['repeated'])):.2f}x")
            bar.update(1)
    window = max(1, min(5, steps // 4))
    return {
        "steps": steps,
        "grouped_seconds": sum(times["grouped"]), "repeated_seconds": sum(times["repeated"]),
        "median_step_ratio": statistics.median(r / g for g, r in zip(times["grouped"], times["repeated"])),
        "tokens_repeated": tokens["repeated"], "tokens_grouped": tokens["grouped"],
        "final_reward_grouped": sum(rewards["grouped"][-window:]) / window,
        "final_reward_repeated": sum(rewards["repeated"][-window:]) / window, "window": window,
    }


def print_comparison(result: dict) -> None:
    """The summary lines of ``--compare-grouping``."""
    token_ratio = result["tokens_repeated"] / max(result["tokens_grouped"], 1)
    total_ratio = result["repeated_seconds"] / result["grouped_seconds"]
    print(f"\ncompared over {result['steps']} steps, interleaved step by step on the same machine:")
    print(f"tokens through the model: repeated-prompt batches {result['tokens_repeated']:,}, grouped "
          f"{result['tokens_grouped']:,} ({token_ratio:.2f}x fewer)")
    print(f"time: grouped {result['grouped_seconds']:.1f} s, --no-grouping {result['repeated_seconds']:.1f} s: "
          f"grouping {total_ratio:.2f}x faster end to end (median per-step ratio {result['median_step_ratio']:.2f}x)")
    print(f"mean reward over the last {result['window']} steps: grouped {result['final_reward_grouped']:.3f}, "
          f"--no-grouping {result['final_reward_repeated']:.3f}")


def run_comparison(grouped, reward_funcs, dataset, tokenizer) -> int:
    """``--compare-grouping``: a --no-grouping twin of ``grouped`` (a copy of its untrained model),
    both run interleaved (``grouped`` with its prefix trees off), the comparison printed."""
    from pyfastrl.trainer import GRPOTrainer

    if not grouped.config.use_prefix_grouping:
        raise ValueError("--compare-grouping runs both layouts: leave out --no-grouping")
    # One-level grouping against repeated prompts, as the summary says: prefix trees (which only
    # change how the grouped side stores a micro-batch) stay off.
    grouped.config = dataclasses.replace(grouped.config, use_prefix_tree=False)
    config = dataclasses.replace(grouped.config, use_prefix_grouping=False)
    repeated = GRPOTrainer(copy.deepcopy(grouped.model), reward_funcs, dataset, config, tokenizer)
    result = compare_grouping(grouped, repeated, progress=grouped.config.progress and grouped.rank == 0)
    if grouped.rank == 0:
        print_comparison(result)
    return 0
