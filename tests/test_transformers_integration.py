"""Drop-in prefix grouping for transformers models: per architecture, the grouped batch gives the
repeated batch's completion log-probs and parameter gradients."""
import pytest
import torch

from pyfastrl.integrations import transformers as pft

ARCHITECTURES = list(pft.TINY_CONFIGS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_grouped_equals_repeated(name, padding_side, checkpointing, dtype):
    report = pft.verify_equivalence(name, dtype=dtype, group_size=3, num_prompts=2, prompt_len=20,
                                    completion_len=9, padding_side=padding_side,
                                    gradient_checkpointing=checkpointing, device="cpu")
    assert report.passed, report.summary()
    assert len(report.grad_rel) == sum(1 for _ in pft.tiny_model(name).parameters())
    assert report.tokens_grouped < report.tokens_repeated


def _exact_rmsnorm(self, hidden):
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("name, norm", [("tiny-llama", "llama.modeling_llama.LlamaRMSNorm"),
                                        ("tiny-mistral", "mistral.modeling_mistral.MistralRMSNorm"),
                                        ("tiny-qwen2", "qwen2.modeling_qwen2.Qwen2RMSNorm")])
def test_float64_is_exact_once_the_norm_keeps_float64(monkeypatch, name, norm):
    """transformers' RMSNorm computes in float32 even for float64 models; with a float64 norm the
    grouped and repeated gradients agree to float64 round-off, sliding windows included (Mistral
    and Qwen2's tiny windows are shorter than prompt + completion)."""
    import importlib

    module_name, class_name = norm.rsplit(".", 1)
    monkeypatch.setattr(getattr(importlib.import_module(f"transformers.models.{module_name}"), class_name), "forward",
                        _exact_rmsnorm)
    report = pft.verify_equivalence(name, dtype=torch.float64, group_size=4, prompt_len=24,
                                    completion_len=10, device="cpu", tolerance=1e-12)
    assert report.passed, report.summary()


def _rollout_logprobs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (16, 11)]
    completions = [[torch.randint(3, 96, (n,), generator=g) for n in sizes] for sizes in ([9, 4], [7, 10, 1])]
    with torch.no_grad():
        return pft.completion_logprobs(model, pft.build_grouped_batch(prompts, completions))[0]


@pytest.mark.parametrize("name, on, off", [
    *((name, {}, {"sliding_window": 4096}) for name in ("tiny-mistral", "tiny-qwen2", "tiny-gemma2", "tiny-gemma3",
                                                        "tiny-phi3")),
    ("tiny-gemma2", {"attn_logit_softcapping": 0.05}, {"attn_logit_softcapping": None}),
])
def test_tiny_configs_exercise_their_windows_and_caps(name, on, off):
    """The equivalence tests above are not vacuous: the tiny configs' windows (8 tokens, shorter
    than their rollouts) change the grouped log-probs, and so does Gemma2's soft-capping, which on
    a tiny random model's small scores binds only when scaled down (its real 50 changes ~1e-8)."""
    with_option = _rollout_logprobs(pft.tiny_model(name, dtype=torch.float64, **on))
    without = _rollout_logprobs(pft.tiny_model(name, dtype=torch.float64, **off))
    assert (with_option - without).abs().max() > 1e-4


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_binding_softcap_grouped_equals_repeated(padding_side):
    """Gemma2 with a soft-cap that binds on the tiny model's scores (and its sliding window):
    grouped vs transformers' eager attention on the repeated batch (SDPA would ignore the cap)."""
    model = pft.tiny_model("tiny-gemma2", dtype=torch.float64, attn_logit_softcapping=0.05)
    report = pft.verify_equivalence(model, group_size=3, prompt_len=20, completion_len=9, padding_side=padding_side)
    assert report.passed, report.summary()
    assert report.reference_attention == pft.EAGER_REFERENCE


def _grads_and_logprobs(model, batch):
    model.zero_grad(set_to_none=True)
    logprobs, mask, entropy = pft.completion_logprobs(model, batch, temperature=0.7, return_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    return logprobs.detach(), mask, entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_variable_group_sizes_entropy_and_temperature():
    model = pft.tiny_model("tiny-qwen2", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (5, 1, 12)]
    completions = [[torch.randint(3, 96, (n,), generator=g) for n in sizes] for sizes in ([4], [1, 7, 2], [3, 3])]
    grouped = _grads_and_logprobs(model, pft.build_grouped_batch(prompts, completions))
    model.set_attn_implementation("sdpa")
    repeated = _grads_and_logprobs(model, pft.build_repeated_batch(prompts, completions, padding_side="left"))
    assert grouped[0].shape == (6, 7)
    assert torch.equal(grouped[1], repeated[1])
    assert grouped[1].sum(1).tolist() == [4, 1, 7, 2, 3, 3]
    torch.testing.assert_close(grouped[0], repeated[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(grouped[2], repeated[2], atol=1e-9, rtol=0)
    for n, grad in repeated[3].items():
        torch.testing.assert_close(grouped[3][n], grad, atol=1e-6 * grad.abs().max().item() + 1e-12, rtol=0)


def test_first_completion_token_is_predicted_at_the_last_prompt_position():
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    completions = [[torch.tensor([10, 11]), torch.tensor([12])], [torch.tensor([13, 14, 15])]]
    batch = pft.build_grouped_batch(prompts, completions)
    assert batch.input_ids.tolist() == [[5, 6, 7, 10, 11, 12, 8, 13, 14, 15]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3]]
    # member 0: tokens 10, 11 predicted at 2 (last prompt) and 3; member 1: token 12 at 2; group 1 at 6, 7, 8.
    assert batch.logit_index.tolist() == [2, 3, 2, 6, 7, 8]
    assert batch.target_ids.tolist() == [10, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("name, overrides, reference", [
    ("tiny-llama", {}, "sdpa"),
    # A soft-capped layer runs the model's eager attention (SDPA would drop the cap).
    ("tiny-gemma2", {"attn_logit_softcapping": 0.05, "sliding_window": 4}, "eager"),
])
def test_fallback_without_layout_is_ordinary_attention(name, overrides, reference):
    """Without a layout: the same logits and greedy generation as transformers' own implementation."""
    model = pft.tiny_model(name, **overrides)
    ids = torch.randint(3, 96, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        ours_plain = model(ids).logits
        ours_masked = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        model.set_attn_implementation(reference)
        torch.testing.assert_close(ours_plain, model(ids).logits)
        torch.testing.assert_close(ours_masked[mask.bool()], model(ids, attention_mask=mask).logits[mask.bool()])
        assert torch.equal(generated, model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
        if overrides:  # the cap binds: SDPA, which ignores it, gives other logits
            model.set_attn_implementation("sdpa")
            assert (model(ids).logits - ours_plain).abs().max() > 1e-4


def test_fallback_sliding_window_is_applied():
    model = pft.tiny_model("tiny-mistral", sliding_window=4)
    ids = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        ours = model(ids).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(ours, model(ids).logits)


def test_torch_compile_of_a_tiny_model_with_grouped_attention():
    model = pft.tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (9,), generator=g), torch.randint(3, 96, (4,), generator=g)]
    completions = [[torch.randint(3, 96, (n,), generator=g) for n in (3, 5)], [torch.randint(3, 96, (2,), generator=g)]]
    batch = pft.build_grouped_batch(prompts, completions)
    eager, _ = pft.completion_logprobs(model, batch)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled, _ = pft.completion_logprobs(compiled_model, batch)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_register_is_idempotent_and_usable_by_name():
    from transformers import AttentionInterface

    pft.register()
    pft.register()
    assert AttentionInterface._global_mapping[pft.ATTN_IMPLEMENTATION] is pft.prefix_attention_forward
    model = pft.tiny_model("tiny-qwen3")
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation(pft.ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == pft.ATTN_IMPLEMENTATION


@pytest.mark.parametrize(
    "prompts, completions, match",
    [
        ([], [], "prompt_ids must be a non-empty list"),
        ([torch.tensor([], dtype=torch.long)], [[torch.tensor([1])]], r"prompt_ids\[0\] is empty"),
        ([torch.tensor([1])], [[]], r"completion_ids\[0\] must be a non-empty list"),
        ([torch.tensor([1])], [[torch.tensor([2]), torch.tensor([], dtype=torch.long)]],
         r"completion_ids\[0\]\[1\] is empty"),
        ([torch.tensor([1.0])], [[torch.tensor([2])]], r"prompt_ids\[0\] must be a 1-D LongTensor"),
        ([torch.tensor([1])], [[torch.tensor([2])], [torch.tensor([3])]], "one list of completions per prompt"),
    ],
)
def test_bad_batches(prompts, completions, match):
    with pytest.raises(ValueError, match=match):
        pft.build_grouped_batch(prompts, completions)


def _small_batch(vocab_max=96):
    return pft.build_grouped_batch([torch.tensor([3, 4, 5])], [[torch.tensor([6, vocab_max - 1]), torch.tensor([7])]])


def test_bad_model_use_raises_clear_errors():
    model = pft.tiny_model("tiny-llama")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        pft.completion_logprobs(model, _small_batch(vocab_max=97))
    batch = _small_batch()
    padding = torch.ones_like(batch.input_ids)
    padding[0, -1] = 0  # (an all-ones mask masks nothing: transformers reduces it to None)
    with pytest.raises(ValueError, match="drop attention_mask"):
        model(**batch.model_inputs(), attention_mask=padding)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="needs the model's attention set to 'pyfastrl_prefix'"):
        pft.completion_logprobs(model, batch)
    model.set_attn_implementation(pft.ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="position_ids restart inside a row but no prefix_layout"):
        model(batch.input_ids, position_ids=batch.position_ids)
    with pytest.raises(ValueError, match="temperature"):
        pft.completion_logprobs(model, batch, temperature=0)


def test_unsupported_features_and_models_are_refused():
    batch = _small_batch()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        pft.completion_logprobs(pft.tiny_model("tiny-llama", attention_dropout=0.1).train(), batch)
    with pytest.raises(NotImplementedError, match="bidirectional attention"):
        pft.completion_logprobs(pft.tiny_model("tiny-gemma3", use_bidirectional_attention=True), batch)
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2))
    gpt2.config._attn_implementation = pft.ATTN_IMPLEMENTATION
    with pytest.raises(NotImplementedError, match="supported: llama, qwen2, qwen3, mistral, gemma2, gemma3_text, phi3"):
        pft.completion_logprobs(gpt2, batch)
    with pytest.raises(ValueError, match="unknown tiny model"):
        pft.tiny_model("tiny-gpt2")


def test_verify_cli(capsys):
    from pyfastrl.cli import main

    code = main(["verify", "--model", "tiny-phi3", "--prompt-len", "16", "--completion-len", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and "worst 5" in out and "tokens through the model" in out
    assert main(["verify", "--model", "tiny-gemma2", "--prompt-len", "16", "--completion-len", "8", "--device", "cpu",
                 "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "transformers 'pyfastrl_eager' attention" in out
    assert main(["verify", "--model", "/no/such/dir"]) == 2
    assert "neither a local directory nor a built-in tiny config" in capsys.readouterr().err


def test_verify_local_model_directory(tmp_path):
    pft.tiny_model("tiny-qwen2").save_pretrained(tmp_path)
    report = pft.verify_equivalence(str(tmp_path), group_size=2, prompt_len=10, completion_len=5, device="cpu")
    assert report.passed, report.summary()


def test_verify_gives_a_loaded_model_its_state_back():
    model = pft.tiny_model("tiny-mistral").eval()
    model.set_attn_implementation("sdpa")
    report = pft.verify_equivalence(model, group_size=2, prompt_len=10, completion_len=5,
                                    gradient_checkpointing=True)
    assert report.passed, report.summary()
    assert not model.training and not model.is_gradient_checkpointing
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- local linear attention


def _lla_model(name="tiny-llama", ridge_lambda=1.0, **overrides):
    from pyfastrl.integrations.transformers_lla import enable_local_linear_attention

    return enable_local_linear_attention(pft.tiny_model(name, **overrides), ridge_lambda=ridge_lambda)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_lla_with_a_huge_ridge_is_the_softmax_model(name):
    ids = torch.randint(3, 96, (2, 20))
    softmax = pft.tiny_model(name)(ids).logits  # no layout: transformers' SDPA attention
    lla = _lla_model(name, ridge_lambda=1e12)
    assert lla.config._attn_implementation == "pyfastrl_lla"
    torch.testing.assert_close(lla(ids).logits, softmax, atol=1e-5, rtol=0)
    with torch.no_grad():  # a real lambda changes the model
        assert (_lla_model(name, ridge_lambda=0.1)(ids).logits - softmax).abs().max() > 1e-3


def test_a_decoder_switched_to_lla_trains():
    model = _lla_model(ridge_lambda=1.0)
    names = [n for n, _ in model.named_parameters() if n.endswith("local_linear_attention.log_ridge")]
    assert len(names) == model.config.num_hidden_layers
    ridge_before = model.model.layers[0].self_attn.local_linear_attention.log_ridge.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(3, 96, (4, 24))
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert not torch.equal(model.model.layers[0].self_attn.local_linear_attention.log_ridge, ridge_before)


def test_lla_refuses_what_it_does_not_implement():
    from pyfastrl.integrations.transformers_lla import enable_local_linear_attention

    model = _lla_model()
    ids = torch.randint(3, 96, (2, 10))
    right_padding = torch.ones_like(ids)
    right_padding[0, 7:] = 0
    with pytest.raises(NotImplementedError, match="other than left padding"):
        model(ids, attention_mask=right_padding)
    assert model.generate(ids[:1], max_new_tokens=2, do_sample=False).shape == (1, 12)  # with the KV cache
    plain = pft.tiny_model("tiny-llama")
    plain.set_attn_implementation("pyfastrl_lla")
    with pytest.raises(RuntimeError, match="enable_local_linear_attention"):
        plain(ids)
    with pytest.raises(ValueError, match="found no attention layers"):
        enable_local_linear_attention(torch.nn.Linear(2, 2))
