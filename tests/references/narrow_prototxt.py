#!/usr/bin/env python3
"""Make a narrow variant of a Caffe deploy prototxt, by a text-level edit of num_output lines.

The rule, exactly (nothing else changes: same layer names, input size, pooling, padding, strides,
groups, structure, comments and formatting):

  * every layer of type "Convolution": num_output // 8 (it must be divisible by 8, else this fails);
  * every layer of type "InnerProduct": the LAST InnerProduct layer in the file (the 1000-way
    classifier) keeps its num_output; every other InnerProduct gets num_output // 16 (4096 -> 256;
    it must be divisible by 16, else this fails).

Each Convolution/InnerProduct layer block must hold exactly one num_output; the layer's type is read
at the block's own depth (not weight_filler's type). Only `layer { ... }` (V2) blocks are handled;
a V1 `layers { ... }` block makes this fail.

    python3 narrow_prototxt.py IN.prototxt OUT.prototxt

Python 3 standard library only.
"""

import re
import sys

CONV_DIV = 8
FC_DIV = 16


def _scan(text):
    """Yield (kind, start, end) for top-level `layer { ... }` blocks; kind is the keyword."""
    i, n, depth = 0, len(text), 0
    start = kind = None
    word = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    while i < n:
        c = text[i]
        if c == "#":  # comment to end of line
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c in "\"'":  # quoted string
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise SystemExit("unbalanced braces")
            if depth == 0 and start is not None:
                yield kind, start, i + 1
                start = None
        elif depth == 0:
            m = word.match(text, i)
            if m:
                w = m.group(0)
                if w in ("layer", "layers"):
                    if w == "layers":
                        raise SystemExit("V1 'layers' blocks are not handled")
                    start, kind = i, w
                i = m.end()
                continue
        i += 1
    if depth != 0:
        raise SystemExit("unbalanced braces")


def _own_type(block):
    """The layer's own type: a `type:` field at depth 1 of the block."""
    depth, i, n = 0, 0, len(block)
    while i < n:
        c = block[i]
        if c == "#":
            j = block.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 1:
            m = re.compile(r"\btype\s*:\s*\"([^\"]*)\"").match(block, i)
            if m and (i == 0 or not (block[i - 1].isalnum() or block[i - 1] == "_")):
                return m.group(1)
            if c == '"':  # skip other strings
                j = block.find('"', i + 1)
                i = j + 1
                continue
        i += 1
    raise SystemExit("layer without a type:\n" + block[:200])


NUM_OUT = re.compile(r"(\bnum_output\s*:\s*)(\d+)")


def narrow(text):
    blocks = [(s, e, _own_type(text[s:e])) for _, s, e in _scan(text)]
    ips = [k for k, (_, _, t) in enumerate(blocks) if t == "InnerProduct"]
    last_ip = ips[-1] if ips else None
    out, pos, changes = [], 0, []
    for k, (s, e, t) in enumerate(blocks):
        if t not in ("Convolution", "InnerProduct"):
            continue
        block = text[s:e]
        hits = NUM_OUT.findall(block)
        name = re.search(r"\bname\s*:\s*\"([^\"]*)\"", block)
        name = name.group(1) if name else "?"
        if len(hits) != 1:
            raise SystemExit(f"layer {name}: expected exactly one num_output, found {len(hits)}")
        old = int(hits[0][1])
        if t == "Convolution":
            div = CONV_DIV
        else:
            div = 1 if k == last_ip else FC_DIV
        if old % div:
            raise SystemExit(f"layer {name} ({t}): num_output {old} is not divisible by {div}")
        new = old // div
        changes.append((name, t, old, new))
        out.append(text[pos:s])
        out.append(NUM_OUT.sub(lambda m, new=new: m.group(1) + str(new), block))
        pos = e
    out.append(text[pos:])
    return "".join(out), changes


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__)
    text = open(argv[1]).read()
    new, changes = narrow(text)
    with open(argv[2], "w") as f:
        f.write(new)
    for name, t, old, nw in changes:
        print(f"{name:32s} {t:13s} {old:5d} -> {nw}")


if __name__ == "__main__":
    main(sys.argv)
