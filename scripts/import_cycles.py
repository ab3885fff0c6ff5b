#!/usr/bin/env python3
"""Import circles between the modules of a crate: strongly connected components of the
graph "module A names module B" (`crate::b`, `use crate::{b, ...}`, `super::b`), test
modules and comments left out.

    python3 scripts/import_cycles.py [REV] [--crate trainer]

REV is a git revision (default: HEAD). Prints each circle (two or more modules) and
exits 1 if there is one.
"""

import argparse
import re
import subprocess
import sys


def sources(rev, crate):
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, f"{crate}/src"],
                           capture_output=True, text=True, check=True).stdout.split()
    for f in names:
        if f.endswith(".rs"):
            text = subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True,
                                  text=True, check=True).stdout
            yield f, text


def module(path, crate):
    m = path[len(f"{crate}/src/"):-3]
    m = m[:-4] if m.endswith("/mod") else m
    return "" if m in ("lib", "main") else m.replace("/", "::")


def graph(rev, crate):
    files = {module(f, crate): text for f, text in sources(rev, crate)}
    edges = {m: set() for m in files}

    def add(m, path):
        parts = path.split("::")
        for k in range(len(parts), 0, -1):
            cand = "::".join(parts[:k])
            if cand in files and cand != m:
                edges[m].add(cand)
                return

    for m, text in files.items():
        text = re.sub(r"//[^\n]*", "", text.split("#[cfg(test)]")[0])
        for ref in re.findall(r"crate::([a-z_]+(?:::[a-z_]+)*)", text):
            add(m, ref)
        for group in re.findall(r"use crate::\{([^}]*)\}", text):
            for item in group.split(","):
                add(m, item.strip())
        parent = "::".join(m.split("::")[:-1])
        for ref in re.findall(r"super::([a-z_]+)", text):
            add(m, f"{parent}::{ref}" if parent else ref)
    edges.pop("", None)
    return {m: e - {""} for m, e in edges.items()}


def circles(edges):
    """Tarjan's strongly connected components of two or more modules."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rev", nargs="?", default="HEAD")
    ap.add_argument("--crate", default="trainer")
    a = ap.parse_args()
    found = circles(graph(a.rev, a.crate))
    for c in found:
        print(f"circle of {len(c)}: {', '.join(c)}")
    print(f"{a.crate} at {a.rev}: {len(found)} import circle(s)")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
