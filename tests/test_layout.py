"""The rules of docs/contracts.md's opening section, checked: which part of the repo may import
which, what stays light to import, and the linter settings in pyproject.toml."""
import ast
import subprocess
import sys

import pytest

from conftest import REPO

PARTS = {"storage", "pipeline", "models", "training", "deploy", "charrnn", "bench"}
# What each part must never import (anywhere in its files, function-level imports included).
FORBIDDEN = {
    "storage.py": PARTS - {"storage"} | {"ray", "torch"},
    "pipeline": PARTS - {"pipeline", "storage"} | {"torch"},
    "models": PARTS - {"models"} | {"ray", "pyarrow"},
    "training": {"deploy", "charrnn", "bench"},
    "deploy": {"training", "charrnn", "bench"},
    "charrnn": {"bench"},
}


def _imported_roots(path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            roots.add(path.relative_to(REPO).parts[0])  # relative: within its own part
    return roots


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_each_part_imports_only_what_the_contracts_allow(part):
    files = [REPO / part] if part.endswith(".py") else sorted((REPO / part).rglob("*.py"))
    assert files
    broken = {str(f.relative_to(REPO)): sorted(_imported_roots(f) & FORBIDDEN[part]) for f in files}
    assert {f: found for f, found in broken.items() if found} == {}


@pytest.mark.parametrize("module", ["pipeline", "pipeline.text.vocab", "deploy.api", "storage"])
def test_light_modules_load_neither_ray_nor_torch(module):
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'ray', 'torch'}}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sample_runs_without_ray(tmp_path):
    """`charrnn sample` on this machine, as the README says: no Ray loaded from start to end."""
    code = f"""
import sys, torch
from models import CharRNN, ModelConfig, save_model
config = ModelConfig(vocab_size=4, hidden=8, layers=1)
save_model(CharRNN(config), config, {{"chars": "abc", "unknown_id": 3}}, {str(tmp_path / 'model')!r})
from charrnn.cli import main
try:
    main(["sample", "--model", {str(tmp_path)!r}, "--prime", "ab", "--length", "5", "--seed", "1"])
except SystemExit as done:
    assert done.code == 0, done.code
print("ray" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False", out.stdout + out.stderr


def test_the_code_passes_the_configured_linter():
    """pyproject.toml's [tool.ruff] settings; ruff comes with the test extras."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "."], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
