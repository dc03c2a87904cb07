"""`ladle run` as a user runs it: a real subprocess, stdout holding only the reply."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from ladle import TextModelBuilder

PROMPT = "List two animals."


def ladle(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ladle", "run", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def expected(smollm2_path: Path) -> dict[str, str]:
    with TextModelBuilder(smollm2_path).build() as model:
        chat = model.send_chat_request(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": PROMPT},
                ],
                "temperature": 0,
                "max_tokens": 10,
            }
        )
        raw = model.send_completion_request(
            {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 10}
        )
    return {"chat": chat.choices[0].message.content or "", "raw": raw.choices[0].text}


def test_run_prints_only_the_deterministic_reply(
    smollm2_path: Path, expected: dict[str, str]
) -> None:
    args = (
        str(smollm2_path),
        PROMPT,
        "--temperature",
        "0",
        "--max-tokens",
        "10",
        "--system",
        "Be brief.",
    )
    first = ladle(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == expected["chat"] + "\n"
    assert ladle(*args).stdout == first.stdout


def test_a_first_run_waits_for_no_compiler(
    smollm2_path: Path, expected: dict[str, str], tmp_path: Path
) -> None:
    """`pip install` built the kernels into the package: a user with an empty cache (and no
    compiler on PATH) loads them at once, builds nothing, and gets the same reply."""
    if os.environ.get("LADLE_NATIVE_KERNELS") == "0":
        pytest.skip("kernels turned off")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PATH": str(tmp_path / "no-bin")}
    args = (str(smollm2_path), PROMPT, "--temperature", "0", "--max-tokens", "10")
    first = ladle(*args, "--system", "Be brief.", env=env)
    assert first.returncode == 0, first.stderr
    assert "building" not in first.stderr and "disabled" not in first.stderr
    assert first.stdout == expected["chat"] + "\n"
    assert not list((tmp_path / "ladle").rglob("*.so"))


def test_raw_completes_without_template(smollm2_path: Path, expected: dict[str, str]) -> None:
    out = ladle(
        str(smollm2_path), "Once upon a time", "--raw", "--temperature", "0", "--max-tokens", "10"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected["raw"] + "\n"


def test_prompt_from_stdin(smollm2_path: Path, expected: dict[str, str]) -> None:
    out = ladle(
        str(smollm2_path),
        "--temperature",
        "0",
        "--max-tokens",
        "10",
        "--system",
        "Be brief.",
        stdin=PROMPT,
    )
    assert out.stdout == expected["chat"] + "\n"


def test_seeded_sampling_repeats(smollm2_path: Path) -> None:
    args = (str(smollm2_path), PROMPT, "--temperature", "1.0", "--seed", "3", "--max-tokens", "12")
    assert ladle(*args).stdout == ladle(*args).stdout


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    out = ladle(str(tmp_path / "missing.gguf"), "hi")
    assert out.returncode == 1
    assert "missing.gguf" in out.stderr and "Traceback" not in out.stderr


def test_interactive_chat_on_a_terminal(smollm2_path: Path, expected: dict[str, str]) -> None:
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "ladle",
            "run",
            str(smollm2_path),
            "--temperature",
            "0",
            "--max-tokens",
            "10",
            "--system",
            "Be brief.",
        ],
        encoding="utf-8",
        timeout=120,
    )
    child.expect(">>> ")
    child.sendline(PROMPT)
    child.expect(">>> ")
    assert expected["chat"].strip() in child.before.replace("\r\n", "\n")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
