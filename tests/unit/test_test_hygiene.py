"""Rules for the test suite itself (CONTRIBUTING.md "Tests").

An ``async def`` test shares its event loop with the scripted upstreams and
clients it drives: a blocking ``time.sleep`` there (directly, or through a
helper that polls with it) freezes all of them, so a wait either measures
nothing or turns into a timeout on a loaded machine. Async code waits with
``await asyncio.sleep`` (``tests/integration/obs_helpers.wait_for``).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _is_time_sleep(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sleep"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "time")


def _module(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def blocking_waits_in_async_code() -> list[str]:
    trees = {_module(p): ast.parse(p.read_text(), str(p)) for p in TESTS.rglob("*.py")}
    # Module-level sync functions that sleep: calling one from async code blocks too.
    sleepers: dict[str, set[str]] = {
        mod: {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and any(map(_is_time_sleep, ast.walk(f)))}
        for mod, tree in trees.items()
    }
    found = []
    for mod, tree in trees.items():
        visible = set(sleepers[mod])
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module in sleepers:
                visible |= {a.asname or a.name for a in node.names if a.name in sleepers[node.module]}
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.AsyncFunctionDef):
                continue
            for call in ast.walk(fn):
                if _is_time_sleep(call):
                    found.append(f"{mod}.{fn.name}:{call.lineno}: time.sleep")
                elif isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in visible:
                    found.append(f"{mod}.{fn.name}:{call.lineno}: {call.func.id}() sleeps")
    return found


def test_the_check_finds_a_blocking_wait() -> None:
    tree = ast.parse("import time\nasync def t():\n    time.sleep(1)\n")
    assert any(_is_time_sleep(n) for n in ast.walk(tree))


def test_async_tests_never_block_the_loop_with_time_sleep() -> None:
    assert blocking_waits_in_async_code() == []
