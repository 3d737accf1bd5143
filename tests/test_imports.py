"""The preprocessing modules depend on each other one way (no import circle, function-level imports
included), and each imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "preprocessing"
MODULES = sorted(p.stem for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__")


def project_imports(module: str) -> set[str]:
    """The ``preprocessing`` modules that ``module`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE:  # from preprocessing import steps
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found & set(MODULES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_between_preprocessing_modules():
    graph = {m: project_imports(m) - {m} for m in MODULES}
    assert "steps" in graph["pipeline"] and "enrich" in graph["pipeline"]  # the parser sees function-level imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    run = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_data_commands_log_and_hold_load_no_model_stack(tmp_path):
    """build_mix and build_sft set up their log file and hold their folder before any work: that took megatron_ext's
    logging, whose import applies megatron's CPU patches, so a build stopping on a user's error spent 9 of its 12 s
    importing megatron-core, and said that Transformer Engine and Apex were missing."""
    code = ("import sys\nfrom pathlib import Path\nfrom preprocessing.pipeline import build_command\n"
            f"with build_command(Path({str(tmp_path)!r}), 'build_mix', False):\n    pass\n"
            "print(sorted(m for m in ('megatron', 'megatron_ext', 'torch') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]" and "not installed" not in run.stderr, run.stderr
    assert (tmp_path / "build_mix.log").is_file()
