"""The embedded model's corpus: Python's documentation and standard library, split into documents.

Sources (conf/tiny_gemma.yaml), Debian packages fetched with `apt-get download` from the package
registry and nothing else, both under the PSF License Agreement:
- `python3.11-doc`: the reST sources Sphinx ships beside the HTML (`html/_sources/**/*.rst.txt`),
  real English prose about programs with code examples. Each page is cut at its top two heading
  levels into documents; markup that is only markup (roles, index entries, author lines, labels)
  is removed, prose and code kept.
- `libpython3.11-stdlib`: the standard library's modules (tests and data tables left out), each cut
  at top-level statements into documents of at most about `max_chars`.

A document goes to the held-out split by a hash of its name, so the split depends neither on the
order of pages nor on the seed, and held-out documents are never trained on.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import CorpusConfig, SourcePackage


class CorpusError(RuntimeError):
    pass


@dataclass(frozen=True)
class Document:
    name: str        # "<source>/<file path>#<piece>", e.g. "docs/library/functools#3"
    text: str


# --- fetching -------------------------------------------------------------------------------------

def fetch_source(src: SourcePackage, work: Path) -> tuple[Path, str]:
    """(the source's root folder, the .deb it came from or ""): `src.deb` (a .deb or an unpacked
    folder), else the package downloaded with apt-get into `work` and unpacked there."""
    if src.deb:
        path = Path(src.deb).expanduser()
        if path.is_dir():
            return (path / src.root if (path / src.root).is_dir() else path), ""
        if path.suffix == ".deb" and path.is_file():
            return _unpack_deb(path, work) / src.root, path.name
        raise CorpusError(f"deb={src.deb!r} of {src.package}: neither a .deb nor an unpacked folder")
    work.mkdir(parents=True, exist_ok=True)
    debs = sorted(work.glob(f"{src.package}_*.deb"))
    if not debs:
        if not shutil.which("apt-get"):
            raise CorpusError(f"apt-get is not available to download {src.package}; fetch the .deb "
                              f"elsewhere and set its `deb:` in conf/tiny_gemma.yaml")
        spec = f"{src.package}={src.version}" if src.version else src.package
        done = subprocess.run(["apt-get", "download", spec], cwd=work, capture_output=True, text=True)
        if done.returncode != 0 and src.version:
            # A point release may have replaced the pinned version: take the current one; the
            # corpus hash in the model card then tells whether the text changed.
            print(f"[corpus] {spec} is not available; downloading the current {src.package}")
            done = subprocess.run(["apt-get", "download", src.package], cwd=work, capture_output=True, text=True)
        debs = sorted(work.glob(f"{src.package}_*.deb"))
        if done.returncode != 0 or not debs:
            raise CorpusError(f"apt-get download {spec} failed: {done.stderr.strip()[-500:]}")
    root = _unpack_deb(debs[-1], work) / src.root
    if not root.is_dir():
        raise CorpusError(f"{debs[-1].name} has no folder {src.root}")
    return root, debs[-1].name


def _unpack_deb(deb: Path, work: Path) -> Path:
    out = work / (deb.name.removesuffix(".deb") + ".unpacked")
    if not out.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=work))
        if shutil.which("dpkg-deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        else:
            _unpack_deb_portably(deb, tmp)
        tmp.rename(out)    # atomic: an interrupted unpack leaves only a temporary folder
    return out


def _unpack_deb_portably(deb: Path, dest: Path) -> None:
    """A .deb is an ar archive holding data.tar.*: enough of ar to get at it without dpkg."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise CorpusError(f"{deb} is not a Debian package")
    pos = 8
    while pos < len(blob):
        name = blob[pos:pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tempfile.NamedTemporaryFile(suffix=name) as f:
                f.write(body)
                f.flush()
                with tarfile.open(f.name) as tar:
                    tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size % 2)
    raise CorpusError(f"{deb} holds no data.tar")


# --- cleaning -------------------------------------------------------------------------------------

# Directives whose line and indented body are dropped: metadata, navigation, includes.
_DROPPED = {"index", "sectionauthor", "moduleauthor", "highlight", "toctree", "include", "literalinclude",
            "tabularcolumns", "only", "currentmodule", "module", "testsetup", "testcleanup", "raw",
            "productionlist", "rubric", "program", "c:namespace", "c:namespace-push", "c:namespace-pop"}
# Directives whose line becomes a plain sentence; the body is kept.
_ADMONITION = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "impl-detail":
               "CPython implementation detail:", "important": "Important:", "tip": "Tip:",
               "attention": "Attention:", "caution": "Caution:", "hint": "Hint:", "topic": "",
               "sidebar": "", "admonition": "", "versionadded": "New in version {}.",
               "versionchanged": "Changed in version {}:", "deprecated": "Deprecated since version {}:",
               "deprecated-removed": "Deprecated since version {}:"}
_CODE = {"code-block", "code", "doctest", "testcode", "testoutput", "sourcecode", "parsed-literal",
         "list-table", "csv-table", "table", "math", "centered", "hlist", "container", "figure", "image"}

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT_OR_LABEL = re.compile(r"^(\s*)\.\.(\s|$)")
_ROLE = re.compile(r":(?:[\w-]+:)+`([^`]+)`")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")


def _role_text(m: re.Match) -> str:
    role = m.group(0).split("`", 1)[0]
    text = m.group(1)
    if "<" in text and text.rstrip().endswith(">"):
        text = text[:text.rindex("<")].rstrip() or text
    text = text.lstrip("~!")
    if role in (":pep:", ":rfc:"):
        return f"{role.strip(':').upper()} {text}"
    if role == ":issue:":
        return f"bpo-{text}"
    if role == ":gh:":
        return f"gh-{text}"
    if m.group(1).lstrip("!").startswith("~"):
        text = text.rsplit(".", 1)[-1]
    return text


def clean_rst(text: str) -> str:
    out: list[str] = []
    skip_indent: int | None = None     # inside a dropped block: lines indented deeper than this
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        m = _DIRECTIVE.match(line)
        if m:
            lead, name, arg = m.groups()
            if name in _DROPPED:
                skip_indent = len(lead)
                continue
            if name in _ADMONITION:
                phrase = _ADMONITION[name].format(arg.split(",")[0].strip()) if "{}" in _ADMONITION[name] \
                    else " ".join(p for p in (_ADMONITION[name], arg) if p)
                out.append(lead + phrase)
            elif name in _CODE:
                out.append("")
            else:                           # function, class, method, data, opcode, c:*, ...
                out.append(lead + arg)
            continue
        if _COMMENT_OR_LABEL.match(line):   # comments, .. _label:, substitutions
            skip_indent = indent
            continue
        if _UNDERLINE.match(line) and (not out or out[-1].strip() or not line.strip()):
            continue                        # heading underline/overline, transition
        if re.match(r"^\s*:[\w -]+:(\s|$)", line) and not line.strip().startswith(":="):
            continue                        # field lists of directives (:synopsis:, :noindex:, ...)
        line = _ROLE.sub(_role_text, line)
        line = line.replace("``", "").replace("**", "")
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-2].rstrip()
            line = line + ":" if line.strip() else ""
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _sections(raw: str) -> list[str]:
    """Cut a page before each heading of its top two levels (the first two underline characters
    the page uses, as reST assigns levels by order of appearance)."""
    lines = raw.splitlines()
    levels: list[str] = []
    starts = [0]
    for i in range(1, len(lines)):
        m = _UNDERLINE.match(lines[i])
        if not m or not lines[i - 1].strip() or len(lines[i].rstrip()) < len(lines[i - 1].rstrip()):
            continue
        char = m.group(1)
        if char not in levels:
            levels.append(char)
        if levels.index(char) < 2:
            start = i - 1
            if start >= 1 and _UNDERLINE.match(lines[start - 1]):   # overlined heading
                start -= 1
            if start > starts[-1]:
                starts.append(start)
    starts.append(len(lines))
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:])]


def sphinx_documents(root: Path, min_chars: int) -> Iterator[Document]:
    pages = sorted(root.rglob("*.rst.txt"))
    if not pages:
        raise CorpusError(f"no .rst.txt files under {root}")
    for page in pages:
        stem = str(page.relative_to(root)).removesuffix(".rst.txt")
        for i, section in enumerate(_sections(page.read_text(encoding="utf-8", errors="replace"))):
            text = clean_rst(section)
            if len(text) >= min_chars:
                yield Document(f"docs/{stem}#{i}", text)


_TOP_LEVEL = re.compile(r"^(def |class |async def |@|if __name__)")
_METHOD = re.compile(r"^    (def |async def |@)")


def python_documents(root: Path, exclude: list[str], min_chars: int, max_chars: int) -> Iterator[Document]:
    files = sorted(f for f in root.rglob("*.py")
                   if f.is_file() and not f.is_symlink() and not f.name.startswith("_sysconfigdata")
                   and not set(f.relative_to(root).parts[:-1]) & set(exclude))
    if not files:
        raise CorpusError(f"no .py files under {root}")
    for f in files:
        lines = f.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        pieces, current = [], []
        for i, line in enumerate(lines):
            # Cut before a top-level definition (with its decorators and the comments just above).
            size = sum(map(len, current))
            starts = (_TOP_LEVEL.match(line) or (size >= max_chars and _METHOD.match(line))) \
                and not (i and lines[i - 1].lstrip().startswith("@"))
            if starts and size >= max_chars // 2:
                keep = []
                while current and current[-1].startswith("#"):
                    keep.insert(0, current.pop())
                pieces.append("".join(current))
                current = keep
            current.append(line)
            if size > 4 * max_chars and not line.strip():   # one huge statement (a data table)
                pieces.append("".join(current))
                current = []
        pieces.append("".join(current))
        stem = str(f.relative_to(root)).removesuffix(".py")
        for i, text in enumerate(pieces):
            text = text.strip("\n") + "\n"
            if len(text) >= min_chars:
                yield Document(f"stdlib/{stem}#{i}", text)


def source_documents(src: SourcePackage, root: Path, cfg: CorpusConfig) -> Iterator[Document]:
    if src.kind == "sphinx_sources":
        return sphinx_documents(root, cfg.min_chars)
    if src.kind == "python_source":
        return python_documents(root, list(src.exclude), cfg.min_chars, cfg.max_chars)
    raise CorpusError(f"source kind {src.kind!r} of {src.package}: choose sphinx_sources or python_source")


def is_heldout(doc: Document, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "big")
    return h < fraction * 2**64


@dataclass
class Corpus:
    train: list[Document]
    heldout: list[Document]

    def sha256(self) -> str:
        """Of every document, name and text, in order: train then held-out."""
        h = hashlib.sha256()
        for doc in self.train + self.heldout:
            h.update(json.dumps([doc.name, doc.text]).encode())
        return h.hexdigest()

    def stats(self) -> dict:
        return {"train_documents": len(self.train), "heldout_documents": len(self.heldout),
                "train_chars": sum(len(d.text) for d in self.train),
                "heldout_chars": sum(len(d.text) for d in self.heldout)}


def build_corpus(cfg: CorpusConfig, work: Path) -> tuple[Corpus, list[dict]]:
    """The corpus and, per source, what it was built from (package, .deb, documents, characters)."""
    if not cfg.sources:
        raise CorpusError("corpus.sources is empty")
    docs, provenance = [], []
    for src in cfg.sources:
        root, deb = fetch_source(src, Path(work))
        mine = list(source_documents(src, root, cfg))
        docs += mine
        provenance.append({"package": src.package, "deb": deb, "kind": src.kind, "root": src.root,
                           "documents": len(mine), "chars": sum(len(d.text) for d in mine)})
    held = [d for d in docs if is_heldout(d, cfg.heldout_fraction)]
    train = [d for d in docs if not is_heldout(d, cfg.heldout_fraction)]
    if not held or not train:
        raise CorpusError(f"{len(docs)} documents give an empty split at heldout_fraction={cfg.heldout_fraction}")
    return Corpus(train=train, heldout=held), provenance


def write_jsonl(docs: list[Document], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "name": d.name}, ensure_ascii=False) + "\n")
    tmp.replace(path)
