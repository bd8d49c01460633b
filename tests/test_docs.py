"""The documentation site builds from ``docs/`` with warnings as errors and no network.

``sphinx-build -W --keep-going -b html`` runs in a subprocess with HTTP(S) proxies pointing
at a closed port, so any attempt to fetch something fails the build. The build executes the
tutorials and the notebook pages (myst-nb, a failing cell fails the build). Needs the
``docs`` extra; skipped with the reason where it is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringsim.conformance.conventions import CONVENTIONS
from ringsim.conformance.mutants import MUTANTS
from ringsim.conformance.ring_mutants import RING_MUTANTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for this module's tests: ``sphinx-build -W`` with no network."""
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
    out = tmp_path_factory.mktemp("site") / "html"
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
    return out


def test_site_builds_with_warnings_as_errors_offline(site: Path) -> None:
    out = site
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    expected = {"index.html", "api.html", "concepts.html", "verification.html", "cli.html",
                "spec.html", "pitfalls.html"}  # fmt: skip
    assert expected <= pages, sorted(pages)
    tutorials = sorted(p.stem for p in (ROOT / "tutorials").glob("[0-9][0-9]-*.md"))
    assert {f"tutorials/{t}.html" for t in tutorials} <= pages
    assert (out / "_images").is_dir() and any((out / "_images").glob("*.png"))
    assert_no_page_loads_from_the_network(out)


@pytest.mark.parametrize(
    "tutorial", sorted(p.stem for p in (ROOT / "tutorials").glob("[0-9][0-9]-*.md"))
)
def test_tutorial_ran_and_passed(site: Path, tutorial: str) -> None:
    """Every tutorial ran in the build (a failing cell fails it) and its last cell, which
    asserts the tutorial's results, printed its "passed" line."""
    html = (site / "tutorials" / f"{tutorial}.html").read_text()
    last_input, last_output = html.rfind('class="cell_input'), html.rfind('class="cell_output')
    assert last_output > last_input, f"{tutorial}: its last cell printed nothing"
    output = re.sub(r"<[^>]+>", "", html[last_output : html.find("</section>", last_output)])
    assert "passed" in output, f"{tutorial}: no 'passed' in its last output: {output[:300]}"


def browser() -> str | None:
    return next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)


@pytest.mark.skipif(browser() is None, reason="no headless Chromium (Debian: apt-get install "
                    "chromium; make setup installs it where it can)")  # fmt: skip
@pytest.mark.parametrize(
    "page", ["index.html", "concepts.html", "spec.html", "tutorials/03-ring.html"]
)
def test_pages_render_in_a_browser(site: Path, page: str, tmp_path: Path) -> None:
    """Headless Chromium opens the built page offline: MathJax typesets every formula (no
    raw TeX left), the figures load, and a screenshot is not blank."""
    run = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=15000", "--window-size=1200,2400"]  # fmt: skip
    url = (site / page).as_uri()
    dom = subprocess.run([*run, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-3000:]
    html = dom.stdout
    if 'class="math' in (site / page).read_text():  # the page has formulas
        assert "<mjx-container" in html, "MathJax did not typeset the page"
    # Sphinx writes each formula as \(...\) or \[...\] in a "math" element; MathJax
    # replaces the TeX with its own elements
    raw = re.findall(r'<(?:span|div) class="math[^"]*">\s*\\[(\[]', html)
    assert not raw, f"{len(raw)} formulas left as raw TeX"
    for image in re.findall(r'<img[^>]*src="([^"]+)"', html):
        assert (site / page).parent.joinpath(image).resolve().is_file(), image
    shot = tmp_path / "page.png"
    done = subprocess.run([*run, f"--screenshot={shot}", url], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and shot.is_file(), done.stderr[-3000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.01, "the screenshot is blank"


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
    missing = [name for name in [*MUTANTS, *RING_MUTANTS, *CONVENTIONS] if f"`{name}`" not in text]
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
