import subprocess
import sys

import pytest

from pyfastrl.cli import main


def test_demo_passes_and_reports_savings(capsys):
    code = main(["demo", "--prefix-lens", "48,20", "--group-size", "4", "--suffix-len", "12", "--head-dim", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "OK: grouped attention equals the repeated-prompt computation" in out
    assert "tokens through the model: repeated" in out


def test_demo_triton_backend_through_interpreter(capsys):
    code = main(["demo", "--backend", "triton", "--prefix-lens", "20", "--group-size", "2", "--suffix-len", "8",
                 "--head-dim", "16", "--heads", "2", "--kv-heads", "1", "--dtype", "bfloat16"])
    assert code == 0, capsys.readouterr().out


def test_demo_bad_input_is_a_clear_error(capsys):
    assert main(["demo", "--heads", "3", "--kv-heads", "2"]) == 2
    assert "must be a multiple of the number of key/value heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--prefix-lens", "4,0"])
    assert "expected integers >= 1" in capsys.readouterr().err


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out
    assert "prefix_grouped_attention" in out and "fused_linear_grpo_loss" in out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "pyfastrl.cli", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--prefix-lens" in result.stdout
