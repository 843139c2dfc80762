"""A tiny HTML builder that escapes by construction.

Every string that reaches the report comes from data or models (questions, captions, LLM prompts, run
names) and may contain markup. Rather than remembering to call ``html.escape`` at each f-string, the
report is built from :func:`tag`, which escapes every plain ``str`` child and every attribute value;
only :class:`Markup` (output of this module) passes through unchanged. Wrapping a string in ``Markup``
by hand is the one way to bypass escaping, and is done only for static text written in this package.

Escaping also makes the text valid: control characters (a NUL byte in a question, say) are parse errors
in HTML and forbidden in XML, and a lone surrogate (``"\\ud800"`` in a JSON file) cannot be encoded as
UTF-8 at all; :func:`clean_text` shows each as a visible stand-in.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

# C0 controls except tab, newline and carriage return (HTML whitespace, valid in XML), DEL, C1 controls,
# lone surrogates
_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_DEL, _REPLACEMENT = 0x7F, "\ufffd"


def _stand_in(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode "control pictures": NUL reads as U+2400, ESC as U+241B
    return "\u2421" if code == _DEL else _REPLACEMENT


def clean_text(text: str) -> str:
    """``text`` with every character that is invalid in an HTML/XML document or in UTF-8 replaced by a
    visible stand-in (control pictures for C0 controls and DEL, U+FFFD otherwise); tab, newline and
    carriage return stay."""
    return _INVALID.sub(_stand_in, text) if _INVALID.search(text) else text


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
    return Markup(html.escape(clean_text(str(value)), quote=True))


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
            out.append(f' {name}="{html.escape(clean_text(str(value)), quote=True)}"')
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
    text = clean_text(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str))  # json writes C0 as \u0000
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                       ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return Markup(text)
