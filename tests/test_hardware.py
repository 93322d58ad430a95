"""What the machine offers: bf16 only where the CPU multiplies it natively, threads only on free cores, and every
run's cost recorded."""
from __future__ import annotations

import os

import pytest
import torch

from budgetlora import hardware, runs
from budgetlora.config import Config
from budgetlora.training import loop


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what the CPU probes answer; the cached answer is dropped before and after."""
    def set_to(native: bool, amx: bool = False):
        hardware.cpu_has_native_bf16.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    yield set_to
    hardware.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("native,amx,expected", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(cpu_bf16, native, amx, expected):
    cpu_bf16(native, amx)
    assert hardware.resolve_precision("auto") == expected
    assert loop.make_accelerator(Config().train).mixed_precision == ("bf16" if expected == "bf16" else "no")
    assert hardware.inference_dtype("auto", "cpu") == (torch.bfloat16 if expected == "bf16" else None)


def test_explicit_settings_are_kept(cpu_bf16):
    cpu_bf16(False)
    assert hardware.resolve_precision("fp32") == "fp32"
    assert hardware.resolve_precision("bf16") == "bf16"  # asked for: runs (emulated) even without native support
    assert hardware.resolve_precision("fp16", "cpu") == "fp32"  # no CPU fp16 autocast worth having
    assert hardware.inference_dtype("fp32", "cpu") is None


def test_cpuinfo_flags_answer_when_torch_has_no_probe(monkeypatch, tmp_path):
    hardware.cpu_has_native_bf16.cache_clear()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    info = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *a, **k):
        return real_open(info if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    try:
        info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
        assert hardware.cpu_has_native_bf16() is True
        hardware.cpu_has_native_bf16.cache_clear()
        info.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
        assert hardware.cpu_has_native_bf16() is False
    finally:
        hardware.cpu_has_native_bf16.cache_clear()


def test_free_cores_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for busy, expected in [(0.1, 4), (0.5, 4), (0.7, 3), (1.2, 3), (3.9, 1), (9.0, 1)]:
        monkeypatch.setattr(hardware, "busy_cores", lambda window=0.25, busy=busy: busy)
        assert hardware.free_cores() == expected


@pytest.mark.slow
def test_busy_cores_sees_a_spinning_process():
    import multiprocessing

    idle = hardware.busy_cores(0.3)
    ctx = multiprocessing.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    spin = ctx.Process(target=_spin, args=(started, stop), daemon=True)
    spin.start()
    try:
        # a spawned child re-imports this module (torch included): on a cold machine that takes seconds, so wait
        # for the child to say it spins rather than guessing how long it needs
        assert started.wait(120), "the spinning child never started"
        busy = hardware.busy_cores(0.5)
    finally:
        stop.set()
        spin.join()
    # one more core's worth of work, give or take the machine's other load (a saturated machine cannot show more)
    assert busy >= min(idle + 0.6, (os.cpu_count() or 1) - 0.3)


def _spin(started, stop):
    started.set()
    while not stop.is_set():
        pass


def test_threads_are_not_part_of_the_run_id():
    cfg = Config()
    assert cfg.replace(**{"train.threads": 1}).run_id == cfg.run_id
    assert cfg.replace(**{"train.precision": "fp32"}).run_id != cfg.run_id


def test_peak_memory_sees_an_allocation():
    import mmap
    import time

    with hardware.PeakMemory(every=0.01) as mem:
        # fresh anonymous pages, each touched: a malloc'd block could reuse heap this process already holds
        block = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(block), mmap.PAGESIZE):
            block[i] = 1
        time.sleep(0.1)
        block.close()
    got = mem.as_dict()
    assert got["peak_rss_mb"] - got["start_rss_mb"] >= 48


def test_a_run_records_what_it_cost(tiny_run):
    m = runs.read_json(tiny_run / runs.METRICS)
    assert m["precision"] == hardware.resolve_precision("auto")
    assert m["threads"] >= 1 and m["peak_rss_mb"] >= m["start_rss_mb"] > 0
    assert 0 < m["val_time_s"] < m["train_time_s"]
    hist = (tiny_run / runs.HISTORY).read_text().splitlines()
    assert hist[0].endswith("elapsed_s,train_s")
    last = hist[-1].split(",")
    assert float(last[-1]) <= float(last[-2])  # training time never exceeds the clock that includes validation


def test_the_card_states_the_cost(tiny_run):
    from budgetlora.training.card import CARD, model_card

    m = runs.read_json(tiny_run / runs.METRICS)
    from budgetlora.adapters.budget import plan

    cfg = runs.load_config(tiny_run)
    card = model_card(cfg, m, plan(cfg).as_dict())
    assert f"(ran {m['precision']})" in card and "MiB resident" in card and f"{m['threads']} thread(s)" in card
    assert (tiny_run / CARD).is_file()


def test_the_api_answers_a_text_the_same_whatever_shares_its_batch(tiny_run):
    """budgetlora.load (and serve, which batches requests) runs plain fp32: under bf16 a text's probabilities move
    with its batch's composition; bulk predict follows the run's precision."""
    import numpy as np

    import budgetlora

    texts = runs.read_json(tiny_run / runs.VERIFY)["texts"][:24]
    clf = budgetlora.load(tiny_run, verify=False)
    together = clf.predict_proba(texts)
    alone = np.concatenate([clf.predict_proba([t]) for t in texts[:6]])
    assert np.abs(together[:6] - alone).max() < 1e-5


@pytest.mark.slow
def test_train_threads_hold_for_the_run_only(small_csvs, tmp_path):
    from budgetlora.training.train import train
    from tests.conftest import tiny_config

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's own setting, which the run's single thread must not outlive
    try:
        run = train(tiny_config(small_csvs, **{"train.max_steps": 2, "train.threads": 1}), root=tmp_path)
        assert runs.read_json(run / runs.METRICS)["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
