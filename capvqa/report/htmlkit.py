"""A tiny HTML builder that escapes by construction.

Every string that reaches the report comes from data or models (questions, captions, LLM prompts, run
names) and may contain markup. Rather than remembering to call ``html.escape`` at each f-string, the
report is built from :func:`tag`, which escapes every plain ``str`` child and every attribute value;
only :class:`Markup` (output of this module) passes through unchanged. Wrapping a string in ``Markup``
by hand is the one way to bypass escaping, and is done only for static text written in this package.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from typing import Any

_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "col", "source", "wbr"})


class Markup(str):
    """A string already safe to embed in HTML (built by this module or written as static text)."""

    __slots__ = ()


Child = Any  # str | Markup | number | None | iterable of those


def escape(value: Any) -> Markup:
    """HTML-escape anything (``None`` -> empty); ``Markup`` is returned unchanged."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[Child], sep: str = "") -> Markup:
    """Concatenate children, escaping each plain string."""
    return Markup(escape(sep).join(_render_child(p) for p in parts))


def _render_child(child: Child) -> Markup:
    if isinstance(child, str) or child is None or isinstance(child, (int, float)):
        return escape(child)
    if isinstance(child, Iterable):
        return join(child)
    return escape(child)


def attrs_to_html(attrs: Mapping[str, Any] | None) -> Markup:
    """``{"class": "x", "hidden": True, "title": None}`` -> `` class="x" hidden`` (None/False dropped)."""
    if not attrs:
        return Markup("")
    out = []
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        if not _is_safe_name(name):
            raise ValueError(f"unsafe attribute name {name!r}")
        if value is True:
            out.append(f" {name}")
        else:
            out.append(f' {name}="{html.escape(str(value), quote=True)}"')
    return Markup("".join(out))


def tag(name: str, attrs: Mapping[str, Any] | None = None, *children: Child) -> Markup:
    """``<name attrs>children</name>`` with attribute values and plain-string children escaped."""
    if not _is_safe_name(name):
        raise ValueError(f"unsafe tag name {name!r}")
    opening = f"<{name}{attrs_to_html(attrs)}>"
    if name in _VOID:
        return Markup(opening)
    return Markup(f"{opening}{join(children)}</{name}>")


def _is_safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-:_" for c in name)


def script_json(value: Any) -> Markup:
    """JSON safe to place inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` are written as ``\\u003c``-style escapes, so neither ``</script>`` nor
    ``<!--`` in the data can end or confuse the script element; U+2028/9 are escaped for old JS parsers.
    """
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                       ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return Markup(text)
