"""anomalib's, Lightning's and torch's private names are used in ``anomalib_moleflow/compat.py`` and nowhere else.

A private name (``_name``) of a library can change in any release without notice; compat.py keeps every use of one
in a single file whose assumptions ``tests/test_compat.py`` pins. Elsewhere in the package, these checks find:

* **attribute**: ``x._name`` where ``_name`` is a known private name of the libraries (:data:`KNOWN_PRIVATE`), or
  any ``_name`` the package does not define itself (the receiver's type is unknown to an AST walk: a private name
  that is not ours belongs to someone else). The namedtuple API (``_replace``, ``_asdict``...) is public.
* **string**: the same names inside identifier-like strings (``getattr(m, "_compiled_call_impl")``,
  ``state_dict["model._extra_state"]``).
* **import**: ``from torch._dynamo import ...``, ``from anomalib.x import _y`` (a private module or name of a library).
* **definition**: a method or attribute that a class of ours defines (an override, or an assignment to ``self._x``)
  whose name its anomalib/Lightning/torch base classes already define (found by importing the classes: their MRO)
  or that is in :data:`KNOWN_PRIVATE`.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "anomalib_moleflow"
COMPAT = PACKAGE / "compat.py"

#: Top-level packages whose private names only compat.py may use.
LIBRARIES = frozenset(
    {
        "anomalib",
        "lightning",
        "lightning_fabric",
        "lightning_utilities",
        "pytorch_lightning",
        "torch",
        "torchmetrics",
    }
)

#: The private names compat.py wraps (``test_compat_uses_exactly_the_names_it_wraps`` keeps this list exact).
COMPAT_NAMES = frozenset(
    {
        "_image_threshold",  # anomalib PostProcessor's single set of statistics (buffers)
        "_pixel_threshold",
        "_normalize",  # PostProcessor's min-max normalisation (static method)
        "_apply_threshold",  # PostProcessor's thresholding (static method)
        "_N_FEATURES_DEFAULTS",  # anomalib.models.image.padim.torch_model
        "_is_fitted",  # anomalib MemoryBankMixin (Patchcore)
        "_compiled_call_impl",  # torch nn.Module.compile's in-place wrapper
        "_dynamo",  # torch._dynamo.config.cache_size_limit
        "_EXTRA_STATE_KEY_SUFFIX",  # torch's state-dict key of get_extra_state
        "_setup_runners",  # anomalib.pipelines.Benchmark (static method naming its job generator)
    }
)

#: Other private names of anomalib, Lightning and torch that a plugin is tempted to reach (flagged wherever they
#: appear outside compat.py, even if the package defined a name of its own with the same spelling).
OTHER_PRIVATE = frozenset(
    {
        # anomalib
        "_get_cnn_features",  # anomalib FastflowModel
        "_checkpointable_components",  # AnomalibModule
        "_resolve_component",
        "_restore_component_enabled_flags",
        "_checkpoint_config_keys",  # PostProcessor
        # Lightning
        "_trainer",  # LightningModule (``self.trainer`` raises when no trainer is attached)
        "_fabric",
        "_results",
        "_logger_connector",
        "_checkpoint_connector",
        "_accelerator_connector",
        "_current_fx_name",
        "_metric_attributes",
        # torch
        "_extra_state",  # the state-dict key of ``get_extra_state`` (torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX)
        "_orig_mod",  # torch.compile's OptimizedModule
        "_modules",
        "_parameters",
        "_buffers",
        "_non_persistent_buffers_set",
        "_forward_hooks",
        "_forward_pre_hooks",
        "_C",
        "_inductor",
    }
)
KNOWN_PRIVATE = COMPAT_NAMES | OTHER_PRIVATE

#: Underscored but public: the namedtuple API (anomalib's ``InferenceBatch`` is a NamedTuple).
PUBLIC_UNDERSCORED = frozenset({"_asdict", "_replace", "_fields", "_field_defaults", "_make"})
#: Names that a library sets on every subclass by itself (not a use of its internals).
AUTOMATIC = frozenset({"_abc_impl", "_is_protocol"})
#: Underscored hooks that anomalib documents as the subclass's to implement (``AnomalibDataModule._setup``:
#: "This method should be implemented by subclasses").
SUBCLASS_HOOKS = frozenset({"_setup"})

_IDENTIFIER_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_INSTANCE_ATTRIBUTE = re.compile(r"self\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=(?!=)|__setattr__\((?:self, )?[\"'](_\w+)[\"']")


@dataclass(frozen=True, order=True)
class Violation:
    """One use of someone else's private name."""

    path: str
    line: int
    name: str
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name} ({self.kind})"


def is_private(name: str) -> bool:
    """``_name`` (single leading underscore, or a mangled ``__name``), not a dunder and not ``_``."""
    return name.startswith("_") and name.strip("_") != "" and not (name.startswith("__") and name.endswith("__"))


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def relative(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix() if path.resolve().is_relative_to(ROOT) else path.as_posix()


def defined_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, variables, and attributes set on ``self`` / ``cls``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in {"self", "cls"}
        ):
            names.add(node.attr)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return {name for name in names if is_private(name)}


@cache
def own_names() -> frozenset[str]:
    """Every private name the package defines itself (compat.py defines none: it only reaches others')."""
    return frozenset(name for path in package_files() for name in defined_names(ast.parse(path.read_text())))


def _foreign(name: str, own: frozenset[str]) -> bool:
    return is_private(name) and (name in KNOWN_PRIVATE or (name not in own and name not in PUBLIC_UNDERSCORED))


def _prose(tree: ast.AST) -> set[int]:
    """The string constants that are not names: docstrings and the literal parts of f-strings."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            ids |= {id(value) for value in node.values if isinstance(value, ast.Constant)}
        elif isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def private_uses(source: str, path: str, own: frozenset[str]) -> list[Violation]:
    """The uses of private names that are not the package's own in ``source`` (statically, see the module doc)."""
    tree = ast.parse(source)
    prose = _prose(tree)
    found: set[Violation] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _foreign(node.attr, own):
            found.add(Violation(path, node.lineno, node.attr, "attribute"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if _IDENTIFIER_PATH.fullmatch(node.value):
                for part in node.value.split("."):
                    if _foreign(part, own):
                        found.add(Violation(path, node.lineno, part, "string"))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            module = node.module.split(".")
            if module[0] in LIBRARIES:
                parts = module[1:] + [alias.name for alias in node.names]
                found |= {Violation(path, node.lineno, part, "import") for part in parts if is_private(part)}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module = alias.name.split(".")
                if module[0] in LIBRARIES:
                    found |= {Violation(path, node.lineno, part, "import") for part in module[1:] if is_private(part)}
        elif isinstance(node, ast.ClassDef):
            for name, line in class_definitions(node).items():
                if name in KNOWN_PRIVATE:
                    found.add(Violation(path, line, name, "definition"))
    return sorted(found)


def class_definitions(node: ast.ClassDef) -> dict[str, int]:
    """Private names a class defines (methods, class attributes, ``self._x`` assignments) -> first line."""
    names: dict[str, int] = {}
    for item in node.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            names.setdefault(item.name, item.lineno)
        elif isinstance(item, ast.Assign | ast.AnnAssign):
            for target in item.targets if isinstance(item, ast.Assign) else [item.target]:
                if isinstance(target, ast.Name):
                    names.setdefault(target.id, item.lineno)
    for child in ast.walk(node):
        if (
            isinstance(child, ast.Attribute)
            and isinstance(child.ctx, ast.Store)
            and isinstance(child.value, ast.Name)
            and child.value.id == "self"
        ):
            names.setdefault(child.attr, child.lineno)
    return {name: line for name, line in sorted(names.items(), key=lambda item: item[1]) if is_private(name)}


def _library_bases_in_source(tree: ast.AST) -> bool:
    """Whether a module imports from a library and defines a class (a candidate for subclassing a library class)."""
    imports = any(
        (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES)
        or (isinstance(node, ast.Import) and any(alias.name.split(".")[0] in LIBRARIES for alias in node.names))
        for node in ast.walk(tree)
    )
    return imports and any(isinstance(node, ast.ClassDef) and node.bases for node in ast.walk(tree))


@cache
def _instance_attributes(source_file: str) -> frozenset[str]:
    """Private attributes a library's source file sets on instances (``self._x = ...``, ``__setattr__("_x", ...)``)."""
    text = Path(source_file).read_text(errors="ignore")
    return frozenset(match.group(1) or match.group(2) for match in _INSTANCE_ATTRIBUTE.finditer(text))


def library_private_names(cls: type) -> set[str]:
    """Private names that the anomalib / Lightning / torch classes of ``cls``'s MRO define or set on instances."""
    names: set[str] = set()
    for base in cls.__mro__[1:]:
        if base.__module__.split(".")[0] not in LIBRARIES:
            continue
        names |= {name for name in vars(base) if is_private(name)}
        with contextlib.suppress(OSError, TypeError):  # a compiled class: its instance attributes are out of reach
            names |= _instance_attributes(inspect.getsourcefile(base) or "")
    return names


def override_violations(path: Path) -> list[Violation]:
    """Private names that a class of ``path`` defines and one of its library base classes already defines."""
    tree = ast.parse(path.read_text())
    if path == COMPAT or not _library_bases_in_source(tree):
        return []
    module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name, None)
        if not isinstance(cls, type) or cls.__module__ != module.__name__:
            continue  # a nested or conditional class: not reachable by name
        clashes = library_private_names(cls) - AUTOMATIC - SUBCLASS_HOOKS - PUBLIC_UNDERSCORED
        for name, line in class_definitions(node).items():
            if name in clashes:
                found.append(Violation(relative(path), line, name, f"definition: {node.name} overrides a library's"))
    return found


@cache
def violations() -> tuple[Violation, ...]:
    """Every use of a library's private name outside compat.py (one per file, line and name)."""
    own = own_names()
    found: dict[tuple[str, int, str], Violation] = {}
    for path in package_files():
        if path == COMPAT:
            continue
        for violation in [*private_uses(path.read_text(), relative(path), own), *override_violations(path)]:
            found.setdefault((violation.path, violation.line, violation.name), violation)
    return tuple(sorted(found.values()))


def _report(found: tuple[Violation, ...] | list[Violation]) -> str:
    return "private names of anomalib/Lightning/torch outside anomalib_moleflow/compat.py:\n" + "\n".join(
        f"  {violation}" for violation in found
    )


# --------------------------------------------------------------------------------------------------------- tests
def test_no_private_names_outside_compat() -> None:
    found = violations()
    assert not found, _report(found)


def test_compat_uses_exactly_the_names_it_wraps() -> None:
    """compat.py is where the listed names live: the checker finds every one there, and nothing unlisted."""
    found = {violation.name for violation in private_uses(COMPAT.read_text(), relative(COMPAT), own_names())}
    assert found == COMPAT_NAMES, (
        f"compat.py reaches {sorted(found - COMPAT_NAMES)} (add to COMPAT_NAMES) and no longer "
        f"{sorted(COMPAT_NAMES - found)} (remove)"
    )


def test_the_package_defines_none_of_the_known_names() -> None:
    """A known name of the libraries is never also one of ours (else the generic check could not tell them apart)."""
    ours = own_names() & KNOWN_PRIVATE
    assert not ours, sorted(ours)


def test_known_names_are_the_libraries() -> None:
    """Every listed name occurs in the source of anomalib, Lightning or torch (no typo in the lists)."""
    import anomalib
    import lightning
    import torch

    files = [
        *Path(anomalib.__file__).parent.rglob("*.py"),
        *Path(lightning.__file__).parent.rglob("*.py"),
        Path(torch.__file__),
        Path(torch.__file__).parent / "nn" / "modules" / "module.py",
        Path(torch.__file__).parent / "_dynamo" / "eval_frame.py",
    ]
    text = "\n".join(path.read_text(errors="ignore") for path in files)
    missing = sorted(name for name in KNOWN_PRIVATE if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text))
    assert not missing, missing


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f(module):\n    return module._trainer\n", [(2, "_trainer", "attribute")]),
        ("def f(m):\n    m._compiled_call_impl = None\n", [(2, "_compiled_call_impl", "attribute")]),
        ("def f(m):\n    return m._some_library_internal\n", [(2, "_some_library_internal", "attribute")]),
        ("def f(c):\n    return c['state_dict']['model._extra_state']\n", [(2, "_extra_state", "string")]),
        ("def f(m):\n    return getattr(m, '_is_fitted')\n", [(2, "_is_fitted", "string")]),
        ("from torch._dynamo import config\n", [(1, "_dynamo", "import")]),
        ("import torch._dynamo\n", [(1, "_dynamo", "import")]),
        ("from anomalib.post_processing.post_processor import _helper\n", [(1, "_helper", "import")]),
        (
            "class B(Benchmark):\n    @staticmethod\n    def _setup_runners(args):\n        return []\n",
            [(3, "_setup_runners", "definition")],
        ),
        ("class M(LightningModule):\n    def f(self):\n        self._trainer = None\n", [(3, "_trainer", "attribute")]),
    ],
)
def test_the_checker_finds(source: str, expected: list[tuple[int, str, str]]) -> None:
    found = private_uses(source, "x.py", own_names())
    assert {(v.line, v.name, v.kind) for v in found} >= set(expected), found


@pytest.mark.parametrize(
    "source",
    [
        "class A:\n    def _mine(self):\n        return self._mine()\n",  # defined here (own_names of the source)
        "def f(batch):\n    return batch._asdict(), batch._replace(x=1)\n",  # the namedtuple API
        "def f(m):\n    return m.__class__.__name__, m._\n",  # dunders and `_`
        "from anomalib.data import Batch\n",
        "from ._local import _ours\n",  # the package's own private modules
        '"""Docstrings may name `_trainer` and model._extra_state."""\n',
    ],
)
def test_the_checker_leaves_alone(source: str) -> None:
    own = own_names() | defined_names(ast.parse(source))
    assert private_uses(source, "x.py", own) == []


def test_the_override_check_finds_a_library_private_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A class overriding a private method of its library base is found; its own private attribute is not."""
    from anomalib.post_processing import PostProcessor

    assert "_normalize" in library_private_names(type("Sub", (PostProcessor,), {}))
    source = (
        "from anomalib.post_processing import PostProcessor\n\n\n"
        "class Sub(PostProcessor):\n"
        "    @staticmethod\n"
        "    def _normalize(*args):\n"
        "        return None\n\n"
        "    def mine(self):\n"
        "        self._own_state = 1\n"
    )
    package = tmp_path / "anomalib_moleflow_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sub.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # the probe package's root
    try:
        found = override_violations(package / "sub.py")
    finally:
        sys.modules.pop("anomalib_moleflow_probe.sub", None)
        sys.modules.pop("anomalib_moleflow_probe", None)
    assert [(v.line, v.name) for v in found] == [(6, "_normalize")], found
