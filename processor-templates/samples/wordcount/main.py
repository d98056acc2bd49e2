"""wordcount: counts the words of the file submitted as `text` (/run/in/text).

A word is a run of letters, digits or underscores, with inner apostrophes kept
("don't"), compared case-folded. Writes the artifact `counts.csv` (`word,count`, by
count descending, then word) and the result `{"words": total, "distinct": n}`.
Exits 2 when no file named `text` was submitted.
"""

import csv
import io
import re
import sys
from collections import Counter

from runner_processor import input_file, run_id, write_artifact, write_result

WORD = re.compile(r"\w+(?:['\u2019]\w+)*")

try:
    path = input_file("text")
except FileNotFoundError as exc:
    print(f"{exc}: submit one with `--file text=PATH`", file=sys.stderr, flush=True)
    sys.exit(2)

counts: Counter[str] = Counter()
with open(path, encoding="utf-8", errors="replace") as handle:
    for line in handle:
        counts.update(word.casefold() for word in WORD.findall(line))

table = io.StringIO()
writer = csv.writer(table, lineterminator="\n")
writer.writerow(["word", "count"])
writer.writerows(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
write_artifact("counts.csv", table.getvalue())

total = sum(counts.values())
print(f"wordcount run={run_id()}: {total} words, {len(counts)} distinct", flush=True)
write_result({"words": total, "distinct": len(counts)})
