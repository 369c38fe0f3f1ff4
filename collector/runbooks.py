"""The runbooks the rule pack ships (alerts/runbooks/NAME.md) as self-contained HTML pages, for
``GET /runbooks/NAME``: the link in a Slack message or on the fleet page opens on the collector that sent it."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")

# Raw HTML in a runbook is shown as text, never passed through: the page shares its origin with the API.
# markdown-it also refuses javascript:, vbscript: and file: links.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")

# Inline styles only, no scripts or outside resources: the header below forbids everything else.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="dark light">
<title>{title}</title>
<style>
:root {{ --bg: #0f1115; --panel: #181b22; --line: #2a2f3a; --text: #e6e8ec; --muted: #8b93a3; --link: #6ea8fe; }}
@media (prefers-color-scheme: light) {{
  :root {{ --bg: #f6f7f9; --panel: #fff; --line: #dde1e7; --text: #1b1f27; --muted: #5d6675; --link: #0b5cd5; }}
}}
body {{ margin: 0 auto; max-width: 52rem; padding: 1rem 1.2rem 3rem; background: var(--bg); color: var(--text);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }}
a {{ color: var(--link); }}
nav {{ color: var(--muted); font-size: .85rem; }}
h1 {{ font-size: 1.5rem; margin: .6rem 0 .8rem; }}
h2 {{ font-size: 1.1rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; }}
code {{ background: var(--panel); border: 1px solid var(--line); border-radius: 3px; padding: 0 .25rem;
       font: .9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }}
pre {{ background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: .6rem .8rem;
      overflow-x: auto; }}
pre code {{ border: 0; padding: 0; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid var(--line); padding: .25rem .5rem; text-align: left; }}
li {{ margin: .2rem 0; }}
.muted {{ color: var(--muted); }}
</style>
</head>
<body>
<nav><a href="{home}">gpufleet</a> · <a href="{index}">runbooks</a></nav>
<main>
{body}
</main>
</body>
</html>
"""


@dataclass(frozen=True)
class Runbook:
    name: str
    title: str  # the first heading: the rule (or rules) it is for
    markdown: str


class Runbooks:
    """The runbooks in one folder of Markdown files. A requested name is looked up among the files found
    there, never joined onto the folder, so no request can read anything else."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.md")) if self.directory.is_dir() else []
        self._files = {p.stem: p for p in files if NAME.fullmatch(p.stem)}
        self._books: dict[str, Runbook] = {}
        self._pages: dict[str, str] = {}

    @classmethod
    def shipped(cls) -> Runbooks:
        """The runbooks of the built-in rule pack (package data of the alerts package)."""
        from gpufleet.collector.rules.model import default_rules_path

        return cls(default_rules_path() / "runbooks")

    def names(self) -> list[str]:
        return list(self._files)

    def get(self, name: str) -> Runbook | None:
        path = self._files.get(name)
        if path is None:
            return None
        if name not in self._books:
            text = path.read_text(encoding="utf-8")
            self._books[name] = Runbook(name, _title(text) or name, text)
        return self._books[name]

    def page(self, name: str) -> str | None:
        """The runbook as an HTML page, or None when there is no runbook of that name."""
        if name not in self._pages:
            book = self.get(name)
            if book is None:
                return None
            self._pages[name] = _PAGE.format(
                title=html.escape(f"{book.title} · gpufleet runbook"),
                home="../",
                index="./",
                body=_MARKDOWN.render(book.markdown),
            )
        return self._pages[name]

    def _list(self) -> str:
        if not self._files:
            return f"<p>No runbooks in {html.escape(str(self.directory))}.</p>"
        items = "".join(
            f'<li><a href="{n}">{html.escape(b.title)}</a> <span class="muted">{n}</span></li>\n'
            for n in self._files
            if (b := self.get(n)) is not None
        )
        return f"<ul>\n{items}</ul>"

    def index_page(self) -> str:
        """Every runbook by its title; links are relative, so the page works under any path prefix."""
        body = (
            "<h1>Runbooks</h1>\n<p>The runbooks of the rule pack: what each alert means, what to check and "
            "what to do.</p>\n" + self._list()
        )
        return _PAGE.format(title="Runbooks · gpufleet", home="../", index="./", body=body)

    def not_found_page(self, name: str) -> str:
        """The answer to an unknown name: what was asked for, and every runbook there is."""
        shown = name if len(name) <= 100 else name[:100] + "…"
        body = (
            f"<h1>No runbook {html.escape(repr(shown))}</h1>\n<p>This collector has no runbook of that name. "
            "Runbook names are lower-case words joined by hyphens, e.g. <code>xid-critical</code>. "
            "A rule's <code>runbook_url</code> that names one outside this list points at a runbook of "
            "your own: set <code>--runbook-base-url</code> to where those live.</p>\n<h2>Runbooks here</h2>\n"
            + self._list()
        )
        # Relative links, as on every page here; a NAME with slashes puts this page deeper under /runbooks/.
        up = "../" * name.count("/")
        return _PAGE.format(title="No such runbook · gpufleet", home=up + "../", index=up or "./", body=body)


def _title(markdown: str) -> str | None:
    tokens = _MARKDOWN.parse(markdown)
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and i + 1 < len(tokens):
            children = tokens[i + 1].children or []
            return "".join(c.content for c in children if c.type in ("text", "code_inline")).strip() or None
    return None
