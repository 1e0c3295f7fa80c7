"""CPU process set-up: glibc keeps freed blocks, and a bf16 run on a CPU that emulates bf16 is told so."""

import sys

import pytest

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


def test_the_bf16_probe_measures_a_ratio():
    assert cpu.bf16_slowdown() > 0
