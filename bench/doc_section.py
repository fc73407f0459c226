#!/usr/bin/env python3
"""Write a benchmark's section into docs/BENCHMARKS.md between its markers.

usage: bench/doc_section.py DOC MARKER SCRIPT TITLE < section-body

The body (read from standard input) goes between `<!-- BEGIN MARKER (SCRIPT) -->` and
`<!-- END MARKER -->`; a document without those markers gets a new `## TITLE` section at its end.
"""
import re
import sys

doc, marker, script, title = sys.argv[1:5]
body = sys.stdin.read().strip("\n")
section = f"<!-- BEGIN {marker} ({script}) -->\n{body}\n<!-- END {marker} -->"
text = open(doc).read()
pattern = re.compile(rf"<!-- BEGIN {re.escape(marker)} \(.*?<!-- END {re.escape(marker)} -->", re.S)
if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
else:
    text = text.rstrip("\n") + f"\n\n## {title}\n\n{section}\n"
open(doc, "w").write(text)
