"""How harvest/corpus/bundled.jsonl was made (run once; the output is committed).

Documents are the docstrings of CPython's standard library (PSF licence): real English prose about
programs, offline, no download. One JSON object per line: {"text": ...}.
"""
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtledemo", "test", "lib2to3", "ensurepip"}


def documents():
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in SKIP or info.name not in sys.stdlib_module_names:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:
            continue
        parts = [inspect.getdoc(module) or ""]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(f"{name}: {doc}")
        text = "\n\n".join(p for p in parts if p)
        if len(text) > 200:
            yield text


if __name__ == "__main__":
    out = Path(__file__).with_name("bundled.jsonl")
    with out.open("w") as f:
        for text in documents():
            f.write(json.dumps({"text": text}) + "\n")
    print(out, out.stat().st_size)
