"""Names of the floating-point dtypes melt loads and saves models in."""

import torch

from .errors import InvalidArgumentError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# safetensors header dtype codes -> torch dtypes (only those a model checkpoint can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


AUTO = "auto"  # the checkpoint's own (stored) dtype


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (and fp32, fp16)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise InvalidArgumentError(f"unsupported dtype {name}; use one of fp32, bf16, fp16")
        return name
    key = name.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[key]


def dtype_or_stored(name: str | torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    """The dtype a ``--dtype`` value asks for: ``auto`` (or None) is ``stored``, the checkpoint's own;
    one vocabulary for every command."""
    return stored if name is None or name == AUTO else parse_dtype(name)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a dtype of at least fp32 precision: half types are computed in fp32, fp64 stays fp64
    (``.float()`` would round a float64 model down, which the CPU-independent float64 tests rely on not doing)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling HF configs use)."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
