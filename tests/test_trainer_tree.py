"""The trainer's prefix-tree micro-batches (use_prefix_tree) on multi-turn conversations: the same
update as the grouped and repeated batches, the tokens saved, the option, conversational prompts and
``pyfastrl train --task multi-turn``."""
import copy
import json

import pytest
import torch

from pyfastrl.cli import main
from pyfastrl.integrations.transformers import GroupedBatch, TreeBatch
from pyfastrl.trainer import GRPOConfig, GRPOTrainer, default_task
from pyfastrl.trainer.batches import grouped_tokens, tree_tokens
from pyfastrl.trainer.command import load_jsonl
from pyfastrl.trainer.prompts import encode_prompt
from test_trainer import _exact_rmsnorm  # float64 RMSNorm (transformers' computes in float32)

TURNS = default_task.TURNS


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops gain nothing from intra-op threads (as `pyfastrl train` runs it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, model=None, rewards=default_task.letter_reward, dataset=None, **overrides):
    """A small multi-turn trainer: two conversations (2 x TURNS rows) per step, one per micro-batch."""
    tokenizer = default_task.build_tokenizer()
    options = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2 * TURNS,
                   gradient_accumulation_steps=2, num_generations=2, max_completion_length=6, progress=False,
                   plot=False, backend="torch", seed=0, logging_steps=1, save_steps=0)
    config = default_task.multi_turn_config(**{**options, **overrides})
    model = default_task.build_model(tokenizer) if model is None else model
    return GRPOTrainer(model, rewards, dataset or default_task.build_conversations(4 * TURNS), config, tokenizer)


def _varied_reward(prompts, completions, **_):
    """Differs between random completions (given as assistant messages: the prompts are conversations)."""
    return [len(c[0]["content"]) + sum(map(ord, c[0]["content"])) % 5 for c in completions]


def test_tree_grouped_and_repeated_steps_give_the_same_update(tmp_path, monkeypatch):
    """Same rollout of multi-turn rows, same initial model, float64: the prefix-tree step (old and
    reference log-probs too) equals the grouped and the repeated-prompt ones, on fewer tokens."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _exact_rmsnorm)  # float64 all the way
    model = default_task.build_model(default_task.build_tokenizer(), dtype=torch.float64)
    options = dict(rewards=_varied_reward, dtype="float64", learning_rate=1e-3, beta=0.04, num_iterations=2)
    trainers = {"tree": _trainer(tmp_path, model=copy.deepcopy(model), **options),
                "grouped": _trainer(tmp_path, model=copy.deepcopy(model), use_prefix_tree=False, **options),
                "repeated": _trainer(tmp_path, model=copy.deepcopy(model), use_prefix_grouping=False, **options)}
    tree = trainers["tree"]
    rollout = tree.generate_rollout(tree._rows_for_rollout(0))
    assert rollout.advantages.abs().sum() > 0
    prompts = [p for p, _ in tree._micro_batches(rollout)]
    assert isinstance(tree._build_batch(rollout.prompt_ids[prompts[0]], rollout.completion_ids[prompts[0]]),
                      TreeBatch)
    grouped = trainers["grouped"]
    assert isinstance(grouped._build_batch(rollout.prompt_ids[prompts[0]], rollout.completion_ids[prompts[0]]),
                      GroupedBatch)
    # The old and reference log-probs the tree trainer took equal the grouped batches'.
    for taken, again in zip(rollout.old_logprobs + rollout.ref_logprobs,
                            sum(grouped._logprobs([grouped.policy, grouped.ref_policy], rollout), [])):
        torch.testing.assert_close(taken, again, atol=1e-12, rtol=0)

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = {name: trainer.optimize(rollout) for name, trainer in trainers.items()}
    assert metrics["tree"]["model_tokens"] < metrics["grouped"]["model_tokens"] < metrics["repeated"]["model_tokens"]
    logged = tree._rollout_metrics(rollout)
    assert (logged["tokens_tree"], logged["tokens_grouped"], logged["tokens_repeated"]) == tuple(
        metrics[name]["model_tokens"] for name in ("tree", "grouped", "repeated"))
    reference = trainers["tree"].model.state_dict()
    moved = 0
    for name in ("grouped", "repeated"):
        assert abs(metrics[name]["loss"] - metrics["tree"]["loss"]) < 1e-12, name
        other = trainers[name].model.state_dict()
        for key in reference:
            update, other_update = reference[key] - initial[key], other[key] - initial[key]
            moved += int(update.abs().max() > 0)
            torch.testing.assert_close(other_update, update, atol=1e-11, rtol=0, msg=lambda m: f"{name} {key}: {m}")
    assert moved > len(reference)  # most parameters moved (counted twice)


def test_a_conversation_shares_a_micro_batch_and_its_earlier_turns_are_stored_once(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    tokenizer = trainer.tokenizer
    per_micro_batch = trainer.config.per_device_train_batch_size // trainer.config.num_generations
    for rollout in range(3):  # the rows in dataset order: conversation by conversation
        rows = trainer._rows_for_rollout(rollout)
        for start in range(0, len(rows), per_micro_batch):
            conversation = rows[start:start + per_micro_batch]
            ids = [encode_prompt(tokenizer, row["prompt"]) for row in conversation]
            assert all(later[:len(ids[k])] == ids[k] for k, later in enumerate(ids[1:]))  # turn k's prompt: a prefix
            # and ends with the letter it asks for (as the letter task's prompts do: what the tiny model learns)
            assert all(tokenizer.decode(i).endswith(f"Character: {row['letter']}") for i, row in zip(ids, conversation))
    # Completions starting with tokens no prompt continues with: the tree holds the last turn's prompt once.
    prompt_ids = [torch.tensor(i) for i in ids]
    g = trainer.config.num_generations
    completion_ids = [[torch.tensor([40 + j, 3]) for j in range(g)] for _ in prompt_ids]
    completions = 2 * g * len(prompt_ids)
    assert grouped_tokens(prompt_ids, completion_ids) == sum(map(len, ids)) + completions
    assert tree_tokens(prompt_ids, completion_ids) == len(ids[-1]) + completions
    # The built-in multi-turn run: a conversation per micro-batch, as many completions per step as the letter run.
    config = default_task.multi_turn_config()
    assert config.per_device_train_batch_size // config.num_generations == TURNS
    assert config.completions_per_step == default_task.default_config().completions_per_step


def test_options_are_validated_and_a_resume_may_change_use_prefix_tree():
    for name in ("use_prefix_tree", "shuffle_dataset", "use_prefix_grouping"):
        with pytest.raises(ValueError, match=f"{name} must be True or False"):
            GRPOConfig(**{name: "yes"})
    config = GRPOConfig()
    assert config.use_prefix_tree and config.shuffle_dataset  # on by default; TRL's default for shuffle_dataset
    assert default_task.default_config().use_prefix_tree is False  # the documented letter run is unchanged
    saved = GRPOConfig(use_prefix_tree=False).to_dict()
    assert config.differences(saved) == []  # the batch layout, not the optimisation
    older = {k: v for k, v in saved.items() if k not in ("use_prefix_tree", "shuffle_dataset")}
    assert config.differences(older) == []  # options a checkpoint predates count as their defaults
    assert GRPOConfig(shuffle_dataset=False).differences(older) == ["shuffle_dataset: checkpoint True, now False"]


def test_conversational_prompts(tmp_path):
    tokenizer = default_task.build_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Character: b"}]
    ids = encode_prompt(tokenizer, messages)
    assert tokenizer.decode(ids) == "system: Be brief.\nuser: Character: b"  # the letter last, as in the letter task
    answered = messages + [{"role": "assistant", "content": "bb"}, {"role": "user", "content": "Character: c"}]
    rendered = tokenizer.decode(encode_prompt(tokenizer, answered))
    assert rendered == "system: Be brief.\nuser: Character: bbb\nuser: Character: c"  # the reply runs on
    assert encode_prompt(tokenizer, "abc") == tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert default_task.letter_reward(None, [[{"role": "assistant", "content": "bbx"}], "bb"], ["b", "b"]) == [2 / 3, 1]

    seen = {}

    def recording(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return [0.0] * len(completions)

    trainer = _trainer(tmp_path, rewards=recording)
    rows = [{"prompt": messages, "letter": "b"}, {"prompt": "plain", "letter": "a"}]
    trainer._rewards(rows, ["x", "y", "z", "w"])
    assert seen["prompts"][0] is messages and seen["prompts"][2] == "plain"
    assert seen["completions"] == [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}],
                                   "z", "w"]  # TRL's form: assistant messages for conversational prompts
    assert seen["letter"] == ["b", "b", "a", "a"]

    no_template = default_task.build_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="this tokenizer has none"):
        encode_prompt(no_template, messages)
    with pytest.raises(ValueError, match=r"train_dataset\[1\] needs a non-empty 'prompt'"):
        _trainer(tmp_path, dataset=[{"prompt": "ok"}, {"prompt": [{"role": "user"}]}] * 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": messages}) + "\n" + json.dumps({"prompt": ["hi"]}) + "\n")
    with pytest.raises(ValueError, match="line 2 needs a non-empty 'prompt'"):
        load_jsonl(str(bad))


def test_multi_turn_task_from_the_command_line(tmp_path, capsys):
    (tmp_path / "quick.toml").write_text("plot = false\nprogress = false\nlogging_steps = 1\n")
    common = ["--task", "multi-turn", "--max-steps", "2", "--warm-up-steps", "2", "--config", str(tmp_path / "quick.toml")]
    assert main(["train", *common, "--output-dir", str(tmp_path / "tree")]) == 0
    text = capsys.readouterr().out
    assert "multi-turn letter task" in text and "prefix trees (a micro-batch's shared prefixes stored once) hold" in text
    records = [json.loads(line) for line in (tmp_path / "tree" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["model_tokens"] == r["tokens_tree"] < r["tokens_grouped"] / 2 for r in records), records
    assert main(["train", *common, "--no-prefix-tree", "--output-dir", str(tmp_path / "grouped")]) == 0
    assert "prefix trees" not in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "grouped" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["model_tokens"] == r["tokens_grouped"] for r in records), records
    assert main(["train", "--task", "multi-turn", "--dataset", "x.jsonl", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--task chooses the built-in default's task" in capsys.readouterr().err


def test_compare_grouping_compares_one_level_grouped_batches(tmp_path, capsys):
    from pyfastrl.trainer.compare_grouping import run_comparison

    trainer = _trainer(tmp_path, max_steps=1)
    assert run_comparison(trainer, [default_task.letter_reward], trainer.dataset, trainer.tokenizer) == 0
    assert "compared over 1 steps" in capsys.readouterr().out
    prompts, _ = next(trainer._micro_batches(trainer.rollout))  # a conversation, stored grouped
    assert isinstance(trainer._build_batch(trainer.rollout.prompt_ids[prompts], trainer.rollout.completion_ids[prompts]),
                      GroupedBatch)


def test_only_prompts_sharing_more_than_themselves_make_a_tree():
    """Completions of unrelated prompts that merely start alike keep the grouped batch; prompts that
    share a prefix (or repeat) make a tree, which then also shares the completions' first tokens."""
    from pyfastrl.trainer import batches

    def build(prompts, completions):
        return batches.build_micro_batch([torch.tensor(p) for p in prompts],
                                         [[torch.tensor(c) for c in group] for group in completions], grouped=True,
                                         use_prefix_tree=True, padding_side="right", pad_token_id=0, device="cpu")

    alike = [[7, 8, 9], [7, 5]]  # every completion starts with 7
    assert isinstance(build([[1, 2, 3], [4, 5, 6]], [alike, alike]), GroupedBatch)
    shared = build([[1, 2, 3], [1, 2, 3, 4, 5]], [alike, alike])
    assert isinstance(shared, TreeBatch)
    assert batches.stored_tokens(shared) == 5 + 4 + 4 < grouped_tokens(
        [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3, 4, 5])], [[torch.tensor(c) for c in alike]] * 2)
    assert isinstance(build([[1, 2, 3], [1, 2, 3]], [alike, alike]), TreeBatch)  # identical prompts


def test_a_rollouts_micro_batches_are_built_once(tmp_path, monkeypatch):
    """Old and reference log-probs and every update of a reused rollout share its micro-batches (a
    tree's trie and kernel tables are not rebuilt); the next rollout builds its own."""
    from pyfastrl.trainer import batches

    built = []
    real = batches.build_micro_batch
    monkeypatch.setattr(batches, "build_micro_batch", lambda *a, **k: built.append(1) or real(*a, **k))
    trainer = _trainer(tmp_path, max_steps=4, num_iterations=2, beta=0.04)
    trainer.train()
    assert len(built) == 2 * 2  # two rollouts of two micro-batches; 4 updates, 2 x (old + ref) log-prob passes
