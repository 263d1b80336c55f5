"""Whether a module's dropout feeds its classifier alone, read from the module's source.

:func:`~adaptive_heads.replace_classifier` moves a dropout the host applies right before the classifier into the
adaptive head. That is right only where the dropout's output goes to the classifier and nowhere else: a dropout
whose output also feeds an auxiliary branch, a second classifier or another layer must stay. For a ``dropout``
attribute beside the classifier, the methods of its module (every class of its MRO above ``torch.nn``) are read
with :mod:`ast`, and every use of ``self.<dropout>`` must be one of:

- an assignment to it, or a test of it (``if self.dropout is not None``, ``if self.dropout:``);
- a call ``self.<classifier>(self.<dropout>(x))``;
- a call ``v = self.<dropout>(x)`` whose result ``v`` is read, until ``v`` is assigned again, only as an argument
  of ``self.<classifier>(...)`` (at least once).

Anything else (the dropout passed on, its result read by another layer, ``getattr`` by name, a method whose source
cannot be read) is not shown to feed the classifier alone.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from collections.abc import Hashable
from typing import Any, cast

from torch import nn

__all__ = ["dropout_feeds_only"]


def dropout_feeds_only(owner: nn.Module, dropout: str, classifier: str) -> tuple[bool, str]:
    """Whether every use of ``owner.<dropout>`` in the methods of ``type(owner)`` feeds ``owner.<classifier>``
    alone, and if not, why (for the message that leaves the dropout in place).

    Example:
        >>> class Decoder(torch.nn.Module):  # HF Segformer's decode head, mmseg's decode heads
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.dropout, self.classifier = torch.nn.Dropout2d(0.1), torch.nn.Conv2d(8, 4, 1)
        ...     def forward(self, x):
        ...         return self.classifier(self.dropout(x))
        >>> dropout_feeds_only(Decoder(), "dropout", "classifier")
        (True, '')
    """
    return _class_feeds_only(cast(Hashable, type(owner)), dropout, classifier)


@functools.lru_cache(maxsize=256)
def _class_feeds_only(cls: Any, dropout: str, classifier: str) -> tuple[bool, str]:
    fed = False
    for name, function in _methods(cls):
        code = getattr(inspect.unwrap(function), "__code__", None)
        if code is not None and not _mentions(code, dropout):
            continue  # the name is nowhere in its bytecode: no use to read (e.g. transformers' PreTrainedModel)
        try:
            source = textwrap.dedent(inspect.getsource(function))
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError):
            return False, f"the source of {cls.__name__}.{name} cannot be read"
        uses = _Uses(tree, dropout, classifier)
        if uses.problem:
            return False, f"{cls.__name__}.{name} {uses.problem}"
        fed = fed or uses.feeds
    if not fed:
        return False, f"no method of {cls.__name__} passes self.{dropout}(...) to self.{classifier}"
    return True, ""


def _mentions(code: types.CodeType, name: str) -> bool:
    """Whether ``name`` is among the attribute names or string constants of ``code`` or of a function inside it."""
    return name in code.co_names or any(
        c == name or (isinstance(c, types.CodeType) and _mentions(c, name)) for c in code.co_consts
    )


def _methods(cls: type) -> list[tuple[str, Any]]:
    """The functions defined by the classes of ``cls``'s MRO outside torch, each name once (the one that is used)."""
    seen: set[str] = set()
    found: list[tuple[str, Any]] = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        for name, member in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            functions = [member.fget, member.fset] if isinstance(member, property) else [member]
            found.extend((name, f) for f in functions if inspect.isfunction(f))
    return found


class _Uses:
    """The uses of ``self.<dropout>`` in one parsed method: :attr:`problem` (empty if every use is allowed) and
    :attr:`feeds` (some use passes its output to ``self.<classifier>``)."""

    def __init__(self, tree: ast.AST, dropout: str, classifier: str) -> None:
        self.dropout, self.classifier = dropout, classifier
        self.problem = ""
        self.feeds = False
        self.parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        method = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
        self_names = {method.args.args[0].arg} if method is not None and method.args.args else {"self"}
        for node in ast.walk(tree):
            if self.problem:
                return
            if isinstance(node, ast.Call) and _is_name(node.func, {"getattr"}) and len(node.args) >= 2:
                target, attribute = node.args[0], node.args[1]
                if _is_name(target, self_names) and isinstance(attribute, ast.Constant) and attribute.value == dropout:
                    self.problem = f"reads self.{dropout} by name with getattr (line {node.lineno})"
            elif isinstance(node, ast.Attribute) and node.attr == dropout and _is_name(node.value, self_names):
                self._check(node, self_names)

    def _check(self, node: ast.Attribute, self_names: set[str]) -> None:
        parent = self.parents.get(node)
        if not isinstance(node.ctx, ast.Load):
            return  # self.dropout = ... (its construction)
        if isinstance(parent, (ast.Compare, ast.BoolOp, ast.UnaryOp)) or (
            isinstance(parent, (ast.If, ast.IfExp, ast.While)) and parent.test is node
        ):
            return  # a test: if self.dropout is not None
        if not (isinstance(parent, ast.Call) and parent.func is node):
            self.problem = f"uses self.{self.dropout} otherwise than calling it (line {node.lineno})"
            return
        result: ast.AST = parent
        while isinstance(choice := self.parents.get(result), ast.IfExp) and choice.test is not result:
            result = choice  # x = self.dropout(x) if self.dropout is not None else x
        if self._is_classifier_argument(result, self_names):
            self.feeds = True
            return
        target = self.parents.get(result)
        if isinstance(target, ast.Assign) and len(target.targets) == 1 and isinstance(target.targets[0], ast.Name):
            self._check_variable(target, target.targets[0].id, self_names)
            return
        self.problem = f"passes the output of self.{self.dropout} to something else (line {node.lineno})"

    def _is_classifier_argument(self, node: ast.AST, self_names: set[str]) -> bool:
        call = self.parents.get(node)
        return (
            isinstance(call, ast.Call)
            and node in call.args
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == self.classifier
            and _is_name(call.func.value, self_names)
        )

    def _check_variable(self, assign: ast.Assign, name: str, self_names: set[str]) -> None:
        """The reads of ``name`` after ``assign`` (``name = self.dropout(x)``) and before ``name`` is assigned
        again must all be arguments of ``self.<classifier>(...)``."""
        assigned_at = (assign.end_lineno or 0, assign.end_col_offset or 0)
        events = []
        for node in ast.walk(self._function_of(assign)):
            if isinstance(node, ast.Name) and node.id == name:
                if isinstance(node.ctx, ast.Load):
                    events.append(((node.lineno, node.col_offset), "read", node))
                else:  # an assignment takes effect at the end of its statement
                    statement = self._statement_of(node)
                    end = (getattr(statement, "end_lineno", 0) or 0, getattr(statement, "end_col_offset", 0) or 0)
                    events.append((end, "write", node))
        reads = 0
        for position, kind, node in sorted(events, key=lambda e: e[0]):
            if position <= assigned_at:
                continue
            if kind == "write":
                break
            if not self._is_classifier_argument(node, self_names):
                self.problem = f"reads the output of self.{self.dropout} ({name}) elsewhere (line {node.lineno})"
                return
            reads += 1
        if reads:
            self.feeds = True
        else:
            self.problem = f"assigns the output of self.{self.dropout} to {name} and never passes it to the classifier"

    def _function_of(self, node: ast.AST) -> ast.AST:
        while node in self.parents and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node = self.parents[node]
        return node

    def _statement_of(self, node: ast.AST) -> ast.AST:
        while node in self.parents and not isinstance(node, ast.stmt):
            node = self.parents[node]
        return node


def _is_name(node: ast.AST, names: set[str]) -> bool:
    return isinstance(node, ast.Name) and node.id in names
