"""The one reading of a ``--device`` string (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

The parent validates the string before anything runs (``milbench run``,
``sweep``, ``tune``), without importing torch; the child reads the same string
again to know which GPU to measure and which torch device to run on. Both use
:func:`parse_device`, so the two sides can never disagree on what a device
string means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from milbench.errors import MilbenchError

#: What every device error lists as valid.
DEVICE_HELP = "valid: auto, cpu, cuda, cuda:N"


@dataclass(frozen=True)
class DeviceRequest:
    """A parsed ``--device``: ``text`` is its canonical spelling (stripped, lower case)."""

    text: str
    #: ``auto``, ``cpu`` or ``cuda``.
    kind: str
    #: The CUDA device index asked for (``cuda`` is 0); None for ``auto`` and ``cpu``.
    index: int | None = None


def parse_device(text: str) -> DeviceRequest:
    """``auto``/``cpu``/``cuda``/``cuda:N`` (any case, surrounding blanks ignored) →
    :class:`DeviceRequest`; anything else is a one-line :class:`MilbenchError`."""
    d = text.strip().lower()
    if d in ("auto", "cpu"):
        return DeviceRequest(d, d)
    if d == "cuda":
        return DeviceRequest(d, "cuda", 0)
    if d.startswith("cuda:") and d[5:].isdigit():
        return DeviceRequest(d, "cuda", int(d[5:]))
    raise MilbenchError(f"bad --device {text!r}; {DEVICE_HELP}")


def check_device(text: str, probe: bool = True) -> str:
    """Validate ``--device`` and return its canonical spelling.

    With ``probe`` (the machine that will run the points), a CUDA device must
    exist: NVML answers without importing torch. Without it (a sweep whose
    workers run elsewhere: a login node sees none of their GPUs) only the
    spelling is checked.
    """
    request = parse_device(text)
    if request.kind != "cuda" or not probe:
        return request.text
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:
        raise MilbenchError(f"--device {text}: no CUDA device on this machine "
                            f"(NVML: {type(exc).__name__}); use --device cpu or auto") from None
    if (request.index or 0) >= count:
        raise MilbenchError(f"--device {text}: only {count} CUDA device(s) visible; {DEVICE_HELP}")
    return request.text


def torch_device(request: DeviceRequest) -> Any:
    """The torch device a request runs on (``auto``: CUDA when available, else CPU). Imports torch."""
    import torch

    if request.kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(request.text)
