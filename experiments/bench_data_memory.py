"""Scale: per-client data loading. Peak memory and time of one client's data loading as the
corpus grows (synthetic JSONL, one file per client, every client the same size).

Each measurement runs in a fresh subprocess (imports and the tokenizer loaded first, then
the peak RSS above that baseline is what the loading added):

* ``client``: one client's sequences from the cached client index (``load_client``), what
  each simulated ClientApp does;
* ``index``: building the client index (once per run, in ``fedllm simulate``'s preflight;
  streams one file at a time);
* ``whole``: the old whole-corpus path (``build_federated_data``), for comparison, up to
  ``--whole-max`` clients.

    python experiments/bench_data_memory.py [--clients 10 100 1000] [--kb-per-client 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
WORDS = ("thou art more lovely and more temperate rough winds do shake the darling buds of may "
         "and summer's lease hath all too short a date sometime too hot the eye of heaven "
         "shines").split()

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from fedllm import models
from fedllm.config import compose
from fedllm.data.federated import build_federated_data
from fedllm.data.per_client import build_client_index, load_client

mode, data_dir, cache = sys.argv[1], sys.argv[2], Path(sys.argv[3])
iid = mode.startswith("iid-")
mode = mode.removeprefix("iid-")
cfg = compose(["model=tiny", "data=jsonl", f"data.path={data_dir}"]
              + (["data.partitioning=iid"] if iid else []))
tok = models.load_tokenizer(cfg.model)
kw = dict(seq_len=cfg.train.seq_len, min_sequences=cfg.train.batch_size, num_clients=None,
          seed=0)

if iid:  # a fixed cost, not the corpus's: count it in the baseline
    import datasets, flwr_datasets.partitioner

def rss_kb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so the
    # peak measured below is the loading's, not the imports'.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

def peak_kb(exact):
    if exact:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def anon_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

# Peak anonymous memory (the process's own; mapped file pages are page cache), sampled.
import threading
anon_peak, sampling = [anon_kb()], threading.Event()
def sample_anon():
    while not sampling.wait(0.005):
        anon_peak[0] = max(anon_peak[0], anon_kb())
threading.Thread(target=sample_anon, daemon=True).start()

base, base_anon = rss_kb(), anon_kb()
exact = reset_peak()
start, cpu0 = time.perf_counter(), time.process_time()
if mode == "whole":
    n = len(build_federated_data(cfg.data, tok, **kw).clients)
elif mode == "index":
    n = len(build_client_index(cfg.data, tok, **kw, where=cache).clients)
else:
    index = build_client_index(cfg.data, tok, **kw, where=cache)  # cached: read back
    n = len(load_client(cfg.data, tok, index, 0, seq_len=cfg.train.seq_len, seed=0,
                        where=cache).train)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
peak = peak_kb(exact)
anon_peak[0] = max(anon_peak[0], anon_kb())
sampling.set()
print(json.dumps({"mode": mode, "peak_mb": (peak - base) / 1024, "base_mb": base / 1024,
                  "wall_s": wall, "cpu_s": cpu, "n": n, "exact_peak": exact,
                  "anon_mb": (anon_peak[0] - base_anon) / 1024}))
"""


def make_corpus(root: Path, clients: int, kb_per_client: int) -> Path:
    """``clients`` JSONL files of about ``kb_per_client`` KiB each (kept between runs)."""
    data = root / f"corpus-{clients}x{kb_per_client}k"
    done = data / ".complete"
    if done.exists():
        return data
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(clients)
    for c in range(clients):
        lines, size = [], 0
        while size < kb_per_client * 1024:
            line = json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))})
            lines.append(line)
            size += len(line) + 1
        (data / f"client-{c:05d}.jsonl").write_text("\n".join(lines) + "\n")
    done.touch()
    return data


def measure(mode: str, data: Path, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(data), str(cache)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--kb-per-client", type=int, default=64)
    ap.add_argument("--whole-max", type=int, default=100,
                    help="measure the old whole-corpus path up to this many clients")
    ap.add_argument("--iid", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure data.partitioning=iid (on-disk Arrow corpus)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fedllm-bench-data"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    for n in args.clients:
        data = make_corpus(args.workdir, n, args.kb_per_client)
        mb = sum(f.stat().st_size for f in data.glob("*.jsonl")) / 2**20
        cache = args.workdir / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)  # the index row measures a fresh build
        row = {"clients": n, "corpus_mb": mb, "index": measure("index", data, cache),
               "client": measure("client", data, cache)}
        if args.iid:  # the same corpus re-partitioned IID: rows from the on-disk Arrow copy
            row["iid_index"] = measure("iid-index", data, cache)
            row["iid_client"] = measure("iid-client", data, cache)
        if n <= args.whole_max:
            row["whole"] = measure("whole", data, cache)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_write:
        write(rows, args)


def cell(r: dict | None) -> str:
    if r is None:
        return "—"
    return f"{r['peak_mb']:.0f} / {r['anon_mb']:.0f} MB, {r['wall_s']:.1f} s"


def write(rows: list[dict], args) -> None:
    from benchmarks_md import write_section

    cmd = (f"python experiments/bench_data_memory.py --clients {' '.join(map(str, args.clients))} "
           f"--kb-per-client {args.kb_per_client} --whole-max {args.whole_max}"
           + ("" if args.iid else " --no-iid"))
    lines = ["## Scale: per-client data loading", "",
             "Peak memory added by data loading (above imports, `datasets` included, and the "
             "tokenizer) and its time, in a "
             "fresh process, for synthetic JSONL corpora with one file per client, every "
             f"client {args.kb_per_client} KiB (model=tiny's tokenizer, seq_len 64). "
             "*One client* is what each simulated ClientApp now does (its own file only, "
             "with the cached client index); *index* is the one streaming pass of `fedllm "
             "simulate`'s preflight that counts every client's sequences; *whole corpus* is "
             "the previous path, which every process ran.", "",
             "*iid* columns: the same corpus with `data.partitioning=iid` (as many partitions "
             "as files), a client's rows read from the memory-mapped Arrow copy; its index "
             "pass includes writing that copy and its seeded permutation (both memory-mapped "
             "by the clients).", "",
             "Each cell: peak RSS / peak anonymous memory (RssAnon, sampled every 5 ms), and "
             "wall time. RSS also counts the pages of memory-mapped files a process touches "
             "(page cache: shared, and dropped under memory pressure); a client's IID rows "
             "are scattered over the Arrow file, so the kernel maps in pages around each.", "",
             "| clients | corpus | one client | index (once per run) | one client, iid | "
             "index, iid | whole corpus (before) |",
             "|---:|---:|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['corpus_mb']:.1f} MB | {cell(r['client'])} | "
                     f"{cell(r['index'])} | {cell(r.get('iid_client'))} | "
                     f"{cell(r.get('iid_index'))} | {cell(r.get('whole'))} |")
    lines += ["", f"Command: `{cmd}`. Load average during the run: "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine)."]
    write_section("data_memory", "\n".join(lines))


if __name__ == "__main__":
    main()
