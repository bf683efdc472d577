"""Instruction records (prompt/response, or chat `messages`): one record is one example, the
chat template is the tokenizer's own, and the loss scores the assistant's tokens only.

The expected masks are built by hand from the template's text, turn by turn, independently of
fedllm's span search: what the assistant says (its content and end-of-turn markup) is scored,
everything else (system turn, user turns, role headers) is context."""

import json

import pytest
import torch

from fedllm.data.chat import PAD_ID, context_id, encode_chat, model_ids, scored
from fedllm.data.federated import encode
from fedllm.data.sources import Unit, load_jsonl_file
from fedllm.privacy import dpsgd

from test_bad_input import TINY, one_line_error, run_cli


@pytest.fixture(scope="module")
def tok(tiny_loaded):
    return tiny_loaded.tokenizer


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def by_hand(tok, pieces):
    """Token ids of consecutive (text, scored) pieces of one rendered conversation."""
    out = []
    for text, is_scored in pieces:
        out += [t if is_scored else context_id(t) for t in ids(tok, text)]
    return out


def test_prompt_response_scores_only_the_answer(tok):
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}],
        tokenize=False)
    head, answer = rendered.split("<|im_start|>assistant\n")
    expected = by_hand(tok, [(head + "<|im_start|>assistant\n", False),
                             ("Four.<|im_end|>\n", True)])
    rows, = encode([[Unit("c", prompt="What is 2+2?", response="Four.")]], tok, 128, "record")
    assert len(rows) == 1  # one record, one example
    got = [t for t in rows[0].tolist() if t != PAD_ID]
    assert got == expected
    assert [t for t in got if t >= 0] == ids(tok, "Four.<|im_end|>\n")
    # the template is applied as the tokenizer defines it (SmolLM2's adds its own system turn:
    # context, as TRL feeds it, never a training target)
    assert tok.decode(model_ids(torch.tensor(got)).tolist()) == rendered


def test_multi_turn_scores_every_assistant_turn_and_invents_no_system_prompt(tok):
    messages = [{"role": "system", "content": "Answer in verse."},
                {"role": "user", "content": "Greet me."},
                {"role": "assistant", "content": "Good morrow, friend."},
                {"role": "user", "content": "And farewell?"},
                {"role": "assistant", "content": "Parting is such sweet sorrow."}]
    got = encode_chat(json.dumps(messages), tok)
    expected = by_hand(tok, [
        ("<|im_start|>system\nAnswer in verse.<|im_end|>\n<|im_start|>user\nGreet me.<|im_end|>"
         "\n<|im_start|>assistant\n", False),
        ("Good morrow, friend.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd farewell?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Parting is such sweet sorrow.<|im_end|>\n", True)])
    assert got == expected
    assert "SmolLM" not in tok.decode(model_ids(torch.tensor(got)).tolist())


def test_loss_is_the_mean_over_the_assistant_tokens_alone(tiny_loaded, tok):
    model = tiny_loaded.model
    row = torch.tensor([encode_chat(json.dumps(
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]), tok)])
    got = dpsgd.per_sequence_losses(model, row)
    with torch.no_grad():
        logits = model(input_ids=model_ids(row)).logits[0, :-1].float()
        targets = model_ids(row)[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        mask = scored(row)[0, 1:]
        assert 0 < mask.sum() < len(mask)  # some, not all, positions are targets
        want = nll[mask].mean()
    torch.testing.assert_close(got.detach()[0], want, rtol=1e-5, atol=1e-6)


def test_one_record_is_one_example_and_truncation_keeps_a_scored_token(tok):
    units = [Unit("c", prompt=f"Question {i}?", response=f"Answer {i}.") for i in range(5)]
    units.append(Unit("c", prompt="word " * 200, response="Lost."))  # answer cut off: dropped
    rows, = encode([units], tok, 64, "record")
    assert len(rows) == 5
    assert all(scored(r[1:]).any() for r in rows)


def test_jsonl_messages_records_are_read(tmp_path):
    f = tmp_path / "alice.jsonl"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"text": "t"}) + "\n")
    first, second = load_jsonl_file(f)
    assert json.loads(first.messages) == msgs and second.text == "t"


@pytest.mark.parametrize("record,needle", [
    ({"messages": []}, "non-empty list"),
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "'messages'[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "'messages'[0]"),
    ({"messages": [{"role": "user", "content": "q"}, "a"]}, "'messages'[1]"),
])
def test_malformed_messages_one_line_naming_file_and_line(capsys, tmp_path, record, needle):
    data = tmp_path / "data"
    data.mkdir()
    (data / "site.jsonl").write_text('{"text": "a fine first record"}\n' + json.dumps(record)
                                     + "\n")
    code, _, err = run_cli(capsys, "simulate", *TINY, "data=jsonl", f"data.path={data}",
                           f"run.dir={tmp_path / 'run'}")
    one_line_error(code, err, f"{data / 'site'}.jsonl:2", needle)
    assert not (tmp_path / "run").exists()
