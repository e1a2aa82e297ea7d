"""python -m benchmarks.ood_text DICT OUT [--max_lines N]: English prose from another domain than the built-in
corpus (the World English Bible), for the out-of-domain columns of the README's recipe tables.

DICT is a dictd database, plain or gzipped (.dict / .dict.dz): the README uses FOLDOC, the Free On-line Dictionary
of Computing (Debian's dict-foldoc package), whose entries are paragraphs of technical English. Each paragraph of
an entry becomes one line: indentation joined, {cross-reference} braces and <domain> tags dropped, URLs, dates and
paragraphs under 12 words skipped. The first N such lines are written (default 2000), in the dictionary's order,
so the file is the same on every machine with the same package version.
"""

from __future__ import annotations

import argparse
import gzip
import re

MIN_WORDS = 12


def paragraphs(text: str):
    """The prose paragraphs of a dictd text: blocks of indented lines, cleaned."""
    block: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith((" ", "\t")) and line.strip():
            block.append(line.strip())
            continue
        if block:
            yield _clean(" ".join(block))
            block = []


def _clean(p: str) -> str:
    p = re.sub(r"<[^>]*>", " ", p)  # <programming> domain tags
    p = re.sub(r"\([^)]*https?://[^)]*\)", " ", p)  # (http://...) references
    p = p.replace("{", "").replace("}", "")
    return re.sub(r"\s+", " ", p).strip()


def keep(p: str) -> bool:
    return len(p.split()) >= MIN_WORDS and "http" not in p and not re.fullmatch(r"\(\d{4}-\d\d-\d\d\)", p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dict", help="a dictd .dict or .dict.dz file")
    ap.add_argument("out", help="the text file to write, one paragraph per line")
    ap.add_argument("--max_lines", type=int, default=2000)
    args = ap.parse_args()
    opener = gzip.open if args.dict.endswith(".dz") or args.dict.endswith(".gz") else open
    with opener(args.dict, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = [p for p in paragraphs(text) if keep(p)][: args.max_lines]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(lines)} paragraphs, {sum(len(p.split()) for p in lines)} words -> {args.out}")


if __name__ == "__main__":
    main()
