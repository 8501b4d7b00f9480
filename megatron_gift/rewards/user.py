"""User reward functions loaded by import path (L1): "package.module:function" or "path/to/file.py:function".

Owns the loading and its errors (bad spec, module missing, attribute missing, not callable). The output
of the loaded function is checked like any reward's (length, finiteness) by the caller.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any, Callable

from megatron_gift.utils.dataclass_dict import nearest


def _import_module(module_part: str, spec: str):
    if module_part.endswith(".py"):
        if not os.path.isfile(module_part):
            raise ValueError(f"user reward {spec!r}: file not found: {module_part}")
        name = "megatron_gift_user_reward_" + os.path.splitext(os.path.basename(module_part))[0]
        module_spec = importlib.util.spec_from_file_location(name, module_part)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # SyntaxError, ImportError, anything the module's top level raises
            raise ValueError(f"user reward {spec!r}: importing {os.path.abspath(module_part)} failed: "
                             f"{_describe(exc)}") from exc
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        if exc.name and module_part.startswith(exc.name):
            raise ValueError(f"user reward {spec!r}: cannot import module {module_part!r} ({exc})") from exc
        raise ValueError(f"user reward {spec!r}: importing {_origin(module_part)} failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise ValueError(f"user reward {spec!r}: importing {_origin(module_part)} failed: {_describe(exc)}") from exc


def _origin(module_part: str) -> str:
    """The file of a module (for messages), or its dotted name when it cannot be found."""
    try:
        found = importlib.util.find_spec(module_part)
    except Exception:
        found = None
    return found.origin if found is not None and found.origin else module_part


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}"


def load_user_function(spec: str) -> Callable[..., Any]:
    """The callable named by `spec` ("package.module:function"); clear errors for every way it can fail."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"user reward {spec!r}: expected 'package.module:function' or 'file.py:function'")
    module_part, attr = spec.split(":")
    module = _import_module(module_part, spec)
    target: Any = module
    for part in attr.split("."):  # allow "module:Class.method"-style nested attributes
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            raise ValueError(f"user reward {spec!r}: {module_part!r} has no attribute {part!r}{nearest(part, public)}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"user reward {spec!r}: {attr!r} is a {type(target).__name__}, not callable")
    return target


def build_user_reward(spec: str, **kwargs: Any) -> Callable[..., Any]:
    """The user function, with any configured kwargs bound as keyword arguments."""
    fn = load_user_function(spec)
    return functools.partial(fn, **kwargs) if kwargs else fn
