"""What each compiled kernel takes, per op and device type: the one table of it.

Read by :mod:`llmcore.ops._dispatch` (kernel or reference for a call), by
``csrc/attention/generate_kernels.py`` (the CUDA attention instantiations and the head-dim
list of ``csrc/attention/generated/head_dims.h``) and by the tests. Plain data with no
imports, so the generator can load this file by path without torch.

``KERNELS[op][device_type]`` is a dict with

- ``dtypes``: the dtypes of the op's floating-point input (q, x, k) that the kernel takes,
  spelled as in ``torch`` (``"float16"``);
- ``head_dims``: the head dims with a kernel, or ``None`` for any (or not applicable).

An (op, device type) absent from the table has no kernel: its Python face runs the
plain-PyTorch reference with a one-time warning. Whether a kernel is actually registered
(a CPU-only build has no CUDA kernels) is checked at run time as well.
"""

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
HALF_DTYPES = ("float16", "bfloat16")

# Fused attention (CUDA: one instantiation per head_dim and dtype; the backward has no
# head_dim 256 kernel, so that backward runs the reference).
ATTENTION_CUDA_FWD_HEAD_DIMS = (32, 64, 96, 128, 256)
ATTENTION_CUDA_BWD_HEAD_DIMS = (32, 64, 96, 128)
# Decoding attention over a KV cache (CUDA: tuned for 64 and 128; 256 also built).
DECODE_CUDA_HEAD_DIMS = (64, 128, 256)

_ANY_FLOAT = {"dtypes": FLOAT_DTYPES, "head_dims": None}

KERNELS = {
    "attention_fwd": {
        "cpu": _ANY_FLOAT,
        "cuda": {"dtypes": HALF_DTYPES, "head_dims": ATTENTION_CUDA_FWD_HEAD_DIMS},
    },
    "attention_bwd": {
        "cpu": _ANY_FLOAT,
        "cuda": {"dtypes": HALF_DTYPES, "head_dims": ATTENTION_CUDA_BWD_HEAD_DIMS},
    },
    "attention_varlen_fwd": {
        "cpu": _ANY_FLOAT,
        "cuda": {"dtypes": HALF_DTYPES, "head_dims": ATTENTION_CUDA_FWD_HEAD_DIMS},
    },
    "attention_varlen_bwd": {
        "cpu": _ANY_FLOAT,
        "cuda": {"dtypes": HALF_DTYPES, "head_dims": ATTENTION_CUDA_BWD_HEAD_DIMS},
    },
    "decode_attention": {
        "cpu": _ANY_FLOAT,
        "cuda": {"dtypes": HALF_DTYPES, "head_dims": DECODE_CUDA_HEAD_DIMS},
    },
    "kv_cache_append": {"cpu": _ANY_FLOAT, "cuda": _ANY_FLOAT},
    "bfp_quantize": {"cpu": _ANY_FLOAT, "cuda": _ANY_FLOAT},
    "bfp_dequantize": {"cpu": _ANY_FLOAT, "cuda": _ANY_FLOAT},
    "bfp_linear": {"cpu": _ANY_FLOAT, "cuda": _ANY_FLOAT},
    "bfp_gemm": {"cpu": _ANY_FLOAT, "cuda": _ANY_FLOAT},
    "bfp_act_linear": {"cpu": _ANY_FLOAT},
    "bfp_act_linear_multi": {"cpu": _ANY_FLOAT},
    # the GEMV tile layout of BFP weights (byte permutations: no float dtype involved)
    "bfp_tiles_pack": {"cpu": _ANY_FLOAT},
    "bfp_tiles_unpack": {"cpu": _ANY_FLOAT},
    "bfp_embedding": {"cpu": _ANY_FLOAT},  # BFP table lookup, either layout
    "linear_gemv": {"cpu": _ANY_FLOAT},  # dense decode GEMV, M <= 16 rows
    # fused decoder-step ops (inference only)
    "rms_norm": {"cpu": _ANY_FLOAT},
    "add_rms_norm": {"cpu": _ANY_FLOAT},
    "rope_": {"cpu": _ANY_FLOAT},
    "silu_mul": {"cpu": _ANY_FLOAT},
    "argmax_last": {"cpu": _ANY_FLOAT},  # greedy decoding's pick over the vocabulary
    "decoder_layers": {"cpu": _ANY_FLOAT},
    "greedy_decode": {"cpu": _ANY_FLOAT},  # decoder_layers + embedding, head and pick, N steps
}


def supports(op: str, device_type: str, dtype: str | None = None,
             head_dim: int | None = None) -> bool:
    """True when the table lists a kernel of ``op`` on ``device_type`` for this dtype (a
    torch-style name; None: not checked) and head_dim (None: not checked)."""
    entry = KERNELS.get(op, {}).get(device_type)
    if entry is None:
        return False
    if dtype is not None and dtype not in entry["dtypes"]:
        return False
    dims = entry["head_dims"]
    return head_dim is None or dims is None or head_dim in dims


def kernel_dtypes(op: str, device_type: str) -> tuple[str, ...]:
    """The dtypes ``op``'s kernel takes on ``device_type`` (empty when it has none)."""
    entry = KERNELS.get(op, {}).get(device_type)
    return () if entry is None else entry["dtypes"]


def kernel_head_dims(op: str, device_type: str) -> tuple[int, ...] | None:
    """The head dims ``op``'s kernel takes on ``device_type``; None for any."""
    entry = KERNELS.get(op, {}).get(device_type)
    return () if entry is None else entry["head_dims"]
