"""CEL, the `common-expression-language` package's Rust extension, loaded without its CLI.

`import cel` runs the package's `__init__`, which imports `cel.cli`: typer, prompt_toolkit and
pygments for an interactive REPL, about 0.3 s of every daemon start and `charter policy` command,
and the memory they hold. Charter uses only `compile` and `Context`, which live in the extension
module `cel.cel`; that module is loaded here directly (and registered as `cel.cel`, so that a
later `import cel` finds it rather than initialising the extension twice). The package's opt-in
Python functions (`cel.stdlib`) are not used by any policy, truth or visibility rule.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType


def _load() -> ModuleType:
    if "cel" in sys.modules:  # imported already, by its package: the same extension
        return sys.modules["cel"]
    if "cel.cel" in sys.modules:
        return sys.modules["cel.cel"]
    package = importlib.util.find_spec("cel")  # found, not run
    if package is None or not package.submodule_search_locations:
        raise ImportError("the CEL runtime (the common-expression-language package) is not installed")
    spec = importlib.machinery.PathFinder.find_spec("cel", list(package.submodule_search_locations))
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        raise ImportError("the common-expression-language package has no compiled `cel` extension")
    spec = importlib.util.spec_from_file_location("cel.cel", spec.origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cel.cel"] = module
    spec.loader.exec_module(module)
    return module


cel = _load()
