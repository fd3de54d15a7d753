"""``pyfastrl train``: the thin trainer on the command line (the built-in default, or a local model and
a JSONL dataset)."""
from __future__ import annotations

import argparse
import importlib
import json
import os

from pyfastrl.trainer.config import DISTRIBUTED
from pyfastrl.trainer.prompts import check_prompt, completion_text

DESCRIPTION = """\
Train with GRPO through pyfastrl's ops (prefix-grouped policy forward, fused GRPO loss).

With no arguments it trains the built-in default: a tiny randomly initialised Llama with a bundled
character-level tokenizer, on a synthetic task with a verifiable reward (repeat the letter named at
the end of a long shared instruction), on whatever device is there (a 2-core CPU: ~1-2 min). A short
supervised warm-up first teaches the answer's format (a letter repeated, chosen at random: reward
~0.25); GRPO then learns to pick the prompt's letter. Writes metrics.jsonl, metrics.png and
checkpoint-<step>/ under --output-dir.

--task multi-turn trains the same model on multi-turn conversations instead (a conversation's turns
as successive rows of one micro-batch, its earlier turns stored once in a prefix-tree batch; each
turn's prompt ends with its letter: reward ~0.6 after the warm-up, ~1 after GRPO).

A real run: --model DIR (a local transformers causal-LM directory with its tokenizer), --dataset
FILE.jsonl (one JSON object per line with a "prompt", a string or a list of {"role", "content"}
messages rendered by the tokenizer's chat template, and the fields the rewards read) and
--reward (built-in name or module:function, repeatable). Every GRPOConfig option can be set in
--config FILE (.toml, .yaml or .json); the flags below override it.

--attention lla trains a local linear attention policy instead (the built-in model or --model switched
to it), on repeated-prompt batches: there is no prefix-grouped LLA op.
"""
BUILTIN_REWARDS = ("letter", "exact_match", "contains")
ATTENTIONS = ("softmax", "lla")
BUILTIN_TASKS = ("letter", "multi-turn")


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="GRPO training (built-in default, or --model/--dataset)",
                                description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--model", help="local transformers causal-LM directory (default: the built-in tiny model)")
    train.add_argument("--dataset", help="JSONL file of rows with a 'prompt' (default: the built-in task)")
    train.add_argument("--reward", action="append", default=None,
                       help="reward function, repeatable: a built-in name (letter: fraction of characters equal "
                       "to row['letter']; exact_match: completion.strip() == row['answer']; contains: "
                       "row['answer'] in completion) or module:function taking (prompts, completions, **columns) "
                       "(default: letter)")
    train.add_argument("--config", help="options file (.toml/.yaml/.json) with GRPOConfig fields")
    train.add_argument("--output-dir", help="where metrics, plot and checkpoints go (default pyfastrl-output)")
    train.add_argument("--max-steps", type=int, help="optimizer steps")
    train.add_argument("--learning-rate", type=float, help="AdamW learning rate")
    train.add_argument("--num-generations", type=int, help="completions per prompt (G >= 2)")
    train.add_argument("--warm-up-steps", type=int, default=None, metavar="N",
                       help="built-in default only: supervised steps on the answer's format before GRPO "
                       "(default 80; 0 skips it: GRPO alone from the random model then ends near 0.1)")
    train.add_argument("--task", choices=BUILTIN_TASKS, default=None,
                       help="built-in default only: letter (the default: one prompt per row) or multi-turn "
                       "(conversations of 4 turns, a turn per row, a conversation per micro-batch)")
    train.add_argument("--no-grouping", action="store_true",
                       help="run the policy on the repeated-prompt batch instead of the prefix-grouped one")
    train.add_argument("--no-prefix-tree", action="store_true",
                       help="keep one-level grouped batches where a prefix tree would store fewer tokens (prompts "
                       "sharing earlier turns); the built-in letter task always does")
    train.add_argument("--compare-grouping", action="store_true",
                       help="train the grouped and the --no-grouping run side by side (interleaved step by step, "
                       "same model, data and seed) and print the token ratio and the measured time ratio; "
                       "writes no checkpoints")
    train.add_argument("--attention", choices=ATTENTIONS, default="softmax",
                       help="the policy's attention: softmax (the model's own) or lla: every attention layer "
                       "switched to local linear attention (enable_local_linear_attention, its per-head ridge "
                       "lambdas trained too; before the built-in warm-up), sampled through its KV-cache decode "
                       "path and trained on repeated-prompt batches (it has no prefix-grouped op)")
    train.add_argument("--ridge-lambda", type=float, default=None, metavar="LAMBDA",
                       help="with --attention lla: the initial ridge lambda of every head (default 1.0; the "
                       "larger, the closer to softmax attention)")
    train.add_argument("--distributed", choices=DISTRIBUTED,
                       help="under torchrun --nproc_per_node N: ddp (DistributedDataParallel, a full replica per "
                       "process; the default) or fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state "
                       "sharded over the processes, each decoder layer gathered only while it runs)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                       help="resume from CHECKPOINT, or the latest checkpoint in --output-dir")
    train.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")
    train.add_argument("--seed", type=int, help="random seed")
    train.set_defaults(run=run)


def load_jsonl(path: str) -> list:
    """Rows of a JSONL file; a missing file or a malformed line is an error naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"--dataset: no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--dataset: {path} line {number} is not valid JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"--dataset: {path} line {number} needs a JSON object, got {type(row).__name__}")
            check_prompt(row.get("prompt"), f"--dataset: {path} line {number}")
            rows.append(row)
    if not rows:
        raise ValueError(f"--dataset: {path} holds no rows")
    return rows


def _exact_match(prompts, completions, answer, **_):
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def _contains(prompts, completions, answer, **_):
    return [float(str(a) in completion_text(c)) for c, a in zip(completions, answer)]


def resolve_reward(spec: str):
    from pyfastrl.trainer.default_task import letter_reward

    builtin = {"letter": letter_reward, "exact_match": _exact_match, "contains": _contains}
    if spec in builtin:
        return builtin[spec]
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--reward: {spec!r} is neither a built-in ({', '.join(builtin)}) nor module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--reward: cannot load {spec}: {error}") from None


def _load_model(path: str, device):
    import transformers

    if not os.path.isdir(path):
        raise ValueError(f"--model: {path} is not a directory (only local models: there are no downloads)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise ValueError(f"--model: {path} has no usable tokenizer ({type(error).__name__}: {error})") from None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.to(device), tokenizer


def _switch_attention(model, args):
    """The model with ``--attention``: as it is, or switched to local linear attention in place; a
    ``--model`` directory saved with local linear attention (a checkpoint of an ``--attention lla``
    run) gets its trained lambdas back."""
    if args.attention != "lla":
        return model
    from pyfastrl.integrations import transformers_lla

    saved = args.model is not None and bool(transformers_lla.saved_ridge_lambdas(args.model))
    if saved and args.ridge_lambda is not None:
        raise ValueError(f"--ridge-lambda: {args.model} holds trained lambdas (saved with local linear attention); "
                         "leave --ridge-lambda out to continue from them")
    ridge_lambda = 1.0 if args.ridge_lambda is None else args.ridge_lambda
    transformers_lla.enable_local_linear_attention(model, ridge_lambda=ridge_lambda)
    return transformers_lla.load_local_linear_attention(model, args.model) if saved else model


def run(args) -> int:
    import torch

    if args.model is not None or args.dataset is not None or "OMP_NUM_THREADS" in os.environ:
        return _train(args)
    # The built-in model's ops are too small to gain from intra-op threads, and on a busy CPU every
    # parallel region waits for a descheduled thread (2 cores at load ~13: ~9 s per step with 2
    # threads, ~1.3 s with one). Restored afterwards: tests call this in-process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # Launched by torchrun: one process per device (gloo on CPU, nccl on GPUs).
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"torchrun started a process with LOCAL_RANK={local_rank} but this node has "
                                 f"{torch.cuda.device_count()} GPU(s): one process per GPU, or --device cpu (gloo)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Torn down here, not at interpreter exit, where gloo's worker threads can still be joinable
        # while its destructor runs (seen as "terminate called without an active exception").
        try:
            result = _train_on(args, device)
            # Every rank done with its collectives (rank 0 may still be writing a checkpoint) before
            # any of them tears its group down: an early teardown is another way to that abort.
            torch.distributed.barrier()
            return result
        finally:
            torch.distributed.destroy_process_group()
    return _train_on(args, device)


def _train_on(args, device) -> int:
    import torch

    from pyfastrl.trainer import GRPOTrainer, load_config_file
    from pyfastrl.trainer import default_task

    options = load_config_file(args.config) if args.config else {}
    flags = {"output_dir": args.output_dir, "max_steps": args.max_steps, "learning_rate": args.learning_rate,
             "num_generations": args.num_generations, "seed": args.seed, "distributed": args.distributed}
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.ridge_lambda is not None and args.attention != "lla":
        raise ValueError("--ridge-lambda is for --attention lla")
    if args.attention == "lla" and args.compare_grouping:
        raise ValueError("--compare-grouping compares prefix grouping, which --attention lla does not have")
    if args.no_grouping or args.attention == "lla":
        options["use_prefix_grouping"] = False
    if args.no_prefix_tree:
        options["use_prefix_tree"] = False
    builtin = args.model is None and args.dataset is None
    if args.warm_up_steps is not None and (not builtin or args.warm_up_steps < 0):
        raise ValueError("--warm-up-steps must be >= 0" if builtin else
                         "--warm-up-steps is for the built-in default (a --model is trained as it is)")
    if args.task is not None and not builtin:
        raise ValueError("--task chooses the built-in default's task (--model/--dataset bring their own)")
    multi_turn = args.task == "multi-turn"
    if builtin:
        config = (default_task.multi_turn_config if multi_turn else default_task.default_config)(**options)
        tokenizer = default_task.build_tokenizer()
        model = _switch_attention(default_task.build_model(tokenizer, seed=config.seed).to(device), args)
        dataset = (default_task.build_conversations if multi_turn else default_task.build_dataset)(seed=config.seed)
        steps = default_task.WARM_UP_STEPS if args.warm_up_steps is None else args.warm_up_steps
        if steps:
            # Every process warms up alike (deterministic), so the reference model is the warmed-up one everywhere.
            losses = default_task.warm_up(model, tokenizer, dataset, steps=steps,
                                          completion_length=config.max_completion_length, seed=config.seed)
            if not (torch.distributed.is_initialized() and torch.distributed.get_rank() > 0):
                print(f"warm-up: {steps} supervised steps on the answer's format (a target letter repeated, drawn "
                      f"at random, not the prompt's): loss {losses[0]:.2f} -> {losses[-1]:.2f}", flush=True)
    else:
        from pyfastrl.trainer import GRPOConfig

        if args.model is None or args.dataset is None:
            raise ValueError("--model and --dataset go together (without both, the built-in default runs)")
        config = GRPOConfig(**options)
        model, tokenizer = _load_model(args.model, device)
        model = _switch_attention(model, args)
        dataset = load_jsonl(args.dataset)
    rewards = [resolve_reward(spec) for spec in (args.reward or ["letter"])]
    trainer = GRPOTrainer(model, rewards, dataset, config, tokenizer)
    what = (f"built-in tiny Llama on the {'multi-turn ' if multi_turn else ''}letter task" if builtin
            else f"{args.model} on {args.dataset}")
    what += " with local linear attention" if args.attention == "lla" else ""
    if trainer.rank == 0:
        print(f"training {what}: {config.max_steps} steps, {config.prompts_per_step * trainer.world_size} prompts x "
              f"{config.num_generations} completions per step over {trainer.world_size} process(es)"
              f"{f' ({config.distributed})' if trainer.world_size > 1 else ''}, device "
              f"{device}, output {config.output_dir}", flush=True)
    if args.compare_grouping:
        from pyfastrl.trainer.compare_grouping import run_comparison

        return run_comparison(trainer, rewards, dataset, tokenizer)
    summary = trainer.train(resume_from_checkpoint=args.resume)
    if trainer.rank == 0 and summary:
        _print_summary(summary, config)
    return 0


def _print_summary(summary: dict, config) -> None:
    saved = summary["tokens_repeated"] - summary["tokens_grouped"]
    ratio = summary["tokens_repeated"] / max(summary["tokens_grouped"], 1)
    trees = config.use_prefix_grouping and config.use_prefix_tree
    print(f"\ndone: {summary['steps']} steps in {summary['seconds']:.1f} s")
    print(f"mean reward: first {summary['window']} steps {summary['first_reward']:.3f} -> last {summary['window']} "
          f"steps {summary['final_reward']:.3f}")
    print(f"tokens through the model: repeated-prompt batches would hold {summary['tokens_repeated']:,} tokens, "
          f"grouped batches {'would ' if trees else ''}hold {summary['tokens_grouped']:,} ({saved:,} saved, "
          f"{ratio:.2f}x fewer)" + ("" if config.use_prefix_grouping else
                                   " [this run used the repeated batches]"))
    if trees:
        print(f"prefix trees (a micro-batch's shared prefixes stored once) hold {summary['tokens_tree']:,} tokens, "
              f"{summary['tokens_grouped'] / max(summary['tokens_tree'], 1):.2f}x fewer than the grouped batches")
    print(f"metrics: {os.path.join(config.output_dir, 'metrics.jsonl')}")
    if summary.get("plot"):
        print(f"plot:    {summary['plot']}")
    print(f"checkpoint: {os.path.join(config.output_dir, 'checkpoint-' + str(summary['steps']))}")
