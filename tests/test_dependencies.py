"""Every third-party module the package imports is declared in setup.py (a requirement or an extra), so no
install of ours misses one, and ``ring-attn env`` reports each of them."""

import ast
import importlib.metadata
import pathlib
import re
import sys

from ring_flash_attn.train.envinfo import collect_env, dependencies

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ring_flash_attn"
DISTRIBUTION = "ring-attention-xpu"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> set:
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"ring_flash_attn"}


def _declared() -> set:
    return {_normalise(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0])
            for r in importlib.metadata.requires(DISTRIBUTION) or []} | {"torch"}


def test_every_imported_distribution_is_declared():
    owners = importlib.metadata.packages_distributions()
    # Intel's deprecated fallbacks are imported only when installed and never required (DESIGN.md).
    optional = {"oneccl_bindings_for_pytorch", "intel_extension_for_pytorch"}
    undeclared = {}
    for module in sorted(_imported_top_level_modules() - optional):
        distributions = {_normalise(d) for d in owners.get(module, [module])}
        if not distributions & _declared():
            undeclared[module] = sorted(distributions)
    assert not undeclared, f"imported but not declared in setup.py (install_requires or extras): {undeclared}"


def test_env_reports_every_declared_dependency():
    versions = {_normalise(name) for name in collect_env()["versions"]}
    assert _declared() <= versions
    assert {_normalise(d) for d in dependencies()} <= versions
