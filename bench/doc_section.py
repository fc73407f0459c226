#!/usr/bin/env python3
"""Write one bench script's section of docs/BENCHMARKS.md between its markers.

    doc_section.py DOC NAME HEADING SCRIPT < BODY

replaces the text between `<!-- BEGIN NAME` and `<!-- END NAME -->` in DOC with BODY (the
markers stay, the BEGIN one naming SCRIPT), or appends `## HEADING` and the marked BODY at
the end when DOC has no such markers yet. Shared by the bench scripts that write a section
(bench/pagecache.sh, dense.sh, containerd.sh, convert.sh; bench/run.sh has its own GENERATED
block through report.py).
"""
import re
import sys


def splice(doc, name, heading, body, script):
    begin = f"<!-- BEGIN {name} ({script}) -->"
    end = f"<!-- END {name} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = open(doc).read()
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)}\b.*?<!-- END {re.escape(name)} -->", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{section}\n"
    open(doc, "w").write(text)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: doc_section.py DOC NAME HEADING SCRIPT < BODY")
    splice(sys.argv[1], sys.argv[2], sys.argv[3], sys.stdin.read(), sys.argv[4])
