"""The merge methods, one file each: the registry.

Every module of this package (but :mod:`.base`) declares one ``METHOD``, a
:class:`~ota_trainer.merger.methods.base.MergeMethod`; this module finds them all, so adding a
method is adding a file (and a row to the shared test table, ``tests/method_cases.py``). The
recipe parser, the CLI flags (:func:`cli_params`), the README's method table
(:func:`markdown_table`), the runner and the tests all read the methods from :data:`METHODS`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import SCORES, MergeMethod, Param

__all__ = ["Param", "MergeMethod", "METHODS", "SCORES", "get_method", "markdown_table", "cli_params"]


def _discover() -> dict[str, MergeMethod]:
    found: dict[str, MergeMethod] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if not isinstance(method, MergeMethod):
            raise TypeError(f"{__name__}.{info.name} declares no METHOD (a MergeMethod)")
        if method.name in found:
            raise TypeError(f"two methods are called {method.name!r}")
        found[method.name] = method
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


METHODS: dict[str, MergeMethod] = _discover()


def get_method(name: str) -> MergeMethod:
    """The method called ``name``.

    Raises:
        ConfigError: unknown method (the message lists the known ones).
    """
    from ...errors import ConfigError, brief

    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"unknown merge method {brief(name)}; choose one of {sorted(METHODS)}")
    return method


def _default(p: Param) -> str:
    if p.default is None:
        return ""
    return f" ({str(p.default).lower() if isinstance(p.default, bool) else p.default})"


def markdown_table() -> str:
    """The README's method table, from the methods' own declarations."""
    rows = [
        "| method | formula (per entry; `d_t = w_t - w0`, `c_t` = per-expert `weight`) "
        "| needs | parameters (default) |",
        "| --- | --- | --- | --- |",
    ]
    for m in METHODS.values():
        needs = ", ".join(x for x, need in (("base", m.needs_base), ("moments", m.needs_moments)) if need) or "—"
        params = ", ".join(f"`{p.name}`{_default(p)}" for p in m.params)
        description = m.description.replace("|", "\\|")  # a pipe would end the cell
        rows.append(f"| [`{m.name}`]({m.reference_url}) | {description} | {needs} | {params} |")
    return "\n".join(rows)


def cli_params() -> dict[str, tuple[Param, list[str]]]:
    """Every parameter name any method takes -> (its declaration, the methods taking it), for
    one CLI flag per name. Raises TypeError if two methods declare one name with two types."""
    out: dict[str, tuple[Param, list[str]]] = {}
    for m in METHODS.values():
        for p in m.params:
            if p.name in out:
                first, users = out[p.name]
                if first.kind is not p.kind:
                    raise TypeError(
                        f"parameter {p.name!r} is a {first.kind.__name__} in {users[0]} and a "
                        f"{p.kind.__name__} in {m.name}"
                    )
                users.append(m.name)
            else:
                out[p.name] = (p, [m.name])
    return out
