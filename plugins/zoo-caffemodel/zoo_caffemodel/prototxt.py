"""Enough of protobuf's text format to read a deploy.prototxt: layers with name, type and group."""

from __future__ import annotations

import re

from zoo.errors import ZooError

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|([{}:])|([^\s{}:"\']+))')


def parse(text: str, path=None) -> dict:
    """Nested dicts of lists: {"layer": [{"name": ["conv1"], "convolution_param": [{"group": ["2"]}]}, ...]}."""
    tokens = []
    for comment, string, punct, word in _TOKEN.findall(text):
        if comment:
            continue
        tokens.append(string[1:-1] if string else punct or word)
    pos = 0

    def message(closing: bool) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens):
            key = tokens[pos]
            if key == "}":
                if not closing:
                    raise ZooError("unbalanced '}' in prototxt", path)
                pos += 1
                return out
            pos += 1
            if pos < len(tokens) and tokens[pos] == ":":
                pos += 1
            if pos >= len(tokens):
                raise ZooError(f"prototxt ends after {key!r}", path)
            if tokens[pos] == "{":
                pos += 1
                out.setdefault(key, []).append(message(True))
            else:
                out.setdefault(key, []).append(tokens[pos])
                pos += 1
        if closing:
            raise ZooError("prototxt ends inside a message", path)
        return out

    return message(False)


def layer_settings(text: str, path=None) -> dict[str, dict]:
    """{layer name as specs write it ("/" as "_"): {"type": ..., "group": int}} for `layer` and V1 `layers` entries."""
    net = parse(text, path)
    out = {}
    for entry in net.get("layer", []) + net.get("layers", []):
        name = entry.get("name", [""])[0]
        conv = (entry.get("convolution_param") or [{}])[0]
        out[name.replace("/", "_")] = {"type": entry.get("type", [""])[0], "group": int(conv.get("group", ["1"])[0])}  # spec names
    return out
