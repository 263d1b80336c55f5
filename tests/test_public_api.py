"""The public API is listed once and pinned: ``__all__`` of each public module and the signature of every public
function, class and method, against ``tests/public_api.json``.

A change here is a change of the API: update the file on purpose (and the CHANGELOG), with
``python -m tests.test_public_api --update``.
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
    api: dict[str, object] = {"__init__": _signature(cls.__init__)}  # not cls: AdaptiveHead's __new__ is (*args)
    for name in ("default_weights", "main_term", "options", "training_options", "free_options", "training_only"):
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


if __name__ == "__main__" and "--update" in sys.argv:
    SNAPSHOT.write_text(json.dumps({m: describe(m) for m in MODULES}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {SNAPSHOT}")
