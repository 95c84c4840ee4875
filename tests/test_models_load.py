"""from_pretrained memory and BFP checkpoints: bounded peak, saved BFP weights as stored."""

import sys
from pathlib import Path

import torch

from llmcore.models import Transformer, TransformerConfig
from llmcore.nn import BFPEmbedding

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[3, 17, 99, 5, 64, 2, 127, 40]])


def _model(tie=True):
    torch.manual_seed(0)
    return Transformer(TransformerConfig.from_name("tiny", tie_embeddings=tie))


def test_saved_bfp_loads_without_quantising(tmp_path, monkeypatch):
    from llmcore.nn import bfp_linear
    from llmcore.ops import bfp

    for tie in (True, False):
        m = _model(tie).quantize("mxint4")
        m.save_pretrained(str(tmp_path / f"q{tie}"))

        def refuse(*a, **k):
            raise AssertionError("a saved BFP checkpoint must load without quantising")

        with monkeypatch.context() as mp:
            mp.setattr(bfp, "bfp_quantize", refuse)
            mp.setattr(bfp_linear, "bfp_quantize", refuse)
            again = Transformer.from_pretrained(str(tmp_path / f"q{tie}"))
        with torch.no_grad():
            assert torch.equal(again(IDS), m(IDS))
        sd, sd2 = m.state_dict(), again.state_dict()
        assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_quantize_while_loading_equals_quantize_after(tmp_path):
    for tie in (True, False):
        m = _model(tie)
        m.save_pretrained(str(tmp_path / f"f{tie}"))
        got = Transformer.from_pretrained(str(tmp_path / f"f{tie}"), quantize="mxint8")
        want = Transformer.from_pretrained(str(tmp_path / f"f{tie}")).quantize("mxint8")
        with torch.no_grad():
            assert torch.equal(got(IDS), want(IDS))
        assert got.device.type == "cpu" and isinstance(got.embed_tokens, BFPEmbedding)
        assert got.head_tied() == tie
        assert not any(t.is_meta for t in [*got.parameters(), *got.buffers()])


def test_compact_embedding_saves_and_loads_exactly(tmp_path):
    """A quantised model's BFP table is written once (shared with a tied head) and loads
    back bit for bit, still shared."""
    import json

    for tie in (True, False):
        m = _model(tie).quantize("mxint4")
        m.save_pretrained(str(tmp_path / f"q{tie}"))
        meta = json.loads((tmp_path / f"q{tie}" / "config.json").read_text())
        mods = meta["llmcore_quantization"]["modules"]
        assert "embed_tokens" in mods and ("lm_head" in mods) == (not tie)
        assert meta["llmcore_quantization"]["format"] == "mxint4"  # the layers', not the table's
        r = Transformer.from_pretrained(str(tmp_path / f"q{tie}"))
        assert isinstance(r.embed_tokens, BFPEmbedding) and r.head_tied() == tie
        for a, b in [(r.embed_tokens.weight_mantissa, m.embed_tokens.weight_mantissa),
                     (r.embed_tokens.weight_exponent, m.embed_tokens.weight_exponent),
                     (r.lm_head.weight_mantissa, m.lm_head.weight_mantissa)]:
            assert torch.equal(a, b)
        with torch.no_grad():
            assert torch.equal(r(IDS), m(IDS))


def test_load_peak_memory_bounded(monkeypatch):
    """The quick shape's loads in fresh processes: peak RSS over the baseline after
    ``import torch, llmcore`` <= 1.3x the file + 16 MB. The allowance covers what does not
    scale with the model (allocator arenas, safetensors and the first-call caches of
    torch; ~6-8 MB measured on the 23 MB quick checkpoint); main's code peaked at
    2.4-3.3x there."""
    monkeypatch.chdir(ROOT)  # the child process imports llmcore from here
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import load_memory
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        float_dir, q_dir = load_memory.write_checkpoints("quick", "float32", Path(d), False)
        for path, q in [(float_dir, None), (float_dir, "mxint8"), (q_dir, None)]:
            r = load_memory.measure(path, q, 1)
            assert r["peak_mb"] <= 1.3 * r["file_mb"] + 16, (q, path.name, r)
