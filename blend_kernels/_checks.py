"""Input checks shared by the public functions: caller misuse raises ValueError with the numbers.

Shape, dtype and device checks read tensor metadata only. Range checks on index tensors read the
values (a few small ops; on CUDA one sync), and remember them: a later check of the very same
(unmodified) index tensor against any bound its values satisfy is skipped -- the query path reuses
one index tensor for every layer, so a pass pays the check once, not once per layer (on CPU that was ~12 us a call,
two calls per layer per request in a decode step).
"""

from __future__ import annotations

import weakref

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, {str(t.dtype).removeprefix('torch.')}, {t.device}"


def require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def require_float(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} ({describe(t)}) must have a float dtype in ({allowed}); cast it first")


def require_int(name: str, t: torch.Tensor) -> None:
    if t.dtype not in INT_DTYPES:
        raise ValueError(f"{name} ({describe(t)}) must be an integer tensor (int64), not {t.dtype}")


def require_dim(name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} ({describe(t)}) must be {dim}-D {layout}")


def require_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must share one device, got {listing}; move them with .to(device)")
    return first


# id(tensor) -> (weakref, version, min, max, unique): the values of a live tensor, read when it was checked.
_checked: dict[int, tuple[weakref.ref, int, int, int, bool]] = {}


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors (made under
    torch.inference_mode), which keep none: chunkcache's forward passes normal tensors for that."""
    return None if t.is_inference() else t._version


def _already_checked(t: torch.Tensor, lower: int, upper: int, unique: bool) -> bool:
    entry = _checked.get(id(t))
    if entry is None or entry[0]() is not t or _version(t) is None or entry[1] != _version(t):
        return False
    _, _, smallest, largest, uniq = entry
    return lower <= smallest and largest < upper and (uniq or not unique)


def _remember(t: torch.Tensor, smallest: int, largest: int, unique: bool) -> None:
    """Record what a check read of `t`: its smallest and largest values and whether they are unique."""
    if _version(t) is None:
        return  # no version to tell a later in-place change by: checked again next time
    key = id(t)
    # The callback drops the entry when the tensor dies, so a recycled id never matches a stale one.
    _checked[key] = (weakref.ref(t, lambda _, key=key: _checked.pop(key, None)), t._version, smallest, largest,
                     unique)


def require_in_range(name: str, index: torch.Tensor, lower: int, upper: int, *, unique: bool = False) -> None:
    """Every value v of the 1-D `index` satisfies lower <= v < upper (and is unique if asked)."""
    if index.numel() == 0 or _already_checked(index, lower, upper, unique):
        return
    facts = [index.min(), index.max()]
    if unique:
        ordered = torch.sort(index).values
        facts.append((ordered[1:] == ordered[:-1]).any())
    # One read of all the facts (on CUDA one sync). The values themselves are remembered, so a later
    # check of the same tensor against any bound they satisfy costs nothing.
    lo, hi, *dup = torch.stack([f.to(torch.int64) for f in facts]).tolist()
    if lo < lower or hi >= upper:
        raise ValueError(f"{name} values must lie in [{lower}, {upper}), got min {lo}, max {hi} ({describe(index)})")
    if dup and dup[0]:
        raise ValueError(f"{name} ({describe(index)}) must not repeat a value; deduplicate it (torch.unique)")
    _remember(index, lo, hi, unique)
