"""The wire contract and the code around it: buf lint, generated code freshness, types, lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import tool

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_generated_code_is_fresh() -> None:
    done = run(sys.executable, "tools/codegen.py", "--check")

    assert done.returncode == 0, done.stderr


def test_freshness_check_fails_when_the_proto_changes(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "petsage_grpc" / "_proto", tmp_path / "petsage_grpc" / "_proto",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proto = tmp_path / "protos" / "petsage" / "smoke" / "v1" / "smoke.proto"
    original = proto.read_text()
    changed = original.replace("message SmokeTestRequest {}", "message SmokeTestRequest {\n  string why = 1;\n}")
    assert changed != original
    proto.write_text(changed)

    done = run(sys.executable, str(ROOT / "tools" / "codegen.py"), "--check", "--root", str(tmp_path))

    assert done.returncode == 1
    assert "stale generated file: petsage_grpc/_proto/smoke/v1/smoke_pb2.py" in done.stderr


def test_freshness_check_fails_on_a_hand_edit(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "petsage_grpc" / "_proto", tmp_path / "petsage_grpc" / "_proto",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "petsage_grpc" / "_proto" / "smoke" / "v1" / "smoke_pb2_grpc.py").open("a") as edited:
        edited.write("# edited by hand\n")

    done = run(sys.executable, str(ROOT / "tools" / "codegen.py"), "--check", "--root", str(tmp_path))

    assert done.returncode == 1
    assert "smoke_pb2_grpc.py" in done.stderr


@pytest.mark.parametrize("command", [("lint",), ("format", "--diff", "--exit-code")])
def test_buf_accepts_the_contract(command: tuple[str, ...]) -> None:
    done = run(tool("buf"), *command)

    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    done = run(sys.executable, "-m", "mypy")

    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_is_clean() -> None:
    done = run(tool("ruff"), "check", ".")

    assert done.returncode == 0, done.stdout + done.stderr
