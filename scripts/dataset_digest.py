"""Digest of the datasets `dlrm preprocess` makes, to show a refactoring left them byte-identical.

Run:  .venv/bin/python scripts/dataset_digest.py --work DIR [--save FILE | --compare FILE]

Writes synthetic inputs once (Criteo's layout plain and gzipped, MovieLens's and Avazu's
declared layouts) under DIR, preprocesses them with every option set that changes the code
path (Criteo vocab staged and unstaged, min-frequency and cap, hash, `--schema criteo`,
`--like`; the declared schemas vocab, hash and `--like`), and prints one line per dataset:
its name, its number of files and the sha256 of all of them together. Every file counts by
its bytes, but manifest.json, whose `seconds` (wall time of the run) is removed first.
`--save FILE` writes the per-file digests as JSON; `--compare FILE` checks them against a
saved one and exits 1 naming every file that differs. The manifest records its inputs' paths
and modification times, so runs to compare use the same DIR: its inputs are kept, its
datasets made afresh each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

DLRM = [sys.executable, "-m", "dlrm"]

INPUTS = {  # name: synth arguments
    "criteo": ["--days", "2", "--rows-per-day", "20000", "--seed", "3"],
    "criteo_gz": ["--days", "2", "--rows-per-day", "5000", "--seed", "4", "--gzip"],
    "movielens": ["--schema", "movielens", "--days", "2", "--rows-per-day", "8000", "--seed", "5"],
    "avazu": ["--schema", "avazu", "--days", "2", "--rows-per-day", "8000", "--seed", "6"],
}

DATASETS = {  # name: (input, preprocess arguments); --like names an earlier dataset
    "criteo_vocab": ("criteo", []),
    "criteo_vocab_unstaged": ("criteo", ["--no-stage"]),
    "criteo_vocab_capped": ("criteo", ["--min-frequency", "2", "--max-vocab", "500"]),
    "criteo_hash": ("criteo", ["--encoding", "hash", "--buckets", "1000"]),
    "criteo_declared": ("criteo", ["--schema", "criteo"]),
    "criteo_gz_vocab": ("criteo_gz", ["--chunk-mb", "1"]),
    "criteo_like": ("criteo_gz", ["--like", "criteo_vocab"]),
    "movielens_vocab": ("movielens", ["--schema", "movielens"]),
    "movielens_hash": ("movielens", ["--schema", "movielens", "--encoding", "hash",
                                     "--buckets", "500"]),
    "movielens_like": ("movielens", ["--like", "movielens_vocab"]),
    "avazu_vocab": ("avazu", ["--schema", "avazu"]),
}


def digest_file(path: Path) -> str:
    if path.name == "manifest.json":
        manifest = json.loads(path.read_text())
        manifest.pop("seconds", None)
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest_dataset(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".dlrm-lock"}


def make(work: Path) -> dict[str, dict[str, str]]:
    for name, args in INPUTS.items():
        if not (work / "raw" / name).exists():
            subprocess.run([*DLRM, "synth", "--out", str(work / "raw" / name), *args], check=True,
                           stdout=subprocess.DEVNULL)
    shutil.rmtree(work / "data", ignore_errors=True)
    digests = {}
    for name, (source, args) in DATASETS.items():
        out = work / "data" / name
        days = sorted(p for p in (work / "raw" / source).iterdir() if p.name.startswith("day_"))
        args = [str(work / "data" / a) if i and args[i - 1] == "--like" else a
                for i, a in enumerate(args)]
        subprocess.run([*DLRM, "preprocess", "--input", *map(str, days), "--out", str(out),
                        "--workers", "2", *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        digests[name] = digest_dataset(out)
        whole = hashlib.sha256(json.dumps(digests[name], sort_keys=True).encode()).hexdigest()
        print(f"{name:24s} {len(digests[name]):3d} files  {whole[:16]}", flush=True)
    return digests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--compare", type=Path)
    args = ap.parse_args()
    digests = make(args.work)
    if args.save:
        args.save.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    if args.compare:
        saved = json.loads(args.compare.read_text())
        differ = [f"{d}/{f}" for d in sorted(set(saved) | set(digests))
                  for f in sorted(set(saved.get(d, {})) | set(digests.get(d, {})))
                  if saved.get(d, {}).get(f) != digests.get(d, {}).get(f)]
        for f in differ:
            print(f"differs: {f}")
        print(f"{'identical' if not differ else f'{len(differ)} files differ'} "
              f"(against {args.compare})")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
