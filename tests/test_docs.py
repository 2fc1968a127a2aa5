"""The documentation: the site builds with --strict (no broken link, anchor or API reference) and fetches nothing,
README.md stays a short first page whose links resolve, and every `tether` command shown in a bash block of the
README or the docs parses with the real command line."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# the example package of docs/architecture.md ("The registry"): its module, and the subcommand it adds once installed
EXAMPLE_PLUGIN_MODULE, EXAMPLE_PLUGIN_COMMANDS = "my_plugins.py", {"hello"}


def test_site_builds_strict_and_offline(tmp_path):
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs is not installed: `make install` installs the docs extra")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARNING" not in log, log
    # the API reference is generated from the docstrings, and the included parts of README/BENCHMARKS are there
    assert 'id="tether.losses.dpo_loss"' in (site / "reference" / "losses.html").read_text()
    assert 'id="tether.registry.register"' in (site / "reference" / "registry.html").read_text()
    assert "toy_preferences(200, seed=1)" in (site / "quickstart.html").read_text()
    assert "benchmark (issue)" in (site / "benchmarks.html").read_text()
    remote = re.compile(r"""(<script[^>]+src|<link[^>]+href|<img[^>]+src|url\()\s*=?\s*["']?(https?:)?//""")
    fetched = [p.name for p in site.rglob("*") if p.suffix in {".html", ".css"} and remote.search(p.read_text())]
    assert not fetched, f"pages that load something from the network: {fetched}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _markdown_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def _raw_images(page: Path) -> list[str]:
    """<img src=...> paths, which the strict build does not check."""
    return [t for t in re.findall(r'<img[^>]+src="([^"]+)"', page.read_text()) if not re.match(r"[a-z]+:", t)]


def _broken(page: Path, targets: list[str]) -> list[str]:
    found = []
    for target in targets:
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            found.append(f"{page.relative_to(ROOT)}: {target}")
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            found.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return found


def test_readme_is_a_short_first_page_and_its_links_resolve():
    readme = ROOT / "README.md"
    text = readme.read_text()
    assert len(text.splitlines()) < 250, "README.md has 250 lines or more; move the detail to a page under docs/"
    assert "make demo" in text and "make test" in text  # the two commands; CI runs `make test`
    broken = _broken(readme, _markdown_links(readme) + _raw_images(readme))
    broken += [b for page in PAGES[1:] for b in _broken(page, _raw_images(page))]
    assert not broken, broken


def _shell_commands(page: Path):
    """Every line of the page's bash blocks, continuation lines joined."""
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                yield line


def _tether_argv(line: str) -> list[str] | None:
    """The arguments after `tether` (or `-m tether.cli`) in a shell line, or None when the line runs no tether."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = list(lexer)
    for i, word in enumerate(words):
        if word == "tether" or word.endswith("/bin/tether"):
            start = i + 1
        elif word == "tether.cli" and i and words[i - 1] == "-m":
            start = i + 1
        else:
            continue
        rest = words[start:]
        end = next((j for j, w in enumerate(rest) if w in {"|", "&&", ";", "||", ">", "2>"}), len(rest))
        return rest[:end]
    return None


def test_every_tether_command_shown_parses():
    """A renamed flag or subcommand breaks a page; this finds it. Parsing only: nothing runs."""
    import contextlib
    import io

    from tether.cli import build_parser

    parser = build_parser()
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    bad, seen = [], 0
    for page in PAGES:
        for line in _shell_commands(page):
            where = f"{page.relative_to(ROOT)}: {line.strip()}"
            make = re.match(r"\s*make ([\w-]+)", line)
            if make and make.group(1) not in targets:
                bad.append(f"{where}: no Makefile target {make.group(1)!r}")
            argv = _tether_argv(line)
            if argv is None or (argv and argv[0] in EXAMPLE_PLUGIN_COMMANDS):
                continue
            seen += 1
            bad += [f"{where}: no such file {w}" for w in argv if w.startswith("examples/") and not (ROOT / w).exists()]
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    args, extras = parser.parse_known_args(argv)
            except SystemExit as e:
                if e.code != 0 or "--help" not in argv:
                    bad.append(f"{where}: the parser refused it")
                continue
            if extras or not getattr(args, "func", None):
                bad.append(f"{where}: unknown {extras}" if extras else f"{where}: not a whole command")
    assert seen > 20, f"only {seen} tether commands found in the pages"
    assert not bad, "\n".join(bad)


def test_the_architecture_page_names_every_module():
    """docs/architecture.md lists every module of both packages and names none that does not exist, so a module
    added, moved or renamed shows up here."""
    text = re.sub(r"```.*?```", "", (ROOT / "docs" / "architecture.md").read_text(), flags=re.S)
    named = set(re.findall(r"`([\w/]+\.py)`", text)) - {EXAMPLE_PLUGIN_MODULE}
    packages = [ROOT / "src" / "tether", ROOT / "src" / "tether_lab"]
    modules = {p.name for pkg in packages for p in pkg.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(modules - {Path(n).name for n in named})
    assert not missing, f"docs/architecture.md does not name these modules: {missing}"
    bases = [ROOT, *packages]
    unknown = sorted(n for n in named if not any((base / n).exists() for base in bases) and n not in modules)
    assert not unknown, f"docs/architecture.md names modules that do not exist: {unknown}"
