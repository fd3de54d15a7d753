"""The trainer on a local linear attention ("pyfastrl_lla") policy: rollouts through the KV-cache decode
path, log-probs and loss through the model's own attention on left-padded repeated batches, checked
in float64 against each row run alone without a cache; ``pyfastrl train --attention lla``; bad
combinations. Prompts of a few characters keep every forward tiny."""
import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from pyfastrl.cli import main
from pyfastrl.integrations import transformers_lla
from pyfastrl.integrations.transformers_lla import enable_local_linear_attention
from pyfastrl.kernels.grpo_loss.reference import naive_grpo_loss
from pyfastrl.nn import LocalLinearAttention
from pyfastrl.trainer import GRPOTrainer, default_task
from test_trainer import _exact_rmsnorm, _varied_reward

# Unequal prompt lengths (6 to 10 tokens): every rollout left-pads some of them.
DATASET = [{"prompt": f"Say {'abcd'[i % 4] * (1 + i % 5)}:", "letter": "abcd"[i % 4]} for i in range(16)]


def _lla_model(dtype=torch.float32, ridge_lambda=0.5):
    return enable_local_linear_attention(default_task.build_model(default_task.build_tokenizer(), dtype=dtype),
                                         ridge_lambda=ridge_lambda)


def _trainer(tmp_path, model, ref_model=None, **overrides):
    options = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                   gradient_accumulation_steps=2, num_generations=4, max_completion_length=6, progress=False,
                   plot=False, backend="torch", seed=0, lr_scheduler_type="constant", logging_steps=1, save_steps=0)
    config = default_task.default_config(**{**options, **overrides})
    return GRPOTrainer(model, _varied_reward, DATASET, config, default_task.build_tokenizer(), ref_model=ref_model)


def _full_forward_logits(model, prompt, completion):
    """``(len(completion), V)`` logits predicting each completion token: ``[prompt ; completion]``
    alone (no padding) through the model, without a cache."""
    ids = torch.cat([prompt, completion])[None]
    return model(input_ids=ids, use_cache=False).logits[0, prompt.numel() - 1:-1]


def _count_decode_steps(monkeypatch) -> list:
    """The query shapes of every ``local_linear_attention_decode`` call from now on (each layer's decode step)."""
    calls = []
    decode = transformers_lla.local_linear_attention_decode

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return decode(*args, **kwargs)

    monkeypatch.setattr(transformers_lla, "local_linear_attention_decode", counting)
    return calls


def test_an_lla_policy_trains_with_its_own_attention(tmp_path, capsys, monkeypatch):
    decoded = _count_decode_steps(monkeypatch)
    model = _lla_model()
    ridge = model.model.layers[0].self_attn.local_linear_attention.log_ridge.detach().clone()
    trainer = _trainer(tmp_path, model, beta=0.04, num_iterations=2, learning_rate=1e-2)
    assert "local linear attention has no prefix-grouped op" in capsys.readouterr().out
    layers = [m for m in model.modules() if isinstance(m, LocalLinearAttention)]
    training_calls = []
    for layer in layers:
        layer.register_forward_hook(lambda *_: training_calls.append(torch.is_grad_enabled()))
    ref = trainer.ref_policy.model
    assert ref is not model and ref.config._attn_implementation == "pyfastrl_lla"
    assert sum(isinstance(m, LocalLinearAttention) for m in ref.modules()) == len(layers)
    summary = trainer.train()
    assert summary["steps"] == 3
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kl"], r["grad_norm"]])).all() for r in trainer.history)
    assert model.config._attn_implementation == "pyfastrl_lla"
    # Every loss forward (3 steps x 2 micro-batches) ran local linear attention in every layer, with grad.
    assert sum(training_calls) == 3 * 2 * len(layers)
    # The rollouts decoded through the KV cache: one query per row and step.
    assert decoded and all(shape[1:] == (4, 16) for shape in decoded)
    assert not torch.equal(model.model.layers[0].self_attn.local_linear_attention.log_ridge, ridge)


def test_rollout_sampling_through_the_cache_sees_the_full_forward_logits(tmp_path, monkeypatch):
    """float64 model: at every sampled token, the logits the rollout drew from (left-padded prompts,
    KV-cache decode steps) are those of the row alone run in full without a cache."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _exact_rmsnorm)
    decoded = _count_decode_steps(monkeypatch)
    model = _lla_model(torch.float64)
    trainer = _trainer(tmp_path, model, dtype="float64", temperature=0.7)
    generate, steps = model.generate, []

    def keeping_logits(**kwargs):
        out = generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        steps.append(torch.stack(out.logits, 1))  # (N, new tokens, V)
        return out.sequences

    monkeypatch.setattr(model, "generate", keeping_logits)
    rollout = trainer.generate_rollout(trainer._rows_for_rollout(0))
    (logits,) = steps
    assert len({p.numel() for p in rollout.prompt_ids}) > 1  # the prompts were padded
    assert len(decoded) == (logits.shape[1] - 1) * model.config.num_hidden_layers
    with torch.no_grad():
        for row, (prompt, completion) in enumerate((p, c) for p, cs in zip(rollout.prompt_ids, rollout.completion_ids)
                                                   for c in cs):
            want = _full_forward_logits(model, prompt, completion)
            got = logits[row, :completion.numel()]
            # generate() keeps its logits in float32: equal up to that rounding.
            assert ((got - want).abs().max() / want.abs().max()).item() <= torch.finfo(torch.float32).eps, row


def test_lla_logprobs_loss_and_gradients_equal_each_row_alone(tmp_path, monkeypatch):
    """float64: the rollout's old and reference log-probs, the step's loss and every parameter gradient
    (the ridge lambdas' too) equal TRL's loss on each [prompt ; completion] run alone without padding."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _exact_rmsnorm)
    model = _lla_model(torch.float64)
    options = dict(beta=0.04, num_iterations=2, temperature=0.7, epsilon=0.2, loss_type="dapo")
    trainer = _trainer(tmp_path, model, dtype="float64", max_grad_norm=1e9, **options)
    # Copied after the trainer cast the model to its dtype: the lambdas are created in float32.
    independent = copy.deepcopy(model)
    rollout = trainer.generate_rollout(trainer._rows_for_rollout(0))
    assert rollout.advantages.abs().sum() > 0
    rows = [(p, c) for p, cs in zip(rollout.prompt_ids, rollout.completion_ids) for c in cs]
    width = max(c.numel() for _, c in rows)
    logps = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, (prompt, completion) in enumerate(rows):
        logits = _full_forward_logits(independent, prompt, completion)
        log_probs = torch.log_softmax(logits / options["temperature"], -1)
        logps[row, :completion.numel()] = log_probs.gather(-1, completion[:, None])[:, 0]
        mask[row, :completion.numel()] = True
    for field in ("old_logprobs", "ref_logprobs"):
        # Rounding differences of the two batchings, amplified by the ridge solves' conditioning.
        torch.testing.assert_close(torch.cat(getattr(rollout, field)), logps[mask].detach(), atol=1e-9, rtol=0)
    want, _ = naive_grpo_loss(logps, mask, rollout.advantages.double(), logps.detach(), logps.detach(),
                              loss_type=options["loss_type"], beta=options["beta"], epsilon=options["epsilon"],
                              num_items_in_batch=int(mask.sum()))
    want.backward()
    grads = {}
    clip = torch.nn.utils.clip_grad_norm_

    def keeping_grads(parameters, max_norm):
        grads.update({name: p.grad.clone() for name, p in model.named_parameters()})
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", keeping_grads)
    metrics = trainer.optimize(rollout)
    assert abs(metrics["loss"] - want.item()) <= 1e-10 * max(1.0, abs(want.item()))
    assert metrics["model_tokens"] == sum(p.numel() + c.numel() for p, c in rows)  # no padding counted
    ridges = [n for n in grads if n.endswith("local_linear_attention.log_ridge")]
    assert len(ridges) == model.config.num_hidden_layers
    for name, parameter in independent.named_parameters():
        scale = parameter.grad.abs().max().item()
        assert scale > 0, name
        assert (grads[name] - parameter.grad).abs().max().item() <= 1e-8 * scale, name


def test_bad_combinations_are_refused(tmp_path):
    softmax = default_task.build_model(default_task.build_tokenizer())
    with pytest.raises(ValueError, match="runs 'pyfastrl_lla' attention but ref_model does not"):
        _trainer(tmp_path, _lla_model(), ref_model=copy.deepcopy(softmax), beta=0.04)
    with pytest.raises(ValueError, match="runs 'pyfastrl_prefix' attention but ref_model does not"):
        _trainer(tmp_path, copy.deepcopy(softmax), ref_model=_lla_model(), beta=0.04)
    switched_back = _lla_model()
    switched_back.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="model has LocalLinearAttention layers but runs 'sdpa' attention"):
        _trainer(tmp_path, switched_back)
    transformers_lla.register()
    softmax.set_attn_implementation("pyfastrl_lla")
    with pytest.raises(ValueError, match="no LocalLinearAttention layers"):
        _trainer(tmp_path, softmax)


@pytest.mark.parametrize("flags, message", [
    (["--ridge-lambda", "2"], "--ridge-lambda is for --attention lla"),
    (["--attention", "lla", "--compare-grouping"], "--compare-grouping compares prefix grouping"),
    (["--attention", "lla", "--ridge-lambda", "-1"], "ridge_lambda must be a positive finite number"),
], ids=["lambda_without_lla", "compare", "negative_lambda"])
def test_bad_attention_flags(tmp_path, capsys, flags, message):
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--warm-up-steps", "0", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_command_trains_the_builtin_job_with_lla(tmp_path, capsys):
    """``pyfastrl train --attention lla`` on the built-in task (one small step: its prompts are long)."""
    (tmp_path / "small.toml").write_text("per_device_train_batch_size = 8\ngradient_accumulation_steps = 1\n"
                                         "num_generations = 4\nmax_completion_length = 4\nplot = false\n"
                                         "progress = false\n")
    out = tmp_path / "out"
    assert main(["train", "--attention", "lla", "--ridge-lambda", "2", "--output-dir", str(out), "--max-steps", "1",
                 "--warm-up-steps", "1", "--config", str(tmp_path / "small.toml")]) == 0
    text = capsys.readouterr().out
    assert "with local linear attention" in text and "[this run used the repeated batches]" in text
    weights = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    ridges = [w for name, w in weights.items() if name.endswith("local_linear_attention.log_ridge")]
    assert len(ridges) == 2 and all(torch.isfinite(w).all() and (w - math.log(2.0)).abs().max() < 0.1
                                    for w in ridges)
    # Resuming it without --attention lla is refused naming the attention (before the config's other
    # differences: --attention lla also turned grouping off).
    assert main(["train", "--output-dir", str(out), "--max-steps", "2", "--warm-up-steps", "0",
                 "--config", str(tmp_path / "small.toml"), "--resume"]) == 2
    assert "the checkpoint's policy ran 'pyfastrl_lla' attention, this model runs 'pyfastrl_prefix'" in \
        capsys.readouterr().err


def test_saved_lambdas_come_back_with_load_local_linear_attention(tmp_path):
    """``from_pretrained`` drops the lambdas of a saved LLA model; ``load_local_linear_attention``
    restores them, and ``--model DIR --attention lla`` does so by itself."""
    import argparse

    import transformers

    from pyfastrl.trainer.command import _switch_attention

    model = _lla_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(transformers_lla.RIDGE_KEY):
                p.copy_(torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(transformers_lla.RIDGE_KEY)}
    model.save_pretrained(tmp_path / "saved")

    def reloaded():
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True)

    fresh = enable_local_linear_attention(reloaded())
    assert not any(torch.equal(dict(fresh.named_parameters())[n], w) for n, w in trained.items())  # dropped
    transformers_lla.load_local_linear_attention(fresh, tmp_path / "saved")
    assert all(torch.equal(dict(fresh.named_parameters())[n], w) for n, w in trained.items())
    args = argparse.Namespace(attention="lla", model=str(tmp_path / "saved"), ridge_lambda=None)
    switched = _switch_attention(reloaded(), args)
    assert all(torch.equal(dict(switched.named_parameters())[n], w) for n, w in trained.items())
    with pytest.raises(ValueError, match="--ridge-lambda: .* holds trained lambdas"):
        _switch_attention(reloaded(), argparse.Namespace(**{**vars(args), "ridge_lambda": 2.0}))
    # Bad uses name the problem.
    with pytest.raises(ValueError, match="no LocalLinearAttention layers"):
        transformers_lla.load_local_linear_attention(reloaded(), tmp_path / "saved")
    default_task.build_model(default_task.build_tokenizer()).save_pretrained(tmp_path / "softmax")
    with pytest.raises(ValueError, match="holds no"):
        transformers_lla.load_local_linear_attention(_lla_model(), tmp_path / "softmax")
    with torch.no_grad():  # a model with one layer fewer: the saved lambdas do not match it one for one
        smaller = reloaded()
        smaller.model.layers = smaller.model.layers[:1]
    with pytest.raises(ValueError, match="does not match the model's LLA layers"):
        transformers_lla.load_local_linear_attention(enable_local_linear_attention(smaller), tmp_path / "saved")


def test_the_multi_turn_warm_up_runs_an_lla_model():
    """``pyfastrl train --task multi-turn --attention lla``'s warm-up: prompts of unequal lengths, no
    right-padding mask (which local linear attention refuses)."""
    rows = default_task.build_conversations(seed=0)[:8]
    assert len({len(row["prompt"]) if isinstance(row["prompt"], str) else len(str(row["prompt"])) for row in rows}) > 1
    losses = default_task.warm_up(_lla_model(), default_task.build_tokenizer(), rows, steps=1, batch_size=4,
                                  completion_length=2)
    assert len(losses) == 1 and math.isfinite(losses[0])
