"""The documentation cannot rot: its code runs, its settings reference is complete.

- Every ```` ```python ```` block of README and ``docs/`` compiles, and what it imports from
  ``django_rpc_audit`` exists. Blocks marked ``<!-- test: run -->`` run with the test settings
  on the test database; a ``DJANGO_CFG_RPC`` they set must parse.
- Every ```` ```pycon ```` block is a doctest: it runs, and its output must match.
- Every field of ``DjangoCfgRPCConfig`` has a ``#:`` doc comment, which the generated settings
  reference shows; every system check id is on the checks page.
- The tooling of ``docs/hooks/`` (reST docstrings to Markdown, README as the front page).

The strict MkDocs build itself runs in ``scripts/test``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import doctest
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.utils.module_loading import import_string

from django_rpc_audit import transports
from django_rpc_audit.conf import DjangoCfgRPCConfig
from django_rpc_audit.signals import rpc_finished, rpc_started
from tests import settings as test_settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs" / "hooks"))

import docs_markup  # noqa: E402
import docs_pages  # noqa: E402

RUN_MARKER = "<!-- test: run -->"
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    run: bool

    @property
    def id(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"


def markdown_files() -> list[Path]:
    pages = sorted(path for path in (ROOT / "docs").rglob("*.md") if "hooks" not in path.parts)
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "BENCHMARKS.md", *pages]


def code_blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of ``path``, indented ones (in list items) included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        language = (match.group("info").strip().split() or [""])[0]
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            line = lines[end]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            end += 1
        assert end < len(lines), f"{path}:{index + 1}: unclosed code block"
        yield Block(
            path, index + 1, language, "\n".join(body) + "\n", previous.strip() == RUN_MARKER
        )
        index = end + 1


BLOCKS = [block for path in markdown_files() for block in code_blocks(path)]
PYTHON = [block for block in BLOCKS if block.language == "python"]
RUNNABLE = [block for block in PYTHON if block.run]
PYCON = [block for block in BLOCKS if block.language == "pycon"]


def test_the_docs_have_code_to_check():
    # The extraction itself works: a wrong fence pattern would silently check nothing.
    assert len(PYTHON) >= 20
    assert len(RUNNABLE) >= 12
    assert len(PYCON) >= 6
    assert {block.path.name for block in RUNNABLE} >= {"README.md", "getting-started.md"}


def test_run_markers_sit_on_python_blocks():
    for path in markdown_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line.strip() == RUN_MARKER:
                following = next(text for text in lines[number + 1 :] if text.strip())
                assert following.strip() == "```python", f"{path.name}:{number + 1}"


def _package_imports(tree: ast.Module) -> list[ast.stmt]:
    return [
        node
        for node in tree.body
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("django_rpc_audit"))
        or (
            isinstance(node, ast.Import)
            and any(alias.name.startswith("django_rpc_audit") for alias in node.names)
        )
    ]


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.id)
def test_python_block_compiles_and_its_imports_exist(block):
    tree = ast.parse(block.code, filename=block.id)
    compile(tree, block.id, "exec")
    imports = ast.Module(body=_package_imports(tree), type_ignores=[])
    exec(compile(imports, block.id, "exec"), {})


@pytest.fixture
def restored_registries() -> Iterator[None]:
    """Receivers and local handlers that a documented example registers are removed after it."""
    signals = {signal: list(signal.receivers) for signal in (rpc_started, rpc_finished)}
    handlers = dict(transports._local_handlers)
    yield
    for signal, receivers in signals.items():
        signal.receivers = receivers
        signal.sender_receivers_cache.clear()
    transports._local_handlers.clear()
    transports._local_handlers.update(handlers)


def _settings_namespace() -> dict[str, object]:
    """The test settings, copied: ``INSTALLED_APPS += [...]`` in an example changes nothing."""
    return {
        name: copy.deepcopy(value) for name, value in vars(test_settings).items() if name.isupper()
    }


@pytest.mark.django_db
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.id)
def test_runnable_block_runs(block, restored_registries):
    namespace = _settings_namespace()
    before = copy.deepcopy(namespace)
    exec(compile(block.code, block.id, "exec"), namespace)
    if "DJANGO_CFG_RPC" in namespace:
        value = namespace["DJANGO_CFG_RPC"]
        if not isinstance(value, DjangoCfgRPCConfig):
            DjangoCfgRPCConfig.from_mapping(value)  # raises ImproperlyConfigured if invalid
    for path in set(namespace.get("MIDDLEWARE", ())) - set(before["MIDDLEWARE"]):
        import_string(path)
    for app in set(namespace.get("INSTALLED_APPS", ())) - set(before["INSTALLED_APPS"]):
        __import__(app)


PYCON_PAGES = sorted({block.path for block in PYCON})


@pytest.mark.django_db
@pytest.mark.parametrize("path", PYCON_PAGES, ids=lambda path: path.name)
def test_pycon_blocks_are_passing_doctests(path, restored_registries):
    """A page's pycon blocks run in order, in one namespace, as a reader would type them."""
    globs: dict[str, object] = {}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    output = io.StringIO()
    for block in (block for block in PYCON if block.path == path):
        test = doctest.DocTestParser().get_doctest(
            block.code, globs, block.id, str(block.path), block.line
        )
        assert test.examples, f"{block.id}: a pycon block without examples"
        runner.run(test, out=output.write, clear_globs=False)
        globs = test.globs  # DocTest works on a copy: carry the names to the next block
    assert runner.summarize(verbose=False).failed == 0, output.getvalue()


def test_a_broken_example_fails(tmp_path):
    """The checks above fail on a broken example (proof that they can)."""
    broken = "```python\nfrom django_rpc_audit import get_rpc_client\nget_rpc_client(.call()\n```\n"
    doc = tmp_path / "broken-example.md"
    doc.write_text(broken, encoding="utf-8")
    (block,) = code_blocks(doc)
    with pytest.raises(SyntaxError):
        test_python_block_compiles_and_its_imports_exist(block)
    missing = dataclasses.replace(block, code="from django_rpc_audit import no_such_name\n")
    with pytest.raises(ImportError):
        test_python_block_compiles_and_its_imports_exist(missing)
    wrong_output = ">>> 1 + 1\n3\n"
    test = doctest.DocTestParser().get_doctest(wrong_output, {}, "wrong", "wrong", 0)
    assert doctest.DocTestRunner().run(test, out=lambda text: None).failed == 1


# -- The settings reference


def test_every_setting_has_a_doc_comment():
    comments = docs_markup.config_comments()
    undocumented = [
        field.name.upper()
        for field in dataclasses.fields(DjangoCfgRPCConfig)
        if not comments.get(field.name)
    ]
    assert undocumented == [], (
        f"DJANGO_CFG_RPC keys without a '#:' doc comment in conf.py: {', '.join(undocumented)}"
    )


def test_doc_comments_are_read_as_sphinx_reads_them():
    source = '''
class Config:
    """Docstring."""

    #: First line,
    #: second line.
    documented: int = 1
    # A plain comment is no doc comment.
    plain: int = 2
    #: Shared comments do not carry over.
    grouped_a: int = 3
    grouped_b: int = 4
'''
    assert docs_markup.doc_comments(source, "Config") == {
        "documented": "First line, second line.",
        "grouped_a": "Shared comments do not carry over.",
    }


def test_settings_reference_shows_every_key_with_its_facts():
    markdown = docs_markup.settings_markdown(docs_pages.resolve_package_path)
    for field in dataclasses.fields(DjangoCfgRPCConfig):
        key = field.name.upper()
        assert f"### `{key}` {{#{field.name}}}" in markdown
        assert f"`DJANGO_CFG_RPC__{key}`" in markdown
    assert (
        '**Type** `"buffered"` or `"sync"` or `"stream"` · **Default** `"buffered"` · '
        "**Environment** `DJANGO_CFG_RPC__WRITE_MODE`"
    ) in markdown
    assert "**Type** list of str · **Default** `[]`" in markdown  # TRUSTED_PROXY_IPS
    assert "**Type** dict of str to float · **Default** `{}`" in markdown  # SAMPLE_RATES
    assert "**Default** `100,000`" in markdown  # BUFFER_SIZE
    assert "## Data hygiene" in markdown
    assert "## Buffered writer" in markdown
    assert '## Log stream (WRITE_MODE "stream") and its ingest workers' in markdown
    # A role in a comment becomes a link the strict build checks.
    assert "[`get_rpc_client`][django_rpc_audit.get_rpc_client]" in markdown


def test_every_check_id_is_documented():
    source = (ROOT / "django_rpc_audit" / "checks.py").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="(django_rpc_audit\.[EW]\d{3})"', source))
    page = (ROOT / "docs" / "checks.md").read_text(encoding="utf-8")
    assert len(ids) >= 6
    assert sorted(check for check in ids if f"`{check}`" not in page) == []


# -- Docstrings as Markdown


def _resolve(target: str) -> str | None:
    return {"RPCClient": "django_rpc_audit.client.RPCClient", "acall": None}.get(target)


def test_roles_become_cross_references_or_code():
    text = ":class:`RPCClient`, :class:`~RPCClient`, :meth:`acall` and :class:`~x.Signal`"
    assert docs_markup.roles_to_markdown(text, _resolve) == (
        "[`RPCClient`][django_rpc_audit.client.RPCClient], "
        "[`RPCClient`][django_rpc_audit.client.RPCClient], `acall` and `Signal`"
    )


LITERAL_BLOCKS = (
    "Use it so::\n\n    client.call('x')\n    client.close()\n\n"
    "Then more.\n\n::\n\n    $ not python\n",
    [
        *("Use it so:", "", "```python", "client.call('x')", "client.close()", "```", ""),
        *("Then more.", "", "", "```", "$ not python", "```"),
    ],
)
DEFINITION_LISTS = (
    "Keyword arguments:\n\n``method`` (str)\n    The RPC method\n    name.\n"
    "``user``\n    The user.\n\n:raises RPCError: unchanged\n    continued.\n",
    [
        *("Keyword arguments:", "", "``method`` (str)", ":   The RPC method name.", ""),
        *("``user``", ":   The user.", "", "", ":raises RPCError: unchanged", "    continued."),
    ],
)


@pytest.mark.parametrize(
    ("rst", "markdown"),
    [LITERAL_BLOCKS, DEFINITION_LISTS],
    ids=["literal blocks become fenced code", "definition lists; field lists unchanged"],
)
def test_rst_to_markdown(rst, markdown):
    assert docs_markup.rst_to_markdown(rst, _resolve).splitlines() == markdown


# -- README as the front page


def test_readme_links_are_rewritten_for_the_site():
    readme = "See [admin](docs/admin.md#who), [log](CHANGELOG.md), ![s](docs/assets/a.png), [x](https://x.org/a.md)."
    assert docs_pages.readme_as_index(readme) == (
        "See [admin](admin.md#who), [log](changelog.md), ![s](assets/a.png), [x](https://x.org/a.md)."
    )
    with pytest.raises(ValueError, match="LICENSE"):
        docs_pages.readme_as_index("[license](LICENSE)")


def test_readme_links_point_at_existing_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [target for target in targets if "://" not in target]
    assert len(local) >= 15
    assert [target for target in local if not (ROOT / target).is_file()] == []
    docs_pages.readme_as_index(readme)  # every link has a page on the site


def test_docs_screenshots_exist_and_are_shown():
    shots = ROOT / "docs" / "assets" / "screenshots"
    for name in ("admin-changelist", "admin-detail", "dashboard"):
        assert (shots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    admin_page = (ROOT / "docs" / "admin.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert admin_page.count("](assets/screenshots/") == 3
    assert readme.count("](docs/assets/screenshots/") == 2
