"""CPU process set-up: glibc keeps freed blocks, and a bf16 run on a CPU that emulates bf16 is told so."""

import sys

import pytest
import torch

from dropup import cpu


@pytest.fixture
def fresh():
    cpu.keep_freed_memory.cache_clear()
    yield
    cpu.keep_freed_memory.cache_clear()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_the_allocator_is_tuned_unless_turned_off(fresh, monkeypatch):
    assert cpu.keep_freed_memory() in cpu.MMAP_THRESHOLDS
    cpu.keep_freed_memory.cache_clear()
    monkeypatch.setenv("DROPUP_CPU_MALLOC", "system")
    assert not cpu.keep_freed_memory()


@pytest.mark.parametrize("slowdown,warned", [(112.0, True), (0.4, False)])
def test_bf16_on_a_cpu_that_emulates_it_gets_one_line_with_the_fix(monkeypatch, slowdown, warned):
    monkeypatch.setattr(cpu, "bf16_slowdown", lambda: slowdown)
    said = []
    cpu.prepare_cpu_process("bf16-mixed", say=said.append)
    lines = [line for line in said if "bf16" in line]
    assert bool(lines) == warned
    if warned:
        assert "112x slower" in lines[0] and "trainer.precision=32-true" in lines[0]
    said.clear()
    cpu.prepare_cpu_process("32-true", say=said.append)
    assert not [line for line in said if "bf16" in line]


def test_the_bf16_probe_is_the_ratio_of_the_best_times(monkeypatch):
    """Best of three per dtype (a first slow run, e.g. a cold cache, must not count): a mean or a worst time,
    or the ratio inverted, gives another number."""
    times = {torch.float32: iter([0.9, 0.1, 0.2]), torch.bfloat16: iter([5.0, 3.0, 4.0])}
    monkeypatch.setattr(cpu, "_matmul_seconds", lambda dtype, n: next(times[dtype]))
    cpu.bf16_slowdown.cache_clear()
    try:
        assert cpu.bf16_slowdown() == pytest.approx(30.0)
    finally:
        cpu.bf16_slowdown.cache_clear()
