"""pyfastrl.integrations.trl.GRPOTrainer against stock trl.GRPOTrainer: the same training run (same seed,
so the same completions and rewards) must give the same losses, metrics and parameters."""
import math
import os
import warnings

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
trl = pytest.importorskip("trl")  # requirements-cpu.txt pins it (CI); a GPU machine may lack it
Dataset = pytest.importorskip("datasets").Dataset

from pyfastrl.integrations import trl as pftrl  # noqa: E402
from pyfastrl.trainer import default_task  # noqa: E402

PROMPTS = ["Say a:", "Write the letter b please:", "c?", "Repeat d four times, then stop:"]
# Wall-clock metrics differ between any two runs.
TIMINGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _reward(completions, **_):
    return [(sum(map(ord, text)) % 7) / 6 for text in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and the bundled character-level tokenizer, saved where TRL loads from (it builds
    the reference model from the same path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = default_task.build_tokenizer()
    default_task.build_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _train(trainer_class, model_dir, output_dir, **options):
    """Two optimizer steps on one rollout (num_iterations=2: the second is off-policy, so ratios, clipping
    and KL are live), two accumulated micro-batches of 4 shuffled rows each; SGD so that the parameter change
    is the gradient itself."""
    config = dict(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, seed=0,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4, num_iterations=2,
                  max_completion_length=6, max_steps=2, beta=0.1, epsilon_high=0.28, learning_rate=3.0, optim="sgd",
                  logging_steps=1, save_strategy="no")
    config.update(options)
    from transformers import AutoTokenizer

    trainer = trainer_class(model=model_dir, reward_funcs=_reward, args=trl.GRPOConfig(**config),
                            train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                            processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, steps, parameters


def _counted(monkeypatch, name):
    calls = []
    original = getattr(pftrl, name)

    def counting(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(pftrl, name, counting)
    return calls


def _assert_same_run(stock, ours):
    (_, stock_steps, stock_params), (_, our_steps, our_params) = stock, ours
    assert len(stock_steps) == len(our_steps) >= 1
    for step, (want, got) in enumerate(zip(stock_steps, our_steps)):
        assert set(want) == set(got), f"step {step}: metric names differ"
        for name, value in want.items():
            if name in TIMINGS:
                continue
            assert math.isclose(got[name], value, rel_tol=2e-5, abs_tol=2e-6), (step, name, value, got[name])
    worst = max((our_params[n] - stock_params[n]).abs().max().item() for n in stock_params)
    assert worst <= 2e-6, f"parameters differ by up to {worst}"


# grpo with TRL's mask_truncated_completions: most completions hit max_completion_length, so most rows are
# fully masked (kept in the grouped batch with one token, weight 0).
@pytest.mark.parametrize("options", [dict(loss_type="grpo", mask_truncated_completions=True),
                                     dict(loss_type="dapo")], ids=["grpo_mask_truncated", "dapo"])
def test_training_equals_stock_trl(model_dir, tmp_path, monkeypatch, options):
    stock = _train(trl.GRPOTrainer, model_dir, tmp_path / "stock", **options)
    fused = _counted(monkeypatch, "fused_linear_grpo_loss")
    scored = _counted(monkeypatch, "selective_logprobs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _train(pftrl.GRPOTrainer, model_dir, tmp_path / "ours", **options)
    assert not [w for w in caught if "pyfastrl GRPOTrainer" in str(w.message)]
    trainer, steps, _ = ours
    assert trainer.model.config._attn_implementation == "pyfastrl_prefix"
    # 4 micro-batches through the fused loss; old and reference log-probs of the rollout (in chunks of 4 rows)
    # and the current ones for the clip metrics of each micro-batch.
    assert len(fused) == 4 and len(scored) == 2 * 2 + 4
    # Not a vacuous comparison: the second step is off-policy and clips, and the KL is live.
    assert steps[1]["clip_ratio/region_mean"] > 0 and steps[1]["kl"] > 0 and steps[1]["loss"] != 0
    _assert_same_run(stock, ours)
    # The completions and rewards were the same too (same seed, same sampling).
    assert list(stock[0]._logs["completion"]) == list(trainer._logs["completion"])


def test_unsupported_loss_falls_back_with_one_warning(model_dir, tmp_path):
    # One optimizer step (two micro-batches: the warning must still come once).
    stock = _train(trl.GRPOTrainer, model_dir, tmp_path / "stock", loss_type="sapo", max_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _train(pftrl.GRPOTrainer, model_dir, tmp_path / "ours", loss_type="sapo", max_steps=1)
    ours_warnings = [str(w.message) for w in caught if "pyfastrl GRPOTrainer" in str(w.message)]
    assert len(ours_warnings) == 1 and "loss_type='sapo'" in ours_warnings[0]
    # The loss is TRL's; the old and reference log-probs still come from the grouped batches.
    _assert_same_run(stock, ours)


def _padded(rows, width, left, pad=0):
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def test_group_rows_packs_each_prompt_once():
    # Two prompts, members shuffled as TRL's micro-batches are; row 3's completion is fully masked
    # (mask_truncated_completions) but keeps its first token.
    prompt_a, prompt_b = [5, 6, 7], [8, 9]
    prompt_ids, prompt_mask = _padded([prompt_a, prompt_b, prompt_a, prompt_b], 4, left=True)
    completion_ids, completion_mask = _padded([[10, 11], [12], [13, 14, 15], [16, 17]], 3, left=False)
    completion_mask[3] = 0
    grouping = pftrl._group_rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert grouping.order.tolist() == [0, 2, 1, 3]
    assert grouping.batch.input_ids[0].tolist() == [5, 6, 7, 10, 11, 13, 14, 15, 8, 9, 12, 16]
    assert grouping.batch.layout.total_tokens == 12
    assert grouping.cu_seqlens.tolist() == [0, 2, 5, 6, 7]
    # Each completion token is predicted one position earlier; the first at its prompt's end.
    assert grouping.batch.logit_index.tolist() == [2, 3, 2, 5, 6, 9, 9]
    assert grouping.batch.target_ids.tolist() == [10, 11, 13, 14, 15, 12, 16]
    values = torch.randn(completion_ids.shape)
    round_trip = grouping.unpacked(grouping.packed(values), completion_mask)
    assert torch.equal(round_trip, torch.where(completion_mask != 0, values, 0.0))


def test_group_rows_refuses_holes_in_masks():
    prompt_ids, prompt_mask = _padded([[5, 6, 7]], 3, left=True)
    completion_ids, completion_mask = _padded([[10, 11, 12]], 3, left=False)
    completion_mask[0, 1] = 0
    reason = pftrl._group_rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert isinstance(reason, str) and "right-padded" in reason


def test_unsupported_models_are_named():
    from pyfastrl.integrations.transformers import tiny_model

    assert pftrl._unsupported_model_reason(tiny_model("tiny-llama")) is None
    softcapped = tiny_model("tiny-gemma2", final_logit_softcapping=30.0)
    assert "final_logit_softcapping" in pftrl._unsupported_model_reason(softcapped)
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert "'gpt2' is not verified" in pftrl._unsupported_model_reason(gpt2)
