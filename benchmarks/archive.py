"""Throughput of the archivist: sealing the log into segments, and verifying the archive.

    .venv/bin/python benchmarks/archive.py            # the full run: 200,000 events, 3 rounds (about 1 min)
    .venv/bin/python benchmarks/archive.py --quick    # a smoke run: same shape, 20,000 events, 1 round

Prints ONE JSON document on stdout; progress goes to stderr.

  seal     `Archivist.seal`, the daemon's and `charter archive seal`'s own path: read the entries
           through the EventLog 250 at a time (yielding between reads, as in the daemon), recompute
           their chain, build leaf hashes and each segment's Merkle root, encode, compress with zstd,
           write segments of 10,000 entries with their indexes, then sign a checkpoint and append its
           event. Target: >= 20,000 events/s.
  verify   `verify_archive` of the archive alone, as a mirror is verified: read and decompress every
           segment, check its digest, recompute every chain hash, link, leaf, segment root, the
           checkpoint's signature and root. Target: >= 50,000 events/s.
  verify_with_live   the same plus the live database (every entry again: chain, parsed envelope,
           indexed columns, cross-check with the archive), as `charter archive verify` does at home.
  sha256   the baseline, in the same run over the same bytes: one SHA-256 per raw envelope (what any
           hash-per-event scheme costs in Python at least), and one SHA-256 over all the bytes at once.

Each scenario runs `--rounds` times on a fresh archive; figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # runnable from a checkout without an editable install
    sys.path.insert(0, str(ROOT / "src"))

from charter import __version__  # noqa: E402
from charter.archive import checkpoints as cp  # noqa: E402
from charter.archive.identity import ensure_identity  # noqa: E402
from charter.archive.layout import Layout  # noqa: E402
from charter.archive.archivist import Archivist  # noqa: E402
from charter.config import Home  # noqa: E402
from charter.identity.init import init_home  # noqa: E402
from charter.archive.verify import verify_archive  # noqa: E402
from charter.bus.envelope import seal  # noqa: E402
from charter.bus.log.sqlite import SqliteLog  # noqa: E402
from charter.identity.keys import SigningKey  # noqa: E402

TARGET_SEAL = 20_000.0
TARGET_VERIFY = 50_000.0
SEGMENT = 10_000


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_log(db: Path, n: int, key: SigningKey) -> list[bytes]:
    """n signed envelopes of realistic sizes (a few hundred bytes), appended as the daemon would."""
    log = SqliteLog(db)
    raws: list[bytes] = []
    try:
        batch = []
        for i in range(n):
            payload = {"task": i, "agent": f"worker-{i % 17}", "status": ("ok", "retry", "done")[i % 3],
                       "detail": "x" * (40 + (i * 37) % 300)}
            env = seal(key, sender="operator", subject=f"agents.worker{i % 17}.results", payload=payload)
            batch.append(env)
            raws.append(env.raw)
            if len(batch) == 1000:
                log.append_sync(batch)
                batch = []
        if batch:
            log.append_sync(batch)
    finally:
        log.close_sync()
    return raws


def sha256_baseline(raws: list[bytes]) -> dict[str, float]:
    sha = hashlib.sha256
    t0 = time.perf_counter()
    for raw in raws:
        sha(raw).digest()
    per_entry = time.perf_counter() - t0
    blob = b"".join(raws)
    t0 = time.perf_counter()
    hashlib.sha256(blob).digest()
    bulk = time.perf_counter() - t0
    return {"per_entry_seconds": per_entry, "bulk_seconds": bulk}


def one_round(template: Home, work: Path, r: int, key: SigningKey, n: int) -> dict[str, Any]:
    """Seal the whole log into a fresh archive with the production archivist, then verify it.

    Each round gets its own copy of the home: sealing appends the archivist's events to the log,
    and a new archive must not meet the previous round's published checkpoints."""
    home = Home(work / f"round{r}")
    shutil.copytree(template.root, home.root)
    root = home.root / "archive"

    async def seal_all() -> tuple[float, dict[str, Any]]:
        archivist = Archivist.local(home)
        archivist.config = archivist.config.model_copy(update={"segment_entries": SEGMENT})
        try:
            t0 = time.perf_counter()
            result = await archivist.seal(partial=True)
            return time.perf_counter() - t0, result
        finally:
            await archivist.close()

    seal_s, result = asyncio.run(seal_all())
    made = result["sealed"]
    sealed = sum(m["count"] for m in made)
    t0 = time.perf_counter()
    alone = verify_archive(root, root=key.public)
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = verify_archive(root, db_path=home.db_path, root=key.public)
    full_s = time.perf_counter() - t0
    if not (alone.ok and full.ok and alone.archived == sealed and sealed >= n):
        raise SystemExit(f"verification failed: {alone.to_dict()['breaks'][:3]} {full.to_dict()['breaks'][:3]}")
    shutil.rmtree(home.root, ignore_errors=True)
    return {
        "seal_s": seal_s, "sealed": sealed, "verify_s": verify_s, "verify_live_s": full_s, "segments": len(made),
        "compressed": sum(m["bytes"] for m in made), "raw": sum(m["raw_bytes"] for m in made),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20,000 events, one round")
    ap.add_argument("--events", type=int, default=None, help="events in the log (default 200,000; quick 20,000)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    ap.add_argument("--dir", default=None, help="where the temporary files go (default: the system temp dir)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.events or (20_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="charter-bench-archive-", dir=args.dir))
    try:
        home = Home(work / "home")
        init_home(home)
        key = SigningKey.load_pem(home.root_key_path)
        progress(f"writing {n:,} signed envelopes to {home.db_path}")
        raws = make_log(home.db_path, n, key)
        total_bytes = sum(len(r) for r in raws)
        results, baselines = [], []
        for r in range(rounds):
            progress(f"round {r + 1}/{rounds}: seal, verify, verify with the live database, SHA-256 baseline")
            results.append(one_round(home, work, r, key, n))
            baselines.append(sha256_baseline(raws))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(key_: str, rows: list[dict[str, Any]]) -> float:
        return statistics.median(row[key_] for row in rows)

    seal_s, verify_s, live_s = med("seal_s", results), med("verify_s", results), med("verify_live_s", results)
    sha_entry, sha_bulk = med("per_entry_seconds", baselines), med("bulk_seconds", baselines)
    seal_rate, verify_rate = n / seal_s, n / verify_s
    sha_rate = n / sha_entry
    doc = {
        "benchmark": "archive", "quick": bool(args.quick), "charter_version": __version__,
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "rounds": rounds,
        "workload": {"events": n, "raw_bytes": total_bytes, "mean_event_bytes": round(total_bytes / n, 1),
                     "segment_entries": SEGMENT},
        "seal": {"events_per_s": round(seal_rate), "seconds": round(seal_s, 4), "segments": results[0]["segments"],
                 "sealed_events": results[0]["sealed"],  # the workload plus the archivist's own events
                 "compressed_bytes": results[0]["compressed"],
                 "compression_ratio": round(results[0]["raw"] / results[0]["compressed"], 2)},
        "verify": {"events_per_s": round(verify_rate), "seconds": round(verify_s, 4)},
        "verify_with_live": {"events_per_s": round(n / live_s), "entries_checked_per_s": round(2 * n / live_s),
                             "seconds": round(live_s, 4)},
        "sha256": {"per_entry_events_per_s": round(sha_rate), "per_entry_seconds": round(sha_entry, 4),
                   "bulk_mb_per_s": round(total_bytes / sha_bulk / 1e6, 1)},
        "ratios": {"seal_over_sha256": round(seal_rate / sha_rate, 4),
                   "verify_over_sha256": round(verify_rate / sha_rate, 4)},
        "targets": {"seal_events_per_s": TARGET_SEAL, "verify_events_per_s": TARGET_VERIFY},
        "meets_targets": {"seal": seal_rate >= TARGET_SEAL, "verify": verify_rate >= TARGET_VERIFY},
    }
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
