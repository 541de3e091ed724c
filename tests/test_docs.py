"""The documentation site builds with `mkdocs build --strict`: a broken link or anchor, a page left out of the nav, an
API reference to a name that does not exist or a docstring griffe cannot read fails the test command, not a reader.
The site is made from the files the code host shows (docs/hooks.py): the home page is README.md, each paper's page
its papers/<name>/README.md."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2, not about this site
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_the_site_builds_strictly_with_every_page_and_the_api_reference(tmp_path):
    proc = build(tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    site = tmp_path / "site"
    home = (site / "index.html").read_text()
    assert "paperloop" in home and 'href="getting-started/"' in home
    # the papers' pages are their READMEs, images included
    for readme in sorted((ROOT / "papers").glob("*/README.md")):
        name = readme.parent.name
        page = (site / "papers" / name / "index.html").read_text()
        title = re.search(r"^# (.*)$", readme.read_text(), re.M).group(1)
        assert title.split(" (")[0].split(":")[0] in page, name
        for image in readme.parent.glob("*.png"):
            assert (site / "papers" / name / image.name).is_file(), image
    # the API reference holds the public names, with their docstrings
    api = (site / "api" / "rl" / "index.html").read_text()
    assert 'id="paperloop.rl.RLTrainer"' in api and "pass_at_k" in api


def test_links_written_for_the_code_host_are_rewritten_to_the_site_pages():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    hooks.GENERATED.update({"index.md": "README.md", "papers/rlvr.md": "papers/rlvr/README.md",
                            "papers/rlvr/results.png": "papers/rlvr/results.png"})
    readme = "[SFT](docs/guides/sft.md#batches) [RLVR](papers/rlvr/README.md) [code](trainer/base.py) [x](#here)"
    assert hooks.rewrite_links(readme, "README.md", "index.md") == (
        "[SFT](guides/sft.md#batches) [RLVR](papers/rlvr.md) [code](trainer/base.py) [x](#here)")
    page = "[home](../../README.md#set-up) ![plot](../../papers/rlvr/results.png)\n```\n[kept](../../README.md)\n```"
    assert hooks.rewrite_links(page, "docs/guides/rl.md", "guides/rl.md") == (
        "[home](../index.md#set-up) ![plot](../papers/rlvr/results.png)\n```\n[kept](../../README.md)\n```")
    paper = "![curves](results.png) [the RL guide](../../docs/guides/rl.md)"
    assert hooks.rewrite_links(paper, "papers/rlvr/README.md", "papers/rlvr.md") == (
        "![curves](rlvr/results.png) [the RL guide](../guides/rl.md)")
