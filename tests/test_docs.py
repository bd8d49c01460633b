"""The documentation site builds from ``docs/`` with warnings as errors and no network.

``sphinx-build -W --keep-going -b html`` runs in a subprocess with HTTP(S) proxies pointing
at a closed port, so any attempt to fetch something fails the build. The build executes the
tutorials and the notebook pages (myst-nb, a failing cell fails the build). Needs the
``docs`` extra; skipped with the reason where it is absent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mutants import MUTANTS
from ring_mutants import RING_MUTANTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_site_builds_with_warnings_as_errors_offline(tmp_path: Path) -> None:
    for module in ("sphinx", "myst_nb", "furo", "matplotlib", "sphinx-mathjax-offline"):
        pytest.importorskip(module, reason="the docs extra: pip install -e '.[docs]'")
    closed = "http://127.0.0.1:9"  # nothing listens on the discard port: no network
    env = {
        **os.environ,
        "http_proxy": closed,
        "https_proxy": closed,
        "HTTP_PROXY": closed,
        "HTTPS_PROXY": closed,
        "no_proxy": "",
        "NO_PROXY": "",
    }
    out = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    done = subprocess.run(
        [*command, str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-10000:]
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    expected = {"index.html", "api.html", "concepts.html", "verification.html", "cli.html"}
    assert expected <= pages, sorted(pages)
    tutorials = sorted(p.stem for p in (ROOT / "tutorials").glob("[0-9][0-9]-*.md"))
    assert {f"tutorials/{t}.html" for t in tutorials} <= pages
    assert (out / "_images").is_dir() and any((out / "_images").glob("*.png"))
    assert_no_page_loads_from_the_network(out)


#: A script, style sheet or image taken from another host: a page that needs the network.
REMOTE = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)


def assert_no_page_loads_from_the_network(out: Path) -> None:
    """Every page's scripts, style sheets and images come from the built site (MathJax
    was loaded from a CDN: every formula showed as raw TeX offline)."""
    remote = {}
    for page in out.rglob("*.html"):
        found = REMOTE.findall(page.read_text(errors="replace"))
        if found:
            remote[page.relative_to(out).as_posix()] = found[:2]
    assert not remote, remote
    mathjax = out / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.is_file(), "MathJax is not served from the site"
    assert 'src="_static/mathjax/tex-chtml.js' in (out / "concepts.html").read_text()


def test_mutant_catalogue_is_documented() -> None:
    text = (DOCS / "verification.md").read_text()
    missing = [name for name in [*MUTANTS, *RING_MUTANTS] if f"`{name}`" not in text]
    assert not missing, f"docs/verification.md does not list the mutants {missing}"


def test_no_page_needs_the_network_at_build_time() -> None:
    conf = (DOCS / "conf.py").read_text()
    assert "sphinx.ext.intersphinx" not in conf


def test_nothing_cites_a_file_outside_the_repository() -> None:
    """The docs, help texts and docstrings cited the steering files ("SPEC 9", "PITFALLS 6",
    ../shared/SPEC.md), which a user does not have; they cite docs/spec.md and
    docs/pitfalls.md now ("spec §9", "pitfall 6")."""
    shipped = [ROOT / "README.md", *(ROOT / "tutorials").glob("*.md"), *DOCS.glob("*.md")]
    for folder in ("ringsim", "reference", "gpu"):
        shipped += (ROOT / folder).rglob("*.py")
    outside = re.compile(r"\bSPEC\b|\bPITFALLS\b|\.\./shared|shared/seed")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in shipped
        if path.name != "CHANGELOG.md"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not found, "\n".join(found)
