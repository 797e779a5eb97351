"""Shared test conventions.

Every numeric comparison against a reference implementation goes through the `parity`
fixture: it asserts the tolerance and records the measured max |Δ|, and the run ends with a
table of every figure, so that CI output carries the numbers the README quotes.
"""

import pytest
import torch

_PARITY: list[tuple[str, float, float]] = []


def _max_abs_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return (ours.detach().double() - ref.detach().double()).abs().max().item()


@pytest.fixture
def parity():
    """parity(name, ours, ref, atol=1e-4): assert max |ours − ref| ≤ atol and record it."""

    def check(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> float:
        diff = _max_abs_diff(ours, ref)
        _PARITY.append((name, diff, atol))
        assert diff <= atol, f"{name}: max |Δ| = {diff:.3e} > tolerance {atol:.0e}"
        return diff

    return check


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    if not _PARITY:
        return
    terminalreporter.section("parity with the reference implementations (max abs diff)")
    width = max(len(name) for name, _, _ in _PARITY)
    for name, diff, atol in _PARITY:
        terminalreporter.write_line(f"{name:<{width}}  {diff:.2e}  (tolerance {atol:.0e})")
