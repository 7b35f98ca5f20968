"""`python -m tilert_jax.generate` as a user runs it: a subprocess, the embedded default model, streamed text, the
figures line, and one-line errors."""

import os
import re
import subprocess
import sys

import pytest

STATS = re.compile(r"^\[(\d+) new tokens \((end of sequence|max new tokens)\) \| prompt (\d+) tokens \| "
                   r"TTFT [\d.]+ ms \| [\d.]+ ms/token \| [\d.]+ tokens/s \| [\d.]+ GB/s \| compile [\d.]+ s\]$")


def _run(*args, stdin=None, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
    return subprocess.run([sys.executable, "-m", "tilert_jax.generate", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=timeout)


def test_no_arguments_runs_the_default_model():
    out = _run()
    assert out.returncode == 0, out.stderr
    *text, stats = out.stdout.rstrip("\n").split("\n")
    text = "\n".join(text)
    assert text.startswith("def fibonacci(n):")  # the prompt is echoed, then the continuation streams after it
    assert len(text) > len("def fibonacci(n):") + 40
    assert re.search(r"\n {4}\S", text), f"no indented Python body in {text!r}"
    m = STATS.match(stats)
    assert m, stats
    assert 1 <= int(m.group(1)) <= 200
    assert "loaded" in out.stderr and "Traceback" not in out.stderr


def test_flags_prompt_file_sampling_and_dtype(tmp_path):
    prompt = tmp_path / "prompt.py"
    prompt.write_text("import os\n\n\nclass Config:\n    def __init__(self, path):\n")
    args = ("--prompt-file", str(prompt), "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "50",
            "--top-p", "0.95", "--seed", "3", "--dtype", "bfloat16")
    first, second = _run(*args), _run(*args)
    assert first.returncode == 0, first.stderr
    *text, stats = first.stdout.rstrip("\n").split("\n")
    assert "\n".join(text).startswith(prompt.read_text())
    m = STATS.match(stats)
    assert m, stats
    assert int(m.group(1)) <= 12 and int(m.group(3)) > 10
    assert first.stdout.split("\n[")[0] == second.stdout.split("\n[")[0]  # same seed, same text


ERRORS = [
    (("--temperature", "-1"), "temperature must be a number >= 0"),
    (("--top-p", "1.5"), "top_p must be in (0, 1]"),
    (("--model", "/nonexistent/model/dir"), "no such model directory"),
    (("--model", "nobody/no-such-model-xyz"), "local Hugging Face cache"),
    (("--prompt-file", "/nonexistent/prompt.txt"), "No such file"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--prompt", "a", "--prompt-file", "b"), "not allowed with argument"),
    (("--chat",), "no chat template"),
    (("--max-new-tokens", "100000"), "exceeds the context"),
]


def _one_error_line(stderr: str, message: str) -> None:
    lines = [line for line in stderr.splitlines() if not line.startswith("loaded ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, message", [ERRORS[0], ERRORS[2]])
def test_errors_are_one_line(args, message):
    out = _run(*args)
    assert out.returncode != 0
    assert out.stdout == ""
    _one_error_line(out.stderr, message)


@pytest.mark.parametrize("args, message", ERRORS)
def test_errors_in_process(args, message, capsys):
    """The same handling, through main() in this process (no interpreter start per case)."""
    from tilert_jax.generate import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code != 0
    _one_error_line(capsys.readouterr().err, message)
