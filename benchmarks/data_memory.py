"""Streaming check: a corpus larger than a gigabyte goes through the full data chain in bounded memory.

    python benchmarks/data_memory.py                 # 1.05 GB of JSONL, the full chain, 2 workers
    python benchmarks/data_memory.py --gb 0.1        # a quick look

It writes a synthetic JSONL corpus (prose paragraphs from a fixed vocabulary, with exact and near
duplicates, e-mail addresses and some junk documents mixed in) to a temporary folder, runs
`lmloom run` on a recipe with every data step (markup, repair, language id, quality rules, safety,
PII, exact + near + paragraph dedup), and samples the resident memory (RSS) of the whole process
tree (the CLI and its workers) every 0.2 s from /proc. It prints the peak of the main process, the
peak of the tree, documents/s and the per-step table. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = (
    "the river valley city north people early century water system market field study light energy "
    "language history school music garden mountain village report season family county station road "
    "bridge island forest winter summer museum library program council research science theory model "
    "design project village farmer harbour railway castle church painter writer teacher student"
).split() + "the the the of of and and to to that with have be is was in a for on".split()


def paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 7)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 20))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def write_corpus(path: Path, target_bytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    written = docs = 0
    recent: list[str] = []
    with path.open("w", encoding="utf-8") as handle:
        while written < target_bytes:
            roll = rng.random()
            if roll < 0.05 and recent:  # exact duplicate
                text = rng.choice(recent)
            elif roll < 0.10 and recent:  # near duplicate: a few words changed
                words = rng.choice(recent).split(" ")
                for _ in range(max(1, len(words) // 25)):
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                text = " ".join(words)
            elif roll < 0.12:  # junk
                text = "".join(rng.choice("#$%&*{}<>|~") for _ in range(rng.randint(200, 2000)))
            else:
                text = "\n\n".join(paragraph(rng) for _ in range(rng.randint(3, 12)))
                if rng.random() < 0.05:
                    text += f"\n\nContact me at user{docs}@mail-{docs % 97}.net for details."
            recent = (recent + [text])[-200:]
            line = json.dumps({"id": f"d{docs}", "text": text}) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


RECIPE = """
name: memory
stages:
  corpus:
    stage: data.prepare
    config:
      sources: [{{type: jsonl, path: {path}}}]
      executor: {{workers: {workers}}}
      steps:
        - {{type: markup}}
        - {{type: fix_text}}
        - {{type: whitespace}}
        - {{type: language, keep: [en]}}
        - {{type: gopher_repetition}}
        - {{type: gopher_quality}}
        - {{type: c4}}
        - {{type: safety}}
        - {{type: pii}}
        - {{type: near_dedup}}
"""


def tree_rss(root: int) -> tuple[int, int]:
    """(RSS of root, RSS of root and all its descendants), bytes."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid, ppid = int(entry), int(fields.get("PPid", "0").strip())
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return rss.get(root, 0), total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.05, help="corpus size in GB (default 1.05)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="lmloom-mem-"))
    corpus = folder / "corpus.jsonl"
    started = time.perf_counter()
    docs = write_corpus(corpus, int(args.gb * 1e9))
    print(
        f"wrote {corpus.stat().st_size / 1e9:.2f} GB, {docs:,} documents in {time.perf_counter() - started:.0f} s"
    )
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(path=corpus, workers=args.workers))
    env = {**os.environ, "LMLOOM_HOME": str(folder / "store"), "COLUMNS": "160"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lmloom", "run", str(recipe)], env=env)
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            main_rss, total = tree_rss(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], main_rss), max(peaks[1], total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    print(f"exit {code}; {seconds:.0f} s, {docs / seconds:,.0f} documents/s")
    print(f"peak RSS: main process {peaks[0] / 2**30:.2f} GiB; process tree {peaks[1] / 2**30:.2f} GiB")
    if code == 0:
        [corpus_id] = [p.name for p in (folder / "store" / "artifacts").iterdir()]
        subprocess.run([sys.executable, "-m", "lmloom", "data", "stats", corpus_id], env=env)
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
