"""The user-facing docs stand alone: no pointer outside the repository, every link resolves.

README.md and docs/*.md are what a newcomer reads on a fresh clone; a link to a file that
is not in the repository (the design brief the project started from, a sibling folder)
is a dead end for them. Committed images stay small enough to keep the clone light.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_docs_point_nowhere_outside_the_repository():
    bad = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if "../shared" in line or re.search(r"\bDESIGN(\.md| §)", line):
                bad.append(f"{doc.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_every_relative_link_and_image_exists():
    missing = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).resolve().exists():
                missing.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not missing, missing


def test_committed_images_are_small():
    images = sorted((REPO / "docs" / "images").glob("*.png"))
    assert images, "docs/images holds the demo's plot and the trace screenshots"
    big = {p.name: p.stat().st_size for p in images if p.stat().st_size >= 300_000}
    assert not big, big
