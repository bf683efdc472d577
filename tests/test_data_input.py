"""Damaged data files end in one line naming the file (and line / byte offset), in simulation
preflight and on a deployed site; empty client files are reported."""

import json
import logging
import os
import subprocess
import sys

import pytest

from fedllm.data.sources import (MAX_LINE_BYTES, DataError, load_jsonl_dir, load_text_dir)

GOOD = json.dumps({"text": "To be, or not to be, that is the question. " * 4}) + "\n"


def preflight(data_dir, tmp_path, *overrides):
    """`fedllm simulate` on data_dir: (CompletedProcess, the child's peak RSS in MiB)."""
    args = [sys.executable, "-m", "fedllm.cli", "simulate", "model=tiny", "data=jsonl",
            f"data.path={data_dir}", f"run.dir={tmp_path / 'run'}", *overrides]
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        child = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), out.read(),
                                           err.read())
    return proc, usage.ru_maxrss / 1024


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_non_utf8_jsonl_names_file_line_and_byte_offset(tmp_path):
    (tmp_path / "alice.jsonl").write_bytes(GOOD.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"alice\.jsonl:2: not UTF-8 text \(invalid byte at "
                                        rf"offset {len(GOOD) + 13}\)"):
        load_jsonl_dir(str(tmp_path))


def test_binary_text_file_names_file_and_byte_offset(tmp_path):
    (tmp_path / "bob.txt").write_bytes(b"a paragraph\n\n" + bytes(range(256)))
    with pytest.raises(DataError, match=r"bob\.txt: not UTF-8 text \(invalid byte at offset "
                                        r"141\)"):
        load_text_dir(str(tmp_path))


def test_simulate_preflight_refuses_binary_jsonl_in_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "alice.jsonl").write_text(GOOD * 50)
    (data / "mallory.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    proc, _ = preflight(data, tmp_path)
    assert_one_line_error(proc, "mallory.jsonl:1: not UTF-8 text (invalid byte at offset 0)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_deployed_site_reports_its_binary_file_in_one_line(tiny_cfg, tmp_path):
    from fedllm.clients.app import this_client

    site = tmp_path / "site.jsonl"
    site.write_bytes(GOOD.encode() * 40 + b"\xc3\x28\n")
    (tmp_path / "neighbour.jsonl").write_bytes(b"\xff")  # not this site's file: never read
    with pytest.raises(DataError, match=rf"site\.jsonl:41: not UTF-8 text \(invalid byte at "
                                        rf"offset {len(GOOD) * 40}\)"):
        this_client(tiny_cfg, {"data-path": str(site), "client-id": "site-a"})


def test_an_overlong_line_is_refused_without_loading_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "alice.jsonl").write_text(GOOD * 50)
    with open(data / "huge.jsonl", "w") as fh:  # one ~50 MB record
        fh.write('{"text": "' + "word " * (10 * 2**20) + '"}\n')
    proc, peak_mib = preflight(data, tmp_path)
    assert_one_line_error(proc, f"huge.jsonl:1: line longer than {MAX_LINE_BYTES // 2**20} MiB")
    assert peak_mib < 2048, peak_mib  # before: the record was tokenized whole (6.6 GB)


def test_empty_client_files_are_reported(tmp_path, caplog):
    (tmp_path / "alice.jsonl").write_text(GOOD)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with caplog.at_level(logging.WARNING):
        units = load_jsonl_dir(str(tmp_path))
    assert {u.client_id for u in units} == {"alice"}
    assert "2 client file(s) hold no text" in caplog.text
    assert "blank.jsonl" in caplog.text and "empty.jsonl" in caplog.text
