"""Put English text and the word-analogy questions for word2vec under the data folder, never into git.

    python scripts/fetch_word2vec_data.py                   # data/word2vec, from the gensim 4.4.0 wheel
    python scripts/fetch_word2vec_data.py --dest ~/data/w2v
    python scripts/fetch_word2vec_data.py --wheel gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.whl

Why the wheel: a package registry is reachable where the internet is not, and gensim's wheel carries its test data.
`pip download --no-deps gensim==4.4.0` fetches the wheel (a zip); three members are read out of it and checked
against the SHA-256 recorded here; nothing is installed. Written into dest:

- `enwiki.txt`: the 206 English Wikipedia articles of gensim's shortened dump
  (`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`), cleaned the way text8 was made from
  Wikipedia: markup, templates, references and tables dropped, link targets replaced by their text, lower case,
  letters only, one article per line. About 456,000 words in 106 articles: the largest running English text in
  the wheel.
- `head500.noblanks.cor`: gensim's other corpus (330,000 tokens; Porter-stemmed, stop words removed, so most
  analogy questions cannot be asked of it).
- `questions-words.txt`: the 19,544 analogy questions of Mikolov et al. (2013).
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GENSIM = "gensim==4.4.0"
WHEEL_FOLDER = "gensim/test/test_data/"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# SHA-256 of the members as gensim 4.4.0 ships them
MEMBER_SHA256 = {
    WIKI_DUMP: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "head500.noblanks.cor": "af9892fa37eef66079a8fcd5d25090104ee7e588f6121ee43817d82131f12474",
    "questions-words.txt": "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36",
}
# SHA-256 of enwiki.txt as clean_wikipedia writes it from the dump above
ENWIKI_SHA256 = "ceb1ff8ea82d5f5612b3ef5e1555ea8f985bbd7d84e626b981c65ff4b87acad5"


class FetchError(RuntimeError):
    """A download or a check that failed: one line for the user."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# markup that carries no running text, removed before links are resolved
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
_TAG = re.compile(r"<[^>]{0,200}>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_FILE_LINK = re.compile(r"\[\[(?:file|image|category|media):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://\S*\s?([^\]]*)\]")
_URL = re.compile(r"(?:https?|ftp)://\S+")
_WORD = re.compile(r"[a-z]+")


def clean_article(markup: str) -> str:
    """One article's wiki markup as lower-case words separated by spaces (text8's convention: letters only)."""
    text = html.unescape(markup)
    text = _COMMENT.sub(" ", text)
    text = _REF.sub(" ", text)
    for _ in range(5):  # nested templates and tables, innermost first
        text, templates = _TEMPLATE.subn(" ", text)
        text, tables = _TABLE.subn(" ", text)
        if not templates and not tables:
            break
    text = _FILE_LINK.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _URL.sub(" ", text)
    text = _TAG.sub(" ", text)
    return " ".join(_WORD.findall(text.lower()))


def clean_wikipedia(dump: bytes) -> str:
    """The articles (main namespace, no redirects) of a bz2 Wikipedia XML dump, one cleaned article per line."""
    xml = bz2.decompress(dump).decode("utf-8")
    lines = []
    for page in re.findall(r"<page>(.*?)</page>", xml, re.S):
        namespace = re.search(r"<ns>(\d+)</ns>", page)
        if (namespace and namespace.group(1) != "0") or "<redirect" in page:
            continue
        body = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        words = clean_article(body.group(1)) if body else ""
        if words:
            lines.append(words)
    return "\n".join(lines) + "\n"


def extract(wheel: Path, dest: Path) -> list[Path]:
    """The checked members of the wheel into dest, and enwiki.txt made from its Wikipedia dump.

    A member whose digest differs stops everything before a file is written, so dest never holds data that passed
    for the real thing.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as error:
        raise FetchError(f"'{wheel}' is not a readable wheel ({error})") from error
    members = {}
    with archive:
        names = set(archive.namelist())
        for name, digest in MEMBER_SHA256.items():
            member = WHEEL_FOLDER + name
            if member not in names:
                raise FetchError(f"'{wheel}' has no {member}; expected the {GENSIM} wheel")
            data = archive.read(member)
            if digest and sha256(data) != digest:
                raise FetchError(f"{name} from '{wheel}': SHA-256 {sha256(data)}, expected {digest}")
            members[name] = data
    text = clean_wikipedia(members.pop(WIKI_DUMP)).encode("utf-8")
    if ENWIKI_SHA256 and sha256(text) != ENWIKI_SHA256:
        raise FetchError(f"enwiki.txt made from '{wheel}': SHA-256 {sha256(text)}, expected {ENWIKI_SHA256}")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in [*members.items(), ("enwiki.txt", text)]:
        target = dest / name
        partial = target.with_suffix(target.suffix + ".part")
        partial.write_bytes(data)
        partial.replace(target)
        written.append(target)
    return written


def download_wheel(folder: Path) -> Path:
    """`pip download --no-deps gensim==4.4.0` into folder (the wheel for this Python and platform)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", GENSIM, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("gensim-4.4.0-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"pip download {GENSIM} failed: {tail[0]}")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path("data/word2vec"), help="the folder to write (data/word2vec)")
    parser.add_argument("--wheel", type=Path, default=None, help="a gensim 4.4.0 wheel already downloaded")
    args = parser.parse_args(argv)
    dest = args.dest.expanduser()
    try:
        if args.wheel is not None:
            written = extract(args.wheel.expanduser(), dest)
        else:
            with tempfile.TemporaryDirectory(prefix="gensim_") as tmp:
                written = extract(download_wheel(Path(tmp)), dest)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    words = len((dest / "enwiki.txt").read_text(encoding="utf-8").split())
    print(f"word2vec data: {len(written)} files in {dest} (checked); enwiki.txt holds {words:,} words")
    print(f"train with: python train.py experiment=word2vec_enwiki data.path={dest / 'enwiki.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
