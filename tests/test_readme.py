"""The README's code must run as written."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    results = []
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
        results.append(namespace)
    api, model = results
    assert api["T"] == 28 and api["out"].shape == (28, 8, 64)
    assert api["q"].grad is not None
    assert model["logprobs"].shape == (3, 3) and model["mask"].sum().item() == 6


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -r requirements-cpu.txt -e . && python -m pytest" in readme
    assert "pip install -r requirements-cpu.txt -e .\npython -m pytest" in ci
