"""The integers that define attention dropout's counter-based mask, shared by the op's reference
(fastdistil/ops/attention.py: dropout_keep_ref) and the Triton kernels (kernels/attention.py): pure Python with
no imports, so both import it without importing each other."""


def fold_seed(seed: int) -> int:
    """The 31-bit seed the kernels hash with (both halves of a 64-bit seed count; 31 bits keep it one
    integer type for Triton)."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & 0x7FFFFFFF


def dropout_threshold(dropout_p: float) -> int:
    """keep iff (hash >> 8) >= threshold: a 24-bit uniform compared with dropout_p * 2^24."""
    return min(int(round(dropout_p * (1 << 24))), (1 << 24) - 1) if dropout_p > 0 else 0
