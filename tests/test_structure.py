"""The package's structure: one-way imports, one registry of heads, one API for every head and loss, and no
shims for the never-published 0.1 names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import adaptive_heads as ah
from adaptive_heads import functional as AF
from adaptive_heads.registry import HEADS, head_by_name

from .conftest import make_head, make_loss

PACKAGE = Path(ah.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Package modules that ``path`` imports (relative and absolute), at module level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    # imports anywhere (a function's lazy import too), except under ``if TYPE_CHECKING:`` (annotations only)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) ==
                   "TYPE_CHECKING" for child in block.body for n in ast.walk(child)}  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("adaptive_heads"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("adaptive_heads"))
    return found


def test_no_import_cycles_inside_the_package():
    files = [p for p in PACKAGE.rglob("*.py") if "integrations" not in p.parts]
    modules = {_module_name(p): p for p in files}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle of theirs: drop edges into a package's
    # own __init__ from its submodules' view
    for name in graph:
        graph[name] = {m for m in graph[name] if not (modules[m].name == "__init__.py" and name.startswith(m + "."))}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


#: the package's layers, lowest first, one family per file: a module imports only from lower layers (and the
#: functional modules from each other); where a reader looks for what
LAYERS = [
    ("helpers", {"_types", "_layout", "_precision", "_validation", "_distributed", "_budget"}),
    ("math", {"functional"}),
    ("outputs, layers, checkpoints", {"outputs", "_layers", "_checkpoint", "_saved_options"}),
    ("losses", {"losses"}),
    ("the head base", {"head"}),
    ("the cosine base", {"cosine_head"}),
    ("heads", {"cac", "ssa", "protoseg"}),
    ("registry", {"registry"}),
    ("model surgery, training and checkpoints", {"replace", "slide", "supervise", "checkpoints"}),
]


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package's __init__: above everything
        return len(LAYERS)
    for level, (_, names) in enumerate(LAYERS):
        if parts[1] in names:
            return level
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py: LAYERS")


def test_imports_follow_the_layers():
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if "integrations" in path.parts:
            continue
        own = _layer(module)
        for target in _imports(path) - {module}:  # ``from . import functional`` names the package itself
            if target.split(".")[1:2] == module.split(".")[1:2] and own in (1, 3):
                continue  # functional/ and losses/ import their own modules
            assert _layer(target) < own, f"{module} imports {target}"


def test_registry_lists_every_head_once_and_each_declares_its_loss():
    assert list(HEADS) == ["cac", "ssa", "proto"]
    assert set(HEADS.values()) == {ah.ContextAwareClassifier, ah.SSAClassifier, ah.PrototypeClassifier}
    assert ah.HEADS is HEADS
    for name, cls in HEADS.items():
        assert head_by_name(name) is cls and head_by_name(cls.__name__) is cls
        assert issubclass(cls.loss_type, ah.HeadLoss)
    with pytest.raises(ValueError, match="unknown head 'fcn'; known: \\['cac'"):
        head_by_name("fcn")


def test_default_loss_reads_what_the_head_returns(head_name):
    head = make_head(head_name, 6, 4, ignore_index=7)
    loss_fn = head.default_loss()
    assert type(loss_fn) is HEADS[head_name].loss_type and loss_fn.ignore_index == 7
    target = torch.randint(0, 4, (2, 8, 8))
    out = head(torch.randn(2, 6, 4, 4), target)
    assert isinstance(out, loss_fn.output_type)
    terms = loss_fn(out, target)
    assert set(terms) == {*loss_fn.default_weights, "loss"} and loss_fn.main_term in terms


def test_loss_options_shared_and_shown_once(head_name):
    loss_fn = make_loss(head_name, ignore_index=-1, weights={next(iter(HEADS[head_name].loss_type.default_weights)): 2})
    text = repr(loss_fn)
    for option in ("ignore_index=-1", "reduction='mean'", "main_average='valid'", *loss_fn.options):
        assert text.count(option.split("=")[0] + "=") == 1, (option, text)
    with pytest.raises(ValueError, match="main_average must be 'valid' or 'all'"):
        make_loss(head_name, main_average="none")
    with pytest.raises(ValueError, match="unknown loss terms"):
        make_loss(head_name, weights={"nope": 1.0})


@pytest.mark.parametrize("loss_type", [ah.ContextAwareLoss, ah.SSALoss])
def test_distill_mix_is_range_checked_by_every_loss_that_has_it(loss_type):
    with pytest.raises(ValueError, match=r"distill_mix must be in \[0, 1\], got 1\.5"):
        loss_type(distill_mix=1.5)


def test_strip_training_layers_keeps_inference_and_refuses_training(head_name):
    torch.manual_seed(0)
    head = make_head(head_name, 6, 4).eval()
    feat = torch.randn(2, 6, 5, 5)
    before = head(feat)
    assert head.strip_training_layers() is head
    for name in head.training_only:
        assert getattr(head, name) is None and not any(k.startswith(name) for k in head.state_dict())
    assert torch.equal(head(feat), before)
    head.train()
    with pytest.raises(RuntimeError, match=r"stripped of its training-only layers .* strip_training_layers"):
        head(feat, torch.zeros(2, 10, 10, dtype=torch.long))


@pytest.mark.parametrize(
    "name",
    [
        "context_aware_loss",
        "ssa_loss",
        "prototype_loss",
        "strip_oracle",
        "strip_teacher",
        "float32_math",
        "upcast_half",
    ],
)
def test_no_shims_for_a_version_nobody_installed(name):
    """0.1 was never published: its names are gone, not deprecated."""
    assert not hasattr(ah, name) and not hasattr(AF, name)
    assert not hasattr(ah.ContextAwareClassifier, name) and not hasattr(ah.SSAClassifier, name)
    with pytest.raises(TypeError):
        ah.ContextAwareLoss(5)  # the unused num_classes argument


def test_functional_all_is_complete_and_tensor_only():
    import inspect

    for name in AF.__all__:
        obj = getattr(AF, name)
        assert inspect.isfunction(obj), name
        assert obj.__module__.startswith("adaptive_heads.functional."), name
    public = {
        n
        for module in (AF.cosine, AF.pooling, AF.labels, AF.reductions, AF.distillation, AF.dice, AF.upsampled)
        for n in module.__all__
    }
    assert public <= set(AF.__all__)


def test_declared_lower_bounds_are_the_oldest_versions_ci_runs():
    tomllib = pytest.importorskip("tomllib")
    version = pytest.importorskip("packaging.version")
    root = PACKAGE.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    floors = {}
    for requirement in requirements:
        name, sep, rest = requirement.partition(">=")
        if sep:
            floors[name.strip().lower()] = rest.split(",")[0].strip()
    pins = {}
    for line in (root / ".ci" / "oldest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.lower()] = pinned
    checked = {name: pins[name] for name in pins if name in floors}
    assert set(checked) >= {"torch", "torchvision", "segmentation-models-pytorch", "transformers", "mmsegmentation"}
    for name, pinned in checked.items():
        assert version.Version(floors[name]) == version.Version(pinned), (name, floors[name], pinned)
