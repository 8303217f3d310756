"""MkDocs hook (mkdocs.yml ``hooks:``): the docstrings use Sphinx roles (``:class:`~sbpet.X```),
which the API reference would show as written; render them as code, ``~`` keeping the last name
as Sphinx does."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|exc|obj):<code>(~?)([^<]+)</code>")


def render_roles(html: str) -> str:
    return ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)


def on_page_content(html, page, config, files):  # noqa: ARG001 (MkDocs' hook signature)
    return render_roles(html)
