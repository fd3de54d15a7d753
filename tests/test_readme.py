"""The README's code must run as written."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_api_example_runs():
    # ```python blocks run as written; ```py blocks are sketches that need the user's own model or data.
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    results = []
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
        results.append(namespace)
    api, tree, model, grpo, lla, lla_model = results
    assert api["T"] == 28 and api["out"].shape == (28, 8, 64)
    assert api["q"].grad is not None
    # The three sequences share [1, 2]; two of them share [1, 2, 3]: 7 packed tokens, not 12.
    assert tree["layout"].total_tokens == 7 and tree["layout"].parents == [-1, 0, 1, 1, 0]
    assert [i.tolist() for i in tree["token_index"]] == [[0, 1, 2, 3], [0, 1, 2, 4, 5], [0, 1, 6]]
    assert model["logprobs"].shape == (3, 3) and model["mask"].sum().item() == 6
    assert grpo["advantages"][2:].eq(0).all() and grpo["advantages"][:2].ne(0).all()
    assert grpo["hidden"].grad.shape == (4, 6, 32) and grpo["lm_head"].grad.abs().sum() > 0
    assert grpo["hidden"].grad[1, 4:].eq(0).all()  # masked tokens get no gradient
    assert {"clip_ratio/region_mean", "kl", "entropy"} <= set(grpo["metrics"])
    # On-policy (old = current log-probs): ratio 1, so dapo's loss is -sum(A * mask) / sum(mask).
    on_policy = -(grpo["advantages"][:, None] * grpo["mask"]).sum() / grpo["mask"].sum()
    assert abs(grpo["loss2"].item() - on_policy.item()) < 1e-6
    assert abs(grpo["metrics"]["ratio_mean"].item() - 1) < 1e-5
    assert lla["out"].shape == (2, 64, 8, 32) and lla["ridge"].grad.abs().min() > 0
    torch.testing.assert_close(lla["out2"][:, 0], lla["v"][:, 0].repeat_interleave(4, 1))  # o_0 = v_0
    assert lla_model["model"].config._attn_implementation == "pyfastrl_lla"


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -r requirements-cpu.txt -e . && python -m pytest" in readme
    assert "pip install -r requirements-cpu.txt -e .\npython -m pytest" in ci
