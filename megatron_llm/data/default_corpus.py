"""The embedded default corpus: the Python standard library's own source, split by subject.

Every machine that runs us has these files, so the default job needs no download. Each subject is a
separate dataset (a channel), so that per-channel losses differ. A subject is the set of top-level
stdlib modules and packages listed below; each .py file is one document, in sorted path order, until
the subject reaches MAX_BYTES. The files go through exactly the path a user's data takes: a jsonl
file, then `preprocess` (the code behind tools/preprocess_data.py).
"""

from __future__ import annotations

import json
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional

from megatron_llm.config import DatasetSpec
from megatron_llm.data.preprocess import preprocess
from megatron_llm.errors import UsageError

SUBJECTS: dict[str, tuple[str, ...]] = {
    "networking": (
        "socket", "ssl", "http", "urllib", "email", "smtplib", "ftplib", "imaplib", "poplib", "xmlrpc",
        "ipaddress", "socketserver", "mailbox", "nntplib", "telnetlib", "wsgiref", "mimetypes", "netrc",
        "smtpd", "asynchat", "asyncore", "webbrowser", "cgi", "base64", "quopri", "uu",
    ),
    "text": (
        "re", "sre_compile", "sre_parse", "sre_constants", "string", "textwrap", "difflib", "json", "html",
        "xml", "csv", "tokenize", "token", "keyword", "gettext", "locale", "stringprep", "shlex", "pprint",
        "reprlib", "configparser", "tomllib", "fnmatch", "_markupbase", "codecs", "encodings", "argparse",
        "optparse", "getopt",
    ),
    "concurrency": (
        "threading", "_threading_local", "multiprocessing", "asyncio", "concurrent", "queue", "sched",
        "subprocess", "selectors", "contextvars", "signal",
    ),
}
MAX_BYTES = 4_000_000  # per subject, so that a build stays well under a second
EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "__pycache__"}


def subject_files(subject: str, stdlib: Optional[Path] = None) -> list[Path]:
    """The subject's .py files in sorted order, test directories excluded, capped at MAX_BYTES."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    candidates = []
    for name in SUBJECTS[subject]:
        if (stdlib / f"{name}.py").is_file():
            candidates.append(stdlib / f"{name}.py")
        elif (stdlib / name).is_dir():
            candidates.extend(
                p for p in (stdlib / name).rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(stdlib).parts)
            )
    files, total = [], 0
    for path in sorted(candidates):
        size = path.stat().st_size
        if total + size > MAX_BYTES:
            break
        files.append(path)
        total += size
    return files


def build_subject(subject: str, output_prefix: str, tokenizer_spec: str = "byte") -> str:
    """Writes one subject as `output_prefix`.bin/.idx; returns a one-line summary."""
    files = subject_files(subject)
    if not files:
        raise UsageError(f"no standard-library sources found for the {subject!r} default dataset")
    with tempfile.TemporaryDirectory(prefix="megatron_llm_corpus_") as tmp:
        jsonl = Path(tmp) / f"{subject}.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for path in files:
                text = path.read_text(encoding="utf-8", errors="replace")
                f.write(json.dumps({"text": text}) + "\n")
        # In-process: a few MB tokenize in ~0.1 s, faster than starting workers (and no fork of a trainer).
        stats = preprocess(str(jsonl), output_prefix, tokenizer_spec, workers=1, progress=False)
    return f"default corpus: {subject} from {len(files)} stdlib files -> " + stats.summary()


def ensure_default_corpus(blend: list[DatasetSpec], tokenizer_spec: str = "byte") -> list[str]:
    """Builds every blend entry whose .bin/.idx is missing and whose file stem names a subject.

    Not a collective: in a multi-process job call it on one rank and barrier. (Calling it on every
    rank is still correct, since the output is deterministic and moved into place atomically.)
    Returns the prefixes it built; a missing entry that is no subject raises UsageError.
    """
    missing = [s.path for s in blend if not (Path(f"{s.path}.bin").is_file() and Path(f"{s.path}.idx").is_file())]
    for path in missing:
        if Path(path).name not in SUBJECTS:
            raise UsageError(
                f"dataset {path}.bin/.idx not found and {Path(path).name!r} is not a default-corpus subject "
                f"({', '.join(SUBJECTS)}); create it with tools/preprocess_data.py"
            )
    for path in missing:
        print(build_subject(Path(path).name, path, tokenizer_spec), flush=True)
    return missing
