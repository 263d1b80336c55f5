"""The public API is listed once and pinned: ``__all__`` of each public module and the signature of every public
function, class and method, against ``tests/public_api.json``.

A change here is a change of the API: update the file on purpose (and the CHANGELOG), with
``python -m tests.test_public_api --update``. The file is frozen for the package's major version (``"frozen"``: 1
for 1.x): the update adds names, parameters and methods but refuses to remove or change one while the major version
is the frozen one (a breaking change waits for 2.0; ``--breaking`` overrides it, for the days before a major
version is released).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).with_name("public_api.json")
#: the public modules and the optional library each needs
MODULES = {
    "adaptive_heads": None,
    "adaptive_heads.functional": None,
    "adaptive_heads.integrations": None,
    "adaptive_heads.integrations.hf": "transformers",
    "adaptive_heads.integrations.mmcv_lite": None,  # mmcv optional: without it the stand-in stays out
}


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def _class_api(cls: type) -> dict[str, object]:
    """The constructor and every public method and property the library defines (inherited ones included)."""
    api: dict[str, object] = {"__init__": _signature(cls.__init__)}
    for name in ("default_weights", "main_term", "options", "free_options", "training_only"):
        value = getattr(cls, name, None)
        if isinstance(value, (dict, tuple, str)):  # the vocabulary: loss-term names, option groups
            api[f"{name} (value)"] = value if isinstance(value, (dict, str)) else list(value)
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("adaptive_heads"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(member, property):
                api[name] = "property"
            elif isinstance(member, (staticmethod, classmethod)):
                api[name] = _signature(member.__func__)
            elif inspect.isfunction(member):
                api[name] = _signature(member)
    return dict(sorted(api.items()))


def describe(module_name: str) -> dict[str, object]:
    module = importlib.import_module(module_name)
    entries: dict[str, object] = {}
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            entries[name] = _class_api(obj)
        elif inspect.isfunction(obj):
            entries[name] = _signature(obj)
        elif isinstance(obj, dict):
            entries[name] = {k: getattr(v, "__name__", repr(v)) for k, v in obj.items()}
        elif inspect.ismodule(obj):
            entries[name] = f"module {obj.__name__}"
        else:
            entries[name] = f"{type(obj).__name__} {obj!r}" if isinstance(obj, str) else type(obj).__name__
    return {"__all__": list(module.__all__), **entries}


@pytest.mark.parametrize("module_name", list(MODULES))
def test_public_api_matches_the_pinned_snapshot(module_name):
    if MODULES[module_name]:
        pytest.importorskip(MODULES[module_name])
    pinned = json.loads(SNAPSHOT.read_text())[module_name]
    current = json.loads(json.dumps(describe(module_name)))
    changed = sorted(k for k in pinned.keys() | current.keys() if pinned.get(k) != current.get(k))
    assert not changed, (
        f"the public API of {module_name} changed in {changed}: if on purpose, run "
        "`python -m tests.test_public_api --update` and note it in the CHANGELOG"
    )


def _parameters(signature: str) -> list[str] | None:
    """The parameters of a pinned signature string ``"(a, b=1, *, c=None) -> 'T'"`` (top-level commas), or
    ``None`` for a value that is not a signature."""
    if not signature.startswith("("):
        return None
    depth, start, parts = 0, 1, []
    for i, char in enumerate(signature):
        depth += char in "([{"
        depth -= char in ")]}"
        if depth == 0:  # the closing parenthesis
            parts.append(signature[start:i])
            return [p.strip() for p in parts if p.strip()]
        if char == "," and depth == 1:
            parts.append(signature[start:i])
            start = i + 1
    return None


def compatible(old: object, new: object) -> bool:
    """Whether ``new`` keeps ``old``: equal, or a signature that only appends parameters with defaults (or ``*``)
    and keeps the return annotation."""
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    before, after = _parameters(old), _parameters(new)
    if before is None or after is None or after[: len(before)] != before:
        return False
    if old.partition(") ->")[2] != new.partition(") ->")[2]:
        return False
    return all(p == "*" or "=" in p or p.startswith("**") for p in after[len(before) :])


def breaking_changes(pinned: dict, current: dict) -> list[str]:
    """What ``current`` removes or changes of ``pinned`` (module → entry, and a class's members); additions are
    not breaking."""
    found = []
    for module, entries in pinned.items():
        if module == "frozen":
            continue
        now = current.get(module, {})
        for name, value in entries.items():
            if name == "__all__":
                found += [f"{module}.{n} removed from __all__" for n in value if n not in now.get("__all__", [])]
            elif name not in now:
                found.append(f"{module}.{name} removed")
            elif isinstance(value, dict) and isinstance(now[name], dict):
                found += [
                    f"{module}.{name}.{k} changed" for k, v in value.items() if not compatible(v, now[name].get(k))
                ]
            elif not compatible(value, now[name]):
                found.append(f"{module}.{name} changed")
    return found


def test_breaking_changes_are_removals_and_changes_not_additions():
    pinned = {"frozen": 1, "m": {"__all__": ["f", "C"], "f": "(x)", "C": {"__init__": "(self)", "run": "(self)"}}}
    grown = {"m": {"__all__": ["f", "C", "g"], "f": "(x)", "g": "()", "C": {"__init__": "(self)", "run": "(self)",
                                                                          "new": "(self)"}}}  # fmt: skip
    assert breaking_changes(pinned, grown) == []
    keyword = {"m": {"__all__": ["f", "C"], "f": "(x, *, y=None)", "C": {"__init__": "(self, z=1)", "run": "(self)"}}}
    assert breaking_changes(pinned, keyword) == []  # parameters with defaults, appended
    assert not compatible("(x, y=1) -> 'T'", "(x, w, y=1) -> 'T'") and not compatible("(x) -> 'T'", "(x) -> 'U'")
    assert compatible("(x, f: 'Callable[[int, int], T]' = None)", "(x, f: 'Callable[[int, int], T]' = None, g=2)")
    shrunk = {"m": {"__all__": ["C"], "C": {"__init__": "(self, y)"}}}
    assert breaking_changes(pinned, shrunk) == [
        "m.f removed from __all__", "m.f removed", "m.C.__init__ changed", "m.C.run changed",
    ]  # fmt: skip


def test_the_frozen_api_is_the_packages_major_version():
    import adaptive_heads

    assert json.loads(SNAPSHOT.read_text())["frozen"] == int(adaptive_heads.__version__.split(".")[0])


if __name__ == "__main__" and "--update" in sys.argv:
    import adaptive_heads

    major = int(adaptive_heads.__version__.split(".")[0])
    pinned = json.loads(SNAPSHOT.read_text())
    current = json.loads(json.dumps({m: describe(m) for m in MODULES}))
    broken = breaking_changes(pinned, current) if pinned.get("frozen") == major else []
    if broken and "--breaking" not in sys.argv:  # --breaking: before the major version's release only
        sys.exit(f"the public API is frozen for {major}.x; these changes break it: {broken}")
    SNAPSHOT.write_text(json.dumps({"frozen": major, **current}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {SNAPSHOT}")
