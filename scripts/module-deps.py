#!/usr/bin/env python3
"""The crate's top-level module graph, from every `crate::<module>` path in
non-test code, and the cycles in it.

    python3 scripts/module-deps.py          # edges, then cycles; exit 1 if any
    python3 scripts/module-deps.py --quiet  # only the cycles (for .ci/run)

A file belongs to the top-level module it sits in (src/volume/device.rs is
`volume`); uses inside one module are not edges. Test code (`#[cfg(test)]`
items, braces matched) is left out: a test may reach anywhere.
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
# Generated code and the crate root are not modules of their own.
SKIP = {"lib", "main", "proto"}


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def strip_comments(text: str) -> str:
    # Line comments only (doc comments name modules in prose); strings are kept,
    # a `crate::` inside one is rare enough to read by hand.
    return re.sub(r"//[^\n]*", "", text)


def strip_test_items(text: str) -> str:
    """Removes every `#[cfg(test)]` item: up to its `;` or its matching brace."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        j = m.end()
        while j < len(text) and text[j] not in "{;":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
        else:
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def targets(text: str) -> set[str]:
    found = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
    # `use crate::{a::X, b}` names several modules at once.
    for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
        found.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.rs")):
        source = module_of(path)
        if source in SKIP:
            continue
        text = strip_test_items(strip_comments(path.read_text()))
        used = {t for t in targets(text) if t != source and t not in SKIP}
        edges.setdefault(source, set()).update(used)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    edges = graph()
    if "--quiet" not in sys.argv:
        for source in sorted(edges):
            print(f"{source:8} -> {', '.join(sorted(edges[source])) or '(nothing)'}")
    found = cycles(edges)
    for component in found:
        print(f"cycle of {len(component)}: {' '.join(component)}")
    if not found:
        print("no cycles between top-level modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
