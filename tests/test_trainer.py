"""The thin GRPO trainer and ``pyfastrl train``: end to end on the built-in default, grouped vs
repeated steps, exact resume, bad input."""
import copy
import json
import os

import pytest
import torch

from pyfastrl.cli import main
from pyfastrl.trainer import GRPOConfig, GRPOTrainer, load_config_file
from pyfastrl.trainer import default_task
from pyfastrl.trainer.command import load_jsonl


def _trainer(tmp_path, model=None, rewards=default_task.letter_reward, dataset=None, **overrides):
    tokenizer = default_task.build_tokenizer()
    options = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                   gradient_accumulation_steps=2, num_generations=4, max_completion_length=6, progress=False,
                   plot=False, backend="torch")
    config = default_task.default_config(**{**options, **overrides})
    model = default_task.build_model(tokenizer) if model is None else model
    return GRPOTrainer(model, rewards, dataset or default_task.build_dataset(64), config, tokenizer)


def test_default_command_trains_and_writes_metrics_plot_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--output-dir", str(out), "--max-steps", "4"]) == 0
    text = capsys.readouterr().out
    assert "mean reward: first" in text and "tokens through the model" in text and "x fewer" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert {"reward", "kl", "clip_ratio", "tokens_per_s", "step_time", "tokens_grouped"} <= set(records[0])
    assert records[0]["tokens_grouped"] < records[0]["tokens_repeated"]
    assert (out / "metrics.png").stat().st_size > 1000
    assert (out / "checkpoint-4" / "trainer_state.pt").is_file()
    # Nothing already written is overwritten: the same output directory is refused without --resume.
    assert main(["train", "--output-dir", str(out), "--max-steps", "4"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_parameters_change_and_reward_improves_on_the_default_task(tmp_path):
    trainer = _trainer(tmp_path, max_steps=30, learning_rate=1e-2, beta=0.0, num_iterations=1)
    before = copy.deepcopy(trainer.model.state_dict())
    summary = trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert summary["final_reward"] > summary["first_reward"] + 0.05, summary


def _varied_reward(prompts, completions, **_):
    """A reward that differs between any two random completions (the letter reward is 0 at init)."""
    return [len(c) + sum(map(ord, c)) % 5 for c in completions]


def _exact_rmsnorm(self, hidden):
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("options", [dict(loss_type="dapo", beta=0.04, num_iterations=2),
                                     dict(loss_type="grpo", importance_sampling_level="sequence")],
                         ids=["dapo_kl_old", "grpo_gspo"])
def test_grouped_and_repeated_steps_give_the_same_update(tmp_path, monkeypatch, options):
    """Same rollout, same initial model, float64: the prefix-grouped step equals the repeated-prompt one."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _exact_rmsnorm)  # float64 all the way
    tokenizer = default_task.build_tokenizer()
    model = default_task.build_model(tokenizer, dtype=torch.float64)
    grouped = _trainer(tmp_path, model=copy.deepcopy(model), rewards=_varied_reward, dtype="float64",
                       learning_rate=1e-3, **options)
    repeated = _trainer(tmp_path, model=copy.deepcopy(model), rewards=_varied_reward, dtype="float64",
                        learning_rate=1e-3, use_prefix_grouping=False, **options)
    rollout = grouped.generate_rollout(grouped._rows_for_rollout(0))
    assert rollout.advantages.abs().sum() > 0
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    grouped_metrics = grouped.optimize(rollout)
    repeated_metrics = repeated.optimize(rollout)
    assert grouped_metrics["model_tokens"] < repeated_metrics["model_tokens"]
    assert abs(grouped_metrics["loss"] - repeated_metrics["loss"]) < 1e-12
    a, b = grouped.model.state_dict(), repeated.model.state_dict()
    moved = 0
    for name in a:
        update_a, update_b = a[name] - initial[name], b[name] - initial[name]
        moved += int(update_a.abs().max() > 0)
        torch.testing.assert_close(update_a, update_b, atol=1e-11, rtol=0, msg=lambda m: f"{name}: {m}")
    assert moved > len(a) // 2


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    whole = _trainer(tmp_path / "a", max_steps=4, num_iterations=2)
    whole.train()
    first = _trainer(tmp_path / "b", max_steps=4, num_iterations=2, save_steps=1)
    first.config.max_steps = 3  # interrupted after step 3, mid-way through a reused rollout
    first.train()
    resumed = _trainer(tmp_path / "b", max_steps=4, num_iterations=2, save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-3"))
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert [r["reward"] for r in resumed.history] == [r["reward"] for r in whole.history]


def test_resume_refuses_another_config_and_later_checkpoints(tmp_path):
    _trainer(tmp_path, max_steps=2, save_steps=1).train()
    with pytest.raises(ValueError, match="another config: learning_rate"):
        _trainer(tmp_path, max_steps=2, learning_rate=0.5).train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="would overwrite the later checkpoints"):
        _trainer(tmp_path, max_steps=3, save_steps=1).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


def _raises(*args, **kwargs):
    raise KeyError("boom")


@pytest.mark.parametrize("reward, match", [
    (_raises, "reward function _raises raised KeyError"),
    (lambda prompts, completions, **_: [1.0], "returned 1 values for"),
    (lambda prompts, completions, **_: [float("nan")] * len(completions), "returned nan for completion 0"),
], ids=["raises", "wrong_length", "nan"])
def test_bad_reward_functions_are_named(tmp_path, reward, match):
    trainer = _trainer(tmp_path, rewards=reward)
    with pytest.raises((RuntimeError, ValueError), match=match):
        trainer.train()


def test_bad_configs_and_datasets(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be an integer >= 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_jsonl(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        load_jsonl(str(tmp_path / "missing.jsonl"))
    (tmp_path / "c.toml").write_text("learning_rat = 1.0\n")
    with pytest.raises(ValueError, match="unknown option\\(s\\) learning_rat"):
        load_config_file(str(tmp_path / "c.toml"))
    (tmp_path / "c.yaml").write_text("learning_rate: 0.5\nmax_steps: 7\n")
    assert load_config_file(str(tmp_path / "c.yaml")) == {"learning_rate": 0.5, "max_steps": 7}
    from pyfastrl.trainer.command import _load_model

    default_task.build_model(default_task.build_tokenizer()).save_pretrained(tmp_path / "m")  # no tokenizer
    with pytest.raises(ValueError, match="has no usable tokenizer"):
        _load_model(str(tmp_path / "m"), torch.device("cpu"))


def test_local_model_and_dataset_from_the_command_line(tmp_path, capsys):
    tokenizer = default_task.build_tokenizer()
    default_task.build_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"Say {c}:", "answer": c} for c in "abcdabcd"]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.toml").write_text("max_steps = 2\nper_device_train_batch_size = 8\nnum_generations = 4\n"
                                          "max_completion_length = 4\nplot = false\n")
    code = main(["train", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.jsonl"),
                 "--reward", "contains", "--config", str(tmp_path / "config.toml"),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")


def test_two_processes_over_gloo(tmp_path):
    """``torchrun --nproc_per_node 2``: DistributedDataParallel on CPU over gloo, metrics reduced."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pyfastrl.cli", "train",
               "--output-dir", str(out), "--max-steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 process(es)" in result.stdout and result.stdout.count("done: 2 steps") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["tokens_repeated"] > r["tokens_grouped"] for r in records)
    # Reduced over both processes: 2 x 8 prompts of the instruction + " x", each once in the grouped batch.
    prompt_tokens = len(default_task.INSTRUCTION) + 2
    assert all(r["tokens_grouped"] - r["completion_tokens"] == 16 * prompt_tokens for r in records)
