"""filework: reads the files at /run/in and leaves artifacts under /run/out, by input.mode.

copy      every input file to /run/out/copies/<name>; the result maps names to SHA-256s
tryin     tries to write, change and remove under /run/in; the result says what failed
symlink   /run/out/link -> /run/in (an artifact that is a link: invalid_output)
fifo      /run/out/pipe is a FIFO (invalid_output)
hardlink  /run/out/a and /run/out/b are one file (invalid_output)
tree      files under nested directories, input.bytes in all (exactly, in 3 files)
sparse    /run/out/sparse of apparent size input.bytes, nearly no blocks
html      /run/out/report.html holding a script tag
fail      leaves /run/out/partial.txt and exits 3
many      input.count files of one byte
note      /run/out/note.txt holding input.note (for reuse: the same input gives the same)
"""

import hashlib
import os
import sys

from runner_processor import read_input, write_result

OUT, IN = "/run/out", "/run/in"


def put(name, data):
    path = os.path.join(OUT, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def attempt(what, action):
    try:
        action()
        return f"{what}: allowed"
    except OSError as exc:
        return f"{what}: {exc.strerror}"


def main():
    job = read_input()
    mode = job["mode"]
    names = sorted(os.listdir(IN))
    print(f"mode={mode} inputs={names}", flush=True)
    if mode == "copy":
        sums = {}
        os.makedirs(os.path.join(OUT, "copies"), exist_ok=True)
        for name in names:  # streamed: a large file needs no memory to copy
            digest = hashlib.sha256()
            with open(os.path.join(IN, name), "rb") as source, \
                    open(os.path.join(OUT, "copies", name), "wb") as target:
                while chunk := source.read(1024 * 1024):
                    digest.update(chunk)
                    target.write(chunk)
            sums[name] = digest.hexdigest()
        write_result(sums)
    elif mode == "tryin":
        target = os.path.join(IN, names[0]) if names else os.path.join(IN, "none")
        report = [
            attempt("create", lambda: open(os.path.join(IN, "new"), "wb").close()),
            attempt("append", lambda: open(target, "ab").close()),
            attempt("remove", lambda: os.remove(target)),
            attempt("chmod", lambda: os.chmod(target, 0o666)),
        ]
        print("\n".join(report), flush=True)
        write_result({"report": report})
    elif mode == "symlink":
        os.symlink(IN, os.path.join(OUT, "link"))
    elif mode == "fifo":
        os.mkfifo(os.path.join(OUT, "pipe"))
    elif mode == "hardlink":
        put("a", b"one file, two names")
        os.link(os.path.join(OUT, "a"), os.path.join(OUT, "b"))
    elif mode == "tree":
        total = job.get("bytes", 3000)
        third = total // 3
        put("top.bin", b"t" * third)
        put("d1/mid.bin", b"m" * third)
        put("d1/d2/deep.bin", b"d" * (total - 2 * third))
    elif mode == "sparse":
        with open(os.path.join(OUT, "sparse"), "wb") as handle:
            handle.truncate(job["bytes"])
    elif mode == "html":
        put("report.html", b"<html><body><script>alert(1)</script></body></html>\n")
    elif mode == "fail":
        put("partial.txt", b"written before the failure\n")
        sys.exit(3)
    elif mode == "many":
        for index in range(job.get("count", 10)):
            put(f"many/{index:05d}", b"x")
    elif mode == "note":
        put("note.txt", job.get("note", "").encode())
        write_result({"note": job.get("note", "")})


if __name__ == "__main__":
    main()
