"""The data layer: the stdlib corpus, user files, token shards, the tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from llmcore.data import corpus as C
from llmcore.data.shards import TokenShards, prepare_shards, read_header
from llmcore.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer


def test_stdlib_files_skip_installed_packages_and_caches():
    files = C.stdlib_files()
    names = [p.as_posix() for p in files]
    assert names == sorted(names) and len(names) > 500
    assert "os.py" in names and "json/decoder.py" in names
    for bad in ("site-packages", "dist-packages", "__pycache__"):
        assert not any(bad in p.parts for p in files)
    assert not any(p.name.startswith("_sysconfigdata_") for p in files)
    assert not any(part.startswith("config-3") for p in files for part in p.parts[:-1])


def test_split_is_by_whole_file_and_deterministic():
    assert C.split_of("json/decoder.py", 0.05) == C.split_of("json/decoder.py", 0.05)
    val = [p for p in C.stdlib_files() if C.split_of(p.as_posix(), 0.05) == "val"]
    share = len(val) / len(C.stdlib_files())
    assert 0.02 < share < 0.09
    assert C.split_of("anything", 0.0) == "train"


def test_user_files_split_independently_of_their_location(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b" / "deeper"):
        (root / "pkg").mkdir(parents=True)
        for i in range(30):
            (root / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    va = [d.source for d in C.iter_documents([str(tmp_path / "a")], "val", 0.3)]
    vb = [d.source for d in C.iter_documents([str(tmp_path / "b" / "deeper")], "val", 0.3)]
    assert va == vb and 0 < len(va) < 30


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: each JSONL line needs a string 'text'"):
        list(C.iter_documents([str(f)]))
    f.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        list(C.iter_documents([str(f)]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(C.iter_documents([str(tmp_path / "missing")]))
    with pytest.raises(ValueError, match="split must be one of"):
        list(C.iter_documents("stdlib", split="test"))


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = (d.text for d in C.iter_documents([str(corpus)], "train", 0.2))
    return train_tokenizer(texts, 400, out, show_progress=False)


def test_tokenizer_is_byte_level_lossless_with_special_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == 400
    assert [tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "def f(x):\n    return 'é漢字' + \"\\t\"  # ünïcode\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs).endswith("<|assistant|>\n")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], 100, tok_dir / "bad")


def test_shards_round_trip_and_skip_a_second_run(corpus, tok_dir, tmp_path):
    out = tmp_path / "shards"
    h = prepare_shards([str(corpus)], tok_dir, out, 0.2, progress=False)
    assert h["dtype"] == "uint16" and h["eos_id"] == 1
    sh = TokenShards(out)
    tok = load_tokenizer(tok_dir)
    docs = list(C.iter_documents([str(corpus)], "val", 0.2))
    want = []
    for d in docs:
        want += tok.encode(d.text, add_special_tokens=False) + [1]
    assert sh.tokens("val").to(torch.int64).tolist() == want
    assert h["splits"]["val"] == {"tokens": len(want), "documents": len(docs),
                                  "bytes": sum(len(d.text.encode()) for d in docs)}
    mtime = os.stat(out / "train.bin").st_mtime_ns
    assert prepare_shards([str(corpus)], tok_dir, out, 0.2, progress=False) == h
    assert os.stat(out / "train.bin").st_mtime_ns == mtime  # skipped: same content


def test_damaged_shards_are_refused(corpus, tok_dir, tmp_path):
    out = tmp_path / "shards"
    prepare_shards([str(corpus)], tok_dir, out, 0.2, progress=False)
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="val.bin holds 10 bytes"):
        read_header(out)
    (out / "header.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenShards(out)
    (out / "header.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an llmcore-tokens"):
        TokenShards(out)
    with pytest.raises(FileNotFoundError, match="llmcore data prepare"):
        TokenShards(tmp_path)
