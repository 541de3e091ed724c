"""MkDocs hooks: the site is built from the files the code host shows, never from copies of them.

- The home page is README.md, and each paper's page is its papers/<name>/README.md (with the images beside it).
- `<!-- include FILE:SECTION -->` ... `<!-- end include -->` in a page is replaced by the part of FILE between
  `<!-- section:SECTION -->` and `<!-- end section:SECTION -->` (the code host shows the link left in between).
- The API reference reads the package as it installs: `paperloop` is the `trainer/` folder with `callbacks/`,
  `models/` and `papers/` mapped into it (pyproject.toml), a layout griffe cannot follow from the folders. So
  `build/api/paperloop` is made of links to those folders, and mkdocstrings reads it there (`paths` in mkdocs.yml).
- A relative link is written for the repository (what the code host follows: `docs/guides/sft.md` from the README,
  `../papers/rlvr/README.md` from a docs page) and rewritten here to the page the site makes of that file. A link to
  a file the site has no page for is left alone, so `mkdocs build --strict` fails on it.
"""

import posixpath
import re
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
GENERATED: dict[str, str] = {}  # the site's path of a generated file -> the repository path it comes from
INCLUDE = re.compile(r"<!-- include (?P<file>[^:\s]+):(?P<section>[\w-]+) -->.*?<!-- end include -->", re.S)
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"(^```.*?^```)", re.S | re.M)


def package_tree() -> Path:
    """`build/api/paperloop`: the installed package's layout, made of links to the repository's folders."""
    package = ROOT / "build" / "api" / "paperloop"
    if package.is_dir():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for entry in sorted((ROOT / "trainer").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for folder in ("callbacks", "models", "papers"):
        (package / folder).symlink_to(ROOT / folder)
    return package.parent


@event_priority(100)  # before mkdocstrings' on_config, which drops a `paths` entry that does not exist yet
def on_config(config):
    package_tree()
    return config


def paper_folders() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "papers").glob("*/README.md"))


def on_files(files, config):
    """Adds the README as the home page and every paper's README (and its images) as the paper's page."""
    generated = {"index.md": "README.md"}
    for folder in paper_folders():
        generated[f"papers/{folder.name}.md"] = f"papers/{folder.name}/README.md"
        for image in sorted(folder.glob("*.png")):
            generated[f"papers/{folder.name}/{image.name}"] = f"papers/{folder.name}/{image.name}"
    for site_path, repo_path in generated.items():
        if files.get_file_from_path(site_path) is not None:
            raise ValueError(f"docs/{site_path} would hide {repo_path}: the site makes that page from {repo_path}")
        if site_path.endswith(".md"):
            files.append(File.generated(config, site_path, content=(ROOT / repo_path).read_text()))
        else:
            files.append(File.generated(config, site_path, abs_src_path=str(ROOT / repo_path)))
    GENERATED.clear()
    GENERATED.update(generated)
    return files


def repo_path_of(site_path: str) -> str:
    return GENERATED.get(site_path, f"docs/{site_path}")


def site_path_of(repo_path: str) -> str | None:
    """The site's path for a repository file, or None where the site has no page for it."""
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    for site_path, source in GENERATED.items():
        if source == repo_path:
            return site_path
    return None


def rewrite_links(markdown: str, repo_file: str, site_file: str) -> str:
    """Links written relative to `repo_file` in the repository, made relative to `site_file` in the site."""

    def rewrite(match):
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):  # a URL, an anchor on the page, a site-absolute path
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        site_target = site_path_of(posixpath.normpath(posixpath.join(posixpath.dirname(repo_file), path)))
        if site_target is None:
            return match.group(0)
        relative = posixpath.relpath(site_target, posixpath.dirname(site_file) or ".")
        return f"{match.group(1)}{relative}{hash_}{anchor}{match.group(3)}"

    parts = FENCE.split(markdown)  # code blocks are left as they are
    return "".join(part if i % 2 else LINK.sub(rewrite, part) for i, part in enumerate(parts))


def section(repo_file: str, name: str) -> str:
    text = (ROOT / repo_file).read_text()
    found = re.search(rf"<!-- section:{name} -->\n(.*?)<!-- end section:{name} -->", text, re.S)
    if found is None:
        raise ValueError(f"{repo_file} has no section {name!r} (<!-- section:{name} --> ... <!-- end section:{name} -->)")
    return found.group(1)


def on_page_markdown(markdown, page, config, files):
    site_file = page.file.src_uri
    repo_file = repo_path_of(site_file)

    def include(match):
        source = posixpath.normpath(posixpath.join(posixpath.dirname(repo_file), match.group("file")))
        return rewrite_links(section(source, match.group("section")), source, site_file)

    return INCLUDE.sub(include, rewrite_links(markdown, repo_file, site_file))
