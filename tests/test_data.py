"""Corpus preparation and batching."""

import json

import numpy as np
import pytest
import torch

from dropup.data import TokenData
from dropup.data.corpus import DataError, clean, jsonl_documents, prepare, split_documents
from dropup.data.sources import chunks, manpage_text
from dropup.lit import lr_lambda


def test_clean_normalizes_and_strips_control_characters():
    assert clean("a\r\nb\x00c  \r\n\n") == "a\nbc"
    assert clean("ｶﾞ") == "ｶﾞ" and clean("e\u0301") == "\u00e9"  # NFC composes, leaves half-width alone


def test_split_is_deterministic_deduplicated_and_filters_short_documents():
    docs = [f"document number {i} " * 10 for i in range(400)] + ["short"] + ["document number 3 " * 10]
    first = split_documents(docs, None, 0.1)
    again = split_documents(list(reversed(docs)), None, 0.1)
    assert sorted(first["val"]) == sorted(again["val"])  # by content, not position
    assert len(first["train"]) + len(first["val"]) == 400
    assert 20 <= len(first["val"]) <= 60


def test_manpage_text_strips_groff():
    page = '.\\" comment\n.TH LS "1"\n.SH 名前\nls \\- 一覧\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\n'
    assert manpage_text(page.encode()) == "LS 1\n名前\nls - 一覧\n-a, --all"


def test_chunks_keep_every_paragraph():
    text = "\n\n".join(f"paragraph {i} " * 50 for i in range(40))
    parts = list(chunks(text, size=2000))
    assert len(parts) > 5 and "\n\n".join(parts) == text


@pytest.fixture
def prepared(tmp_path):
    docs = {"a": [f"alpha {i} " * 30 for i in range(200)], "b": [f"beta {i} " * 30 for i in range(200)]}
    manifest = prepare(tmp_path / "ds", docs, vocab_size=300, val_fraction=0.1, max_chars_per_domain=None)
    return tmp_path / "ds", manifest


def test_prepare_writes_a_manifest_and_token_files(prepared):
    path, manifest = prepared
    assert json.loads((path / "manifest.json").read_text()) == manifest
    assert manifest["vocab_size"] <= 300 and manifest["domains"]["a"]["train"]["tokens"] > 1000
    assert not (path.parent / "ds.partial").exists()
    tokens = np.fromfile(path / "a.train.bin", dtype=np.uint16)
    assert tokens.max() < manifest["vocab_size"] and (tokens == manifest["eot_id"]).sum() >= 150


def test_batches_depend_only_on_the_step(prepared):
    data = TokenData(prepared[0], ["a", "b"], seq_len=32)
    x1, y1 = data.train_batch(step=7, batch_size=8, seed=0, stream="moe")
    x2, _ = data.train_batch(step=7, batch_size=8, seed=0, stream="moe")
    x3, _ = data.train_batch(step=8, batch_size=8, seed=0, stream="moe")
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    top, _ = data.train_batch(step=7, batch_size=8, seed=0, stream="moe", rows=slice(0, 4))
    bottom, _ = data.train_batch(step=7, batch_size=8, seed=0, stream="moe", rows=slice(4, 8))
    assert torch.equal(torch.cat([top, bottom]), x1)  # data-parallel ranks split the same global batch


def test_mixture_weights(prepared):
    data = TokenData(prepared[0], ["a", "b"], seq_len=16, weights={"a": 1.0})
    x, _ = data.train_batch(step=0, batch_size=64, seed=0, stream="moe")
    tokenizer_ids_of_b = set(np.fromfile(prepared[0] / "b.train.bin", dtype=np.uint16).tolist()) - set(
        np.fromfile(prepared[0] / "a.train.bin", dtype=np.uint16).tolist())
    assert not (set(x.flatten().tolist()) & tokenizer_ids_of_b)
    with pytest.raises(DataError, match="unknown domain"):
        TokenData(prepared[0], ["a", "b"], seq_len=16, weights={"c": 1.0})


def test_jsonl_domain_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x" * 100, "domain": "en"}) + "\n")
    with pytest.raises(DataError, match=r"no documents for domain\(s\) \['ja'\]"):
        jsonl_documents(path, ["en", "ja"])


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    lrs = [lr_lambda(s, 100, 10, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)
    held = [lr_lambda(s, 100, 10, 0.1, final_constant=20) for s in range(80, 101)]
    assert held == pytest.approx([0.1] * len(held))


def test_routing_summaries():
    from dropup.routing import summarize

    uniform = {d: [[10.0] * 4] for d in ("ja", "en")}
    s = summarize(uniform)
    assert s["routing/imbalance"] == pytest.approx(1.0) and s["routing/entropy"] == pytest.approx(1.0)
    assert s["routing/specialization"] == pytest.approx(0.0, abs=1e-9)
    split = {"ja": [[10.0, 10.0, 0.0, 0.0]], "en": [[0.0, 0.0, 10.0, 10.0]]}
    s = summarize(split)
    assert s["routing/specialization"] == pytest.approx(1.0)  # disjoint experts per domain
    assert s["routing/imbalance"] == pytest.approx(1.0)  # yet the pooled load is balanced
    collapsed = {"ja": [[20.0, 0.0, 0.0, 0.0]], "en": [[20.0, 0.0, 0.0, 0.0]]}
    assert summarize(collapsed)["routing/imbalance"] == pytest.approx(4.0)
    assert summarize(None) == {}
