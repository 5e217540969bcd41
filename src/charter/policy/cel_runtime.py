"""CEL, the `common-expression-language` package's Rust extension, loaded without its CLI.

`import cel` runs the package's `__init__`, which imports `cel.cli`: typer, prompt_toolkit and
pygments for an interactive REPL, about 0.3 s of every daemon start and `charter policy` command,
and the memory they hold. Charter uses only `compile` and `Context`, which live in the extension
module `cel.cel`; that module is loaded here directly (and registered as `cel.cel`, so that a
later `import cel` finds it rather than initialising the extension twice; `from cel import cel`
then works, the attribute `cel.cel` on the package does not). The package's opt-in Python
functions (`cel.stdlib`) are not used by any policy, truth or visibility rule. Where `cel` is the
extension itself (another build, without the package), it is imported as it is.
"""

from __future__ import annotations

import importlib
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
    if package is None:
        raise ImportError("the CEL runtime (the common-expression-language package) is not installed")
    if not package.submodule_search_locations:  # a module, not the package: nothing heavy to skip
        return importlib.import_module("cel")
    spec = importlib.machinery.PathFinder.find_spec("cel", list(package.submodule_search_locations))
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        raise ImportError("the common-expression-language package has no compiled `cel` extension")
    spec = importlib.util.spec_from_file_location("cel.cel", spec.origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cel.cel"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("cel.cel", None)
        raise
    return module


cel = _load()
