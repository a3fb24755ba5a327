"""The README stays short, every relative link in the docs resolves, and the README's Python uses the public API."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import suite

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 200
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "reports" / "benchmarks.md",
        ROOT / "reports" / "benchmarks-history.md", ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code: links and headings are only read there."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markdown marks and punctuation dropped, lowercase, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(_prose(path.read_text())) if not EXTERNAL.match(target)]


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail to a page in docs/")


def test_the_checked_pages_exist():
    missing = [str(p.relative_to(ROOT)) for p in DOCS if not p.exists()]
    assert not missing, f"pages whose links are checked are missing: {missing}"


@pytest.mark.parametrize("page", [p for p in DOCS if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    where = page.relative_to(ROOT)
    broken = []
    for link in relative_links(page):
        target, _, anchor = link.partition("#")
        base = ROOT if target.startswith("/") else page.parent  # GitHub reads a leading / from the repository root
        file = (base / target.lstrip("/")).resolve() if target else page
        if not file.exists():
            broken.append(f"{where}: [{link}] -> {target} does not exist")
        elif anchor and file.suffix == ".md" and anchor.lower() not in anchors(file):
            broken.append(f"{where}: [{link}] -> no heading in {file.relative_to(ROOT)} has the anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_follows_github():
    assert slug("`gpu_check.py`: the GPU proof") == "gpu_checkpy-the-gpu-proof"
    assert slug("Flops, MFU and the roofline") == "flops-mfu-and-the-roofline"
    assert slug("Trials, failures and the results database") == "trials-failures-and-the-results-database"


def test_readme_python_uses_only_the_public_api():
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```", README.read_text(), re.S | re.M)
    assert blocks, "README.md has no python code block"
    public = set(suite.__all__)
    for i, code in enumerate(blocks, 1):
        private = sorted({name for name in re.findall(r"\bsuite\.(\w+)", code) if name not in public})
        assert not private, f"README.md python block {i} uses suite.{private}: not in suite.__all__ {sorted(public)}"
        imports = re.findall(r"^\s*(?:from\s+suite[.\s]|import\s+suite\.).*$", code, re.M)
        assert not imports, f"README.md python block {i} imports from inside suite: {imports}; use suite.<name>"
